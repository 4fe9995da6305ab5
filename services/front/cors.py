"""CORS, for clients in a browser: which origins may call the front
(`--cors-origins`: none by default, `*` for any, or a list), the headers of
a preflight's answer (OPTIONS) and those every answer to an allowed origin
carries. No credentials (cookies) are involved: lmx has none. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOW_METHODS = "GET, POST, OPTIONS"
#: Asked for when a preflight names none; otherwise the ones it names are allowed.
ALLOW_HEADERS = "authorization, content-type, x-request-id"
#: What a page's script may read of an answer besides the simple headers.
EXPOSE_HEADERS = "x-request-id, retry-after"
MAX_AGE_S = 600


def parse_origins(value: object) -> tuple[str, ...]:
    """`*`, or origins (scheme://host[:port]) separated by commas (a flag, the
    environment) or in a list (TOML); empty: no CORS. ValueError if one is
    not an origin."""
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[arg-type]
    origins = tuple(str(item).strip().lower().rstrip("/") for item in items if str(item).strip())
    if "*" in origins:
        if len(origins) > 1:
            raise ValueError("'*' allows every origin: give it alone")
        return origins
    for origin in origins:
        url = urlsplit(origin)
        if url.scheme not in ("http", "https") or not url.netloc or url.path or url.query:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], e.g. "
                             "http://localhost:3000)")
    return origins


@dataclass(frozen=True)
class Cors:
    origins: tuple[str, ...] = ()        # (): no CORS headers; ("*",): any origin

    def allows(self, origin: str | None) -> bool:
        if not origin or not self.origins:
            return False
        return self.origins == ("*",) or origin.lower().rstrip("/") in self.origins

    def headers(self, origin: str | None) -> dict[str, str]:
        """For every answer: Access-Control-Allow-Origin when `origin` (the
        request's Origin header) is allowed, else nothing."""
        if not self.allows(origin):
            return {}
        if self.origins == ("*",):
            return {"Access-Control-Allow-Origin": "*",
                    "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        assert origin is not None
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": EXPOSE_HEADERS}

    def preflight(self, origin: str | None, requested_headers: str | None) -> dict[str, str]:
        """For a preflight (OPTIONS) from an allowed origin: the methods and
        headers it may use, and how long the browser may remember it."""
        headers = self.headers(origin)
        if not headers:
            return {}
        return {**headers, "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": (requested_headers or ALLOW_HEADERS),
                "Access-Control-Max-Age": str(MAX_AGE_S)}
