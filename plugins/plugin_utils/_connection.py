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

import ast
import os
import re
import shlex
import typing as t

from ansible.errors import (AnsibleAuthenticationFailure, AnsibleConnectionFailure, AnsibleError,
                            AnsibleFileNotFound)
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.mitogen.svc.ansible_mitogen_svc import (BrokenError, CallError,
                                                                 RoutingError, TimeoutError)
from ansible_collections.mitogen.svc.plugins.plugin_utils import _mux, _payload

display = Display()

#: Remote exception types that mean "the target could not be reached".
_BOOTSTRAP_ERROR = "ansible_mitogen_svc.errors.BootstrapError"
_PASSWORD_ERROR = "ansible_mitogen_svc.errors.PasswordError"
_UNREACHABLE_TYPES = (_BOOTSTRAP_ERROR, _PASSWORD_ERROR)
#: A bootstrap failure meaning "no such interpreter on the target" (the
#: shell's 127): commands then run the vanilla way, so ``raw`` works.
_NO_PYTHON = re.compile(r"status 127\b|\b127\)|not found|No such file or directory")
_SSH_FAILED = re.compile(r"process exited \(status 255\) before the handshake; output: (.*)$",
                         re.S)
#: ssh prompted again for its password: what it said in between.
_SSH_WRONG_PASSWORD = re.compile(r"Incorrect ssh password(?:: (.*))?$", re.S)
#: Files up to this size travel inline in one call; bigger ones stream
#: from the mux's FileService (windowed, so memory stays bounded).
INLINE_FILE_LIMIT = 1024 * 1024
FETCH_CHUNK = 4 * 1024 * 1024
RUNNER_MODULE = "ansible_mitogen_svc.runner"


class AgentConnection(ConnectionBase):
    """Base of the connection plugins that run through an agent."""

    has_pipelining = True
    #: How error messages name the transport ("ssh", like vanilla's).
    _transport_word = "agent"
    # Modules always travel in the command's input (what pipelining does):
    # the agent runs them without temp files, whatever ``pipelining`` says.
    always_pipeline_modules = True
    #: Seconds is_pipelining_enabled() waits for a running agent's id
    #: before it answers without it (see there).
    _CONNECT_GRACE = 0.05

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._agent_id: int | None = None
        self._agent_executable: str | None = None
        #: Agents the mux just started for this connection (nothing sent yet).
        self._fresh: set[int] = set()
        self._client: _mux.Client | None = None
        self._fallback: ConnectionBase | None = None
        # The mux's answer to "get", while it has not been collected.
        self._pending: tuple[t.Any, float, dict[str, t.Any]] | None = None
        # A failed connect that is_pipelining_enabled() saw: the next
        # _connect() raises it rather than logging in again (vanilla tries
        # once per command: a wrong password must not count twice).
        self._deferred_failure: AnsibleError | None = None
        self._var_options: t.Any = None
        self._module: dict[str, t.Any] | None = None
        # build_become_command() output -> its input, for the last few calls.
        self._become_inputs: dict[str, str] = {}
        # Chained agents (become, other interpreter) by id -> their route.
        self._chained: dict[int, dict[str, t.Any]] = {}

    # -- subclasses ----------------------------------------------------------
    def _route_spec(self) -> dict[str, t.Any]:
        raise NotImplementedError

    def _shell_argv(self, cmd: str) -> list[str]:
        raise NotImplementedError

    def _use_pty(self, in_data: bytes | None, sudoable: bool) -> bool:
        return False

    def _describe_host(self) -> str:
        return to_text(self._play_context.remote_addr)

    def _vanilla_connection(self) -> ConnectionBase | None:
        """The stock plugin to use when the target has no usable Python."""
        return None

    def set_options(self, task_keys: t.Any = None, var_options: t.Any = None,
                    direct: t.Any = None) -> None:
        self._var_options = var_options  # replayed into a vanilla fallback
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)

    # -- plumbing ------------------------------------------------------------
    def _connect_failure(self, exc: t.Any) -> AnsibleConnectionFailure:
        """The error vanilla raises when it cannot log in (as with its
        ``_handle_error``); ssh's own failure keeps what ssh said in
        ``msvc_ssh_stderr``, for :func:`data_not_sent`."""
        text = str(exc)
        wrong = _SSH_WRONG_PASSWORD.match(text)
        if wrong and self._transport_word == "ssh":
            # ssh prompted again (password_mechanism=sshpass): sshpass's 5.
            return AnsibleAuthenticationFailure("Invalid/incorrect password: %s"
                                                % (wrong.group(1) or ""))
        # ssh itself failed (its status 255): say what it said, as vanilla does.
        m = _SSH_FAILED.search(text)
        if m:
            text = ast.literal_eval(m.group(1)) if m.group(1) != "(none)" else ""
            text = text.replace("\r\r\n", "\r\n")  # ssh's lines through a pty
        failure = AnsibleConnectionFailure("Failed to connect to the host via %s: %s"
                                           % (self._transport_word, text))
        if m:
            failure.msvc_ssh_stderr = text  # type: ignore[attr-defined]
        return failure

    def data_not_sent(self, failure: AnsibleConnectionFailure) -> AnsibleConnectionFailure:
        """``failure`` as vanilla words it when ssh fails while a command's
        stdin was being sent (a pipelined module): ssh's output as it was."""
        said = getattr(failure, "msvc_ssh_stderr", None)
        if said is None:
            return failure
        return AnsibleConnectionFailure(
            'Data could not be sent to remote host "%s". Make sure this host can be reached '
            "over ssh: %s" % (self._describe_host(), said + "\r\n" if said else ""))

    def _raise_if_mux_lost(self, exc: BaseException) -> None:
        if self._client is not None and self._client.mux_lost():
            self._agent_id = None
            self._connected = False
            raise AnsibleConnectionFailure("lost the mitogen.svc mux while talking to %s (%s)"
                                           % (self._describe_host(), exc)) from None

    def _start_connect(self) -> None:
        """Ask the mux for our agent without waiting for the answer (the
        mux starts it if need be); :meth:`_connect` collects it."""
        if self._pending is not None or self._deferred_failure is not None or (
                self._connected and (self._agent_id is not None or self._fallback is not None)):
            return
        spec = self._route_spec()
        timeout = float(spec.get("timeout") or 30) + 60.0
        try:
            self._client = _mux.client()
        except ConnectionError as exc:  # not the host's fault: say whose
            raise AnsibleConnectionFailure("cannot reach %s: %s" % (self._describe_host(), exc)
                                           ) from None
        self._pending = (self._client.connection_call_async("get", spec=spec), timeout, spec)

    def _connect(self) -> "AgentConnection":
        if self._connected and (self._agent_id is not None or self._fallback is not None):
            return self
        if self._deferred_failure is not None:
            failure, self._deferred_failure = self._deferred_failure, None
            raise failure
        try:
            self._start_connect()
            assert self._pending is not None
            pending, timeout, spec = self._pending
            self._pending = None
            reply = pending.get(timeout)
        except CallError as exc:
            # (ssh's own failure, status 255, may say "not found" too:
            # e.g. its -v output. That is no missing Python.)
            if (exc.type_name == _BOOTSTRAP_ERROR and _NO_PYTHON.search(exc.message)
                    and not _SSH_FAILED.search(exc.message)):
                fallback = self._vanilla_connection()
                if fallback is not None:
                    display.vvv("no Python %s on the target (%s): this task runs the vanilla way"
                                % (spec.get("python"), exc.message), host=self._describe_host())
                    self._fallback = fallback
                    self._connected = True
                    return self
            if exc.type_name in _UNREACHABLE_TYPES:
                raise self._connect_failure(exc.message) from None
            raise AnsibleError("mitogen.svc could not start an agent for %s: %s"
                               % (self._describe_host(), exc)) from None
        except (OSError, BrokenError, RoutingError, TimeoutError) as exc:
            self._raise_if_mux_lost(exc)
            raise self._connect_failure(exc) from None
        self._agent_id = int(reply["id"])
        self._agent_executable = reply.get("executable")
        if reply.get("fresh"):
            self._fresh.add(self._agent_id)
        self._connected = True
        display.vvvv("agent %s (context %d) ready" % (reply.get("name"), self._agent_id),
                     host=self._describe_host())
        return self

    def _target(self, function: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        assert self._agent_id is not None
        return self._call(self._agent_id, _mux.TARGET_MODULE, function, *args, **kwargs)

    def _call(self, agent_id: int, module: str, function: str, *args: t.Any,
              **kwargs: t.Any) -> t.Any:
        assert self._client is not None
        try:
            return self._client.call_function(agent_id, module, function, *args, **kwargs)
        except (BrokenError, RoutingError) as exc:
            self._raise_if_mux_lost(exc)
            lost = self._chained.pop(agent_id, None)
            if lost is not None:  # the mux cannot see it died: tell it
                try:
                    self._client.connection_call("reset", 30.0, spec=lost)
                except Exception:
                    pass
            self._agent_id = None
            self._connected = False
            raise AnsibleConnectionFailure("mitogen.svc agent on %s was lost: %s"
                                           % (self._describe_host(), exc)) from None

    def is_pipelining_enabled(self, wrap_async: bool = False) -> bool:
        # Modules always travel pipelined through an agent; the answer
        # differs only when the target has no Python (the stock plugin then
        # answers). Vanilla asks this before it builds the module: while
        # an agent is still starting, answer without waiting for it when
        # the stock plugin would answer the same, so the module is built
        # while the agent starts.
        try:
            self._start_connect()
        except Exception:
            pass  # _connect() reports it
        pending = self._pending[0] if self._pending is not None else None
        if (pending is not None and self._fallback is None
                and not pending.wait_ready(self._CONNECT_GRACE)):
            ours = bool(super().is_pipelining_enabled(wrap_async))
            try:
                stock = self._vanilla_connection()
                same = stock is None or bool(stock.is_pipelining_enabled(wrap_async)) == ours
            except Exception:
                same = False
            if same:
                return ours
        try:
            self._connect()
        except AnsibleError as exc:
            self._deferred_failure = exc  # the first command reports it
        if self._fallback is not None:
            return bool(self._fallback.is_pipelining_enabled(wrap_async))
        return bool(super().is_pipelining_enabled(wrap_async))

    def agent_ready(self) -> bool:
        """Connect; True when an agent (not the vanilla fallback) serves us."""
        self._connect()
        return self._agent_id is not None

    def rpc(self, function: str, *args: t.Any) -> t.Any:
        """Call ``function`` of ansible_mitogen_svc.target in the agent of
        the login user (what vanilla runs ``sudoable=False`` commands as).

        Raises:
            AnsibleError: the call failed on the target.
        """
        self._connect()
        if self._agent_id is None:
            raise AnsibleError("no agent on %s" % self._describe_host())
        try:
            return self._target(function, *args)
        except CallError as exc:
            raise AnsibleError("%s failed on %s: %s"
                               % (function, self._describe_host(), exc)) from None

    # -- become bookkeeping --------------------------------------------------
    def set_become_plugin(self, plugin: t.Any) -> None:
        super().set_become_plugin(plugin)
        if plugin is None:
            return
        build = plugin.build_become_command
        inputs = self._become_inputs

        def recording(cmd: str, shell: t.Any) -> str:
            out = build(cmd, shell)
            if len(inputs) > 8:
                inputs.clear()
            inputs[out] = cmd
            return out

        plugin.build_become_command = recording

    def _unwrap_become(self, cmd: str) -> str | None:
        """The command as it was before the become plugin wrapped it (with
        whatever Ansible put around the wrapped command: ``executable -c``,
        ``&& sleep 0``...), or None if it was not wrapped."""
        for out, plain in self._become_inputs.items():
            if out in cmd:
                return cmd.replace(out, plain, 1)
            try:
                words = shlex.split(cmd)
            except ValueError:
                continue
            for i, word in enumerate(words):
                if out in word:
                    words[i] = word.replace(out, plain, 1)
                    return " ".join(shlex.quote(w) for w in words)
        return None

    # -- modules -------------------------------------------------------------
    def expect_module(self, interpreter: str | None, env: dict[str, str] | None,
                      run: dict[str, t.Any] | None = None, piped: bool = True,
                      path: str | None = None) -> None:
        """Called by the action mixin: the next exec_command() runs an
        AnsiballZ wrapper with ``interpreter`` (None: one with arguments,
        run as a command) and task environment ``env`` (None: forget it);
        ``run``: an async job, an answer or an isolation (see _async.py);
        ``piped``: vanilla would pipeline it (else it would run the module
        from the file ``path``, with a tty where its transport gives
        commands one)."""
        self._module = (None if env is None
                        else {"interpreter": interpreter, "env": env, "run": run,
                              "piped": piped, "path": path})

    def _agent_for(self, become: bool, python: str | None = None) -> int | None:
        """The agent that runs ``python`` (default: the login agent's) as
        the login user, or through the task's become plugin; None when the
        command must run the vanilla way (no agent: vanilla fallback)."""
        self._connect()
        if self._agent_id is None:
            return None
        spec = self._route_spec()
        python = python or self._agent_executable or spec.get("python")
        timeout = float(spec.get("timeout") or 30)
        if become:
            assert self.become is not None
            from ansible_collections.mitogen.svc.plugins.plugin_utils._become import become_hop
            hop = become_hop(self.become, self._shell, str(python), timeout)
        elif python in (spec.get("python"), self._agent_executable):
            return self._agent_id
        else:
            hop = {"command": None, "python": python, "name": "python", "timeout": timeout}
        spec["chain"] = [hop]
        try:
            spec["become_cap"] = int(self.get_option("become_cap"))
        except KeyError:
            pass
        assert self._client is not None
        try:
            reply = self._client.connection_call("get", timeout + 30.0, spec=spec)
        except CallError as exc:
            if exc.type_name == _PASSWORD_ERROR:
                raise AnsibleError(exc.message) from None  # as vanilla: "Incorrect sudo password"
            if exc.type_name == _BOOTSTRAP_ERROR and not become and _NO_PYTHON.search(exc.message):
                return None  # vanilla reports the missing interpreter
            raise AnsibleError("mitogen.svc could not start %s on %s: %s"
                               % ("become (%s)" % self.become.name if become and self.become
                                  else python, self._describe_host(), exc)) from None
        except (BrokenError, RoutingError, TimeoutError) as exc:
            raise self._connect_failure(exc) from None
        self._chained[int(reply["id"])] = spec
        if reply.get("fresh"):
            self._fresh.add(int(reply["id"]))
        display.vvvv("%s agent %s (context %s) ready" % (
            "become" if become else "interpreter", reply.get("name"), reply["id"]),
            host=self._describe_host())
        return int(reply["id"])

    def _exec_module(self, module: dict[str, t.Any], data: bytes,
                     become: bool) -> tuple[int, bytes, bytes] | None:
        interp = str(module["interpreter"])
        agent_id = self._agent_for(become, interp)
        run = module.get("run") or {}
        if "job" in run or "answer" in run:
            from ansible_collections.mitogen.svc.plugins.plugin_utils import _async
            return _async.exec_module(self, agent_id, interp, data, module)
        if agent_id is None:
            return None
        part = _payload.split(data)
        display.vvvv("module runs in the %s zygote of agent %d (zip %s)"
                     % (interp, agent_id, part.digest), host=self._describe_host())
        args = (part.head, part.tail, part.digest, module["env"] or {},
                _payload.zygote_key(interp), _payload.PRELOAD)
        opts: dict[str, t.Any] = {"isolation": run["isolation"]} if run.get("isolation") else {}
        tty = bool(module.get("tty"))
        if tty:  # as vanilla's module run from a file by ssh -tt
            opts.update(tty=True, term=os.environ.get("TERM"))
        if module.get("path"):  # the file vanilla would run: tracebacks name it
            opts["path"] = module["path"]
        # The shell vanilla's module command runs in (it reports a kill).
        opts["shell"] = to_text(getattr(self._play_context, "executable", None) or "/bin/sh")
        first: dict[str, t.Any] = {}
        if agent_id in self._fresh and part.digest:
            # Just started for us: it cannot hold the zip, so send it now
            # rather than after a {"missing"} answer.
            self._fresh.discard(agent_id)
            first["blob"] = part.blob
        try:
            res = self._call(agent_id, RUNNER_MODULE, "run_module", *args, **opts, **first)
            if "missing" in res:
                res = self._call(agent_id, RUNNER_MODULE, "run_module", *args, blob=part.blob,
                                 **opts)
        except CallError as exc:
            raise AnsibleError("failed to run a module on %s: %s"
                               % (self._describe_host(), exc)) from None
        if tty:
            return int(res["rc"]), res["stdout"], res["stderr"] + self._tty_closed_message()
        return int(res["rc"]), res["stdout"], res["stderr"]

    # -- ConnectionBase ------------------------------------------------------
    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        if self._fallback is not None:
            return t.cast("tuple[int, bytes, bytes]",
                          self._fallback.exec_command(cmd, in_data=in_data, sudoable=sudoable))
        display.vvv("EXEC %s" % to_text(cmd), host=self._describe_host())
        module, self._module = self._module, None
        # Output through a tty, as vanilla's module run from a file by ssh -tt.
        module_tty = (module is not None and in_data is not None and not module["piped"]
                      and self._use_pty(None, sudoable))
        # The command as it was before the become plugin wrapped it: it runs
        # in the become agent, which already is the become user.
        plain = self._unwrap_become(cmd) if sudoable and self.become is not None else None
        if plain is None and sudoable and self.become is not None and self._become_inputs:
            # The plugin wrapped something we cannot find in the command:
            # never run it as the login user, run it as it is (vanilla).
            module = None
        if module is not None and module["interpreter"] and in_data is not None:
            module["tty"] = module_tty
            res = self._exec_module(module, in_data, plain is not None)
            if res is not None:
                return res
        use_pty = module_tty or self._use_pty(in_data, sudoable)
        if plain is not None:
            agent_id = self._agent_for(True)
            argv = ["/bin/sh", "-c", plain]
        else:
            if sudoable and self.become is not None and self.become.expect_prompt():
                # Not a command we saw wrapped: its prompt would wait forever.
                raise AnsibleError("mitogen.svc cannot answer the %s prompt of this command"
                                   % self.become.name)
            agent_id = self._agent_id
            argv = self._shell_argv(to_text(cmd))
        assert agent_id is not None
        try:
            # A pty's terminal type: the client's, as ssh sends it.
            term = os.environ.get("TERM") if use_pty else None
            res = self._call(agent_id, _mux.TARGET_MODULE, "run_command", argv, in_data, use_pty,
                             term, *((True,) if module_tty else ()))
        except CallError as exc:
            raise AnsibleError("failed to run a command on %s: %s"
                               % (self._describe_host(), exc)) from None
        rc, stdout, stderr = int(res["rc"]), res["stdout"], res["stderr"]
        if plain is None and sudoable and self.become is not None and self.become.success:
            stdout, stderr = self._strip_become(stdout, stderr)
        if use_pty:
            stderr += self._tty_closed_message()
        return rc, stdout, stderr

    def _tty_closed_message(self) -> bytes:
        """What the stock plugin's transport adds to stderr when a command
        with a tty ends (see mitogen_ssh)."""
        return b""

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
        if self._fallback is not None:
            return self._fallback.put_file(in_path, out_path)
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._describe_host())
        b_in = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.exists(b_in):
            raise AnsibleFileNotFound("file or module does not exist: %s" % in_path)
        st = os.stat(b_in)
        mode = st.st_mode & 0o777  # what sftp gives the new file (less umask)
        try:
            if st.st_size <= INLINE_FILE_LIMIT:
                with open(b_in, "rb") as fp:
                    self._target("write_file", out_path, fp.read(), mode)
            else:
                assert self._client is not None
                real = self._client.connection_call("register_file", 60.0,
                                                    path=os.path.abspath(in_path))
                self._target("pull_file", real, out_path, 300.0, mode)
        except CallError as exc:
            raise AnsibleError("failed to transfer file to %s: %s" % (out_path, exc)) from None

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        if self._fallback is not None:
            return self._fallback.fetch_file(in_path, out_path)
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
            raise AnsibleError("failed to transfer file from %s: %s" % (in_path, exc)) from None

    def close(self) -> None:
        """Cheap: the agent stays up for the next task."""
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
        self._pending = None
        self._deferred_failure = None
        self._agent_id = None
        self._connected = False

    def reset(self) -> None:
        """Stop the agent; the next task starts a fresh interpreter."""
        try:
            spec = self._route_spec()
        except AnsibleError:  # settings no agent can have started with
            self.close()
            return
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
