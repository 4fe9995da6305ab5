"""Every bound on what a client sends the KV store, checked here and nowhere
else (the store calls these before it allocates anything, after the layout's
own checks; the servicer for Export's chunk size), so that no request can
make the store hold memory it does not account for.

A parked context's own bytes are bounded by the store's capacity; what an
entry holds beside them, in the store's own memory, is bounded here:
  - names (owner, session_id, secret, layout.model, layout.model_version):
    at most MAX_NAME_CHARS characters each;
  - token_ids: at most layout.num_tokens + MAX_UNCACHED_TOKENS (the tokens
    with KV, then those of the context that have none yet), and never more
    than MAX_TOKEN_IDS;
  - metadata: at most MAX_METADATA_BYTES;
  - all entries' token ids, metadata and per-entry bookkeeping together: at
    most capacity / BOOKKEEPING_FRACTION, and never less than
    MIN_BOOKKEEPING_BYTES (store.py checks it: a new entry past it is refused
    with RESOURCE_EXHAUSTED and a retry hint);
  - entry ids: required, at most MAX_NAME_CHARS;
  - Export chunks: at most MAX_CHUNK_BYTES.
A reservation not committed within the store's reservation TTL is dropped
and its memory freed (store.py).
"""

from __future__ import annotations

from collections.abc import Sized

from services.common.errors import InvalidArgument

MAX_NAME_CHARS = 1024
MAX_METADATA_BYTES = 1 << 20
#: Tokens of an entry's context past those with KV (a worker parks at most
#: one: the last token sampled, not yet run).
MAX_UNCACHED_TOKENS = 4096
#: A context of a million tokens is the most any entry describes.
MAX_TOKEN_IDS = 1 << 20
#: Token ids are kept as int32.
TOKEN_ID_BYTES = 4
#: What one entry costs the store beside its ids and metadata (objects,
#: manifest record), counted so that many tiny entries are bounded too.
ENTRY_OVERHEAD_BYTES = 2048
#: All entries' bookkeeping stays under capacity / this.
BOOKKEEPING_FRACTION = 16
MIN_BOOKKEEPING_BYTES = 64 << 20
MAX_CHUNK_BYTES = 32 << 20


def check_name(field: str, value: str, required: bool = True) -> None:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"longer than {MAX_NAME_CHARS} characters")


def check_entry_id(entry_id: str) -> None:
    check_name("entry_id", entry_id)


def check_reserve(owner: str, session_id: str, secret: str, model: str, model_version: str,
                  num_tokens: int, token_ids: Sized, metadata: bytes) -> None:
    """A Reserve (or an Import's header) within bounds; the layout's own
    dimensions are checked by Layout.validate."""
    for field, value in (("owner", owner), ("session_id", session_id), ("secret", secret)):
        check_name(field, value)
    check_name("layout.model", model, required=False)
    check_name("layout.model_version", model_version, required=False)
    if len(metadata) > MAX_METADATA_BYTES:
        raise InvalidArgument("metadata", f"at most {MAX_METADATA_BYTES} bytes, "
                                          f"got {len(metadata)}")
    limit = min(MAX_TOKEN_IDS, max(0, num_tokens) + MAX_UNCACHED_TOKENS)
    if len(token_ids) > limit:
        raise InvalidArgument("token_ids", f"{len(token_ids)} ids for a layout of {num_tokens} "
                                           f"tokens: at most num_tokens + "
                                           f"{MAX_UNCACHED_TOKENS} and {MAX_TOKEN_IDS} in all")


def check_chunk_bytes(chunk_bytes: int) -> None:
    if not 0 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise InvalidArgument("chunk_bytes", f"must be in [0, {MAX_CHUNK_BYTES}] (0: the "
                                             f"server's default), got {chunk_bytes}")


def bookkeeping_bound(capacity_bytes: int) -> int:
    """The most all entries may hold beside their KV bytes."""
    return max(capacity_bytes // BOOKKEEPING_FRACTION, MIN_BOOKKEEPING_BYTES)


def bookkeeping_bytes(num_token_ids: int, metadata_bytes: int) -> int:
    """What an entry holds in the store's memory beside its KV bytes."""
    return ENTRY_OVERHEAD_BYTES + TOKEN_ID_BYTES * num_token_ids + metadata_bytes
