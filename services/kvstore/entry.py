"""A parked context: its layout, tokens, owner, where its bytes are, and the
hash of its session's secret. Plain values; no grpc."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import sys
from array import array
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any

from services.common.errors import InvalidArgument
from services.kvstore.arena import Region

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Generous bounds so that hostile layouts cannot overflow anything.
MAX_DIM = 1 << 24
ENTRY_ID = re.compile(r"^kv-[0-9a-f]{16}$")


class State:
    RESERVED = "reserved"
    READY = "ready"
    SPILLED = "spilled"


@dataclass(frozen=True)
class Layout:
    """K then V, each [num_layers][num_tokens][num_kv_heads][head_dim] of dtype."""

    model: str
    model_version: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    block_size: int = 0

    @property
    def num_bytes(self) -> int:
        return (2 * self.num_layers * self.num_tokens * self.num_kv_heads * self.head_dim
                * ITEMSIZE[self.dtype])

    def validate(self, num_token_ids: int) -> None:
        """Raises InvalidArgument naming the field (as in the proto)."""
        if not self.model:
            raise InvalidArgument("layout.model", "is required")
        if self.dtype not in ITEMSIZE:
            raise InvalidArgument("layout.dtype", f"must be float32, bfloat16 or float16, "
                                                  f"got {self.dtype!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_tokens"):
            value = getattr(self, name)
            if not 0 < value <= MAX_DIM:
                raise InvalidArgument(f"layout.{name}", f"must be in [1, {MAX_DIM}], got {value}")
        if self.block_size < 0:
            raise InvalidArgument("layout.block_size", "must not be negative")
        if self.num_tokens > num_token_ids:
            raise InvalidArgument("layout.num_tokens",
                                  f"{self.num_tokens} exceeds len(token_ids) = {num_token_ids}")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)


@dataclass
class Entry:
    entry_id: str
    owner: str
    session_id: str
    layout: Layout
    #: int32s (an array from Reserve, a tuple from the manifest).
    token_ids: Sequence[int]
    secret_hash: str
    created_at: float
    last_used_at: float
    state: str = State.RESERVED
    region: Region | None = None
    checksum: int | None = None
    #: Opaque bytes kept with the entry (a worker's session metadata, JSON).
    metadata: bytes = b""
    #: Readers streaming it out (Export): never spilled or deleted meanwhile.
    pins: int = field(default=0, repr=False)

    @property
    def num_bytes(self) -> int:
        return self.layout.num_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id, "owner": self.owner, "session_id": self.session_id,
            "layout": asdict(self.layout), "token_ids": encode_tokens(self.token_ids),
            "secret_hash": self.secret_hash, "created_at": self.created_at,
            "last_used_at": self.last_used_at, "state": self.state,
            "region": asdict(self.region) if self.region else None,
            "checksum": self.checksum, "num_bytes": self.num_bytes,
            "metadata": base64.b64encode(self.metadata).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        """Raises KeyError/TypeError/ValueError on a malformed record."""
        layout = Layout(**data["layout"])
        if layout.dtype not in ITEMSIZE:
            raise ValueError(f"bad dtype {layout.dtype!r}")
        region = Region(**data["region"]) if data.get("region") else None
        entry = cls(
            entry_id=str(data["entry_id"]), owner=str(data["owner"]),
            session_id=str(data["session_id"]), layout=layout,
            token_ids=decode_tokens(data["token_ids"]),
            secret_hash=str(data["secret_hash"]), created_at=float(data["created_at"]),
            last_used_at=float(data["last_used_at"]), state=str(data["state"]),
            region=region, checksum=int(data["checksum"]),
            metadata=base64.b64decode(data.get("metadata", ""), validate=True))
        if not ENTRY_ID.match(entry.entry_id):
            raise ValueError(f"bad entry id {entry.entry_id!r}")
        if entry.state not in (State.READY, State.SPILLED):
            raise ValueError(f"state {entry.state!r} is not kept")
        return entry


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int32, 4 bytes an id: the manifest's form
    and the protos' packed_token_ids (a repeated int32 field costs Python
    tenths of a millisecond per thousands of ids, each way)."""
    ids = token_ids if isinstance(token_ids, array) and token_ids.typecode == "i" \
        else array("i", token_ids)
    if sys.byteorder == "big":
        ids = array("i", ids)
        ids.byteswap()
    return ids.tobytes()


def unpack_tokens(raw: bytes) -> array:
    """pack_tokens undone, as an array("i"). ValueError unless whole ids."""
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of 4-byte token ids")
    ids = array("i")
    ids.frombytes(raw)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids


def encode_tokens(token_ids) -> str:
    """Token ids for the manifest: base64 of little-endian int32 (a JSON list
    of a long context cost milliseconds per commit)."""
    return base64.b64encode(pack_tokens(token_ids)).decode("ascii")


def decode_tokens(text: str) -> tuple[int, ...]:
    return tuple(unpack_tokens(base64.b64decode(text, validate=True)))
