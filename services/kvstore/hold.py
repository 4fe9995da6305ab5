"""A hold: shared memory an owner keeps ahead of its next entry, so that a
park writes its bytes at once and makes the entry in one round trip (Place)
instead of two (Reserve, then Commit). Plain values; no grpc.

A hold counts as used memory, like a reservation, and is dropped when it is
neither renewed nor used within the store's reservation TTL (a worker that
dies leaves nothing held for long), and it is on the manifest: a kvstore
restarted after a crash keeps its region. An owner keeps at most
MAX_PER_OWNER.
A hold is at most 1/SHARE of the store's capacity (a larger ask gets that
much) and all holds together at most 1/ALL_SHARE of it: the rest is for
entries, so that a hold never leaves a Reserve or a spilled entry's return
without room (a hold cannot be taken back to make room: its owner may be
writing into it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from services.kvstore.arena import Region

#: Holds one owner may keep at once (a worker keeps one).
MAX_PER_OWNER = 4
#: A hold is at most capacity / SHARE; all holds at most capacity / ALL_SHARE.
SHARE = 8
ALL_SHARE = 4


@dataclass
class Hold:
    hold_id: str
    owner: str
    secret_hash: str
    region: Region
    #: When it was made or last renewed (the TTL counts from here).
    renewed_at: float

    @property
    def num_bytes(self) -> int:
        return self.region.length

    def to_json(self) -> dict[str, Any]:
        """For the manifest: a restart after a crash keeps a hold's region
        (its owner may write there any time) and its TTL starts again."""
        return {"hold_id": self.hold_id, "owner": self.owner, "secret_hash": self.secret_hash,
                "region": asdict(self.region)}

    @classmethod
    def from_json(cls, data: dict[str, Any], now: float) -> Hold:
        """Raises KeyError/TypeError/ValueError on a malformed record."""
        region = Region(**data["region"])
        return cls(hold_id=str(data["hold_id"]), owner=str(data["owner"]),
                   secret_hash=str(data["secret_hash"]),
                   region=Region(str(region.segment), int(region.offset), int(region.length)),
                   renewed_at=now)
