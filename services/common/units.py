"""Byte sizes and addresses as people write them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """'8GiB' -> 8589934592, '512MiB', '1.5GB', '4096'. Raises ValueError."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"negative size {text}")
        return text
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 8GiB, 512MiB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(num: int) -> str:
    """4294967296 -> '4.00 GiB'; keeps the sign."""
    sign = "-" if num < 0 else ""
    value = float(abs(num))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:50051' -> ('127.0.0.1', 50051); '[::1]:50051' too; a unix
    socket 'unix:/run/lmx/admission.sock' -> ('unix:/run/lmx/admission.sock', 0)."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/") or len(path) > 100:
            raise ValueError(f"not unix:/ABSOLUTE/PATH (at most 100 characters): {text!r}")
        return text, 0
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)
