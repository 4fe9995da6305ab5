"""The HTTP front's settings: one frozen object, built once at start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.common import settings as loader
from services.common.errors import ConfigError
from services.common.units import parse_address, parse_bytes
from services.front.cors import parse_origins

DEFAULT_LISTEN = "127.0.0.1:8000"


@dataclass(frozen=True)
class FrontSettings:
    listen: str = field(default=DEFAULT_LISTEN, metadata={"help": "HOST:PORT to serve HTTP on"})
    admission: str = field(default="127.0.0.1:50051", metadata={
        "help": "admission's address: its worker registry says which worker serves which model"})
    kvstore: str = field(default="", metadata={
        "help": "the kvstore's address, for its bytes held in /metrics (empty: not shown)"})
    max_body_bytes: int = field(default=8 << 20, metadata={
        "help": "largest request body", "parse": parse_bytes})
    default_max_tokens: int = field(default=256, metadata={
        "help": "max_tokens when a request gives none"})
    sessions_per_worker: int = field(default=32, metadata={
        "help": "conversations kept open per worker for prefix reuse (least recently used "
                "closed first)"})
    request_timeout_s: float = field(default=600.0, metadata={
        "help": "longest a generation may take, waits for memory included"})
    cors_origins: tuple[str, ...] = field(default=(), metadata={
        "help": "origins whose browser pages may call the API (CORS): '*' for any, or a "
                "comma-separated list such as http://localhost:3000 (empty: no CORS headers)",
        "parse": parse_origins})
    keep_alive_s: float = field(default=5.0, metadata={
        "help": "how long an idle HTTP connection is kept for the client's next request "
                "(0: one request per connection)"})
    grace_s: float = field(default=5.0, metadata={
        "help": "how long requests in flight may finish on shutdown"})
    log_format: str = field(default="auto", metadata={"help": "auto | json | console"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def __post_init__(self) -> None:
        for name in ("listen", "admission", "kvstore"):
            if name == "kvstore" and not self.kvstore:
                continue
            try:
                parse_address(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        if not (1 << 10) <= self.max_body_bytes <= (1 << 30):
            raise ConfigError("max_body_bytes", "must be within 1KiB..1GiB")
        if self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens", "must be at least 1")
        if self.sessions_per_worker < 1:
            raise ConfigError("sessions_per_worker", "must be at least 1")
        if not 0 <= self.keep_alive_s <= 3600:
            raise ConfigError("keep_alive_s", "must be within 0..3600 seconds")
        try:
            parse_origins(self.cors_origins)
        except ValueError as exc:
            raise ConfigError("cors_origins", str(exc)) from None
        if self.request_timeout_s <= 0 or self.grace_s < 0:
            raise ConfigError("request_timeout_s", "must be positive (grace_s not negative)")
        if self.log_format not in loader.LOG_FORMATS:
            raise ConfigError("log_format", f"unknown format {self.log_format!r}")
        if self.log_level.lower() not in loader.LOG_LEVELS:
            raise ConfigError("log_level", f"unknown level {self.log_level!r}")


def load_settings(argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> FrontSettings:
    return loader.load(FrontSettings, "front", argv, environ,
                       description="lmx front: the OpenAI-compatible HTTP API over lmx's workers")
