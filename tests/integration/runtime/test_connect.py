"""Connection failures give clear errors quickly and leave nothing behind."""
from __future__ import annotations

import time
from typing import Any

import pytest

from _remote_helpers import AGENT
from ansible_mitogen_svc import BootstrapError, CallError, PasswordError, Router, call, connect

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


def _ssh_by_password(router: Router, testbed: Any, password: str, **kwargs: Any) -> Any:
    from tests.lib.testbed import ALICE
    host = testbed.hosts[0]
    options = ["-o", "PubkeyAuthentication=no", "-o", "StrictHostKeyChecking=yes",
               "-o", "UserKnownHostsFile=%s" % host.known_hosts_path, "-o", "LogLevel=ERROR"]
    return connect.ssh(router, host.address, port=host.port, username=ALICE, ssh_args=options,
                       python="/usr/bin/python3", password=password, timeout=20, **kwargs)


def test_ssh_password_login_and_its_failures(router: Router, testbed: Any) -> None:
    """ssh's password prompt gets the password; a wrong one is "Incorrect"
    when ssh asks again, or ssh's own failure with single_prompt; a right
    one is declined (an empty answer) at a prompt not containing
    ``prompt``. The password never appears in an error."""
    from tests.lib.testbed import ALICE_PASSWORD
    ctx = _ssh_by_password(router, testbed, ALICE_PASSWORD)
    assert call(ctx, AGENT, "ping") is True
    ctx = _ssh_by_password(router, testbed, ALICE_PASSWORD, prompt="assword")
    assert call(ctx, AGENT, "ping") is True

    with pytest.raises(PasswordError) as wrong:
        _ssh_by_password(router, testbed, "wrong-pw-1")
    assert str(wrong.value) == "Incorrect ssh password: Permission denied, please try again."
    with pytest.raises(BootstrapError) as once:
        _ssh_by_password(router, testbed, "wrong-pw-2", single_prompt=True)
    assert "(status 255)" in str(once.value) and "Permission denied (" in str(once.value)
    assert "wrong-pw-2" not in str(once.value)
    with pytest.raises(BootstrapError) as declined:
        _ssh_by_password(router, testbed, ALICE_PASSWORD, single_prompt=True, prompt="Passcode")
    assert "Permission denied (" in str(declined.value)
    assert ALICE_PASSWORD not in str(declined.value)
