"""Runnable example from docs/services.md: writing and calling a service.

Run from a checkout: PYTHONPATH=. python3 docs/examples/echo_service.py
"""
from __future__ import annotations

from ansible_mitogen_svc import (AllowAny, AllowParents, Pool, RefusedError, Router,
                                 Service, arg_spec, call, current_call, expose)


class Echo(Service):
    name = "demo.Echo"

    @expose(AllowAny())
    @arg_spec({"text": str})
    def shout(self, text: str) -> str:
        return text.upper()

    @expose(AllowParents())
    def whoami(self) -> int:
        return current_call().caller.context_id

    def secret(self) -> int:  # not exposed: unreachable
        return 42


def main() -> None:
    router = Router()
    pool = Pool(router, [Echo], size=4)
    try:
        me = router.context(0)
        print(call(me, "demo.Echo", "shout", text="hi"))
        print(call(me, "demo.Echo", "whoami"))
        for method, kwargs in (("secret", {}), ("shout", {"text": 1})):
            try:
                call(me, "demo.Echo", method, **kwargs)
            except RefusedError as exc:
                print(exc.message)
    finally:
        pool.stop()
        router.shutdown()
        router.join()


if __name__ == "__main__":
    main()
