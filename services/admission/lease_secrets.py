"""Optional per-lease secrets: a holder that gives one when it acquires a
lease must give it again to resize, release or renew that lease. Lease ids
and epochs are public (Status, Watch); the secret is not, and only its
SHA-256 is kept. A lease acquired without one is open to any client that
knows its id and epoch, as before (grpcurl, simple clients). Pure: no gRPC."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from services.common.errors import InvalidArgument, PermissionDenied

MAX_SECRET_CHARS = 256


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class LeaseSecrets:
    def __init__(self) -> None:
        self._hashes: dict[str, str] = {}

    @staticmethod
    def validate(secret: str) -> None:
        if len(secret) > MAX_SECRET_CHARS:
            raise InvalidArgument("secret", f"at most {MAX_SECRET_CHARS} characters")

    def remember(self, lease_id: str, secret: str) -> None:
        if secret:
            self._hashes[lease_id] = _digest(secret)

    def check(self, lease_id: str, secret: str) -> None:
        """PermissionDenied unless the lease has no secret or `secret` is it."""
        wanted = self._hashes.get(lease_id)
        if wanted is None:
            return
        if not secret or not hmac.compare_digest(wanted, _digest(secret)):
            raise PermissionDenied("secret", f"lease {lease_id!r} was acquired with a secret; "
                                             "give the same one")

    def keep_only(self, lease_ids: Iterable[str]) -> None:
        """Forget the secrets of leases that are gone (released, expired)."""
        live = set(lease_ids)
        for lease_id in [k for k in self._hashes if k not in live]:
            del self._hashes[lease_id]

    def __len__(self) -> int:
        return len(self._hashes)
