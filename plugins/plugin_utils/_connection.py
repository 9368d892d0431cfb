# PRIVATE to the collection: not a public API, may change without notice.
"""Shared body of the mitogen_ssh and mitogen_local connection plugins.

Runs on: the controller (Ansible workers, and the main process for
``meta: reset_connection``).

A connection is a *route spec* (what identifies one agent: host, user, port,
ssh options, interpreter...) plus the agent's context id. The mux starts the
agent the first time any worker asks for the spec and keeps it for the run;
``close()`` forgets only the id, ``reset()`` asks the mux to stop the agent.
"""
from __future__ import annotations

import os
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.mitogen.svc.ansible_mitogen_svc import (BrokenError, CallError,
                                                                 RoutingError, TimeoutError)
from ansible_collections.mitogen.svc.plugins.plugin_utils import _mux

display = Display()

#: Remote exception types that mean "the target could not be reached".
_UNREACHABLE_TYPES = ("ansible_mitogen_svc.errors.BootstrapError",
                      "ansible_mitogen_svc.errors.PasswordError")
#: Files up to this size travel inline in one call; bigger ones stream
#: from the mux's FileService (windowed, so memory stays bounded).
INLINE_FILE_LIMIT = 1024 * 1024
FETCH_CHUNK = 4 * 1024 * 1024


class AgentConnection(ConnectionBase):
    """Base of the connection plugins that run through an agent."""

    has_pipelining = True

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent_id: int | None = None
        self._client: _mux.Client | None = None

    # -- subclasses ----------------------------------------------------------
    def _route_spec(self) -> dict[str, t.Any]:
        raise NotImplementedError

    def _shell_argv(self, cmd: str) -> list[str]:
        raise NotImplementedError

    def _use_pty(self, in_data: bytes | None, sudoable: bool) -> bool:
        return False

    def _describe_host(self) -> str:
        return to_text(self._play_context.remote_addr)

    # -- plumbing ------------------------------------------------------------
    def _connect_failure(self, exc: BaseException) -> AnsibleConnectionFailure:
        return AnsibleConnectionFailure("Failed to connect to the host via %s: %s"
                                        % (self.transport, exc))

    def _connect(self) -> "AgentConnection":
        if self._connected and self._agent_id is not None:
            return self
        spec = self._route_spec()
        timeout = float(spec.get("timeout") or 30) + 30.0
        try:
            self._client = _mux.client()
            reply = self._client.connection_call("get", timeout, spec=spec)
        except CallError as exc:
            if exc.type_name in _UNREACHABLE_TYPES:
                raise self._connect_failure(exc.message) from exc
            raise AnsibleError("mitogen.svc could not start an agent for %s: %s"
                               % (self._describe_host(), exc)) from exc
        except (OSError, BrokenError, RoutingError, TimeoutError) as exc:
            raise self._connect_failure(exc) from exc
        self._agent_id = int(reply["id"])
        self._connected = True
        display.vvvv("agent %s (context %d) ready" % (reply.get("name"), self._agent_id),
                     host=self._describe_host())
        return self

    def _target(self, function: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        assert self._client is not None and self._agent_id is not None
        try:
            return self._client.target_call(self._agent_id, function, *args, **kwargs)
        except (BrokenError, RoutingError) as exc:
            self._agent_id = None
            self._connected = False
            raise AnsibleConnectionFailure("mitogen.svc agent on %s was lost: %s"
                                           % (self._describe_host(), exc)) from exc

    # -- ConnectionBase ------------------------------------------------------
    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        display.vvv("EXEC %s" % to_text(cmd), host=self._describe_host())
        if sudoable and self.become is not None and self.become.expect_prompt():
            # The prompt would wait on the pty forever: fail clearly instead.
            raise AnsibleError("mitogen.svc does not support %s with a password yet "
                               "(become without a password works)" % self.become.name)
        use_pty = self._use_pty(in_data, sudoable)
        try:
            res = self._target("run_command", self._shell_argv(to_text(cmd)), in_data, use_pty)
        except CallError as exc:
            raise AnsibleError("failed to run a command on %s: %s"
                               % (self._describe_host(), exc)) from exc
        rc, stdout, stderr = int(res["rc"]), res["stdout"], res["stderr"]
        if sudoable and self.become is not None and self.become.success:
            stdout, stderr = self._strip_become(stdout, stderr)
        return rc, stdout, stderr

    def _strip_become(self, stdout: bytes, stderr: bytes) -> tuple[bytes, bytes]:
        """Drop the become plugin's success line, as the ssh plugin does,
        and raise the same errors it raises for a bad or missing password."""
        assert self.become is not None
        found = False
        outs = []
        for data in (stdout, stderr):
            kept = []
            for line in data.splitlines(True):
                if not found and self.become.check_success(line):
                    found = True
                    continue
                kept.append(line)
            outs.append(b"".join(kept))
        if not found:
            both = stdout + b"\n" + stderr
            if any(self.become.check_incorrect_password(ln) for ln in both.splitlines()):
                raise AnsibleError("Incorrect %s password" % self.become.name)
            if any(self.become.check_missing_password(ln) for ln in both.splitlines()):
                raise AnsibleError("Missing %s password" % self.become.name)
        return outs[0], outs[1]

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._describe_host())
        b_in = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.exists(b_in):
            raise AnsibleFileNotFound("file or module does not exist: %s" % in_path)
        try:
            if os.path.getsize(b_in) <= INLINE_FILE_LIMIT:
                with open(b_in, "rb") as fp:
                    self._target("write_file", out_path, fp.read())
            else:
                assert self._client is not None
                real = self._client.connection_call("register_file", 60.0,
                                                    path=os.path.abspath(in_path))
                self._target("pull_file", real, out_path)
        except CallError as exc:
            raise AnsibleError("failed to transfer file to %s: %s" % (out_path, exc)) from exc

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._describe_host())
        offset = 0
        try:
            with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as fp:
                while True:
                    res = self._target("read_chunk", in_path, offset, FETCH_CHUNK)
                    fp.write(res["data"])
                    offset += len(res["data"])
                    if not res["data"] or offset >= res["size"]:
                        break
        except CallError as exc:
            raise AnsibleError("failed to transfer file from %s: %s" % (in_path, exc)) from exc

    def close(self) -> None:
        """Cheap: the agent stays up for the next task."""
        self._agent_id = None
        self._connected = False

    def reset(self) -> None:
        """Stop the agent; the next task starts a fresh interpreter."""
        spec = self._route_spec()
        cur = _mux.transient_client()
        if cur is None:
            self.close()
            return
        try:
            cur.connection_call("reset", 60.0, spec=spec)
        except (CallError, BrokenError, RoutingError, TimeoutError) as exc:
            display.warning("mitogen.svc: reset of %s failed: %s" % (self._describe_host(), exc))
        finally:
            cur.close()
        self.close()
