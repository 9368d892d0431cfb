"""Become through any become plugin: chained routes of the mux's
ConnectionService, with hops built by the plugin helper from real Ansible
become plugins (ansible.builtin.sudo, ansible.builtin.su, and a doas plugin
shaped like community.general.doas), started over ssh on the testbed.

Test-only, controller side. Every testbed host is this machine, so the
tests look at the target's processes in /proc directly.
"""
from __future__ import annotations

import os
import pathlib
import pwd
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from _remote_helpers import AGENT, wait_gone
from ansible_mitogen_svc import CallError, Pool, Router, call
from ansible_mitogen_svc.files import FileService
from ansible_mitogen_svc.mux import BECOME_CAP, ConnectionService

pytestmark = pytest.mark.timeout(180)

REPO = pathlib.Path(__file__).resolve().parents[3]
PLUGINS = pathlib.Path(__file__).resolve().parent / "become_plugins"
PYTHON = "/usr/bin/python3"
TIMEOUT = 20.0
SERVICE = ConnectionService.name
PASSWORD_ERROR = "ansible_mitogen_svc.errors.PasswordError"
BOOTSTRAP_ERROR = "ansible_mitogen_svc.errors.BootstrapError"


# -- Ansible side: real become plugins and the helper under test -----------------------
@pytest.fixture(scope="module")
def ansible_side(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Ansible's plugin loader, with this repository as the mitogen.svc
    collection and the test doas plugin; returns the helper module. The
    collection loader stays installed for the session, so its directory
    must too (tmp_path_factory keeps it)."""
    pytest.importorskip("ansible")
    from ansible.utils.collection_loader import AnsibleCollectionConfig
    if AnsibleCollectionConfig.collection_finder is None:
        root = tmp_path_factory.mktemp("collections")
        coll = root / "ansible_collections" / "mitogen"
        coll.mkdir(parents=True)
        (coll / "svc").symlink_to(REPO)
        from ansible.plugins.loader import init_plugin_loader
        init_plugin_loader([str(root)])
    from ansible.plugins.loader import become_loader
    become_loader.add_directory(str(PLUGINS))
    try:
        from ansible_collections.mitogen.svc.plugins.plugin_utils import _become
    except ImportError as exc:
        pytest.skip("the collection loader was set up without mitogen.svc: %s" % exc)
    return _become


@pytest.fixture
def hop(ansible_side: Any) -> Callable[..., Dict[str, Any]]:
    """``hop(plugin, user, password=None)``: the hop become_hop() builds
    for a freshly configured become plugin, as the connection plugin does
    for every task."""
    from ansible.plugins.loader import become_loader, get_shell_plugin

    def make(plugin: str, user: str, password: Optional[str] = None,
             timeout: float = TIMEOUT) -> Dict[str, Any]:
        become = become_loader.get(plugin)
        assert become is not None, plugin
        options: Dict[str, Any] = {"become_user": user}
        if password is not None:
            options["become_pass"] = password
        become.set_options(direct=options)
        shell = get_shell_plugin(shell_type="sh", executable="/bin/sh")
        return ansible_side.become_hop(become, shell, PYTHON, timeout)
    return make


# -- the mux side: a ConnectionService in this process --------------------------------
class Mux:
    """A ConnectionService served in the test process, as a worker without
    a mux process hosts it (plugin_utils/_mux.py)."""

    def __init__(self, testbed: Any) -> None:
        self.host = testbed.hosts[0]
        self.router = Router(name="test-mux")
        files = FileService(self.router)
        self.pool = Pool(self.router, [files, ConnectionService(self.router, files)], size=12)
        self.me = self.router.context(0, "self")

    def base(self, user: str) -> Dict[str, Any]:
        return {"kind": "ssh", "host": self.host.address, "ssh_path": "ssh",
                "ssh_args": ["-p", str(self.host.port), "-l", user] + self.host.ssh_options(),
                "python": PYTHON, "password": None, "timeout": 30}

    def call(self, method: str, **kwargs: Any) -> Any:
        return self.me.call_service_async(SERVICE, method, **kwargs).get(120.0)

    def get(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        return self.call("get", spec=spec)

    def info(self, reply: Dict[str, Any]) -> Dict[str, Any]:
        return call(self.router.context(int(reply["id"])), AGENT, "info")

    def close(self) -> None:
        self.pool.stop(5.0)
        self.router.shutdown()
        self.router.join(20.0)


@pytest.fixture
def mux(testbed: Any) -> Iterator[Mux]:
    m = Mux(testbed)
    try:
        yield m
    finally:
        m.close()


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def tree(pid: int) -> List[int]:
    """``pid`` and every process below it (the target is this machine)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as fp:
                    raw = fp.read().decode("ascii", "replace")
            except OSError:
                continue
            children.setdefault(int(raw[raw.rindex(")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cmdlines(pids: List[int]) -> str:
    text = []
    for p in pids:
        try:
            with open("/proc/%d/cmdline" % p, "rb") as fp:
                text.append(fp.read().decode("utf-8", "replace"))
        except OSError:
            pass
    return "\n".join(text)


def expect_error(mux: Mux, spec: Dict[str, Any], type_name: str) -> CallError:
    with pytest.raises(CallError) as info:
        mux.get(spec)
    assert info.value.type_name == type_name, info.value
    return info.value


# -- the tests --------------------------------------------------------------------------
def test_sudo_without_password(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """root -> msvc-alice with sudo -n: the agent runs as alice."""
    from tests.lib.testbed import ALICE
    spec = dict(mux.base("root"), chain=[hop("ansible.builtin.sudo", ALICE)])
    reply = mux.get(spec)
    assert set(reply) == {"id", "name", "executable", "fresh"}
    assert reply["executable"] == PYTHON
    # Only the first caller after the start is told nothing was sent yet.
    assert reply["fresh"] is True
    again = mux.get(spec)
    assert again["id"] == reply["id"] and again["fresh"] is False
    info = mux.info(reply)
    assert info["uid"] == info["euid"] == uid(ALICE)


def test_sudo_with_password(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """msvc-alice -> root with her password; it never shows in argv."""
    from tests.lib.testbed import ALICE, ALICE_PASSWORD
    base = mux.base(ALICE)
    reply = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", "root", ALICE_PASSWORD)]))
    info = mux.info(reply)
    assert info["uid"] == 0
    parent = mux.info(mux.get(base))
    assert parent["uid"] == uid(ALICE)
    assert ALICE_PASSWORD not in cmdlines(tree(parent["pid"]))


def test_sudo_wrong_password(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    from tests.lib.testbed import ALICE
    base = mux.base(ALICE)
    err = expect_error(mux, dict(base, chain=[hop("ansible.builtin.sudo", "root", "wrong-pw")]),
                       PASSWORD_ERROR)
    assert err.message == "Incorrect sudo password"
    assert "wrong-pw" not in str(err)
    assert mux.info(mux.get(base))["uid"] == uid(ALICE)  # the base agent carries on


def test_sudo_missing_password(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """sudo -n says a password is required: vanilla's "Missing" error."""
    from tests.lib.testbed import ALICE
    err = expect_error(mux, dict(mux.base(ALICE), chain=[hop("ansible.builtin.sudo", "root")]),
                       PASSWORD_ERROR)
    assert err.message == "Missing sudo password"


def test_su_with_password(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """msvc-bob -> msvc-alice with her password, at su's localized prompt."""
    from tests.lib.testbed import ALICE, ALICE_PASSWORD, BOB
    reply = mux.get(dict(mux.base(BOB), chain=[hop("ansible.builtin.su", ALICE,
                                                   ALICE_PASSWORD)]))
    assert mux.info(reply)["uid"] == uid(ALICE)


@pytest.mark.parametrize("password,message", [("wrong-pw", "Incorrect su password"),
                                              (None, "Missing su password")])
def test_su_password_errors(mux: Mux, hop: Callable[..., Dict[str, Any]],
                            password: Optional[str], message: str) -> None:
    from tests.lib.testbed import ALICE, BOB
    err = expect_error(mux, dict(mux.base(BOB), chain=[hop("ansible.builtin.su", ALICE,
                                                           password)]), PASSWORD_ERROR)
    assert err.message == message


def test_doas_with_password(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """A third-party plugin whose prompt is not a string: the generic
    prompt pattern answers doas's "doas (user@host) password:"."""
    from tests.lib.testbed import ALICE, ALICE_PASSWORD, BOB
    h = hop("msvc_doas", BOB, ALICE_PASSWORD)
    assert h["prompt"] == "(?i)password[^\\n]*:\\s*$"
    reply = mux.get(dict(mux.base(ALICE), chain=[h]))
    assert mux.info(reply)["uid"] == uid(BOB)


def test_doas_failures_show_the_tool_output(mux: Mux, hop: Callable[..., Dict[str, Any]]
                                            ) -> None:
    """opendoas's texts are not the plugin's fail/missing texts (as with
    community.general.doas on Linux): the error carries doas's output."""
    from tests.lib.testbed import ALICE, BOB
    err = expect_error(mux, dict(mux.base(ALICE), chain=[hop("msvc_doas", BOB, "wrong-pw")]),
                       BOOTSTRAP_ERROR)
    assert "Authentication failed" in err.message and "wrong-pw" not in str(err)
    err = expect_error(mux, dict(mux.base(ALICE), chain=[hop("msvc_doas", BOB)]),
                       BOOTSTRAP_ERROR)
    assert "Authentication required" in err.message


def test_same_user_other_interpreter(mux: Mux) -> None:
    """A hop without a command: the same user, another interpreter."""
    import glob
    pythons = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3"))
    if not pythons:
        pytest.skip("no second interpreter on this machine")
    other = pythons[0]
    reply = mux.get(dict(mux.base("root"), chain=[{
        "command": None, "python": other, "password": None, "prompt": None, "success": None,
        "incorrect": [], "missing": [], "name": "python", "timeout": TIMEOUT}]))
    assert os.path.realpath(reply["executable"]) == os.path.realpath(other)
    assert mux.info(reply)["uid"] == 0


def test_reuse_and_nested_chain(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """Every task builds a new command (random success marker) yet gets
    the same agent; a two-hop chain reuses its first hop."""
    from tests.lib.testbed import ALICE, ALICE_PASSWORD
    base = mux.base("root")
    first = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]))
    again = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]))
    assert again["id"] == first["id"]
    deep = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE),
                                     hop("ansible.builtin.sudo", "root", ALICE_PASSWORD)]))
    assert mux.info(deep)["uid"] == 0
    assert mux.call("statistics") == {"routes": 1, "chained": 2}


def test_reset_stops_the_chain(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    """reset() of the base route stops its agent; every agent chained
    below it (and the sudo/sh between them) exits on EOF."""
    from tests.lib.testbed import ALICE, ALICE_PASSWORD
    base = mux.base("root")
    deep = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE),
                                     hop("ansible.builtin.sudo", "root", ALICE_PASSWORD)]))
    base_pid = mux.info(mux.get(base))["pid"]
    pids = tree(base_pid)
    assert mux.info(deep)["pid"] in pids and len(pids) >= 6, cmdlines(pids)
    assert mux.call("reset", spec=base) is True
    assert wait_gone(pids, timeout=15.0) == []
    assert mux.call("statistics") == {"routes": 0, "chained": 0}
    assert mux.call("reset", spec=base) is False


def test_reset_of_a_hop_keeps_its_parent(mux: Mux, hop: Callable[..., Dict[str, Any]]) -> None:
    from tests.lib.testbed import ALICE
    base = mux.base("root")
    spec = dict(base, chain=[hop("ansible.builtin.sudo", ALICE)])
    pid = mux.info(mux.get(spec))["pid"]
    assert mux.call("reset", spec=dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]))
    assert wait_gone([pid]) == []
    assert mux.call("statistics") == {"routes": 1, "chained": 0}
    assert mux.info(mux.get(spec))["pid"] != pid


def test_cap_evicts_the_least_recently_used(mux: Mux, hop: Callable[..., Dict[str, Any]]
                                            ) -> None:
    from tests.lib.testbed import ALICE, BOB
    assert BECOME_CAP >= 2
    base = dict(mux.base("root"), become_cap=2)
    a = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]))
    b = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", BOB)]))
    a_pid, b_pid = mux.info(a)["pid"], mux.info(b)["pid"]
    assert mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]))["id"] == a["id"]
    c = mux.get(dict(base, chain=[hop("ansible.builtin.su", ALICE)]))  # bob's is the LRU
    assert mux.info(c)["uid"] == uid(ALICE)
    assert wait_gone([b_pid]) == []
    assert mux.call("statistics") == {"routes": 1, "chained": 2}
    assert mux.get(dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]))["id"] == a["id"]
    assert wait_gone([a_pid], timeout=0.2) == [a_pid]  # still running
    b2 = mux.get(dict(base, chain=[hop("ansible.builtin.sudo", BOB)]))  # su's goes now
    assert b2["id"] != b["id"] and mux.info(b2)["uid"] == uid(BOB)
    assert mux.call("statistics") == {"routes": 1, "chained": 2}


def test_concurrent_gets_share_one_start(mux: Mux, hop: Callable[..., Dict[str, Any]]
                                         ) -> None:
    """Eight workers ask at once for one become route (each with its own
    command, as real tasks do) and two for another route on the same base:
    one base agent, one agent per hop."""
    from tests.lib.testbed import ALICE, BOB
    base = mux.base("root")
    specs = [dict(base, chain=[hop("ansible.builtin.sudo", ALICE)]) for _ in range(8)]
    specs += [dict(base, chain=[hop("ansible.builtin.sudo", BOB)]) for _ in range(2)]
    replies: List[Any] = [None] * len(specs)

    def run(i: int) -> None:
        try:
            replies[i] = mux.get(specs[i])
        except Exception as exc:  # reported below
            replies[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120.0)
    assert all(isinstance(r, dict) for r in replies), replies
    assert len({r["id"] for r in replies[:8]}) == 1
    assert len({r["id"] for r in replies[8:]}) == 1
    assert mux.call("statistics") == {"routes": 1, "chained": 2}


def test_concurrent_wrong_password_shares_the_error(mux: Mux, hop: Callable[..., Dict[str, Any]]
                                                 ) -> None:
    """Callers waiting on a start that fails get its error."""
    from tests.lib.testbed import ALICE
    base = mux.base(ALICE)
    mux.get(base)
    errors: List[Any] = []

    def run() -> None:
        try:
            mux.get(dict(base, chain=[hop("ansible.builtin.sudo", "root", "wrong-pw")]))
        except CallError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120.0)
    assert [e.message for e in errors] == ["Incorrect sudo password"] * 4


def test_no_ready_within_the_timeout(mux: Mux) -> None:
    """A prompt nobody recognises: BootstrapError after the hop's timeout,
    with the output, never the password."""
    err = expect_error(mux, dict(mux.base("root"), chain=[{
        "command": "printf 'Token for root: ' >&2; sleep 60", "python": PYTHON,
        "password": "s3cret-pw", "prompt": r"(?i)password:\s*$", "success": None,
        "incorrect": [], "missing": [], "name": "custom", "timeout": 2}]), BOOTSTRAP_ERROR)
    assert "no handshake within 2.0s" in err.message and "Token for root:" in err.message
    assert "s3cret-pw" not in str(err)


# -- the helper alone -------------------------------------------------------------------
def test_hop_fields_and_identity(hop: Callable[..., Dict[str, Any]]) -> None:
    """Two tasks build different commands (random id) with one identity;
    the password shows only in its own field, never in the key."""
    from tests.lib.testbed import ALICE
    one = hop("ansible.builtin.sudo", ALICE, "pw-1")
    two = hop("ansible.builtin.sudo", ALICE, "pw-1")
    assert set(one) == {"command", "python", "password", "prompt", "success", "incorrect",
                        "missing", "name", "timeout", "key"}
    assert one["command"] != two["command"] and one["key"] == two["key"]
    assert one["success"].startswith("BECOME-SUCCESS-") and one["success"] in one["command"]
    assert one["name"] == "sudo" and one["password"] == "pw-1"
    assert one["incorrect"] == ["Sorry, try again."]
    assert "sudo: a password is required" in one["missing"]
    assert "pw-1" not in repr(one["key"]) and "pw-1" not in one["command"]
    assert hop("ansible.builtin.sudo", ALICE, "pw-2")["key"] != one["key"]
    assert hop("ansible.builtin.sudo", "root", "pw-1")["key"] != one["key"]


@pytest.mark.parametrize("text,matches", [
    ("Password: ", True), ("Passwort:", True), ("密码：", True), ("Mot de passe : ", True),
    ("Password: \r\nsu: Authentication failure", False), ("Enter token: ", False)])
def test_su_prompt_is_localized(hop: Callable[..., Dict[str, Any]], text: str,
                                matches: bool) -> None:
    import re
    assert bool(re.search(hop("ansible.builtin.su", "root")["prompt"], text)) is matches


def test_sudo_prompt_is_its_own(hop: Callable[..., Dict[str, Any]]) -> None:
    import re
    h = hop("ansible.builtin.sudo", "root", "pw")
    key = h["success"][len("BECOME-SUCCESS-"):]
    assert re.search(h["prompt"], "[sudo via ansible, key=%s] password: " % key)
    assert not re.search(h["prompt"], "[sudo] password for alice: ")
    # Without a password sudo runs with -n and sets no prompt: the generic one.
    assert hop("ansible.builtin.sudo", "root")["prompt"] == "(?i)password[^\\n]*:\\s*$"


def test_the_plugin_state_is_left_alone(ansible_side: Any) -> None:
    """A task's own wrapped command keeps its success marker and prompt."""
    from ansible.plugins.loader import become_loader, get_shell_plugin
    become = become_loader.get("ansible.builtin.sudo")
    become.set_options(direct={"become_user": "root", "become_pass": "pw"})
    shell = get_shell_plugin(shell_type="sh", executable="/bin/sh")
    become.build_become_command("id -u", shell)
    before = (become._id, become.success, become.prompt)
    h = ansible_side.become_hop(become, shell, PYTHON, TIMEOUT)
    assert (become._id, become.success, become.prompt) == before
    assert h["success"] != before[1]
