"""The whole exception tree of the runtime.

Runs on: controller and targets (shipped).

::

    Error
     +-- InternalError            a bug in this package; please report it
     +-- CodecError
     |    +-- DumpError           value cannot be encoded (names the type and path)
     |    +-- LoadError           bytes are not a valid encoding
     +-- ProtocolError
     |    +-- LocalProtocolError  *we* received bad framing from a peer
     |    +-- RemoteProtocolError the peer told us our framing was bad
     +-- StreamError
     |    +-- ClosedError         we closed it (shutdown, stop())
     |    +-- BrokenError         the peer or transport failed (``__cause__`` set)
     +-- RoutingError             no route, refused route, dead context
     +-- CallError                a call failed; carries the remote type/message/traceback
     |    +-- RefusedError        a policy or argument check refused the call
     +-- TimeoutError             a bounded wait ran out
     +-- WouldBlock               a ``*_nowait()`` call had nothing ready
     +-- BootstrapError           an agent could not be started (names the command/host)
          +-- PasswordError       a password was required, missing or wrong

Message templates are class attributes so tests can match them.
"""
from __future__ import annotations

import builtins

__all__ = [
    "Error", "InternalError", "CodecError", "DumpError", "LoadError",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "StreamError", "ClosedError", "BrokenError", "RoutingError",
    "CallError", "RefusedError", "TimeoutError", "WouldBlock",
    "BootstrapError", "PasswordError",
]


class Error(Exception):
    """Base of every exception raised on purpose by this package."""


class InternalError(Error):
    """Something happened that should be impossible: this is a bug in
    ansible_mitogen_svc; please report it with the traceback."""


class CodecError(Error, ValueError):
    pass


class DumpError(CodecError):
    """A value cannot be encoded. The message names the type and where in
    the value it was found, e.g. ``cannot encode object of type 'Foo' at
    [0]['key']``."""

    template = "cannot encode object of type {type!r} at {path}"


class LoadError(CodecError):
    """The bytes are not a valid encoding (truncated, unknown opcode,
    nesting too deep, ...)."""


class ProtocolError(Error):
    pass


class LocalProtocolError(ProtocolError):
    """A peer sent us bytes that break the framing rules. The stream it
    arrived on is closed; other streams carry on."""


class RemoteProtocolError(ProtocolError):
    """A peer reported that bytes we sent broke its framing rules."""


class StreamError(Error):
    pass


class ClosedError(StreamError):
    """The stream or router was closed on our side."""


class BrokenError(StreamError):
    """The peer or the transport failed: EOF, a dead process, a bad frame.
    ``__cause__`` holds the underlying error where there is one."""

    template = "stream {name!r} broke: {reason}"


class RoutingError(Error):
    """A message could not be delivered: no route to the context, the route
    is refused (e.g. sibling to sibling), or the context is gone."""


class CallError(Error):
    """A call failed on the remote side (or could not be made).

    Attributes:
        type_name: fully qualified name of the remote exception type,
            e.g. ``builtins.ZeroDivisionError``.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted remote traceback (may be empty).
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(type_name, message, remote_traceback)

    def __str__(self) -> str:
        s = "%s: %s" % (self.type_name, self.message)
        if self.remote_traceback:
            s += "\n" + self.remote_traceback.rstrip("\n")
        return s

    @classmethod
    def from_exception(cls, exc: BaseException, tb: str = "") -> "CallError":
        if isinstance(exc, CallError):
            return cls(exc.type_name, exc.message, exc.remote_traceback or tb)
        t = type(exc)
        return cls("%s.%s" % (_canonical(t.__module__), t.__qualname__), str(exc), tb)


def _canonical(module: str) -> str:
    """``module`` as targets know it: the runtime is ``ansible_mitogen_svc``
    there, whatever package holds it here (e.g. an installed collection's
    ``ansible_collections.mitogen.svc.ansible_mitogen_svc``)."""
    at = (module + ".").find(".ansible_mitogen_svc.")
    return module[at + 1:] if at >= 0 else module


class RefusedError(CallError):
    """A call was refused before the method ran: no such service or method,
    the method is not exposed, a policy said no, or an argument had the
    wrong type. The message names the service, the method and the reason."""

    template = "refused call to {service}.{method}(): {reason}"

    @classmethod
    def make(cls, service: str, method: str, reason: str) -> "RefusedError":
        return cls("ansible_mitogen_svc.errors.RefusedError",
                   cls.template.format(service=service, method=method, reason=reason))


class TimeoutError(Error, builtins.TimeoutError):
    """A bounded wait ran out. The message says what was awaited and for how
    long."""


class WouldBlock(Error):
    """A non-blocking ``*_nowait()`` call found nothing ready."""


class BootstrapError(Error):
    """An agent could not be started. The message names the command or host
    and gives the cause and any output the command produced."""


class PasswordError(BootstrapError):
    """A password prompt appeared and the password was missing or wrong."""
