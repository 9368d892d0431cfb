"""Remote error type names do not depend on where the runtime was imported
from: callers compare them with the canonical names."""
from __future__ import annotations

from ansible_mitogen_svc.errors import BootstrapError, CallError


def test_type_names_are_canonical_under_a_collection_prefix() -> None:
    class Renamed(BootstrapError):
        pass
    Renamed.__module__ = "ansible_collections.mitogen.svc.ansible_mitogen_svc.errors"
    Renamed.__qualname__ = "BootstrapError"
    err = CallError.from_exception(Renamed("no python"))
    assert err.type_name == "ansible_mitogen_svc.errors.BootstrapError"
    assert err.message == "no python"


def test_other_type_names_are_kept() -> None:
    assert CallError.from_exception(KeyError("k")).type_name == "builtins.KeyError"

    class Mine(Exception):
        pass
    Mine.__module__ = "ansible_collections.other.ansible_mitogen_svcx.errors"
    Mine.__qualname__ = "Mine"
    name = CallError.from_exception(Mine()).type_name
    assert name == "ansible_collections.other.ansible_mitogen_svcx.errors.Mine"
