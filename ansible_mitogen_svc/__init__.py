"""ansible_mitogen_svc: the runtime of the mitogen.svc collection.

Runs on: controller and targets (shipped). Pure stdlib; never imports
ansible.

Layering rule (enforced by tests/unit/ansible_mitogen_svc/test_layers.py):
imports flow one way, from top to bottom of this list, never upwards.

1. pure, sans-IO:   errors, codec, wire, protocol, router, policy, transfer
2. I/O:             transport, broker, context, service, bootstrap, spawn, forkserver
3. entry points:    connect, agent, files, jobs, mux, target, runner, asyncjob
Plugins reach this package only through ``plugins/plugin_utils``.
"""
from __future__ import annotations

from .errors import (BootstrapError, BrokenError, CallError, ClosedError, Error,
                     PasswordError, RefusedError, RoutingError, TimeoutError, WouldBlock)
from .policy import AllowAny, AllowChildren, AllowController, AllowParents, Caller, Policy
from .context import Context, PendingCall, Router, call, call_async
from .service import (DeduplicatingService, Pool, Service, arg_spec, current_call,
                      expose)

__all__ = [
    "Router", "Context", "PendingCall", "call", "call_async",
    "Service", "DeduplicatingService", "Pool", "expose", "arg_spec", "current_call",
    "Policy", "AllowAny", "AllowParents", "AllowChildren", "AllowController", "Caller",
    "Error", "CallError", "RefusedError", "BrokenError", "ClosedError", "RoutingError",
    "TimeoutError", "WouldBlock", "BootstrapError", "PasswordError",
]
