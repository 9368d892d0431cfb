"""spawn.Dialog: when the password is typed and which output is an error
(sans-IO, no processes)."""
from __future__ import annotations

import pytest

from ansible_mitogen_svc import PasswordError
from ansible_mitogen_svc.spawn import (PASSWORD_PROMPT, Dialog, _drop_prompt, prompt_containing,
                                       prompt_pattern)

SUDO = r"\[sudo via ansible, key=k\] password:\s*$"


def sudo(password: "str | None" = "pw") -> Dialog:
    return Dialog("sudo", password, SUDO, incorrect=["Sorry, try again."],
                  missing=["sudo: a password is required"])


def test_answers_the_prompt_once_even_when_split() -> None:
    d = sudo()
    assert d.feed(b"[sudo via ansible, ") == b""
    assert d.feed(b"key=k] password: ") == b"pw\n"
    assert d.feed(b"\r\n") == b""


def test_a_second_prompt_means_incorrect() -> None:
    d = sudo()
    d.feed(b"[sudo via ansible, key=k] password:")
    with pytest.raises(PasswordError, match="^Incorrect sudo password$"):
        d.feed(b"\r\n[sudo via ansible, key=k] password:")


def test_incorrect_text_counts_only_after_an_answer() -> None:
    d = sudo()
    assert d.feed(b"motd: Sorry, try again.\n") == b""
    d.feed(b"[sudo via ansible, key=k] password:")
    with pytest.raises(PasswordError, match="^Incorrect sudo password$"):
        d.feed(b"\r\nSorry, try again.\r\n")


@pytest.mark.parametrize("output", [b"sudo: a password is required\r\n",
                                    b"[sudo via ansible, key=k] password:"])
def test_missing_password(output: bytes) -> None:
    with pytest.raises(PasswordError, match="^Missing sudo password$"):
        sudo(None).feed(output)


def test_exit_explained_by_the_output() -> None:
    d = Dialog("su", "pw", incorrect=["Authentication failure"])
    assert d.feed(b"Password: ") == b"pw\n"
    with pytest.raises(PasswordError, match="^Incorrect su password$"):
        d.exited(b"su: Authentication failure\r\n", b"")
    Dialog("su", "pw").exited(b"/bin/sh: 1: python9: not found\n", b"")  # not about passwords


def test_default_and_named_prompts() -> None:
    assert Dialog("ssh", "pw").feed(b"alice@host's password: ") == b"pw\n"
    named = Dialog("sudo", "pw", prompt_pattern("Enter secret> "))
    assert named.feed(b"Enter secret> ") == b"pw\n"


def test_a_prompt_containing_the_text_gets_the_password_others_an_empty_answer() -> None:
    d = Dialog("ssh", "pw", prompt_containing("Passcode"), decline=PASSWORD_PROMPT)
    assert d.feed(b"alice@host's password: ") == b"\n"
    assert d.answered_prompt is d.decline
    assert not d.answered  # declined: a later prompt is not "prompted again"
    assert d.feed(b"\r\nPasscode for alice (OTP): ") == b"pw\n"
    assert d.answered_prompt is d.prompt
    with pytest.raises(PasswordError, match="^Incorrect ssh password"):
        d.feed(b"\r\nPasscode for alice (OTP): ")
    # The text may sit anywhere in the prompt's line, not in earlier lines.
    assert Dialog("ssh", "pw", prompt_containing("assword")).feed(
        b"alice@host's password: ") == b"pw\n"
    assert Dialog("ssh", "pw", prompt_containing("Passcode")).feed(
        b"Passcode rules apply\nalice@host's password: ") == b""


def test_explain_keeps_what_the_tool_said_not_the_new_prompt() -> None:
    d = Dialog("ssh", "pw", explain=True)
    assert d.feed(b"alice@h's password: ") == b"pw\n"
    with pytest.raises(PasswordError) as exc:
        d.feed(b"\r\nPermission denied, please try again.\r\r\nalice@h's password: ")
    assert str(exc.value) == "Incorrect ssh password: Permission denied, please try again."
    quiet = Dialog("ssh", "pw")
    quiet.feed(b"password: ")
    with pytest.raises(PasswordError, match=r"^Incorrect ssh password$"):
        quiet.feed(b"Permission denied\r\npassword: ")


def test_an_answered_prompt_leaves_the_diagnostics() -> None:
    diag = bytearray(b"Warning: added host key.\r\nalice@h's password: ")
    _drop_prompt(diag, Dialog("ssh", "pw").prompt)
    assert bytes(diag) == b"Warning: added host key.\r\n"
    diag = bytearray(b"[sudo] password for alice: ")
    _drop_prompt(diag, Dialog("sudo", "pw").prompt)
    assert bytes(diag) == b""
    diag = bytearray(b"no prompt here\n")
    _drop_prompt(diag, Dialog("sudo", "pw").prompt)
    assert bytes(diag) == b"no prompt here\n"


def test_ready_line_round_trip() -> None:
    from ansible_mitogen_svc.bootstrap import READY, parse_ready, ready_line
    line = ready_line(4321, "/opt/py 3/bin/python3")
    assert line.startswith(READY) and line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_ready(line[len(READY):-1]) == (4321, "/opt/py 3/bin/python3")
    # An executable the line cannot carry is left out, never a broken line.
    line = ready_line(7, "/bad\npath")
    assert line.count(b"\n") == 1
    assert parse_ready(line[len(READY):-1]) == (7, None)
    assert parse_ready(b"99") == (99, None)
