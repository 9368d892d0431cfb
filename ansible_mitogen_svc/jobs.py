"""JobResultService: results of jobs pushed by the processes that ran them.

Runs on: controller (the mux hosts it); shipped so agents may host one too.

Theory of operation
-------------------
A job is a string id. Whoever starts one may :meth:`~JobResultService.register`
it with the id of the context that will run it (usually the agent of the
host); from then on only contexts in the same subtree as that owner may
``push`` its result, so one target cannot forge another target's result.

* ``push(job_id, result)``: store the result and wake every listener.
* ``listen(job_id, timeout)``: reply as soon as the result is known. The
  reply is deferred, so a listener holds no pool thread while it waits; if
  ``timeout`` passes first the listener gets a TimeoutError.
* ``get(job_id, settle=0)``: ``{"state": "unknown" | "running" |
  "finished", "result": ...}``. It never blocks, except that a job
  registered less than ``settle`` seconds ago is waited for until then
  (answered at once when it pushes): a status asked right after a
  short job starts then finds it finished, as it would have with vanilla's
  slower start, and the ``until`` loop around it needs no second try.
* ``forget(job_id)``: drop what is known about a job (``mode: cleanup``).

Results are kept until forgotten, at most MAX_JOBS of them; beyond that the
oldest finished results are dropped first.

Every method but ``push`` is for the controller side only
(:class:`~policy.AllowController`: this process, its parents, and the
trusted worker processes attached to the mux).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Dict, List, Tuple

from .context import Router
from .errors import TimeoutError
from .policy import CHILD, AllowAny, AllowController, Caller
from .service import Responder, Service, arg_spec, current_call, expose

__all__ = ["JobResultService", "MAX_JOBS"]

# A controller run with 500 hosts x 100 async tasks stays under this; a
# result is typically a few KiB, so the cap bounds memory to tens of MiB.
MAX_JOBS = 50000


class JobResultService(Service):
    name = "ansible_mitogen_svc.jobs.JobResultService"

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self._lock = threading.Lock()
        self._owners: Dict[str, int] = {}
        self._since: Dict[str, float] = {}  # job id -> time.monotonic() at register
        self._results: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        # job id -> (responder, as_state): as_state replies are get()'s form
        self._listeners: Dict[str, List[Tuple[Responder, bool]]] = {}
        self.pushes = 0

    @expose(AllowController())
    @arg_spec({"job_id": str, "owner": int})
    def register(self, job_id: str, owner: int) -> None:
        """Only ``owner``'s subtree may push this job's result."""
        with self._lock:
            self._owners[job_id] = owner
            self._since[job_id] = time.monotonic()

    def _may_push(self, job_id: str, caller: Caller) -> bool:
        owner = self._owners.get(job_id)
        if owner is None or caller.relation != CHILD:
            return caller.relation != CHILD or owner is None
        lo, hi = caller.child_ids
        return lo <= owner < hi

    @expose(AllowAny())
    @arg_spec({"job_id": str})
    def push(self, job_id: str, result: Any) -> bool:
        """Record ``result``; returns True. Raises PermissionError when the
        caller is outside the subtree the job was registered for."""
        caller = current_call().caller
        with self._lock:
            if not self._may_push(job_id, caller):
                raise PermissionError("context %d may not push a result for job %r"
                                      % (caller.context_id, job_id))
            self._results[job_id] = result
            self._results.move_to_end(job_id)
            while len(self._results) > MAX_JOBS:
                old, _ = self._results.popitem(last=False)
                self._owners.pop(old, None)
            self._since.pop(job_id, None)
            waiters = self._listeners.pop(job_id, [])
            self.pushes += 1
        for responder, as_state in waiters:
            responder.send({"state": "finished", "result": result} if as_state else result)
        return True

    def _wait(self, job_id: str, timeout: float, as_state: bool) -> None:
        """Defer the current call's reply until ``job_id`` is pushed or
        ``timeout`` passes (a TimeoutError, or the running state when
        ``as_state``). Called with the lock held."""
        responder = current_call().defer_reply()
        entry = (responder, as_state)
        self._listeners.setdefault(job_id, []).append(entry)

        def expire() -> None:
            with self._lock:
                waiters = self._listeners.get(job_id, [])
                if entry not in waiters:
                    return  # pushed meanwhile
                waiters.remove(entry)
                if not waiters:
                    self._listeners.pop(job_id, None)
            if as_state:
                responder.send({"state": "running", "result": None})
            else:
                responder.fail(TimeoutError("job %r: no result within %.1fs"
                                            % (job_id, timeout)))

        self.router.broker.call_later(timeout, expire)

    @expose(AllowController())
    @arg_spec({"job_id": str, "timeout": (int, float)})
    def listen(self, job_id: str, timeout: float = 3600.0) -> Any:
        """The job's result, as soon as it is pushed. Raises TimeoutError
        after ``timeout`` seconds."""
        with self._lock:
            if job_id in self._results:
                return self._results[job_id]
            self._wait(job_id, float(timeout), as_state=False)
        return None

    @expose(AllowController())
    @arg_spec({"job_id": str, "settle": (int, float)})
    def get(self, job_id: str, settle: float = 0.0) -> Dict[str, Any]:
        """The state of a job and its result if finished; waits only for
        a job registered less than ``settle`` seconds ago (module
        docstring)."""
        with self._lock:
            if job_id in self._results:
                return {"state": "finished", "result": self._results[job_id]}
            if job_id not in self._owners and job_id not in self._listeners:
                return {"state": "unknown", "result": None}
            left = self._since.get(job_id, float("-inf")) + float(settle) - time.monotonic()
            if left <= 0:
                return {"state": "running", "result": None}
            self._wait(job_id, left, as_state=True)
        return {}  # not sent: the deferred reply is

    @expose(AllowController())
    @arg_spec({"job_id": str})
    def forget(self, job_id: str) -> bool:
        with self._lock:
            known = job_id in self._results or job_id in self._owners
            self._results.pop(job_id, None)
            self._owners.pop(job_id, None)
            self._since.pop(job_id, None)
        return known

    @expose(AllowController())
    def statistics(self) -> Dict[str, int]:
        with self._lock:
            return {"jobs": len(self._results), "pushes": self.pushes,
                    "listeners": sum(len(v) for v in self._listeners.values())}
