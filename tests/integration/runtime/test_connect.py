"""Connection failures give clear errors quickly and leave nothing behind."""
from __future__ import annotations

import time
from typing import Any

import pytest

from _remote_helpers import AGENT
from ansible_mitogen_svc import BootstrapError, CallError, Router, call, connect

pytestmark = pytest.mark.timeout(60)

BOUND = 15.0


def _ssh_as(router: Router, testbed: Any, user: str) -> Any:
    host = testbed.hosts[0]
    return connect.ssh(router, host.address, port=host.port, username=user,
                       ssh_args=host.ssh_options(), python="/usr/bin/python3", timeout=30)


def test_missing_interpreter_is_a_bootstrap_error(router: Router) -> None:
    t0 = time.monotonic()
    with pytest.raises(BootstrapError) as exc:
        connect.local(router, python="/nonexistent/python3", timeout=10)
    assert time.monotonic() - t0 < BOUND
    assert "/nonexistent/python3" in str(exc.value)


def test_ssh_to_a_closed_port_is_a_bootstrap_error(router: Router, testbed: Any) -> None:
    host = testbed.hosts[0]
    t0 = time.monotonic()
    with pytest.raises(BootstrapError) as exc:
        connect.ssh(router, host.address, port=1, username="root",
                    ssh_args=host.ssh_options(), python="/usr/bin/python3", timeout=10)
    assert time.monotonic() - t0 < BOUND
    assert "before the handshake" in str(exc.value) and "refused" in str(exc.value).lower()


@pytest.mark.parametrize("password,reason", [
    (None, "Missing sudo password"),
    ("wrong-pw", "Incorrect sudo password"),
])
def test_sudo_password_errors(router: Router, testbed: Any, password: Any, reason: str) -> None:
    from tests.lib.testbed import ALICE, BOB
    first = _ssh_as(router, testbed, ALICE)
    t0 = time.monotonic()
    with pytest.raises(CallError) as exc:
        connect.via(first, ["sudo", "-p", "[msvc-test] password for %p: ", "-u", BOB, "--"],
                    python="/usr/bin/python3", password=password, timeout=10)
    assert time.monotonic() - t0 < BOUND
    assert exc.value.type_name == "ansible_mitogen_svc.errors.PasswordError"
    assert reason in exc.value.message
    assert password is None or password not in str(exc.value)
    assert call(first, AGENT, "ping") is True  # the first agent is fine


def test_custom_sudo_prompt_is_answered(router: Router, testbed: Any) -> None:
    """A prompt without the word "password" is answered when named."""
    from tests.lib.testbed import ALICE, ALICE_PASSWORD, BOB
    first = _ssh_as(router, testbed, ALICE)
    t0 = time.monotonic()
    second = connect.via(first, ["sudo", "-p", "Enter secret> ", "-u", BOB, "--"],
                         python="/usr/bin/python3", password=ALICE_PASSWORD, timeout=10,
                         password_prompt="Enter secret> ")
    assert time.monotonic() - t0 < BOUND
    info = call(second, AGENT, "info")
    import pwd
    assert info["uid"] == pwd.getpwnam(BOB).pw_uid
