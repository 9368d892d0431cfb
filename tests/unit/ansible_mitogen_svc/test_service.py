"""Tests for ansible_mitogen_svc.service through an in-process Router: a
Pool serving calls this process makes to context 0 (relation SELF)."""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List

import pytest

from ansible_mitogen_svc import (AllowAny, AllowChildren, AllowParents, CallError,
                                 DeduplicatingService, Pool, Policy, RefusedError, Router,
                                 RoutingError, Service, TimeoutError, WouldBlock, arg_spec,
                                 call, call_async, current_call, expose)
from ansible_mitogen_svc.policy import SELF, Caller
from ansible_mitogen_svc.wire import HANDLE_CALL_SERVICE

pytestmark = pytest.mark.timeout(30)

REFUSED = "ansible_mitogen_svc.errors.RefusedError"


class Never(Policy):
    def is_authorized(self, caller: Caller) -> bool:
        return False

    def describe(self) -> str:
        return "Never"


class Unencodable:
    pass


class Calc(Service):
    name = "unit.Calc"

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.shut = 0
        self.release = threading.Event()

    @expose(AllowAny())
    @arg_spec({"a": int, "b": (int, float)})
    def add(self, a: int, b: float = 1) -> float:
        return a + b

    @expose(AllowParents())
    def whoami(self) -> Dict[str, Any]:
        info = current_call()
        return {"relation": info.caller.relation, "src": info.caller.context_id,
                "me": info.context.context_id, "controller": info.controller.context_id,
                "parent": info.parent}

    @expose(AllowChildren())
    def for_children(self) -> str:
        return "children or self"

    @expose(Never())
    def never(self) -> str:
        return "unreachable"

    @expose(AllowAny())
    def divide(self, a: int, b: int) -> float:
        return a / b

    @expose(AllowAny())
    def bad_value(self) -> Any:
        return [Unencodable()]

    @expose(AllowAny())
    def later(self, value: Any) -> None:
        responder = current_call().defer_reply()

        def reply() -> None:
            self.release.wait(10)
            responder.send(value)
        threading.Thread(target=reply, name="later-reply").start()

    @expose(AllowAny())
    def never_replies(self) -> None:
        current_call().defer_reply()

    @expose(AllowAny())
    def kwargs_only(self, *, flag: bool, **rest: Any) -> Dict[str, Any]:
        return {"flag": flag, "rest": rest}

    def plain(self) -> str:
        return "not exposed"

    def on_shutdown(self) -> None:
        self.shut += 1


class Square(DeduplicatingService):
    name = "unit.Square"

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.runs: List[int] = []
        self.gate = threading.Event()

    @expose(AllowAny())
    def square(self, x: int) -> int:
        self.runs.append(x)
        self.gate.wait(10)
        if x < 0:
            raise ValueError("negative %d" % x)
        return x * x


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router(name="unit")
    yield r
    r.shutdown()
    r.join(10)


@pytest.fixture
def pool(router: Router) -> Iterator[Pool]:
    p = Pool(router, [Calc, Square], size=4,
             function_modules=lambda name: name == __name__)
    yield p
    p.stop(5)


@pytest.fixture
def me(router: Router, pool: Pool) -> Any:
    return router.context(0)


def module_function(a: int, b: int = 2) -> int:
    return a * b


def _refused(ctx: Any, service: str, method: str, reason: str, **kwargs: Any) -> RefusedError:
    with pytest.raises(RefusedError) as exc:
        call(ctx, service, method, **kwargs)
    err = exc.value
    assert err.type_name == REFUSED
    assert err.message == "refused call to %s.%s(): %s" % (service, method, reason)
    return err


# -- successful calls ---------------------------------------------------------------------
def test_call_returns_the_result(me: Any) -> None:
    assert call(me, "unit.Calc", "add", a=2, b=3) == 5
    assert call(me, "unit.Calc", "add", a=2) == 3
    assert call(me, "unit.Calc", "add", a=2, b=0.5) == 2.5
    assert call(me, "unit.Calc", "kwargs_only", flag=True, x=1) == {"flag": True, "rest": {"x": 1}}


def test_calls_from_this_process_are_self(me: Any) -> None:
    assert call(me, "unit.Calc", "whoami") == {"relation": SELF, "src": 0, "me": 0,
                                               "controller": 0, "parent": None}
    assert call(me, "unit.Calc", "for_children") == "children or self"


def test_concurrent_async_calls(me: Any) -> None:
    pending = [call_async(me, "unit.Calc", "add", a=i, b=i) for i in range(200)]
    assert [p.get(10) for p in pending] == [2 * i for i in range(200)]


def test_pending_call_api(me: Any, pool: Pool) -> None:
    calc = pool.get("unit.Calc")
    p = call_async(me, "unit.Calc", "later", value="v")
    assert not p.ready()
    with pytest.raises(WouldBlock):
        p.get_nowait()
    calc.release.set()
    assert p.get(10) == "v"
    assert p.ready() and p.get_nowait() == "v" and p.get() == "v"


def test_deferred_reply_that_never_comes_times_out(me: Any) -> None:
    p = call_async(me, "unit.Calc", "never_replies")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"unit.Calc.never_replies\(\): no reply within 0.3s"):
        p.get(0.3)
    assert time.monotonic() - t0 < 5


def test_function_calls(me: Any) -> None:
    assert me.call(module_function, 21) == 42
    assert me.call(module_function, 3, b=5) == 15
    with pytest.raises(RefusedError, match="was not shipped"):
        me.call(time.monotonic)
    with pytest.raises(ValueError, match="not a module-level function"):
        me.call(lambda: 1)


# -- errors ---------------------------------------------------------------------------------
def test_exception_carries_type_message_and_traceback(me: Any) -> None:
    with pytest.raises(CallError) as exc:
        call(me, "unit.Calc", "divide", a=1, b=0)
    err = exc.value
    assert not isinstance(err, RefusedError)
    assert err.type_name == "builtins.ZeroDivisionError"
    assert err.message == "division by zero"
    assert "in divide" in err.remote_traceback
    assert err.remote_traceback.rstrip().endswith("ZeroDivisionError: division by zero")
    assert str(err).startswith("builtins.ZeroDivisionError: division by zero\nTraceback")


def test_unencodable_result_is_reported(me: Any) -> None:
    with pytest.raises(CallError) as exc:
        call(me, "unit.Calc", "bad_value")
    assert exc.value.type_name == "ansible_mitogen_svc.errors.DumpError"
    assert "Unencodable" in exc.value.message and "[0]" in exc.value.message


def test_refusals_name_service_method_and_reason(me: Any) -> None:
    _refused(me, "unit.Nope", "add", "no such service in context 0 (unit)")
    _refused(me, "unit.Calc", "nope", "no such exposed method")
    _refused(me, "unit.Calc", "plain", "no such exposed method")
    _refused(me, "unit.Calc", "on_shutdown", "no such exposed method")
    _refused(me, "unit.Calc", "__init__", "no such exposed method")
    _refused(me, "unit.Calc", "_check", "no such exposed method")
    _refused(me, "unit.Calc", "never", "Never refused caller 0 via unit (self)")
    _refused(me, "unit.Calc", "add", "argument 'a' must be int, got str", a="1")
    _refused(me, "unit.Calc", "add", "argument 'b' must be int/float, got NoneType",
             a=1, b=None)
    _refused(me, "unit.Calc", "add", "missing required argument 'a'", b=1)
    _refused(me, "unit.Calc", "add", "unexpected argument 'c'", a=1, c=2)
    _refused(me, "unit.Calc", "kwargs_only", "missing required argument 'flag'", x=1)


def test_malformed_call_body_is_refused(me: Any) -> None:
    for body in ("not a tuple", ("svc", "method"), (1, "m", {}), ("s", "m", [])):
        with pytest.raises(RefusedError, match=r"refused call to \?\.\?\(\): malformed call"):
            me.send_call(HANDLE_CALL_SERVICE, body, "malformed").get(10)


def test_no_route_to_an_unknown_context(router: Router, pool: Pool) -> None:
    with pytest.raises(RoutingError, match="no route to context 5|gone or was never started"):
        call(router.context(5), "unit.Calc", "add", a=1)


def test_expose_needs_a_policy_instance() -> None:
    with pytest.raises(TypeError, match="needs a Policy instance"):
        expose(AllowAny)  # type: ignore[arg-type]


def test_current_call_outside_a_call() -> None:
    with pytest.raises(LookupError):
        current_call()


# -- DeduplicatingService -------------------------------------------------------------------
def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_dedup_runs_the_body_once_for_20_identical_calls(me: Any, pool: Pool) -> None:
    svc = pool.get("unit.Square")
    pending = [call_async(me, "unit.Square", "square", x=7) for _ in range(20)]
    _wait_for(lambda: sum(len(w) for w in svc._inflight.values()) == 20)
    svc.gate.set()
    assert [p.get(10) for p in pending] == [49] * 20
    assert svc.runs == [7]
    # Identical calls after the first finished run the body again.
    assert call(me, "unit.Square", "square", x=7) == 49
    assert svc.runs == [7, 7]


def test_dedup_keeps_different_arguments_apart(me: Any, pool: Pool) -> None:
    svc = pool.get("unit.Square")
    pending = [call_async(me, "unit.Square", "square", x=i % 3) for i in range(12)]
    _wait_for(lambda: sum(len(w) for w in svc._inflight.values()) == 12)
    svc.gate.set()
    assert [p.get(10) for p in pending] == [(i % 3) ** 2 for i in range(12)]
    assert sorted(svc.runs) == [0, 1, 2]


def test_dedup_shares_the_error(me: Any, pool: Pool) -> None:
    svc = pool.get("unit.Square")
    pending = [call_async(me, "unit.Square", "square", x=-2) for _ in range(5)]
    _wait_for(lambda: sum(len(w) for w in svc._inflight.values()) == 5)
    svc.gate.set()
    for p in pending:
        with pytest.raises(CallError) as exc:
            p.get(10)
        assert exc.value.type_name == "builtins.ValueError"
        assert exc.value.message == "negative -2"
        assert "in square" in exc.value.remote_traceback
    assert svc.runs == [-2]


# -- pool lifetime ---------------------------------------------------------------------------
def test_stop_calls_on_shutdown_and_unregisters(router: Router) -> None:
    p = Pool(router, [Calc], size=2)
    calc = p.get("unit.Calc")
    assert call(router.context(0), "unit.Calc", "add", a=1) == 2
    p.stop(5)
    p.stop(5)  # idempotent
    assert calc.shut == 1
    with pytest.raises(RoutingError, match="has no handle 1"):
        call(router.context(0), "unit.Calc", "add", a=1)


def test_service_names() -> None:
    class Local(Service):
        pass
    assert Local.service_name() == "%s.%s" % (__name__, Local.__qualname__)
    assert Calc.service_name() == "unit.Calc"
