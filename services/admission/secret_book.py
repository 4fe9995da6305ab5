"""Optional secrets of what a client makes in admission: a lease, a
worker's registration. A client that gives one when it acquires the lease
(registers the worker) must give it again to resize, release or renew the
lease (to register again, unregister, report the worker's activity). Ids
are public (Status, Watch, ListWorkers); the secret is not, and only its
SHA-256 is kept. What was made without one is open to any client that
knows its id, as before (grpcurl, simple clients). Pure: no gRPC."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from services.admission import limits
from services.common.errors import PermissionDenied



def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class SecretBook:
    """The secrets' hashes of one kind of thing, by its id. `noun` and
    `made` word the refusal: "lease 'x' was acquired with a secret"."""

    def __init__(self, noun: str = "lease", made: str = "acquired") -> None:
        self.noun = noun
        self.made = made
        self._hashes: dict[str, str] = {}

    @staticmethod
    def validate(secret: str) -> None:
        limits.check_secret(secret)

    def remember(self, key: str, secret: str) -> None:
        if secret:
            self._hashes[key] = _digest(secret)

    def check(self, key: str, secret: str) -> None:
        """PermissionDenied unless `key` has no secret or `secret` is it."""
        wanted = self._hashes.get(key)
        if wanted is None:
            return
        if not secret or not hmac.compare_digest(wanted, _digest(secret)):
            raise PermissionDenied("secret", f"{self.noun} {key!r} was {self.made} with a "
                                             "secret; give the same one")

    def forget(self, key: str) -> None:
        self._hashes.pop(key, None)

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget the secrets of what is gone (released, expired)."""
        live = set(keys)
        for key in [k for k in self._hashes if k not in live]:
            del self._hashes[key]

    def __len__(self) -> int:
        return len(self._hashes)
