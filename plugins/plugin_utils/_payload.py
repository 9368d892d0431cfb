# PRIVATE to the collection: not a public API, may change without notice.
"""Split an AnsiballZ wrapper into its cacheable zip and per-task rest.

Runs on: the controller (Ansible workers).

The wrapper ansible-core builds for a Python module (with pipelining) is a
script holding the module zip as one base64 string literal, and the task's
parameters. Every ansible-core version since 2.0 does this, in different
layouts, so the split looks for the literal itself rather than for a
version's template: the longest base64 run that decodes to a zip file. The
target caches that text by SHA-1 (see ansible_mitogen_svc.runner) and the
rest travels with every task.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import typing as t

# Shorter runs are not worth a cache entry (and are not a module zip).
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{4096,}={0,2}")
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_START = base64.b64encode(_ZIP_MAGIC)[:5]  # b"UEsDB"
#: The marker every AnsiballZ wrapper defines.
WRAPPER_MARK = b"_ANSIBALLZ_WRAPPER = True"

#: Imported once in each zygote, from the first module zip it is given.
PRELOAD = [
    "ansible.module_utils.basic",
    "ansible.module_utils._internal._ansiballz._loader",  # 2.19+
    # Imported by every module run (2.19+: the serialization profiles).
    "ansible.modules",
    "ansible.module_utils.common.sentinel",
    "ansible.module_utils._internal._json._profiles._module_legacy_m2c",
    "ansible.module_utils._internal._json._profiles._module_legacy_c2m",
    # Standard library the wrapper (and many modules) import every run.
    "zipfile",
    "encodings.cp437",
    "glob",
]


class Split(t.NamedTuple):
    head: bytes
    digest: t.Optional[str]
    blob: bytes
    tail: bytes


def is_wrapper(data: t.Optional[bytes]) -> bool:
    return bool(data) and WRAPPER_MARK in t.cast(bytes, data)


def split(data: bytes) -> Split:
    """``head + blob + tail == data``; ``digest`` is None (and ``blob``
    empty) when no module zip was found. The zip text is the longest run
    of base64 that starts with a zip's magic (``UEsDB``): looking only
    where that appears saves scanning the whole wrapper (~0.7 ms)."""
    best = None
    pos = data.find(_ZIP_START)
    while pos != -1:
        match = _BASE64_RUN.match(data, pos)
        if match is not None and (best is None or match.end() - match.start()
                                  > best.end() - best.start()):
            best = match
        pos = data.find(_ZIP_START, match.end() if match is not None else pos + 1)
    if best is not None:
        blob = best.group(0)
        try:
            head_bytes = base64.b64decode(blob[:8], validate=True)
        except binascii.Error:
            head_bytes = b""
        if head_bytes.startswith(_ZIP_MAGIC):
            return Split(data[:best.start()], hashlib.sha1(blob).hexdigest(), blob,
                         data[best.end():])
    return Split(data, None, b"", b"")


_key: t.Dict[str, str] = {}


def zygote_key(interpreter: str) -> str:
    """Zygotes are shared by every module of one ansible-core (same
    ``module_utils``) and one interpreter."""
    if "core" not in _key:
        from ansible import release
        from ansible.module_utils import basic
        with open(basic.__file__, "rb") as fp:
            _key["core"] = hashlib.sha1(release.__version__.encode() + b"\0" + fp.read()
                                        ).hexdigest()
    return hashlib.sha1((_key["core"] + "\0" + interpreter).encode()).hexdigest()
