"""The pure parts of ansible_mitogen_svc.asyncjob: how a module's output
becomes a job record (async_wrapper's rules), and the job spec."""
from __future__ import annotations

import pytest

from ansible_mitogen_svc.asyncjob import JobSpec, _text, split_json_output


@pytest.mark.parametrize("blank_junk_warns", [False, True])
def test_json_alone(blank_junk_warns: bool) -> None:
    assert split_json_output('{"a": 1}\n', blank_junk_warns) == ('{"a": 1}', [])


def test_leading_junk_is_dropped_silently() -> None:
    text = 'MOTD line\n  {"a": {"b": 2}\n}\n'
    assert split_json_output(text, False) == ('  {"a": {"b": 2}\n}', [])


def test_trailing_junk_warns() -> None:
    text = '{"a": 1}\nbye\n\nagain'
    assert split_json_output(text, False) == (
        '{"a": 1}', ["Module invocation had junk after the JSON data: bye\n\nagain"])


def test_blank_trailing_lines_warn_only_before_2_21() -> None:
    text = '{"a": 1}\n\n  \n'
    assert split_json_output(text, False) == ('{"a": 1}', [])
    assert split_json_output(text, True) == (
        '{"a": 1}', ["Module invocation had junk after the JSON data: \n  "])


@pytest.mark.parametrize("text, message", [
    ("no json\n", "No start of json char found"),
    ("", "No start of json char found"),
    ('{"a": 1,\n"b": 2\n', "No end of json char found"),
])
def test_no_json(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_json_output(text, False)


def test_text_mode_reading() -> None:
    assert _text(b"a\r\nb\rc\n\xff") == "a\nb\nc\n\udcff"


def test_job_spec() -> None:
    spec = JobSpec.from_dict({"jid": "j1", "limit": 5, "unknown": 1})
    assert spec == JobSpec("j1", 5, False, None, "", True, False, "")
    with pytest.raises(TypeError):
        JobSpec.from_dict({"jid": 1, "limit": 5})
    with pytest.raises(TypeError):
        JobSpec.from_dict({"limit": 5})
