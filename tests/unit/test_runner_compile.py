"""How a task child compiles its AnsiballZ wrapper (runner._compile_program):
the zip text literal is left out of the tokenizer and put back as the
constant it would have been. Pure functions, no processes."""
from __future__ import annotations

import base64
import os
from typing import Any, Dict

from ansible_mitogen_svc import runner

BLOB = base64.b64encode(os.urandom(6000))


def run(source: bytes, span: Any) -> Dict[str, Any]:
    scope: Dict[str, Any] = {}
    exec(runner._compile_program(source, "<stdin>", span), scope)
    return scope


def parts(head: bytes, tail: bytes) -> "tuple[bytes, list[int]]":
    return head + BLOB + tail, [len(head), len(BLOB)]


def test_module_level_literal_2_19_style() -> None:
    source, span = parts(b"def main(zip_data):\n    return zip_data\nOUT = main(zip_data='",
                         b"')\n")
    assert run(source, span)["OUT"] == BLOB.decode()


def test_literal_inside_a_function_2_18_style() -> None:
    source, span = parts(b'def main():\n    ZIPDATA = """', b'"""\n    return ZIPDATA\n'
                         b"OUT = main()\n")
    assert run(source, span)["OUT"] == BLOB.decode()


def test_bytes_literal() -> None:
    source, span = parts(b"OUT = b'", b"'\n")
    assert run(source, span)["OUT"] == BLOB


def test_the_literal_is_not_tokenized() -> None:
    # What compile() sees: the stand-in, never the zip text.
    seen = []
    original = compile

    def spy(src: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(bytes(src))
        return original(src, *args, **kwargs)

    source, span = parts(b"OUT = '", b"'\n")
    runner.compile = spy  # type: ignore[attr-defined]
    try:
        assert run(source, span)["OUT"] == BLOB.decode()
    finally:
        del runner.compile  # type: ignore[attr-defined]
    assert seen == [b"OUT = '" + runner._ZIP_STAND_IN.encode() + b"'\n"]


def test_falls_back_when_the_span_is_not_one_literal() -> None:
    # Implicit concatenation: the constant is not the stand-in alone.
    source, span = parts(b"OUT = 'x' '", b"'\n")
    assert run(source, span)["OUT"] == "x" + BLOB.decode()
    # A wrong span, no span, a span outside the source.
    source, span = parts(b"OUT = '", b"'\n")
    for bad in ([0, 3], None, [len(source) + 5, 10], ["a", "b"]):
        assert run(source, bad)["OUT"] == BLOB.decode()
