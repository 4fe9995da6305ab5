"""A health check for the front's container: one GET of its /health.

    python -m services.front.healthcheck ADDRESS [--path /health] [--timeout-s 3]

ADDRESS is HOST:PORT (or a whole http:// URL). Exit 0 when the front answers
200, 1 otherwise (another status, a refused connection, a timeout), with a
one-line message either way. For a compose `healthcheck.test` in exec form,
whose arguments hold no spaces: podman 4.x splits the arguments of a
`python -c "..."` check at spaces (podman issue 26519), so the front used to
show unhealthy while serving (issue 19). The gRPC services' counterpart is
services/common/healthcheck.py.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_PATH = "/health"


def health_url(address: str, path: str = DEFAULT_PATH) -> str:
    """The URL to GET: http://ADDRESS/PATH, or ADDRESS itself when it is a URL."""
    if "://" in address:
        return address
    return f"http://{address}/{path.lstrip('/')}"


def check(url: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    """One GET of `url`, through no proxy: (healthy, a one-line message)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:          # a status other than 2xx/3xx
        return False, f"front at {url}: HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:           # refused, unresolvable
        return False, f"front at {url}: {exc.reason}"
    except (OSError, http.client.HTTPException) as exc:   # a timeout, a garbled answer
        return False, f"front at {url}: {type(exc).__name__} ({exc})"
    return status == 200, f"front at {url}: HTTP {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.front.healthcheck",
        description="exit 0 when the front's health endpoint answers 200, 1 otherwise")
    parser.add_argument("address", metavar="ADDRESS",
                        help="HOST:PORT of the front, or a whole http:// URL")
    parser.add_argument("--path", default=DEFAULT_PATH,
                        help="the health endpoint's path [default: %(default)s]")
    parser.add_argument("--timeout-s", type=float, default=3.0,
                        help="how long to wait for the answer [default: 3]")
    args = parser.parse_args(argv)
    healthy, message = check(health_url(args.address, args.path), args.timeout_s)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
