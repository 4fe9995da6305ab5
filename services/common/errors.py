"""Domain errors, raised by the pure cores and mapped to gRPC status codes in
one place (services.common.interceptors). Each says whether a caller should
retry and names the field or the fix."""

from __future__ import annotations

from dataclasses import dataclass, field


class LmxError(Exception):
    """Base of every error a request may end in. `retryable` tells a caller
    whether the same request can succeed later."""

    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(LmxError):
    """Bad input: the request can never succeed as sent. `field` names the
    offending request field (dotted path, as in the proto)."""

    def __init__(self, field: str, message: str, reason: str = ""):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message
        #: A machine-readable kind, for clients to act on (ErrorInfo.reason):
        #: CONTEXT_LENGTH_EXCEEDED. Empty for most.
        self.reason = reason


class NotFound(LmxError):
    """An unknown (or already released) lease, session or model."""

    def __init__(self, kind: str, ident: str, hint: str = ""):
        text = f"unknown {kind} {ident!r}"
        super().__init__(f"{text}; {hint}" if hint else text)
        self.kind = kind
        self.ident = ident


class PermissionDenied(LmxError):
    """The caller may not touch this object (a session's token does not match)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class FailedPrecondition(LmxError):
    """The request is well formed but the state forbids it: a stale epoch, an
    expired lease. The caller must not keep using what it held."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Aborted(LmxError):
    """The work was stopped by something outside the request: the worker lost
    its memory lease (it expired while the worker was frozen, or admission
    restarted). Retry: the same request can succeed."""

    retryable = True

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Shortfall:
    device: str
    requested_bytes: int
    free_bytes: int

    @property
    def missing_bytes(self) -> int:
        return max(0, self.requested_bytes - self.free_bytes)


class CapacityExhausted(LmxError):
    """Not enough memory now. Retryable after `retry_after_s`."""

    retryable = True

    def __init__(self, message: str, shortfall: Shortfall, retry_after_s: float):
        super().__init__(message)
        self.shortfall = shortfall
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ConfigError(Exception):
    """A setting that cannot be used; raised at start, before serving."""

    setting: str
    message: str
    fix: str = field(default="")

    def __str__(self) -> str:
        text = f"{self.setting}: {self.message}"
        return f"{text} ({self.fix})" if self.fix else text
