"""Every size bound on what a client sends admission, checked here (the
ledger, the worker registry and the secret book call these): strings are
the only fields a client can make large (admission's requests have no
repeated fields; numbers are checked where they mean something, against the
devices and caps, in ledger.py and registry.py).

  - holder.name, a worker's id, model, address and device: printable, at
    most MAX_NAME_CHARS characters;
  - a lease's or a registration's secret: at most MAX_SECRET_CHARS;
  - the whole message: --max-message-bytes (gRPC, every service).
"""

from __future__ import annotations

from services.common.errors import InvalidArgument

MAX_NAME_CHARS = 256
MAX_SECRET_CHARS = 256


def check_name(field: str, value: str, required: bool = True) -> None:
    """A printable name of at most MAX_NAME_CHARS (required: not blank)."""
    if required and not value.strip():
        raise InvalidArgument(field, f"is required: printable, at most {MAX_NAME_CHARS} chars")
    if len(value) > MAX_NAME_CHARS or (value and not value.isprintable()):
        raise InvalidArgument(field, f"must be printable, at most {MAX_NAME_CHARS} chars")


def check_secret(secret: str) -> None:
    if len(secret) > MAX_SECRET_CHARS:
        raise InvalidArgument("secret", f"at most {MAX_SECRET_CHARS} characters")
