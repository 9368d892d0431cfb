# PRIVATE to the collection: not a public API, may change without notice.
"""What every action plugin gains while a mitogen.svc connection is in use.

Runs on: the controller (Ansible workers).

The strategy's action loader hook (see _strategy.py) re-classes each action
plugin object whose connection is one of ours as a subclass of its own class
(see :func:`_mixed_class`). The subclass changes no decision of the action: vanilla
``_execute_module`` still builds the module, its arguments and environment
and parses the result. It only notes, for the one command that runs
an AnsiballZ wrapper, the interpreter and the task environment, so that the
connection can run the wrapper in a child of the agent's zygote instead of
starting ``python3`` (see ansible_mitogen_svc.runner).
"""
from __future__ import annotations

import os
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError

from ansible.utils.display import Display

from ansible_collections.mitogen.svc.plugins.plugin_utils import _async, _payload
from ansible_collections.mitogen.svc.plugins.plugin_utils._connection import AgentConnection

display = Display()


def interpreter_path(shebang: t.Optional[str]) -> t.Optional[str]:
    """``"#!/usr/bin/python3"`` -> ``"/usr/bin/python3"``; None when the
    shebang carries interpreter arguments (those runs stay vanilla)."""
    text = (shebang or "").strip()
    if text.startswith("#!"):
        text = text[2:].strip()
    if not text.startswith("/") or len(text.split()) != 1:
        return None
    return text


def _mixed_class(base: type) -> type:
    """A subclass of ``base`` with the hooks below. (A mixin base class
    cannot be used: instances could not be re-classed to it.)"""

    class Mixed(base):  # type: ignore[valid-type,misc]
        _msvc_mixed = True
        _msvc_env: t.Optional[t.Dict[str, str]] = None

        def _compute_environment_string(self, raw_environment_out: t.Any = None) -> str:
            captured: t.Dict[str, t.Any] = (raw_environment_out
                                            if isinstance(raw_environment_out, dict) else {})
            text = super()._compute_environment_string(captured)
            self._msvc_env = {str(k): str(v) for k, v in captured.items()}
            return t.cast(str, text)

        def _low_level_execute_command(self, cmd: str, sudoable: bool = True,
                                       in_data: t.Optional[bytes] = None,
                                       executable: t.Optional[str] = None,
                                       *args: t.Any, **kwargs: t.Any) -> t.Any:
            env, self._msvc_env = self._msvc_env, None
            conn = self._connection
            interp = interpreter_path(getattr(self, "_used_interpreter", None))
            if (env is not None and not executable and _payload.is_wrapper(in_data)
                    and isinstance(conn, AgentConnection)):
                piped = self._vanilla_pipelines() or bool(self._task.async_val)
                # Vanilla would run the module from this file (the agent
                # expands "~": no round trip for it).
                path = (None if piped or self._msvc_run is None
                        else _async.module_file(self, self._msvc_run, expand=False))
                conn.expect_module(interp, env, self._msvc_run, piped=piped, path=path)
            try:
                return super()._low_level_execute_command(cmd, sudoable, in_data, executable,
                                                          *args, **kwargs)
            except AnsibleConnectionFailure as exc:
                # Vanilla sends stdin with the command only when it pipelines
                # (a module otherwise goes first to a temp dir it has to make).
                if (in_data and isinstance(conn, AgentConnection)
                        and (not _payload.is_wrapper(in_data)
                             or (self._vanilla_pipelines() and not self._task.async_val))):
                    raise conn.data_not_sent(exc) from None
                raise
            finally:
                if isinstance(conn, AgentConnection):
                    conn.expect_module(None, None)

        # -- action-layer RPCs: one call each instead of a shell command ----
        def _remote_expand_user(self, path: str, sudoable: bool = True,
                                *args: t.Any, **kwargs: t.Any) -> str:
            conn = self._connection
            if (not path.startswith("~") or getattr(conn, "_remote_is_local", False)
                    or not conn.agent_ready()):
                return t.cast(str, super()._remote_expand_user(path, sudoable, *args, **kwargs))
            first, sep, rest = path.partition(os.path.sep)
            if first == "~":
                become_user = self.get_become_option("become_user")
                if sudoable and conn.become and become_user:
                    first = "~%s" % become_user
                else:
                    first = "~%s" % (self._get_remote_user() or "")
            try:
                home = conn.rpc("expand_user", first)
            except AnsibleError:
                home = None
            if not home:  # vanilla then asks pwd: let it
                return t.cast(str, super()._remote_expand_user(path, sudoable, *args, **kwargs))
            expanded = conn._shell.join_path(home, rest) if sep else home
            if ".." in os.path.dirname(expanded).split("/"):
                raise AnsibleError("'%s' returned an invalid relative home directory path "
                                   "containing '..'" % self._get_remote_addr({}))
            return t.cast(str, expanded)

        def _make_tmp_path(self, remote_user: t.Optional[str] = None) -> str:
            conn = self._connection
            made, self._msvc_tmpdir_made = self._msvc_tmpdir_made, None
            if made is not None and conn._shell.tmpdir == made:
                return made  # made early for this module (see _msvc_early_tmpdir)
            name = getattr(conn._shell, "_generate_temp_dir_name", None)
            if (name is None or getattr(conn, "_remote_is_local", False)
                    or self._is_become_unprivileged() or not conn.agent_ready()):
                return t.cast(str, super()._make_tmp_path(remote_user))
            tmpdir = self._remote_expand_user(
                self.get_shell_option("remote_tmp", default="~/.ansible/tmp"), sudoable=False)
            try:
                path = conn.rpc("make_temp_dir", tmpdir, name())
            except AnsibleError:  # vanilla's command, for vanilla's error
                return t.cast(str, super()._make_tmp_path(remote_user))
            self._cleanup_remote_tmp = True
            conn._shell.tmpdir = path
            return t.cast(str, path)

        def _remove_tmp_path(self, tmp_path: t.Optional[str], force: bool = False) -> None:
            conn = self._connection
            if tmp_path is None and conn._shell.tmpdir:
                tmp_path = conn._shell.tmpdir
            if not (force or self._should_remove_tmp_path(tmp_path)):
                return  # before connecting: most tasks have nothing to remove
            if not conn.agent_ready():
                return super()._remove_tmp_path(tmp_path, force)
            try:
                conn.rpc("remove_tree", tmp_path)
            except AnsibleError as exc:
                display.warning("Error deleting remote temporary files (rc: 1, stderr: %s})" % exc)
            else:
                conn._shell.tmpdir = None

        def _remote_chmod(self, paths: t.List[str], mode: str, sudoable: bool = False) -> t.Any:
            conn = self._connection
            if not (sudoable and conn.become) and conn.agent_ready():
                try:
                    done = conn.rpc("chmod", list(paths), mode)
                except AnsibleError:
                    done = False
                if done:
                    return dict(rc=0, stdout="", stdout_lines=[], stderr="", stderr_lines=[])
            return super()._remote_chmod(paths, mode, sudoable)

        # -- async jobs, mitogen_async_status, task isolation: see _async.py --
        _msvc_run: t.Optional[t.Dict[str, t.Any]] = None

        def _execute_module(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
            return _async.execute_module(self, super()._execute_module, args, kwargs)

        def _configure_module(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
            configured = super()._configure_module(*args, **kwargs)
            _async.check_configured(self, configured)
            self._msvc_early_tmpdir(configured, kwargs.get("module_args",
                                                           args[1] if len(args) > 1 else None))
            return configured

        # Modules always travel pipelined here, so vanilla's _execute_module
        # skips the temporary directory it makes up front when pipelining
        # is off. A module that is not new-style (binary, old-style,
        # WANT_JSON) is copied to one anyway, and vanilla's arguments then
        # name it in _ansible_tmpdir: make it now, as vanilla would have.
        _msvc_tmpdir_made: t.Optional[str] = None

        def _msvc_early_tmpdir(self, configured: t.Any, module_args: t.Any) -> None:
            first = configured[0] if isinstance(configured, tuple) and configured else None
            style = first if isinstance(first, str) else getattr(first, "module_style", None)
            conn = self._connection
            if (style in (None, "new") or not isinstance(module_args, dict)
                    or conn._shell.tmpdir is not None or self._task.async_val
                    or self._vanilla_pipelines()):
                return
            path = self._make_tmp_path()
            self._msvc_tmpdir_made = path
            if not self._is_become_unprivileged():
                module_args["_ansible_tmpdir"] = path

        def _vanilla_pipelines(self) -> bool:
            """Would vanilla pipeline (so make no directory up front)?"""
            try:
                enabled = bool(self._connection.get_option("pipelining"))
            except KeyError:
                enabled = bool(getattr(self._play_context, "pipelining", False))
            become = self._connection.become
            return enabled and (become is None or bool(getattr(become, "pipelining", True)))

    Mixed.__name__ = base.__name__
    Mixed.__qualname__ = base.__qualname__
    Mixed.__module__ = base.__module__
    return Mixed


_mixed: t.Dict[type, type] = {}


def mix_in(action: t.Any) -> t.Any:
    """Re-class ``action`` (an ActionBase) when its connection is ours."""
    if action is None or not isinstance(getattr(action, "_connection", None), AgentConnection):
        return action
    cls = type(action)
    if getattr(cls, "_msvc_mixed", False):
        return action
    mixed = _mixed.get(cls)
    if mixed is None:
        mixed = _mixed[cls] = _mixed_class(cls)
    action.__class__ = mixed
    return action
