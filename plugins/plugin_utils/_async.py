# PRIVATE to the collection: not a public API, may change without notice.
"""Async tasks, ``mitogen_async_status`` and task isolation: controller side.

Runs on: the controller (Ansible workers).

The action mixin (_action.py) sends every ``_execute_module()`` through
:func:`execute_module`, which may add a *run* dict to the action for the
duration of the call; the mixin hands it to the connection with the module,
and the connection calls :func:`exec_module` for the two cases it cannot
handle alone:

* ``job``: the task is ``async:``. Vanilla ``_execute_module`` runs with
  ``wrap_async=False``, so it builds the module as for any pipelined task
  (with ``ANSIBLE_ASYNC_DIR`` in the environment, as vanilla adds it for
  async tasks); the connection registers the job with the mux's
  JobResultService and starts it in the agent
  (``ansible_mitogen_svc.asyncjob.start_job``), which answers what
  ``async_wrapper`` would have printed. Then what vanilla does after
  ``async_wrapper`` returns is done here (``changed``, the temp dir). A
  module that cannot run that way (not a new-style Python module,
  ``keep_remote_files``...) raises :class:`NotEligible` and the task runs
  the vanilla way (``async_wrapper``).
* ``answer``: ``mitogen_async_status`` found the job's final result in
  JobResultService. The async_status module is built as vanilla builds it,
  but when the agent that would run it is the agent that ran the job (same
  host, user and interpreter, not restarted since), its output is made from
  the pushed job file instead of running it: no message to the target.
  Otherwise :class:`Mismatch` makes the action run the stock way.

``isolation`` (task var ``mitogen_task_isolation: fork``) asks the runner
for a fresh child of the virgin fork parent instead of the zygote.

Record formats follow the running ansible-core (:data:`CORE`): 2.19 made
the records' ``started``/``finished``/``failed`` booleans, 2.21 stopped
warning about blank lines after a module's JSON and passes the module's
command as argv.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import typing as t

from ansible import constants as C
from ansible import release
from ansible.errors import AnsibleError
from ansible.utils.display import Display

from ansible_collections.mitogen.svc.ansible_mitogen_svc import (BrokenError, CallError,
                                                                 RoutingError, TimeoutError)
from ansible_collections.mitogen.svc.ansible_mitogen_svc.jobs import JobResultService
from ansible_collections.mitogen.svc.plugins.plugin_utils import _payload
from ansible_collections.mitogen.svc.plugins.plugin_utils._connection import AgentConnection

display = Display()


def _core_version() -> t.Tuple[int, int]:
    major, minor = release.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


#: (major, minor) of the running ansible-core.
CORE = _core_version()
#: Job records say True/False (2.19+) rather than 1/0.
BOOL_RECORDS = CORE >= (2, 19)
#: async_wrapper warns about blank lines after the JSON too (before 2.21).
BLANK_JUNK_WARNS = CORE < (2, 21)
#: async_wrapper gets the module command as argv (2.21+), else as a string.
ARGV_CMD = CORE >= (2, 21)
#: The async_status module prints the job file's data as it is (2.19+);
#: before, exit_json() adds fields of its own (see _as_exit_json()).
STATUS_AS_IS = CORE >= (2, 19)

ISOLATION_VAR = "mitogen_task_isolation"
ISOLATIONS = ("zygote", "fork")
ASYNCJOB_MODULE = "ansible_mitogen_svc.asyncjob"
JOBS = JobResultService.name
STATUS_MODULE = "ansible.legacy.async_status"
#: Action names redirected to STATUS_ACTION under the strategies.
STATUS_NAMES = frozenset({"async_status", "ansible.builtin.async_status",
                          "ansible.legacy.async_status"})
STATUS_ACTION = "mitogen.svc.mitogen_async_status"
#: What async_wrapper uses when ANSIBLE_ASYNC_DIR is not set.
DEFAULT_ASYNC_DIR = "~/.ansible_async"
#: Seconds to wait for the mux's JobResultService.
MUX_TIMEOUT = 60.0
#: A status asked this soon after its job was registered waits for the
#: job's push until then. Vanilla's first answer comes 1-1.5 s after the
#: start (it starts async_wrapper, then a new interpreter for async_status),
#: so a short job launched with ``poll: 0`` is found finished at once, as
#: with vanilla, instead of after the ``until`` loop's delay. Our job needs
#: 0.3-0.8 s to push (it imports the module's code afresh in a child of the
#: virgin parent), more on a loaded target: 2 s leaves room for that
#: (docs/async.md).
STATUS_SETTLE = 2.0
# ActionBase._execute_module()'s positional parameters, in order.
_EXECUTE_ARGS = ("module_name", "module_args", "tmp", "task_vars", "persist_files",
                 "delete_remote_tmp", "wrap_async")


class NotEligible(Exception):
    """This async task cannot run as an agent job: run it the vanilla way."""


class Mismatch(Exception):
    """The pushed result does not answer this async_status: ask the target."""


# -- task isolation ---------------------------------------------------------------

def task_isolation(action: t.Any, task_vars: t.Optional[t.Mapping[str, t.Any]]) -> str:
    """The task's ``mitogen_task_isolation`` ("zygote" when unset).

    Raises:
        AnsibleError: a value other than "zygote" or "fork".
    """
    value = (task_vars or {}).get(ISOLATION_VAR)
    if value is None:
        return "zygote"
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        value = action._templar.template(value)
    if value not in ISOLATIONS:
        raise AnsibleError("%s must be one of %s, not %r"
                           % (ISOLATION_VAR, ", ".join(ISOLATIONS), value))
    return str(value)


# -- _execute_module() --------------------------------------------------------------

def execute_module(action: t.Any, execute: t.Callable[..., t.Any], args: t.Tuple[t.Any, ...],
                   kwargs: t.Dict[str, t.Any]) -> t.Any:
    """The mixin's ``_execute_module(*args, **kwargs)``; ``execute`` is
    the action's own."""
    kwargs = dict(kwargs)
    kwargs.update(zip(_EXECUTE_ARGS, args))
    run: t.Dict[str, t.Any] = {"module": kwargs.get("module_name") or action._task.action}
    isolation = task_isolation(action, kwargs.get("task_vars"))
    if isolation != "zygote":
        run["isolation"] = isolation
    known = getattr(action, "_msvc_known", None)
    if known is not None and kwargs.get("module_name") == STATUS_MODULE:
        run["answer"] = known
    if kwargs.get("wrap_async") and _jobs_possible(action):
        return _execute_job(action, execute, kwargs, run)
    action._msvc_run = run
    try:
        return execute(**kwargs)
    finally:
        action._msvc_run = None


def _jobs_possible(action: t.Any) -> bool:
    # A limit of 0 comes from gather_facts in parallel: async_wrapper then
    # kills the job at its first check (5 s), and so does ours.
    conn = action._connection
    return (isinstance(conn, AgentConnection) and int(action._task.async_val or 0) >= 0
            and conn.agent_ready())


def _execute_job(action: t.Any, execute: t.Callable[..., t.Any], kwargs: t.Dict[str, t.Any],
                 run: t.Dict[str, t.Any]) -> t.Any:
    shell = action._connection._shell
    tmpdir = shell.tmpdir
    if tmpdir:
        preserve = not action._should_remove_tmp_path(tmpdir)
    else:
        preserve = bool(C.DEFAULT_KEEP_REMOTE_FILES)
    run.pop("isolation", None)  # a job always forks from the virgin parent
    run["job"] = {"path": module_file(action, run),
                  "jid": "j%d" % secrets.randbelow(999999999999),
                  "limit": int(action._task.async_val), "preserve": preserve,
                  "remove_dir": tmpdir if tmpdir and not preserve else None,
                  "bools": BOOL_RECORDS, "blank_junk_warns": BLANK_JUNK_WARNS}
    environment = action._task.environment
    saved = list(environment) if isinstance(environment, list) else None
    action._msvc_run = run
    try:
        result = execute(**dict(kwargs, wrap_async=False))
    except NotEligible as exc:
        action._msvc_run = None
        if saved is not None:
            environment[:] = saved
        display.vvvv("async task runs the vanilla way: %s" % exc,
                     host=action._connection._describe_host())
        return _execute_vanilla_async(action, execute, kwargs)
    finally:
        action._msvc_run = None
    if not run.get("started"):
        raise AnsibleError("mitogen.svc: an async task ran without starting a job (this is "
                           "a bug)")
    if tmpdir:
        shell.tmpdir = None  # the job removes it, as async_wrapper does
    # What vanilla does after async_wrapper returned.
    result["changed"] = True
    return result


def module_file(action: t.Any, run: t.Dict[str, t.Any], expand: bool = True) -> str:
    """Where vanilla puts the module of an async task for async_wrapper
    (or of any task, without pipelining): ``AnsiballZ_<module>.py`` in the
    task's temporary directory, or in the one it would make
    (``remote_tmp``, expanded unless not ``expand``, then a fresh
    ``ansible-tmp-...`` name). Nothing is written there: the job runs as
    that file, so its records and tracebacks name what vanilla's do.
    Without ``action``: the bare file name."""
    leaf = "AnsiballZ_%s.py" % str(run.get("module") or "module").rpartition(".")[2]
    if action is None:
        return leaf
    shell = action._connection._shell
    base = shell.tmpdir
    name = getattr(shell, "_generate_temp_dir_name", None)
    if not base and name is not None:
        remote_tmp = action.get_shell_option("remote_tmp", default="~/.ansible/tmp")
        try:
            root = (action._remote_expand_user(remote_tmp, sudoable=False) if expand
                    else remote_tmp)
        except AnsibleError:
            root = remote_tmp
        base = shell.join_path(root, name())
    return str(shell.join_path(base, leaf)) if base else leaf


def _execute_vanilla_async(action: t.Any, execute: t.Callable[..., t.Any],
                           kwargs: t.Dict[str, t.Any]) -> t.Any:
    """async_wrapper, as vanilla runs it. Before 2.21 vanilla skips it
    for connections that always pipeline modules (they are expected to do
    async themselves), so that flag is off for the call."""
    conn = action._connection
    conn.always_pipeline_modules = False
    try:
        return execute(**kwargs)
    finally:
        del conn.always_pipeline_modules  # the class attribute again


def check_configured(action: t.Any, configured: t.Any) -> None:
    """Called with what ``_configure_module()`` returned (2.18: a 4-tuple
    (style, shebang, data, path); 2.19+: (module bits, path)).

    Raises:
        NotEligible: a job is pending and this module cannot be one.
    """
    run = getattr(action, "_msvc_run", None)
    if not run or "job" not in run:
        return
    if isinstance(configured, tuple) and len(configured) == 4:
        style, shebang, has_async = configured[0], configured[1], False
    else:
        bits = configured[0]
        style, shebang = bits.module_style, bits.shebang
        has_async = bool(getattr(bits, "has_async", False) or getattr(bits, "has_become", False))
    from ansible_collections.mitogen.svc.plugins.plugin_utils._action import interpreter_path
    if style != "new" or has_async or not interpreter_path(shebang):
        raise NotEligible("a %s module with interpreter line %r" % (style, shebang))
    if not action._is_pipelining_enabled(style):
        raise NotEligible("pipelining is off (keep_remote_files?)")


# -- the connection's side -------------------------------------------------------------

def exec_module(conn: AgentConnection, agent_id: t.Optional[int], interpreter: str,
                data: bytes, module: t.Dict[str, t.Any]) -> t.Tuple[int, bytes, bytes]:
    """Run a module the connection was told about with a ``job`` or an
    ``answer``; (rc, stdout, stderr) as the command would give them.

    Raises:
        NotEligible / Mismatch: see the module docstring.
        AnsibleError: the agent refused or failed to start the job.
    """
    run = module.get("run") or {}
    if "answer" in run:
        return _answer(agent_id, run["answer"])
    if agent_id is None:
        raise NotEligible("no agent runs %s" % interpreter)
    job = dict(run["job"])
    path = str(job.get("path") or module_file(None, run))
    job["cmd"] = shlex.join([interpreter, path]) if ARGV_CMD else path
    job["argv"] = wrapper_argv(job, interpreter, path)
    client = conn._client
    assert client is not None
    if client.pool is None:  # a mux serves JobResultService: have the result pushed
        try:
            client.service_ctx.call_service_async(JOBS, "register", job_id=job["jid"],
                                                  owner=agent_id).get(MUX_TIMEOUT)
        except (CallError, BrokenError, RoutingError, TimeoutError) as exc:
            raise AnsibleError("mitogen.svc could not register an async job with the mux: %s"
                               % exc) from None
        job["push"] = job["jid"]
    part = _payload.split(data)
    display.vvvv("async job %s (limit %ss) starts in agent %d" % (job["jid"], job["limit"],
                                                                  agent_id),
                 host=conn._describe_host())
    args = (part.head, part.tail, part.digest, module.get("env") or {}, job)
    try:
        res = conn._call(agent_id, ASYNCJOB_MODULE, "start_job", *args)
        if "missing" in res:
            res = conn._call(agent_id, ASYNCJOB_MODULE, "start_job", *args, blob=part.blob)
    except CallError as exc:
        raise AnsibleError("failed to start an async job on %s: %s"
                           % (conn._describe_host(), exc)) from None
    run["started"] = True
    return int(res["rc"]), res["stdout"], res["stderr"]


def wrapper_argv(job: t.Dict[str, t.Any], interpreter: str, path: str) -> str:
    """The arguments vanilla's async_wrapper would have got for this job,
    as its syslog line "Invoked with ..." shows them."""
    if ARGV_CMD:
        args = [job["jid"], str(job["limit"]), str(bool(job["preserve"])).lower(), path,
                interpreter, path]
    else:
        args = [job["jid"], str(job["limit"]), path, "_"]
        if job["preserve"]:
            args.append("-preserve_tmp")
    return " ".join(args)


def _answer(agent_id: t.Optional[int], known: t.Dict[str, t.Any]
            ) -> t.Tuple[int, bytes, bytes]:
    """What the async_status module prints for the pushed job file,
    when ``agent_id`` ran the job; else Mismatch."""
    if agent_id is None or agent_id != known.get("owner"):
        raise Mismatch("agent %s did not run job %s" % (agent_id, known.get("jid")))
    try:
        data = json.loads(str(known["text"]))
    except (TypeError, ValueError) as exc:
        raise Mismatch("pushed job file unreadable: %s" % exc) from None
    if not isinstance(data, dict):
        raise Mismatch("pushed job file is not an object")
    # The async_status module's reading of a job file.
    if "started" not in data:
        data["finished"] = True if STATUS_AS_IS else 1
        data["ansible_job_id"] = known["jid"]
    elif "finished" not in data:
        data["finished"] = False if STATUS_AS_IS else 0
    if not STATUS_AS_IS:
        _as_exit_json(data, known)
    return 0, ("\n%s\n" % json.dumps(data)).encode(), b""


def _as_exit_json(data: t.Dict[str, t.Any], known: t.Dict[str, t.Any]) -> None:
    """Before 2.19 the async_status module hands the job file's data to
    ``exit_json()``, which adds the module's own ``invocation`` when the
    data has none and re-issues its warnings. Mismatch for what it would
    do on the target (``path``: stat it) or re-format (deprecations)."""
    if "path" in data or "deprecations" in data:
        raise Mismatch("exit_json() would stat a path or re-format deprecations")
    warnings = data.get("warnings")
    if warnings is not None:
        warnings = [warnings] if isinstance(warnings, str) else warnings
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise Mismatch("warnings exit_json() would refuse")
        if warnings:
            data["warnings"] = warnings
    if "invocation" not in data:
        async_dir = os.path.dirname(str(known.get("path") or ""))
        if not async_dir.startswith("/") or "$" in async_dir:
            raise Mismatch("async dir %r would be expanded on the target" % async_dir)
        data["invocation"] = {"module_args": {"jid": known["jid"], "mode": "status",
                                              "_async_dir": async_dir}}


# -- mitogen_async_status -------------------------------------------------------------

def redirect(name: t.Any, connection: t.Any) -> t.Any:
    """The action to load for ``name`` under the strategies: async_status
    becomes mitogen_async_status over our connections."""
    if isinstance(name, str) and name in STATUS_NAMES and isinstance(connection,
                                                                     AgentConnection):
        return STATUS_ACTION
    return name


def job_key(jid: t.Any) -> t.Optional[str]:
    """The JobResultService key of a jid ``j<digits>.<pid>``: its random
    part, known before the job's process (and so its pid) exists."""
    if not isinstance(jid, str):
        return None
    key, dot, pid = jid.rpartition(".")
    if not dot or not key.startswith("j") or not key[1:].isdigit() or not pid.isdigit():
        return None
    return key


def _mux_jobs(conn: t.Any, method: str, **kwargs: t.Any) -> t.Any:
    """Call JobResultService in the mux; None without a mux or on error."""
    if not isinstance(conn, AgentConnection) or not conn.agent_ready():
        return None
    client = conn._client
    if client is None or client.pool is not None:
        return None
    try:
        return client.service_ctx.call_service_async(JOBS, method, **kwargs).get(MUX_TIMEOUT)
    except (CallError, BrokenError, RoutingError, TimeoutError) as exc:
        display.vvvv("JobResultService.%s failed: %s" % (method, exc))
        return None


def pushed_result(conn: t.Any, jid: t.Any) -> t.Optional[t.Dict[str, t.Any]]:
    """What the job ``jid`` pushed to the mux once it finished, or None."""
    key = job_key(jid)
    if key is None:
        return None
    reply = _mux_jobs(conn, "get", job_id=key, settle=STATUS_SETTLE)
    if not isinstance(reply, dict) or reply.get("state") != "finished":
        return None
    result = reply.get("result")
    if not isinstance(result, dict) or result.get("jid") != jid:
        return None
    return result


def run_status(action: t.Any, stock_run: t.Callable[..., t.Any], tmp: t.Any,
               task_vars: t.Any) -> t.Any:
    """``mitogen_async_status``'s run(): from the pushed result when the
    job ran in this run through the agent that would run async_status, the
    stock way otherwise. ``mode: cleanup`` always removes the file on the
    target, and forgets the pushed result."""
    args = action._task.args or {}
    jid, mode = args.get("jid"), args.get("mode", "status")
    if mode == "status":
        known = pushed_result(action._connection, jid)
        if known is not None and known.get("text") is not None:
            action._msvc_known = known
            try:
                result = stock_run(tmp, task_vars)
                display.vvv("async_status of %s answered by the mux" % jid,
                            host=action._connection._describe_host())
                return result
            except Mismatch as exc:
                display.vvvv("async_status of %s asks the target: %s" % (jid, exc),
                             host=action._connection._describe_host())
            finally:
                action._msvc_known = None
    result = stock_run(tmp, task_vars)
    if mode == "cleanup" and job_key(jid) is not None:
        _mux_jobs(action._connection, "forget", job_id=job_key(jid))
    return result


def status_async_dir(action: t.Any, stock: t.Callable[[], str]) -> str:
    """``mitogen_async_status._get_async_dir()``: the directory the pushed
    job used, when the task's async dir setting is the one it ran with (no
    round trip to expand ``~``); the stock answer otherwise."""
    known = getattr(action, "_msvc_known", None)
    if known is not None:
        raw = action.get_shell_option("async_dir", default=DEFAULT_ASYNC_DIR)
        if raw == known.get("async_dir") and known.get("path"):
            return os.path.dirname(str(known["path"]))
        action._msvc_known = None
    return stock()
