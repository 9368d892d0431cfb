"""Run Ansible modules in children of a warm zygote.

Runs on: targets (shipped to every agent the mux starts, through
``extra_modules``). Never imports ansible itself: only the zygote imports
``ansible.module_utils`` from a module zip the controller sent.

Theory of operation
-------------------
Vanilla Ansible with pipelining runs ``python3`` per task and feeds it the
AnsiballZ wrapper on stdin. The wrapper carries the module zip (base64) and
the task's parameters. Here the controller splits the wrapper into

* the zip text (big, the same for every task of one module in a run): sent
  once per agent and kept in a :class:`_Cache` keyed by its SHA-1, and
* the rest (wrapper code and parameters, a few KiB): sent every task.

:func:`run_module` (in the agent, called by the controller) puts the wrapper
back together and hands it to a *zygote*: a process forked from the agent's
virgin fork parent that imported ``ansible.module_utils.basic`` once from a
module zip and then only forks. Each task runs in a fresh child of the
zygote, so no Python start-up and no ``basic`` import per task, and nothing
a module does outlives its task. The child executes the unmodified wrapper
as ``__main__`` with stdin at EOF, stdout/stderr on pipes and the task's
environment, exactly like ``python3`` reading it from stdin: the controller
parses the output the vanilla way (junk filtering, warnings, rc). Where
vanilla would run the module from a file under ``ssh -tt``, the child's
stdin, stdout and stderr are one new pty instead (its controlling
terminal), and a child killed by a signal is reported as the shell of
vanilla's module command reports it.

The zygote is single-threaded: it serves fork requests on a SOCK_SEQPACKET
socket, each carrying four fds (program pipe, stdout, stderr, status pipe),
and writes each child's exit status (``-N`` for signal N) to that child's
status pipe when it reaps it. Packages imported in the zygote keep finding
submodules that only a task's zip has: the child puts that zip first on
every preloaded ``ansible`` package's ``__path__``.
"""
from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import errno
import logging
import os
import pty
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from .errors import BrokenError
from .forkserver import recv_packet, send_packet
from .spawn import acquire_tty, pty_linger

__all__ = ["run_module", "zygote_main", "load_program", "run_program", "ISOLATIONS",
           "CACHE_LIMIT"]

LOG = logging.getLogger("ansible_mitogen_svc.runner")

#: Bytes of module zip text an agent keeps in memory (least recently used
#: zips are dropped first; the controller resends them on demand).
CACHE_LIMIT = 64 * 1024 * 1024
#: Seconds the zygote may take to answer a fork request.
SPAWN_TIMEOUT = 30.0
_ENTRY = "ansible_mitogen_svc.runner:zygote_main"
#: Where a task's module may run: a fresh child of the warm zygote (the
#: default), or a fresh child of a one-shot process forked from the virgin
#: fork parent, which imported nothing of any task (``fork``).
ISOLATIONS = ("zygote", "fork")


class _Cache:
    """Module zip text by SHA-1 (memory, LRU) and each zip decoded on disk
    (zipimport needs a file) in a private directory removed at exit."""

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._blobs: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._size = 0
        self._dir: Optional[str] = None

    def directory(self) -> str:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="msvc-modules-")
                from .agent import at_exit
                at_exit(lambda: shutil.rmtree(str(self._dir), ignore_errors=True))
            return self._dir

    def get(self, digest: str) -> Optional[bytes]:
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is not None:
                self._blobs.move_to_end(digest)
            return blob

    def zip_path(self, digest: str) -> str:
        return os.path.join(self.directory(), digest + ".zip")

    def put(self, digest: str, blob: bytes) -> None:
        if hashlib.sha1(blob).hexdigest() != digest:
            raise ValueError("module zip does not match its digest %s" % digest)
        path = self.zip_path(digest)
        if not os.path.exists(path):
            try:
                data = base64.b64decode(blob, validate=True)
            except binascii.Error as exc:
                raise ValueError("module zip %s is not base64: %s" % (digest, exc)) from exc
            tmp = "%s.%d.%d" % (path, os.getpid(), threading.get_ident())
            with open(tmp, "wb") as fp:
                fp.write(data)
            os.rename(tmp, path)
        with self._lock:
            if digest not in self._blobs:
                self._blobs[digest] = blob
                self._size += len(blob)
            while self._size > self.limit and len(self._blobs) > 1:
                _old, dropped = self._blobs.popitem(last=False)
                self._size -= len(dropped)


class _Zygote:
    """The agent's handle on one zygote process."""

    def __init__(self, key: str, zip_path: str, preload: List[str], once: bool = False) -> None:
        from .agent import fork_server
        server = fork_server()
        if server is None:
            raise RuntimeError("only an agent with a fork parent can run modules")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = server.fork({"entry": _ENTRY, "zip": zip_path, "preload": preload,
                                    "name": "isolated" if once else "zygote", "once": once},
                                   theirs.fileno())
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.set_inheritable(False)
        self.key = key
        self._sock = mine
        self._lock = threading.Lock()

    def spawn(self, request: Dict[str, Any], fds: List[int]) -> int:
        """Fork a task child; returns its pid. Raises BrokenError."""
        with self._lock:
            try:
                send_packet(self._sock, request, fds)
                ready, _, _ = select.select([self._sock], [], [], SPAWN_TIMEOUT)
                if not ready:
                    raise BrokenError("zygote %d did not answer" % self.pid)
                reply, extra = recv_packet(self._sock)
            except OSError as exc:
                raise BrokenError("zygote %d is gone: %s" % (self.pid, exc)) from exc
        for fd in extra:
            os.close(fd)
        if not isinstance(reply, dict) or "pid" not in reply:
            raise BrokenError("zygote %d closed its socket" % self.pid)
        return int(reply["pid"])

    def close(self) -> None:
        self._sock.close()


_cache = _Cache()
_zygotes: Dict[str, _Zygote] = {}
_zygote_lock = threading.Lock()


def _zygote(key: str, zip_path: str, preload: List[str], fresh: bool = False) -> _Zygote:
    with _zygote_lock:
        zyg = _zygotes.get(key)
        if zyg is not None and fresh:
            zyg.close()
            zyg = None
        if zyg is None:
            zyg = _zygotes[key] = _Zygote(key, zip_path, preload)
        return zyg


def load_program(head: bytes, tail: bytes, digest: Optional[str],
                 blob: Optional[bytes] = None) -> Optional[Tuple[bytes, Optional[str]]]:
    """The AnsiballZ wrapper ``head + zip text + tail`` and the path of
    its module zip on disk (None without a zip); None when the zip text
    is neither cached here nor given as ``blob``.

    Raises:
        ValueError: ``blob`` does not match ``digest`` or is not base64.
    """
    if digest is None:
        return head + (blob or b"") + tail, None
    if blob is not None:
        _cache.put(digest, blob)
    else:
        blob = _cache.get(digest)
        if blob is None:
            return None
    return head + blob + tail, _cache.zip_path(digest)


def run_module(head: bytes, tail: bytes, digest: Optional[str], env: Dict[str, str],
               zygote_key: str, preload: List[str], blob: Optional[bytes] = None,
               isolation: str = "zygote", tty: bool = False,
               term: Optional[str] = None, shell: str = "/bin/sh",
               path: Optional[str] = None) -> Dict[str, Any]:
    """Run the AnsiballZ wrapper ``head + zip text + tail`` like
    ``python3`` would read it from stdin, in a child of the zygote for
    ``zygote_key`` (or, with ``isolation="fork"``, of a one-shot process
    forked from the virgin fork parent); ``env`` is added to the
    environment. With ``tty``, stdin, stdout and stderr are one new pty,
    the child's controlling terminal, as for a module that ``ssh -tt`` runs
    from a file: the output comes merged, with CRLF line ends, and
    ``SSH_TTY`` and ``TERM`` (``term``, if given) are set as sshd sets them.
    A child killed by a signal is reported as vanilla's ``shell -c
    'python3 ... && sleep 0'`` reports it (see :func:`_as_shell_reports`).
    With ``path`` (``~`` and variables expanded here), the wrapper runs as
    ``python3 path`` would run that file (``__file__``, ``sys.argv``,
    tracebacks); nothing is written there.

    Returns ``{"rc", "stdout", "stderr"}``, or ``{"missing": digest}``
    when the zip text is not cached here: call again with ``blob``.

    Raises:
        ValueError: an unknown ``isolation``.
        BrokenError: no zygote could be started or reached.
    """
    if isolation not in ISOLATIONS:
        raise ValueError("isolation must be one of %s, not %r" % (", ".join(ISOLATIONS), isolation))
    loaded = load_program(head, tail, digest, blob)
    if loaded is None:
        return {"missing": digest}
    program, zip_path = loaded
    request: Dict[str, Any] = {"env": dict(env), "zip": zip_path, "tty": bool(tty)}
    if tty and term:
        request["env"]["TERM"] = term
    if path:
        request["path"] = os.path.expanduser(os.path.expandvars(path))
    if digest is not None:  # where the zip text sits in the program
        request["span"] = [len(head), len(program) - len(head) - len(tail)]
    if isolation == "fork":
        zyg = _Zygote("fork", "", [], once=True)
        try:
            return _as_shell_reports(_run_child(zyg, request, program), shell, tty)
        finally:
            zyg.close()
    for attempt in (0, 1):
        zyg = _zygote(zygote_key, zip_path or "", preload, fresh=attempt == 1)
        try:
            return _as_shell_reports(_run_child(zyg, request, program), shell, tty)
        except BrokenError:
            if attempt:
                raise
            LOG.warning("zygote for %s lost; starting a new one", zygote_key[:12])
    raise AssertionError("unreachable")


def _as_shell_reports(res: Dict[str, Any], shell: str, tty: bool) -> Dict[str, Any]:
    """A child killed by signal N: status 128+N, as from the shell that
    runs vanilla's module command, and, when that shell is dash (Debian's
    /bin/sh), the line dash prints then ("Killed"; none for SIGINT and
    SIGPIPE), on the pty or on stderr. Other shells word it their own way
    (with pids): they get the status only."""
    rc = int(res["rc"])
    if rc >= 0:
        return res
    sig = -rc
    res["rc"] = 128 + sig
    try:
        is_dash = os.path.basename(os.path.realpath(shell)) == "dash"
    except (OSError, ValueError):
        is_dash = False
    text = signal.strsignal(sig) if is_dash else None
    if text and sig not in (signal.SIGINT, signal.SIGPIPE):
        if tty:
            res["stdout"] += text.encode() + b"\r\n"
        else:
            res["stderr"] += text.encode() + b"\n"
    return res


def _output_fds(request: Dict[str, Any]) -> "tuple[List[int], List[int]]":
    """([stdout, stderr] for the child, [what we read]): two pipes, or one
    pty (whose slave ``request["env"]["SSH_TTY"]`` then names)."""
    if not request.get("tty"):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        return [out_w, err_w], [out_r, err_r]
    master, slave = pty.openpty()
    request["env"]["SSH_TTY"] = os.ttyname(slave)
    return [slave, os.dup(slave)], [master]


def _run_child(zyg: _Zygote, request: Dict[str, Any], program: bytes) -> Dict[str, Any]:
    writes, reads = _output_fds(request)
    prog_r, prog_w = os.pipe()
    st_r, st_w = os.pipe()
    theirs = [prog_r] + writes + [st_w]
    ours = [prog_w] + reads + [st_r]
    try:
        zyg.spawn(request, theirs)
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    try:
        try:
            view = memoryview(program)
            while view:
                view = view[os.write(prog_w, view[:65536]):]
        except OSError:
            pass  # the child died before reading its program: its rc says why
        os.close(prog_w)
        ours.remove(prog_w)
        got = _collect(reads + [st_r], st_r, reads[0] if request.get("tty") else None)
    finally:
        for fd in ours:
            os.close(fd)
    rc = int(got[st_r].strip() or b"-9")
    return {"rc": rc, "stdout": got[reads[0]], "stderr": got[reads[1]] if len(reads) > 1 else b""}


def _collect(fds: List[int], status: int, tty: Optional[int] = None) -> Dict[int, bytes]:
    """Everything read from ``fds`` until each is at its end (a pty's
    master: EIO once every slave fd is closed). The pty ``tty`` is done
    once the child is (``status`` at its end) and the pty stays silent for
    PTY_LINGER (at most PTY_LINGER_MAX; see :func:`.spawn.pty_linger`)."""
    bufs: Dict[int, bytearray] = {fd: bytearray() for fd in fds}
    open_fds = set(bufs)
    until = 0.0
    while open_fds:
        wait = None
        if tty in open_fds and status not in open_fds:
            until, wait = pty_linger(until)
        ready, _, _ = select.select(list(open_fds), [], [], wait)
        if wait is not None and (not ready or wait == 0.0):
            open_fds.discard(tty)
            ready = [fd for fd in ready if fd != tty]
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if data:
                bufs[fd] += data
            else:
                open_fds.discard(fd)
    return {fd: bytes(buf) for fd, buf in bufs.items()}


# -- the zygote process (single-threaded) ----------------------------------

def zygote_main(fd: int, cfg: Dict[str, Any]) -> None:
    """Entry point of the zygote, forked by the virgin fork parent. With
    ``cfg["once"]`` it serves one request, reports that child's status and
    returns (``mitogen_task_isolation: fork``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
    _install_code_cache()
    _preload(str(cfg.get("zip") or ""), [str(n) for n in cfg.get("preload") or ()])
    _zygote_modules[0] = frozenset(sys.modules)
    # Objects of the zygote are never collected in children: a collection
    # there would write to every one of them, copying their pages.
    import gc
    gc.collect()
    gc.freeze()
    once = bool(cfg.get("once"))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status: Dict[int, int] = {}
    served = False
    while True:
        watch = [wake_r] if served else [sock.fileno(), wake_r]
        try:
            ready, _, _ = select.select(watch, [], [], 5.0)
        except InterruptedError:
            ready = []
        if wake_r in ready:
            os.read(wake_r, 4096)
        _reap(status)
        if served and not status:
            return
        if sock.fileno() not in ready:
            continue
        try:
            req, fds = recv_packet(sock)
        except OSError:
            return
        if req is None:
            return
        if not once and isinstance(req, dict):
            _precompile(str(req.get("zip") or ""))
        if not isinstance(req, dict) or len(fds) != 4:
            for x in fds:
                os.close(x)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            for x in [wake_r, wake_w] + list(status.values()):
                os.close(x)
            _task_child(req, fds)
        for x in fds[:3]:
            os.close(x)
        status[pid] = fds[3]
        send_packet(sock, {"pid": pid})
        served = once


def _reap(status: Dict[int, int]) -> None:
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        rc = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        fd = status.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, b"%d\n" % rc)
            except OSError:
                pass
            os.close(fd)


# The zip the zygote imported its preloaded modules from.
_preloaded_from: Dict[str, str] = {}
#: Per preloaded ``ansible`` module (name, module, names of its globals that
#: hold a path into the zygote's zip), computed once in the zygote so each
#: task child does not walk every module's globals again.
_preloaded: List[Tuple[str, Any, List[str]]] = []
#: The packages among them (name, module).
_preloaded_packages: List[Tuple[str, Any]] = []
#: The names in ``sys.modules`` once the zygote was ready. A task child
#: finds what it imported since by walking ``sys.modules`` from its end
#: (dicts keep insertion order) up to the first of these: walking all of it
#: would touch every module object, and each costs the child a copied page.
_zygote_modules: List["frozenset[str]"] = [frozenset()]


def _preload(zip_path: str, names: List[str]) -> None:
    if not zip_path:
        return
    _preloaded_from["zip"] = zip_path
    import importlib
    sys.path.insert(0, zip_path)
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a zip without it: tasks import it themselves
                LOG.debug("zygote: cannot preload %s: %s", name, exc)
    finally:
        sys.path.remove(zip_path)
    for name, mod in list(sys.modules.items()):
        if name == "ansible" or name.startswith("ansible."):
            _preloaded.append((name, mod, _path_globals(mod, zip_path)))
            if isinstance(getattr(mod, "__path__", None), list):
                _preloaded_packages.append((name, mod))


def _path_globals(mod: Any, prefix: str) -> List[str]:
    """Names of ``mod``'s globals whose value is a path under ``prefix``."""
    import pathlib
    return [key for key, value in list(vars(mod).items())
            if (isinstance(value, str) and value.startswith(prefix))
            or (isinstance(value, pathlib.PurePath) and str(value).startswith(prefix))]


# -- compiled code cache (zygote and task children) -------------------------

#: Code objects by SHA-1 of their source: what the zygote compiled from the
#: module zips it was given (:func:`_precompile`); its children inherit it.
_codes: Dict[str, Any] = {}
#: Zips already compiled, and how many sources the zygote keeps at most.
_precompiled: Set[str] = set()
CODE_LIMIT = 4096
#: In a task child: sources zipimport took from ``_codes`` (tests read it).
_code_hits = [0]
#: zipimport's own compile function, once the cache is installed.
_codes_compile: List[Any] = [None]


def _install_code_cache() -> None:
    """Make zipimport take code the zygote compiled (:data:`_codes`, keyed
    by the SHA-1 of the source) instead of compiling the source again in
    every task child, which cannot pass what it compiled on to the next
    one. The code gets the file name the source has this time, as if just
    compiled. No-op on a Python whose zipimport has no ``_compile_source``
    (3.8-3.13 have it)."""
    import zipimport
    original = getattr(zipimport, "_compile_source", None)
    if original is None:
        return
    _codes_compile[0] = original

    def compile_source(pathname: str, source: bytes) -> Any:
        code = _codes.get(hashlib.sha1(source).hexdigest())
        if code is None:
            return original(pathname, source)
        _code_hits[0] += 1
        return _renamed(code, pathname)

    setattr(zipimport, "_compile_source", compile_source)


def _precompile(zip_path: str) -> None:
    """In the zygote, before it forks a task child for ``zip_path``: compile
    the zip's Python sources that no child can have imported already (not
    preloaded), once per zip and source. Sources that do not compile are
    left to the child, which fails on them as vanilla would."""
    compile_source = _codes_compile[0]
    if (compile_source is None or not zip_path or zip_path in _precompiled
            or len(_codes) >= CODE_LIMIT):
        return
    _precompiled.add(zip_path)
    import zipfile
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for name in zf.namelist():
                module = name[:-3].replace("/", ".")
                if not name.endswith(".py") or module.replace(".__init__", "") in sys.modules:
                    continue
                source = zf.read(name)
                key = hashlib.sha1(source).hexdigest()
                if key not in _codes and len(_codes) < CODE_LIMIT:
                    try:
                        _codes[key] = compile_source(os.path.join(zip_path, name), source)
                    except (SyntaxError, ValueError):
                        pass
    except (OSError, zipfile.BadZipFile) as exc:
        LOG.debug("zygote: cannot precompile %s: %s", zip_path, exc)


def _renamed(code: Any, filename: str) -> Any:
    """``code`` and its nested code objects with ``co_filename`` set."""
    if code.co_filename == filename:
        return code
    consts = tuple(_renamed(c, filename) if isinstance(c, type(code)) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _task_child(req: Dict[str, Any], fds: List[int]) -> None:
    """In a fresh child of the zygote: become ``python3 < wrapper``."""
    code = 1
    try:
        prog, out, err, st = fds
        os.close(st)
        os.setsid()
        if req.get("tty"):
            acquire_tty(out)
        chunks = []
        while True:
            data = os.read(prog, 65536)
            if not data:
                break
            chunks.append(data)
        os.close(prog)
        code = run_program(req, b"".join(chunks), out, err)
    finally:
        os._exit(code)


def run_program(req: Dict[str, Any], program: bytes, out: int, err: int) -> int:
    """In a freshly forked, single-threaded child: run the AnsiballZ
    wrapper ``program`` as ``python3 < wrapper`` would, with stdin at EOF,
    stdout on ``out``, stderr on ``err`` (both fds are moved to 1 and 2)
    and ``req["env"]`` added to the environment. Returns the exit status
    the interpreter would have had; the caller ends the process with it."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    moves: List[Tuple[int, int]] = [(out, 1), (err, 2)]
    if req.get("tty"):  # the pty is stdin too, as under ssh -tt
        os.dup2(out, 0)
    else:
        moves.insert(0, (os.open(os.devnull, os.O_RDONLY), 0))
    for src, dst in moves:
        if src != dst:
            os.dup2(src, dst)
            os.close(src)
    _prepare(req)
    return _execute(program, str(req.get("path") or ""), req.get("span"))


def _prepare(req: Dict[str, Any]) -> None:
    env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
    os.environ.update(env)
    _coerce_locale()
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if extra:
        at = 1 if sys.path and sys.path[0] == "" else 0
        sys.path[at:at] = extra
    if "LANG" in env or "LC_ALL" in env or "LC_CTYPE" in env:
        import locale
        try:
            locale.setlocale(locale.LC_CTYPE, "")
        except locale.Error:
            pass
    sys.argv = [str(req.get("path") or "")]
    zip_path = req.get("zip")
    if zip_path:
        _rebase(str(zip_path), paths_only=True)
    loader = sys.modules.get("ansible.module_utils._internal._ansiballz._loader")
    original = getattr(loader, "run_module", None)
    if original is not None:
        def run_module(*args: Any, **kwargs: Any) -> Any:
            modlib = kwargs.get("modlib_path")
            if isinstance(modlib, str):
                _rebase(modlib)
            return original(*args, **kwargs)
        setattr(loader, "run_module", run_module)
    else:  # wrappers before 2.19 name the task's zip to runpy themselves
        import runpy
        plain_run = runpy.run_module

        def run_with_globals(*args: Any, **kwargs: Any) -> Any:
            modlib = (kwargs.get("init_globals") or {}).get("_modlib_path")
            if isinstance(modlib, str):
                _rebase(modlib)
            return plain_run(*args, **kwargs)
        setattr(runpy, "run_module", run_with_globals)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        new = _stdio(fd, getattr(sys, name))
        setattr(sys, name, new)
        setattr(sys, "__%s__" % name, new)
    sys.stdin = open(0, "r", closefd=False)
    setattr(sys, "__stdin__", sys.stdin)


def _stdio(fd: int, old: Any) -> Any:
    """sys.stdout (fd 1) or sys.stderr (fd 2) as a new interpreter makes
    it: unbuffered with PYTHONUNBUFFERED, else line-buffered on a tty (and
    stderr always from Python 3.9), else block-buffered."""
    import io
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    raw = io.FileIO(fd, "w", closefd=False)
    line = not unbuffered and (os.isatty(fd) or (fd == 2 and sys.version_info >= (3, 9)))
    return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw),  # type: ignore[arg-type]
                            encoding=old.encoding, errors=old.errors, line_buffering=line,
                            write_through=unbuffered)


def _coerce_locale() -> None:
    """What a new Python does (PEP 538) when the environment leaves the C
    locale and the agent's Python did it too (``agent.COERCED_LOCALE``): set
    ``LC_CTYPE`` in the environment, so the module's own children see it."""
    from .agent import COERCED_LOCALE
    coerced = COERCED_LOCALE.get("LC_CTYPE")
    if not coerced or "LC_ALL" in os.environ or "LC_CTYPE" in os.environ:
        return
    import locale
    try:
        current = locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:
        current = "C"
    if current in ("C", "POSIX"):
        os.environ["LC_CTYPE"] = coerced
        try:
            locale.setlocale(locale.LC_CTYPE, coerced)
        except locale.Error:
            pass


def _rebase(zip_path: str, paths_only: bool = False) -> None:
    """Make the preloaded ``ansible`` packages look imported from
    ``zip_path`` (the task's zip) rather than the zygote's: their package
    ``__path__`` lists it first (submodules only the task's zip has), and
    unless ``paths_only``, every path-valued global that pointed into the
    zygote's zip (``__file__``, constants such as the deprecator's base path)
    points into ``zip_path``, as if this process had imported them there."""
    import pathlib
    old = _preloaded_from.get("zip")
    # Preloaded modules (their path globals listed once by the zygote),
    # then those this task imported since.
    entries = ([(name, mod, []) for name, mod in _preloaded_packages] if paths_only
               else list(_preloaded))
    for name, mod in _imported_since_fork():
        entries.append((name, mod, _path_globals(mod, old) if old else []))
    for name, mod, keys in entries:
        path = getattr(mod, "__path__", None)
        if isinstance(path, list):
            mod.__path__ = [os.path.join(zip_path, *name.split("."))] + path
        if paths_only or not old:
            continue
        for key in keys:
            value = getattr(mod, key, None)
            if isinstance(value, str) and value.startswith(old):
                setattr(mod, key, zip_path + value[len(old):])
            elif isinstance(value, pathlib.PurePath) and str(value).startswith(old):
                setattr(mod, key, type(value)(zip_path + str(value)[len(old):]))


def _imported_since_fork() -> List[Tuple[str, Any]]:
    """The ``ansible`` modules in ``sys.modules`` that the zygote did not
    have, newest first."""
    found = []
    zygote = _zygote_modules[0]
    for name in reversed(sys.modules):  # type: ignore[call-overload]
        if name in zygote:
            break
        if name == "ansible" or name.startswith("ansible."):
            mod = sys.modules.get(name)
            if mod is not None:
                found.append((name, mod))
    return found


def _execute(source: bytes, path: str = "", span: Any = None) -> int:
    """Run ``source`` as ``python3`` would read it from stdin, or, given
    ``path``, as ``python3 path`` would run that file: ``__file__`` and
    tracebacks name it, with its source lines (from memory: nothing is
    written there)."""
    import builtins
    import types
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    if path:
        import linecache
        main.__file__ = path
        text = source.decode("utf-8", "replace")
        linecache.cache[path] = (len(text), None, text.splitlines(True), path)
    sys.modules["__main__"] = main
    try:
        exec(_compile_program(source, path or "<stdin>", span), main.__dict__)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:
        # As the interpreter reports it: sys.excepthook, with the
        # program's frames, not ours.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        code = _uncaught(exc, tb)
    try:
        import atexit
        atexit._run_exitfuncs()
        import threading as _threading
        getattr(_threading, "_shutdown", lambda: None)()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return code


def _uncaught(exc: BaseException, tb: Any) -> int:
    """What the interpreter does with an exception nothing caught: calls
    sys.excepthook (a module may set its own, e.g. to fail_json); a
    SystemExit from the hook is the exit status; a hook that fails is
    reported as CPython reports it. The default hook's report comes from
    the traceback module (it finds the program's source lines in
    linecache), without our own frames. Returns the exit status."""
    import traceback
    tb = _without_our_frames(tb)
    exc.__traceback__ = tb
    try:
        if sys.excepthook is sys.__excepthook__:
            traceback.print_exception(type(exc), exc, tb)
        else:
            sys.excepthook(type(exc), exc, tb)
    except SystemExit as done:
        return _exit_code(done.code)
    except BaseException as failed:
        sys.stderr.write("Error in sys.excepthook:\n")
        traceback.print_exception(type(failed), failed, failed.__traceback__)
        sys.stderr.write("\nOriginal exception was:\n")
        traceback.print_exception(type(exc), exc, tb)
    return 1


def _without_our_frames(tb: Any) -> Any:
    """The traceback ``tb`` without frames of this file (the hooks
    :func:`_prepare` puts around the wrapper's calls)."""
    kept = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != __file__:
            kept.append(tb)
        tb = tb.tb_next
    for a, b in zip(kept, kept[1:] + [None]):
        a.tb_next = b
    return kept[0] if kept else None


#: Stands in for the module zip text while a wrapper is compiled: base64
#: characters only, so it is valid wherever the zip text is.
_ZIP_STAND_IN = "MSVCzipTEXTstandIN0"


def _compile_program(source: bytes, filename: str, span: Any = None) -> Any:
    """``compile(source, filename, "exec")``. With ``span`` ([offset,
    length] of the zip text, one string literal of hundreds of KiB), the
    text is taken out before compiling and put back as that literal's
    constant: the same code, without tokenizing the literal (~2 ms per
    task). Falls back to compiling ``source`` as it is."""
    try:
        start, size = int(span[0]), int(span[1])
        text = source[start:start + size].decode("ascii")
    except (TypeError, ValueError, IndexError, UnicodeDecodeError):
        text = ""
    if text:
        code = compile(source[:start] + _ZIP_STAND_IN.encode() + source[start + size:],
                       filename, "exec")
        swapped = _swap_constant(code, _ZIP_STAND_IN, text)
        if swapped is not None:
            return swapped
    return compile(source, filename, "exec")


def _swap_constant(code: Any, old: str, new: str) -> Any:
    """``code`` with its one constant ``old`` (a str, or the same as bytes)
    replaced by ``new``, looking into nested code; None unless exactly one
    was found."""
    found: List[Any] = []

    def walk(co: Any) -> Any:
        consts = []
        for const in co.co_consts:
            if isinstance(const, type(co)):
                const = walk(const)
            elif isinstance(const, str) and const == old:
                found.append(const)
                const = new
            elif isinstance(const, bytes) and const == old.encode():
                found.append(const)
                const = new.encode()
            consts.append(const)
        return co.replace(co_consts=tuple(consts))

    swapped = walk(code)
    return swapped if len(found) == 1 else None


def _exit_code(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    try:
        sys.stderr.write("%s\n" % (value,))
    except Exception:
        pass
    return 1
