"""First stage, source bundle and handshake of an agent.

Runs on: controller and targets (shipped: an agent starts chained agents).

How an agent starts
-------------------
1. The parent runs ``<prefix> python3 -c "<FIRST STAGE>"`` with stdin and
   stdout as the data pipes. The first stage is ~300 characters of base64
   that decodes to a loop reading a 4-byte length and then that many bytes
   of stage 2 from its *data fd*: stdin, or stdout (a socket, so it reads
   too) for chained agents, whose stdin is the pty a become tool such as
   ``sudo -S`` or ``su`` reads the password from. The command holds no
   per-agent data, so :func:`agent_command` is one fixed string per
   interpreter that a become plugin can wrap on the controller.
2. The parent writes stage 2: zlib-compressed Python source holding the
   source of every module in :data:`SHIPPED_MODULES` (plus modules the
   caller ships) and a tiny meta-path importer that serves them from memory.
3. The parent writes the config: a 4-byte length then a codec-encoded dict
   (ids, parent id, name, limits). Stage 2 imports
   :mod:`ansible_mitogen_svc.agent` from memory and calls ``main(config)``.
4. The agent forks its virgin fork parent, moves the data pipes off fds 0
   and 1, and writes :data:`READY` followed by its pid, a space, its
   ``sys.executable`` and a newline (:func:`ready_line`). From then on both
   directions carry only frames.

Nothing the target sends before READY is trusted: it is kept (bounded) only
to explain a failure.
"""
from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from typing import Dict, Iterable, Optional, Tuple

from . import codec

__all__ = ["SHIPPED_MODULES", "MIN_TARGET_PYTHON", "READY", "Sources",
           "collect_sources", "stage2", "first_stage_argv", "agent_command", "encode_stage2",
           "encode_config", "ready_line", "parse_ready"]

# The minimum target Python, declared once.
MIN_TARGET_PYTHON = (3, 8)

# Every module an agent needs, in import order. Nothing else is shipped.
SHIPPED_MODULES = (
    "ansible_mitogen_svc",
    "ansible_mitogen_svc.errors",
    "ansible_mitogen_svc.codec",
    "ansible_mitogen_svc.wire",
    "ansible_mitogen_svc.protocol",
    "ansible_mitogen_svc.router",
    "ansible_mitogen_svc.policy",
    "ansible_mitogen_svc.transport",
    "ansible_mitogen_svc.broker",
    "ansible_mitogen_svc.context",
    "ansible_mitogen_svc.service",
    "ansible_mitogen_svc.bootstrap",
    "ansible_mitogen_svc.spawn",
    "ansible_mitogen_svc.connect",
    "ansible_mitogen_svc.forkserver",
    "ansible_mitogen_svc.jobs",
    "ansible_mitogen_svc.transfer",
    "ansible_mitogen_svc.files",
    "ansible_mitogen_svc.agent",
)

READY = b"MSVC-READY "

# name -> (is_package, source text)
Sources = Dict[str, Tuple[bool, str]]

_STAGE1 = """\
import os,sys,zlib
F=%d
def _read(n):
 b=b''
 while len(b)<n:
  c=os.read(F,n-len(b))
  if not c:raise SystemExit('msvc: EOF during bootstrap')
  b+=c
 return b
exec(compile(zlib.decompress(_read(int.from_bytes(_read(4),'big'))),'<msvc-stage2>','exec'))
"""

_STAGE2_TAIL = """
class _Importer(object):
    def __init__(self, sources):
        self.msvc_sources = sources
    def find_spec(self, name, path=None, target=None):
        if name not in self.msvc_sources:
            return None
        import importlib.util
        return importlib.util.spec_from_loader(name, self, is_package=self.msvc_sources[name][0])
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        is_pkg, src = self.msvc_sources[module.__name__]
        fn = '<msvc>/%s%s' % (module.__name__.replace('.', '/'), '/__init__.py' if is_pkg else '.py')
        module.__file__ = fn
        exec(compile(src, fn, 'exec'), module.__dict__)
    def get_source(self, name):
        return self.msvc_sources[name][1]
    def is_package(self, name):
        return self.msvc_sources[name][0]
sys.meta_path.insert(0, _Importer(_SOURCES))
import struct
_cfg = _read(struct.unpack('>I', _read(4))[0])
import ansible_mitogen_svc.agent
ansible_mitogen_svc.agent.main(_cfg, F)
"""


def _is_docstring(node: object) -> bool:
    import ast
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
        and isinstance(node.value.value, str)


def _minify(source: str) -> str:
    """Drop docstrings, comments and annotations: well over half the
    bytes. Line numbers change, but tracebacks on the target show the
    shipped (minified) lines, so they stay self-consistent. Annotations are
    never evaluated at run time (``from __future__ import annotations``)."""
    import ast
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None:
                    a.annotation = None
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        new_body = []
        for i, stmt in enumerate(body):
            if i == 0 and _is_docstring(stmt):
                continue
            if isinstance(stmt, ast.AnnAssign):
                if stmt.value is None:
                    continue
                stmt = ast.Assign(targets=[stmt.target], value=stmt.value,
                                  lineno=stmt.lineno, col_offset=stmt.col_offset)
            new_body.append(stmt)
        node.body = new_body or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.unparse(tree) + "\n"  # type: ignore[attr-defined]


def _cache_path(name: str) -> str:
    """``name`` in the per-user cache directory (~/.cache/mitogen-svc)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mitogen-svc", name)


def _cache_read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as fp:
            return fp.read()
    except OSError:
        return None


def _cache_write(path: str, data: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
        with open(tmp, "wb") as fp:
            fp.write(data)
        os.rename(tmp, path)
    except OSError:
        pass  # read-only home: compute it again next time


def _minify_cached(source: str) -> str:
    """_minify() through the per-user cache: it costs ~1 s of CPU per run
    otherwise, which a one-task run would notice. Keyed by the source and
    the Python version doing the unparsing."""
    import hashlib
    key = hashlib.sha256(("%d.%d\0" % sys.version_info[:2] + source).encode("utf-8")).hexdigest()
    path = _cache_path("min-%s.py" % key)
    hit = _cache_read(path)
    if hit is not None:
        return hit.decode("utf-8")
    out = _minify(source)
    _cache_write(path, out.encode("utf-8"))
    return out


def _compress_cached(data: bytes) -> bytes:
    """``zlib.compress(data, 9)`` through the per-user cache, keyed by
    ``data``: ~18 ms of CPU in every mux otherwise."""
    import hashlib
    path = _cache_path("stage2-%s.z" % hashlib.sha256(data).hexdigest())
    hit = _cache_read(path)
    if hit is not None:
        try:
            if zlib.decompress(hit) == data:  # a torn or foreign file: ignore it
                return hit
        except zlib.error:
            pass
    out = zlib.compress(data, 9)
    _cache_write(path, out)
    return out


# Targets always see the runtime as ``ansible_mitogen_svc``, whatever it is
# called here (``ansible_collections.mitogen.svc.ansible_mitogen_svc`` when
# loaded as part of the installed collection).
CANONICAL = "ansible_mitogen_svc"
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _runtime_source(name: str) -> Tuple[bool, str]:
    rel = name[len(CANONICAL):].lstrip(".")
    if not rel:
        path, is_pkg = os.path.join(_PKG_DIR, "__init__.py"), True
    else:
        path, is_pkg = os.path.join(_PKG_DIR, *rel.split(".")) + ".py", False
    with open(path, encoding="utf-8") as fp:
        return is_pkg, fp.read()


def _module_sources(names: Iterable[str], minify: bool) -> Sources:
    out: Sources = {}
    for name in names:
        if name == CANONICAL or name.startswith(CANONICAL + "."):
            is_pkg, src = _runtime_source(name)
        else:
            mod = sys.modules.get(name) or __import__(name, fromlist=["_"])
            loader = getattr(mod, "__loader__", None)
            get_source = getattr(loader, "get_source", None)
            text = get_source(name) if get_source is not None else None
            if text is None:
                raise ImportError("cannot find the source of %s to ship it" % name)
            is_pkg, src = hasattr(mod, "__path__"), text
        if minify and sys.version_info >= (3, 9):
            src = _minify_cached(src)
        out[name] = (is_pkg, src)
    return out


def own_sources() -> Optional[Sources]:
    """On an agent: the sources it was started with (to start children)."""
    for finder in sys.meta_path:
        sources = getattr(finder, "msvc_sources", None)
        if sources is not None:
            return sources
    return None


_CACHE: Dict[Tuple[str, ...], Tuple[bytes, Sources]] = {}
_CACHE_LOCK = threading.Lock()


def collect_sources(extra: Iterable[str] = (), minify: bool = True) -> Sources:
    """Sources of SHIPPED_MODULES plus ``extra`` module names."""
    mine = own_sources()
    names = list(SHIPPED_MODULES) + [n for n in extra if n not in SHIPPED_MODULES]
    if mine is not None:
        missing = [n for n in names if n not in mine]
        out = {n: mine[n] for n in names if n in mine}
        out.update(_module_sources(missing, minify))
        return out
    return _module_sources(names, minify)


def stage2(extra: Iterable[str] = ()) -> Tuple[bytes, Sources]:
    """Compressed stage 2 (cached per set of extra modules) and its sources."""
    key = tuple(sorted(set(extra)))
    with _CACHE_LOCK:  # one build, however many threads want it at once
        hit = _CACHE.get(key)
        if hit is None:
            sources = collect_sources(key)
            text = "_SOURCES = %r\n%s" % (sources, _STAGE2_TAIL)
            hit = (_compress_cached(text.encode("utf-8")), sources)
            _CACHE[key] = hit
    return hit


def first_stage_argv(python: str, data_fd: int = 0) -> list:
    """``[python, "-c", code]``: reads stage 2 (length-prefixed) from
    ``data_fd``: 0 (stdin) or 1 (stdout, when it is a socket)."""
    import base64
    code = base64.b64encode(zlib.compress((_STAGE1 % data_fd).encode(), 9)).decode()
    return [python, "-c",
            "import base64,zlib;exec(zlib.decompress(base64.b64decode('%s')))" % code]


def agent_command(python: str) -> str:
    """The shell command that starts a chained agent with ``python``: the
    same for every agent, so a become plugin can wrap it on the controller
    (``become.build_become_command(agent_command(python), shell)``)."""
    import shlex
    return " ".join(shlex.quote(a) for a in first_stage_argv(python, 1))


def ready_line(pid: int, executable: str) -> bytes:
    """What an agent writes once it serves: READY, pid, executable."""
    exe = os.fsencode(executable or "")
    if b"\n" in exe:
        exe = b""  # unknown rather than a broken handshake
    return READY + b"%d %s\n" % (pid, exe)


def parse_ready(rest: bytes) -> Tuple[int, Optional[str]]:
    """(pid, executable or None) from a READY line's text after READY."""
    pid, _, exe = rest.partition(b" ")
    return int(pid or 0), (os.fsdecode(exe) if exe else None)


def encode_stage2(blob: bytes) -> bytes:
    """Stage 2 as the first stage reads it."""
    return struct.pack(">I", len(blob)) + blob


def encode_config(config: dict) -> bytes:
    body = codec.dumps(config)
    return struct.pack(">I", len(body)) + body
