"""Async tasks: detached jobs forked from the agent's virgin fork parent.

Runs on: targets (shipped to every agent the mux starts, through
``extra_modules``). Never imports ansible.

Theory of operation
-------------------
Vanilla Ansible starts an ``async:`` task by copying the module and
``async_wrapper`` to the target and running the wrapper, which daemonizes,
writes the job file ``<async dir>/<jid>`` and runs the module under a
watchdog. Through an agent the same job goes like this:

1. The controller registers the job with the mux's JobResultService (key:
   the random part of the jid, owner: the agent) and calls
   :func:`start_job` in the agent with the AnsiballZ wrapper (its module
   zip cached as for :func:`runner.run_module`), the task's environment and
   a *job spec* (:class:`JobSpec` fields: time limit, record format of the
   controller's ansible-core, ...).
2. :func:`start_job` asks the virgin fork parent for a *supervisor*: a
   detached child (a session of its own) running :func:`job_main`. Over a
   socketpair they first exchange two length-prefixed codec packets (the
   *handshake*): the agent sends the job; the supervisor creates the async
   directory, writes the running record and answers with what
   ``async_wrapper`` would have printed (``started``, ``ansible_job_id``,
   ``results_file``... or vanilla's error). Only then does the agent attach
   its end as the supervisor's stream: the supervisor becomes a context
   below the agent.
3. The supervisor, still single-threaded, forks the *module process* into
   a process group of its own, which runs the wrapper as the runner's task
   children do (:func:`runner.run_program`), stdout and stderr on pipes.
4. It waits on vanilla's schedule: a check every 5 s (every ``limit / 2``
   s for limits up to 5 s). At the first check at or past the limit with
   the module still running (or still holding its pipes open), it kills
   the module's whole process group and writes vanilla's timeout record.
   Otherwise it filters the output as ``async_wrapper`` does and writes the
   final record (or vanilla's record for output that is not JSON).
5. It pushes ``{"jid", "path", "async_dir", "text", "owner"}`` (``text``:
   the job file's content) to JobResultService through its stream, if the
   spec asks for it and the agent still lives, and exits.

The supervisor has /dev/null for stdio, a session of its own and no fd of
the agent's but its stream, so it outlives the task's worker, ``meta:
reset_connection``, the agent and the playbook. Without the agent the push
fails; the job file is written regardless, and the controller reads it as
vanilla does.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from . import codec
from .broker import Broker, Stream
from .context import Router
from .errors import BrokenError, CodecError
from .jobs import JobResultService
from .protocol import DEFAULT_MAX_BODY
from .router import IdRange
from .runner import load_program, run_program
from .service import current_call
from .transport import FdTransport

try:
    import syslog
except ImportError:  # not a Unix
    syslog = None  # type: ignore[assignment]

__all__ = ["start_job", "job_main", "JobSpec", "split_json_output", "DEFAULT_ASYNC_DIR",
           "HANDSHAKE_TIMEOUT", "PUSH_LIMIT"]

LOG = logging.getLogger("ansible_mitogen_svc.asyncjob")

_ENTRY = "ansible_mitogen_svc.asyncjob:job_main"
#: What async_wrapper uses when ANSIBLE_ASYNC_DIR is not set.
DEFAULT_ASYNC_DIR = "~/.ansible_async"
#: Seconds for the handshake. async_wrapper waits up to 2.5 s for its
#: module process; a loaded target may need longer to fork and mkdir.
HANDSHAKE_TIMEOUT = 60.0
#: Job files bigger than this are not pushed (a frame may carry 64 MiB);
#: the controller then reads the file from the target.
PUSH_LIMIT = 32 * 1024 * 1024
#: Seconds the supervisor waits for the mux to acknowledge a push.
PUSH_TIMEOUT = 60.0
#: async_wrapper's check interval, in seconds.
CHECK_STEP = 5
# How often to look for the module's exit once its pipes are closed.
_REAP_POLL = 0.02


class JobSpec(collections.namedtuple(
        "_JobSpec", "jid limit preserve remove_dir cmd bools blank_junk_warns push path argv",
        defaults=(False, None, "", True, False, "", "", ""))):
    """What the controller says about one job (sent as a dict).

    Attributes:
        jid: the random part of the job id (``j<digits>``); the supervisor
            appends ``.<its pid>``, as async_wrapper appends its own.
        limit: the task's ``async`` value, in seconds.
        preserve: keep the task's temporary directory (``keep_remote_files``).
        remove_dir: a temporary directory to remove after the job, as
            async_wrapper removes its own (None: there is none).
        cmd: what the ``cmd`` field of a record for unparsable output says.
        bools: records use True/False (ansible-core 2.19+), else 1/0.
        blank_junk_warns: blank lines after the JSON count as junk worth a
            warning (before 2.21); else only non-blank ones do.
        push: the JobResultService key to push the result to, or "".
        path: the module file vanilla would have run (async_wrapper runs
            ``python3 path``): the module runs as that file (``__file__``,
            tracebacks), though nothing is written there; "" for stdin.
        argv: the arguments async_wrapper would have got, for the syslog
            line "Invoked with ..." (see :func:`notice`).
    """

    __slots__ = ()

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "JobSpec":
        known = {k: v for k, v in data.items() if k in cls._fields}
        spec = cls(**known)
        if not isinstance(spec.jid, str) or not isinstance(spec.limit, int):
            raise TypeError("a job spec needs a str jid and an int limit, got %r" % (data,))
        return spec


def notice(msg: str) -> None:
    """Log ``msg`` to syslog as async_wrapper does (ident
    ``ansible-async_wrapper.py``, LOG_NOTICE): the supervisor logs the same
    lines at the same steps of a job, so whoever reads the targets' logs
    for them still finds them. The connection is closed again at once: a
    forked module process inherits no syslog fd."""
    if syslog is None:
        return
    try:
        syslog.openlog("ansible-async_wrapper.py")
        syslog.syslog(syslog.LOG_NOTICE, msg)
        syslog.closelog()
    except Exception:  # logging never stops a job
        LOG.debug("syslog: %r not logged", msg, exc_info=True)


# -- handshake packets: 4-byte length + codec body --------------------------------

def _send_packet(sock: socket.socket, obj: Any) -> None:
    body = codec.dumps(obj)
    sock.sendall(struct.pack(">I", len(body)) + body)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError("peer closed during the handshake")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _recv_packet(sock: socket.socket, limit: int = DEFAULT_MAX_BODY) -> Any:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > limit:
        raise ValueError("handshake packet of %d bytes exceeds %d" % (size, limit))
    return codec.loads(_recv_exact(sock, size))


# -- agent side ---------------------------------------------------------------------

def start_job(head: bytes, tail: bytes, digest: Optional[str], env: Dict[str, str],
              job: Dict[str, Any], blob: Optional[bytes] = None) -> Dict[str, Any]:
    """Start the AnsiballZ wrapper ``head + zip text + tail`` as a detached
    job described by ``job`` (a :class:`JobSpec` as a dict), with ``env``
    added to its environment.

    Returns ``{"rc", "stdout", "stderr"}`` as running async_wrapper would
    have (stdout: its JSON line), or ``{"missing": digest}`` when the zip
    text is not cached here: call again with ``blob``.

    Raises:
        TypeError: a malformed job spec.
        BrokenError: the supervisor could not be forked or did not answer.
    """
    spec = JobSpec.from_dict(job)
    loaded = load_program(head, tail, digest, blob)
    if loaded is None:
        return {"missing": digest}
    program, zip_path = loaded
    from .agent import fork_server
    server = fork_server()
    if server is None:
        raise RuntimeError("only an agent with a fork parent can start jobs")
    router = current_call().router
    ids = router.allocate(leaf=True)
    mine, theirs = socket.socketpair()
    cfg = {"entry": _ENTRY, "detach": True, "name": "job", "id_lo": ids.lo, "id_hi": ids.hi,
           "parent_id": router.my_id, "max_body": router.max_body}
    try:
        pid = server.fork(cfg, theirs.fileno())
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    try:
        mine.settimeout(HANDSHAKE_TIMEOUT)
        _send_packet(mine, {"program": program, "env": dict(env), "zip": zip_path,
                            "job": spec._asdict()})
        reply = _recv_packet(mine)
        if not isinstance(reply, dict):
            raise ValueError("unexpected handshake reply %r" % (reply,))
    except (OSError, EOFError, ValueError, CodecError) as exc:
        mine.close()
        raise BrokenError("job supervisor %d did not start: %s" % (pid, exc)) from exc
    if spec.push and reply.get("started"):
        fd = mine.detach()
        name = "job.%d" % pid
        stream = Stream(router.broker, FdTransport(fd, fd), "%s.%s" % (router.name, name),
                        router.max_body)
        router.attach_child(stream, ids, name)
    else:
        mine.close()
    return {"rc": int(reply.get("rc", 1)), "stdout": str(reply.get("stdout", "")).encode(),
            "stderr": b""}


# -- the supervisor (single-threaded until the module process is forked) --------------

def job_main(fd: int, cfg: Dict[str, Any]) -> None:
    """Entry point of a job supervisor, forked (detached) by the virgin
    fork parent; ``fd`` is its end of the socketpair to the agent."""
    _detach_stdio(keep=fd)
    sock = socket.socket(fileno=fd)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        req = _recv_packet(sock)
        spec = JobSpec.from_dict(req["job"])
    except Exception as exc:  # the agent went away or sent garbage: nothing to run
        LOG.debug("job: bad or no handshake: %s", exc)
        sock.close()
        return
    _Supervisor(sock, cfg, spec, req).run()


def _detach_stdio(keep: int) -> None:
    """stdio to /dev/null and every other fd closed but ``keep``: nothing
    ties the job to the agent's session (an ssh channel stays open while
    any process holds its stderr)."""
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        if null != target:
            os.dup2(null, target)
    if null > 2:
        os.close(null)
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    for n in fds:
        if n > 2 and n != keep:
            try:
                os.close(n)
            except OSError:
                pass


class _Supervisor:
    """One job, start to end. See the module docstring."""

    def __init__(self, sock: socket.socket, cfg: Dict[str, Any], spec: JobSpec,
                 req: Dict[str, Any]) -> None:
        self.sock = sock
        self.cfg = cfg
        self.spec = spec
        self.env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
        self.program = req.get("program") or b""
        self.zip = req.get("zip")
        self.jid = "%s.%d" % (spec.jid, os.getpid())
        self.async_dir = ""
        self.path = ""
        self.module_pid = 0
        self.module_done = False  # it ended within the limit

    def flag(self, value: bool) -> Any:
        """True/False, or 1/0 for ansible-core before 2.19."""
        return value if self.spec.bools else int(value)

    def run(self) -> None:
        os.environ.update(self.env)
        notice("Invoked with %s" % (self.spec.argv or "%s %d" % (self.spec.jid, self.spec.limit)))
        reply, ok = self.prepare()
        try:
            _send_packet(self.sock, reply)
        except OSError:
            pass  # the agent died: the job runs all the same
        if not ok:
            self.sock.close()
            return
        notice("Return async_wrapper task started.")
        try:
            record = self.supervise()
            text = self.write(record)
        except Exception as exc:
            notice("error: %s" % exc)
            LOG.debug("job %s: could not finish", self.jid, exc_info=True)
            self.sock.close()
            return
        if self.module_done:
            notice("Module complete (%d)" % self.module_pid)
            notice("Done in kid B.")
        if self.spec.remove_dir and not self.spec.preserve:
            shutil.rmtree(self.spec.remove_dir, True)
        self.push(text)

    def prepare(self) -> Tuple[Dict[str, Any], bool]:
        """Create the async directory and write the running record, as
        async_wrapper does before it returns; the reply for the agent and
        whether the job is to run."""
        self.async_dir = os.environ.get("ANSIBLE_ASYNC_DIR", DEFAULT_ASYNC_DIR)
        jobdir = os.path.expanduser(self.async_dir)
        self.path = os.path.join(jobdir, self.jid)
        try:
            os.makedirs(jobdir, exist_ok=True)
        except Exception as exc:
            failure = {"failed": self.flag(True),
                       "msg": "could not create directory: %s - %s" % (jobdir, exc),
                       "exception": traceback.format_exc()}
            return {"rc": 1, "stdout": json.dumps(failure) + "\n"}, False
        # async_wrapper's daemon sets umask 022 after it created the directory.
        os.umask(0o022)
        started = {"failed": self.flag(False), "started": self.flag(True),
                   "finished": self.flag(False), "ansible_job_id": self.jid,
                   "results_file": self.path,
                   "_ansible_suppress_tmpdir_delete": not self.spec.preserve}
        reply = {"rc": 0, "stdout": json.dumps(started) + "\n", "started": True}
        try:
            self.write({"started": self.flag(True), "finished": self.flag(False),
                        "ansible_job_id": self.jid})
        except OSError as exc:
            # async_wrapper's module process dies here and its parent
            # reports the start anyway; the job never runs.
            LOG.debug("job %s: cannot write %s: %s", self.jid, self.path, exc)
            return reply, False
        return reply, True

    def write(self, record: Dict[str, Any]) -> str:
        """Replace the job file atomically; returns the text written."""
        text = json.dumps(record)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fp:
            fp.write(text)
        os.rename(tmp, self.path)
        return text

    def supervise(self) -> Dict[str, Any]:
        """Run the module process to its end or the time limit; returns
        the record to write."""
        notice("Starting module and watcher")
        try:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pid = os.fork()
        except OSError as exc:
            notice("error: %s" % exc)
            return {"failed": self.flag(True), "cmd": self.spec.cmd, "msg": str(exc),
                    "outdata": "", "stderr": "", "ansible_job_id": self.jid}
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                self.sock.close()
                os.close(out_r)
                os.close(err_r)
                notice("Start module (%d)" % os.getpid())
                code = run_program({"env": self.env, "zip": self.zip, "path": self.spec.path},
                                   self.program,
                                   out_w, err_w)
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # also here: no window where a kill misses it
        except OSError:
            pass  # it already did, or already exited
        os.close(out_w)
        os.close(err_w)
        self.program = b""
        self.module_pid = pid
        notice("Start watching %d (%d)" % (pid, self.spec.limit))
        done, out, err = self.wait(pid, [out_r, err_r])
        if not done:
            return {"msg": "Timeout exceeded", "failed": True, "child_pid": pid}
        self.module_done = True
        return self.final_record(out, err)

    def wait(self, pid: int, fds: List[int]) -> Tuple[bool, bytes, bytes]:
        """Collect the module's output until it exited and closed its
        pipes; False when the limit struck first (the group is killed)."""
        limit = self.spec.limit
        # async_wrapper's numbers, as its "still running" lines print them.
        step: float = CHECK_STEP
        if limit != 0 and step >= limit:
            step = limit / 2
        remaining: float = limit
        pipes = _Pipes(fds)
        exited = False
        start = time.monotonic()
        checks = 0
        try:
            while True:
                if not exited:
                    exited = os.waitpid(pid, os.WNOHANG)[0] == pid
                if exited and pipes.closed:
                    return True, pipes.data(0), pipes.data(1)
                left = start + (checks + 1) * step - time.monotonic()
                if left > 0:
                    pipes.pump(min(left, 1.0 if pipes.open else _REAP_POLL))
                    continue
                # A check: was it done already, output not read yet?
                pipes.pump(0.0)
                if not exited:
                    exited = os.waitpid(pid, os.WNOHANG)[0] == pid
                if exited and pipes.closed:
                    continue
                checks += 1
                remaining -= step
                notice("%d still running (%s)" % (pid, remaining))
                if remaining <= 0:
                    notice("Timeout reached, now killing %d" % pid)
                    self.kill(pid, exited)
                    return False, b"", b""
        finally:
            pipes.close()

    @staticmethod
    def kill(pid: int, reaped: bool) -> None:
        """async_wrapper's timeout: SIGKILL to the group, then 1 s."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        notice("Sent kill to group %d " % pid)
        time.sleep(1)
        if not reaped:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def final_record(self, out: bytes, err: bytes) -> Dict[str, Any]:
        outdata, stderr = _text(out), _text(err)
        try:
            filtered, warnings = split_json_output(outdata, self.spec.blank_junk_warns)
            result = json.loads(filtered)
            if warnings:
                module_warnings = result.get("warnings", [])
                if not isinstance(module_warnings, list):
                    module_warnings = [module_warnings]
                module_warnings.extend(warnings)
                result["warnings"] = module_warnings
            if stderr:
                result["stderr"] = stderr
            return dict(result)
        except Exception:
            return {"failed": self.flag(True), "cmd": self.spec.cmd, "data": outdata,
                    "stderr": stderr, "msg": traceback.format_exc(),
                    "ansible_job_id": self.jid}

    def push(self, text: str) -> None:
        """Tell JobResultService (through the agent) what the file says."""
        if not self.spec.push:
            self.sock.close()
            return
        result = {"jid": self.jid, "path": self.path, "async_dir": self.async_dir,
                  "owner": int(self.cfg["parent_id"]),
                  "text": text if len(text) <= PUSH_LIMIT else None}
        max_body = int(self.cfg.get("max_body", DEFAULT_MAX_BODY))
        broker = Broker("job.broker").start()
        router = Router(broker, IdRange(int(self.cfg["id_lo"]), int(self.cfg["id_hi"])),
                        name="job", max_body=max_body)
        router.on_parent_lost = broker.shutdown
        try:
            stream = Stream(broker, FdTransport.from_socket(self.sock), "job.parent", max_body)
            router.attach_parent(stream, int(self.cfg["parent_id"]))
            router.context(0).call_service_async(JobResultService.name, "push",
                                                 job_id=self.spec.push,
                                                 result=result).get(PUSH_TIMEOUT)
        except Exception as exc:  # the agent is gone: the job file says it all
            LOG.debug("job %s: result not pushed: %s", self.jid, exc)
        finally:
            router.shutdown()
            router.join(5.0)


class _Pipes:
    """The read ends of the module's stdout and stderr pipes."""

    def __init__(self, fds: List[int]) -> None:
        self.fds = list(fds)
        self.open = list(fds)
        self.bufs = {fd: bytearray() for fd in fds}

    @property
    def closed(self) -> bool:
        return not self.open

    def pump(self, timeout: float) -> None:
        """Read what arrives within ``timeout`` seconds (sleep when every
        pipe is at EOF already)."""
        if not self.open:
            if timeout > 0:
                time.sleep(timeout)
            return
        while True:
            ready, _, _ = select.select(self.open, [], [], timeout)
            for fd in ready:
                data = os.read(fd, 65536)
                if data:
                    self.bufs[fd] += data
                else:
                    self.open.remove(fd)
            if timeout or not ready or not self.open:
                return

    def data(self, index: int) -> bytes:
        return bytes(self.bufs[self.fds[index]])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _text(data: bytes) -> str:
    """Bytes as async_wrapper reads them: UTF-8 with surrogateescape, in
    text mode (universal newlines)."""
    return data.decode("utf-8", "surrogateescape").replace("\r\n", "\n").replace("\r", "\n")


def split_json_output(text: str, blank_junk_warns: bool) -> Tuple[str, List[str]]:
    """The module's JSON out of its output, as async_wrapper finds it: from
    the first line starting with ``{`` to the last line ending with ``}``
    (leading and trailing whitespace ignored). Returns the JSON text and
    the warnings about what followed it.

    Raises:
        ValueError: no line starts or ends the JSON.
    """
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip().startswith("{")), None)
    if first is None:
        raise ValueError("No start of json char found")
    body = lines[first:]
    last = next((i for i in range(len(body) - 1, -1, -1) if body[i].strip().endswith("}")), None)
    if last is None:
        raise ValueError("No end of json char found")
    junk = body[last + 1:]
    warnings = []
    if junk and (blank_junk_warns or any(line.strip() for line in junk)):
        warnings.append("Module invocation had junk after the JSON data: %s" % "\n".join(junk))
    return "\n".join(body[:last + 1]), warnings
