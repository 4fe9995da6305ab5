"""The entry table and its policy: reserve, commit, open, delete, list and
status over the shared-memory arena, and holds (memory kept ahead of an
owner's next entry, placed in one step: hold.py); capacity, least-recently-
used spilling or refusal when full; re-adoption after a crash; a clean stop.
No grpc.

Every method is synchronous and runs on the server's event loop thread, so
the table needs no lock. Checksums are sum64 (services/kvstore/checksum.py):
Commit records the writer's, readers check it before use (the kvstore does
not read the bytes on the hot path), and the kvstore checks it itself
whenever it handles the bytes: on Import, when it brings a spilled entry
back from disk, and when it re-adopts an entry after a crash.
"""

from __future__ import annotations

import secrets
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.common.errors import (
    CapacityExhausted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Shortfall,
)
from services.kvstore import hold as holds
from services.kvstore import limits
from services.kvstore.arena import Arena, Region, align_up, parse_segment_name
from services.kvstore.checksum import checksum
from services.kvstore.entry import Entry, Layout, State, hash_secret, secret_matches
from services.kvstore.hold import Hold
from services.kvstore.manifest import Manifest, StoreLock, has_manifest, is_locked
from services.kvstore.spill import SpillDir

log = structlog.get_logger(__name__)

WHEN_FULL = ("spill", "refuse")
RETRY_AFTER_S = 1.0
#: How many expired reservations' ids are remembered, so that a late Commit
#: learns why its entry is gone.
EXPIRED_REMEMBERED = 1024


@dataclass(frozen=True)
class StoreConfig:
    shm_dir: Path
    store_id: str
    segment_bytes: int
    capacity_bytes: int
    when_full: str
    spill_dir: Path
    state_dir: Path
    keep_on_stop: bool = True
    clean_stale: bool = True
    max_entry_bytes: int = 0  # 0: capacity_bytes
    #: A reservation not committed within this is dropped (0: never).
    reservation_ttl_s: float = 60.0
    #: Bytes of emptied dedicated segments kept for the next large entry.
    spare_bytes: int = 0


@dataclass(frozen=True)
class StoreStatus:
    capacity_bytes: int
    used_bytes: int
    spilled_bytes: int
    num_entries: int
    num_segments: int
    when_full: str


class Store:
    def __init__(self, config: StoreConfig, clock: Callable[[], float] = time.time):
        if config.when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be spill or refuse, got {config.when_full!r}")
        self.config = config
        self.clock = clock
        # Empty dedicated segments (entries larger than a segment) are kept
        # for the next such entry, up to spare_bytes of them, while the
        # segments map at most the capacity.
        self.arena = Arena(config.shm_dir, config.store_id, config.segment_bytes,
                           spare_bytes=config.spare_bytes, mapped_limit=config.capacity_bytes)
        self.spill = SpillDir(config.spill_dir)
        self.manifest = Manifest(config.state_dir)
        self._lock = StoreLock(config.shm_dir, config.store_id)
        self._entries: dict[str, Entry] = {}
        self._holds: dict[str, Hold] = {}
        self._expired: OrderedDict[str, float] = OrderedDict()
        self._closed = False
        #: Called when a commit or delete went on the manifest's journal
        #: (None: no journal, the whole manifest is written at once). The app
        #: then writes the whole manifest behind them (`flush`): rewriting
        #: every entry's token ids on each commit and delete cost
        #: milliseconds, growing with the entries.
        self.save_later: Callable[[], None] | None = None
        self._stale = False

    @property
    def max_entry_bytes(self) -> int:
        limit = self.config.max_entry_bytes or self.config.capacity_bytes
        return min(limit, self.config.capacity_bytes)

    # ---- life cycle -------------------------------------------------------
    def start(self) -> None:
        """Take the store's lock, re-adopt what the manifest knows, remove stale files."""
        self.config.shm_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        self._recover()
        if self.config.clean_stale:
            self._clean_other_stores()
        self._save()
        log.info("store_started", store_id=self.config.store_id, entries=len(self._entries),
                 segments=len(self.arena.segments()), used_bytes=self.used_bytes,
                 capacity_bytes=self.config.capacity_bytes)

    def close(self) -> None:
        """A clean stop: no segment is left behind. With keep_on_stop, ready
        entries are spilled first (and the manifest lists them); without it,
        every entry is forgotten."""
        if self._closed:
            return
        self._closed = True
        self._holds.clear()     # their segments go: a restart keeps none (a crash's keeps them)
        kept = 0
        for entry in list(self._entries.values()):
            if self.config.keep_on_stop and entry.state == State.READY:
                try:
                    self._spill(entry)
                    kept += 1
                    continue
                except OSError as exc:
                    log.error("entry_lost", entry_id=entry.entry_id, error=str(exc))
            if entry.state == State.SPILLED and self.config.keep_on_stop:
                kept += 1
                continue
            self._forget(entry)
        self.arena.close()
        if self.config.keep_on_stop:
            self._save()
        else:
            self.manifest.remove()
        self._lock.release()
        log.info("store_closed", store_id=self.config.store_id, kept_entries=kept)

    # ---- requests ---------------------------------------------------------
    def reserve(self, owner: str, session_id: str, secret: str, layout: Layout,
                token_ids: Iterable[int], metadata: bytes = b"") -> tuple[Entry, Region]:
        token_ids = self._check_entry(owner, session_id, secret, layout, token_ids, metadata)
        self.expire_reservations()
        self._check_bookkeeping(limits.bookkeeping_bytes(len(token_ids), len(metadata)))
        self._make_room(layout.num_bytes)
        region = self.arena.allocate(layout.num_bytes)
        entry = self._new_entry(owner, session_id, secret, layout, token_ids, metadata, region)
        log.info("entry_reserved", entry_id=entry.entry_id, owner=owner,
                 session_id=session_id, bytes=layout.num_bytes, segment=region.segment)
        return entry, region

    def _check_entry(self, owner: str, session_id: str, secret: str, layout: Layout,
                     token_ids: Iterable[int], metadata: bytes):
        """A new entry's fields within bounds (InvalidArgument naming the
        field); its token ids, with a length."""
        if not hasattr(token_ids, "__len__"):
            token_ids = list(token_ids)   # a repeated field has a length: checked before copied
        layout.validate(len(token_ids))
        num_bytes = layout.num_bytes
        if num_bytes > self.max_entry_bytes:
            raise InvalidArgument("layout", f"the entry needs {num_bytes} bytes, more than the "
                                            f"store ever holds ({self.max_entry_bytes})")
        limits.check_reserve(owner, session_id, secret, layout.model, layout.model_version,
                             layout.num_tokens, token_ids, metadata)
        return token_ids

    def _new_entry(self, owner: str, session_id: str, secret: str, layout: Layout,
                   token_ids, metadata: bytes, region: Region) -> Entry:
        now = self.clock()
        entry = Entry(entry_id=f"kv-{secrets.token_hex(8)}", owner=owner, session_id=session_id,
                      layout=layout, token_ids=array("i", token_ids),  # 4 bytes an id
                      secret_hash=hash_secret(secret), created_at=now, last_used_at=now,
                      region=region, metadata=bytes(metadata))
        self._entries[entry.entry_id] = entry
        return entry

    # ---- holds: memory kept ahead of an owner's next entry (hold.py) ----
    def hold(self, owner: str, secret: str, num_bytes: int, hold_id: str = "") -> Hold:
        """A new hold of `num_bytes` (at most the share of hold.py), or
        (`hold_id`) that hold renewed."""
        if hold_id:
            held = self._held(hold_id, secret)
            held.renewed_at = self.clock()
            return held
        limits.check_name("owner", owner)
        limits.check_name("secret", secret)
        if not 0 < num_bytes <= self.max_entry_bytes:
            raise InvalidArgument("num_bytes", f"must be in [1, {self.max_entry_bytes}] (the "
                                               f"largest entry), got {num_bytes}")
        self.expire_reservations()
        if sum(h.owner == owner for h in self._holds.values()) >= holds.MAX_PER_OWNER:
            raise CapacityExhausted(
                f"{owner!r} holds {holds.MAX_PER_OWNER} regions already: place or release one",
                Shortfall(f"kvstore:{self.config.store_id}", num_bytes, 0), RETRY_AFTER_S)
        capacity = self.config.capacity_bytes
        num_bytes = min(num_bytes, capacity // holds.SHARE)
        held_bytes = sum(h.num_bytes for h in self._holds.values())
        if num_bytes <= 0 or held_bytes + num_bytes > capacity // holds.ALL_SHARE:
            raise CapacityExhausted(
                f"holds take {held_bytes} bytes of the store's {capacity}; {num_bytes} more "
                f"would pass their share (1/{holds.ALL_SHARE})",
                Shortfall(f"kvstore:{self.config.store_id}", num_bytes,
                          max(0, capacity // holds.ALL_SHARE - held_bytes)), RETRY_AFTER_S)
        self._make_room(num_bytes)
        held = Hold(hold_id=f"hold-{secrets.token_hex(8)}", owner=owner,
                    secret_hash=hash_secret(secret), region=self.arena.allocate(num_bytes),
                    renewed_at=self.clock())
        self._holds[held.hold_id] = held
        self._changed({"op": "hold", "hold": held.to_json(),
                       "segment": self._segment_record(held.region)})
        log.info("region_held", hold_id=held.hold_id, owner=owner, bytes=num_bytes,
                 segment=held.region.segment)
        return held

    def place(self, hold_id: str, hold_secret: str, owner: str, session_id: str, secret: str,
              layout: Layout, token_ids: Iterable[int], metadata: bytes, crc: int,
              hold_again: bool = False) -> tuple[Entry, Hold | None]:
        """The bytes at the start of the hold's region, a ready entry (a
        Reserve and a Commit in one); the rest of the region is freed. With
        `hold_again`, a new hold of the same size and secret for the next
        (None when there is no room: the entry is placed all the same)."""
        held = self._held(hold_id, hold_secret)
        token_ids = self._check_entry(owner, session_id, secret, layout, token_ids, metadata)
        if owner != held.owner:
            raise InvalidArgument("entry.owner", f"must be the hold's owner {held.owner!r}, "
                                                 f"got {owner!r}")
        num_bytes = layout.num_bytes
        if num_bytes > held.num_bytes:
            raise FailedPrecondition(f"the entry needs {num_bytes} bytes, more than hold "
                                     f"{hold_id!r}'s {held.num_bytes}: reserve it instead",
                                     "HOLD_TOO_SMALL")
        self._check_bookkeeping(limits.bookkeeping_bytes(len(token_ids), len(metadata)))
        del self._holds[hold_id]
        region = held.region
        used = align_up(num_bytes)
        if align_up(region.length) > used:
            self.arena.free(Region(region.segment, region.offset + used,
                                   align_up(region.length) - used))
        entry = self._new_entry(owner, session_id, secret, layout, token_ids, metadata,
                                Region(region.segment, region.offset, num_bytes))
        self._ready(entry, crc, hold_id=hold_id)
        log.info("entry_placed", entry_id=entry.entry_id, hold_id=hold_id, owner=owner,
                 session_id=session_id, bytes=num_bytes, checksum=crc)
        following = None
        if hold_again:
            try:
                following = self.hold(held.owner, hold_secret, held.num_bytes)
            except CapacityExhausted as exc:
                log.info("hold_not_renewed", owner=held.owner, reason=exc.message)
        return entry, following

    def release_hold(self, hold_id: str, secret: str) -> int:
        held = self._held(hold_id, secret)
        self._drop_hold(held)
        log.info("hold_released", hold_id=hold_id, bytes=held.num_bytes)
        return held.num_bytes

    def _drop_hold(self, held: Hold) -> None:
        del self._holds[held.hold_id]
        self.arena.free(held.region)
        self._changed({"op": "unhold", "hold_id": held.hold_id})

    def _held(self, hold_id: str, secret: str) -> Hold:
        limits.check_name("hold_id", hold_id)
        self.expire_reservations()
        held = self._holds.get(hold_id)
        if held is None:
            raise NotFound("hold", hold_id, "it expired, was used or was never made")
        if not secret or not secret_matches(secret, held.secret_hash):
            raise PermissionDenied("secret", f"does not match hold {hold_id!r}'s")
        return held

    def commit(self, entry_id: str, secret: str, crc: int, verify: bool = False) -> Entry:
        """The entry ready, with the writer's checksum; `verify` checks the
        bytes against it first (Import does: the kvstore wrote them itself)."""
        entry = self._authorized(entry_id, secret)
        if entry.state != State.RESERVED:
            raise FailedPrecondition(f"entry {entry_id!r} is already committed", "ALREADY_COMMITTED")
        if verify and (actual := checksum(self.arena.view(entry.region))) != crc:
            self._forget(entry)
            raise FailedPrecondition(f"checksum mismatch for {entry_id!r}: given {crc:#018x}, "
                                     f"the bytes have {actual:#018x}; the entry was deleted, "
                                     f"reserve and write it again", "CHECKSUM_MISMATCH")
        self._ready(entry, crc)
        log.info("entry_committed", entry_id=entry_id, bytes=entry.num_bytes, checksum=crc)
        return entry

    def _ready(self, entry: Entry, crc: int, hold_id: str = "") -> None:
        """The entry ready with its checksum, on the manifest's journal (and
        the hold it was placed in gone, in the same line)."""
        entry.state = State.READY
        entry.checksum = crc
        entry.last_used_at = self.clock()
        record = {"op": "commit", "entry": entry.to_json(),
                  "segment": self._segment_record(entry.region)}
        if hold_id:
            record["hold_id"] = hold_id
        self._changed(record)

    def _segment_record(self, region: Region) -> dict:
        segment = self.arena.segment(region.segment)
        return {"name": segment.name, "size": segment.size, "dedicated": segment.dedicated}

    def open(self, entry_id: str, secret: str) -> tuple[Entry, Region]:
        """The entry's region (the reader checks the checksum); a spilled
        entry is brought back into shared memory first, and checked."""
        entry = self._authorized(entry_id, secret)
        if entry.state == State.RESERVED:
            raise FailedPrecondition(f"entry {entry_id!r} is not committed yet", "NOT_COMMITTED")
        if entry.state == State.SPILLED:
            self._restore(entry)
        entry.last_used_at = self.clock()
        return entry, entry.region

    def delete(self, entry_id: str, secret: str) -> int:
        entry = self._authorized(entry_id, secret)
        if entry.pins:
            raise FailedPrecondition(f"entry {entry_id!r} is being exported", "ENTRY_BUSY")
        self._forget(entry)
        self._changed({"op": "delete", "entry_id": entry_id})
        log.info("entry_deleted", entry_id=entry_id, bytes=entry.num_bytes)
        return entry.num_bytes

    def list(self, owner: str = "") -> list[Entry]:
        entries = [e for e in self._entries.values() if not owner or e.owner == owner]
        return sorted(entries, key=lambda e: e.created_at)

    def status(self) -> StoreStatus:
        return StoreStatus(
            capacity_bytes=self.config.capacity_bytes, used_bytes=self.used_bytes,
            spilled_bytes=sum(e.num_bytes for e in self._entries.values()
                              if e.state == State.SPILLED),
            num_entries=len(self._entries), num_segments=len(self.arena.segments()),
            when_full=self.config.when_full)

    def view(self, region: Region) -> memoryview:
        return self.arena.view(region)

    def pin(self, entry_id: str) -> None:
        self._entries[entry_id].pins += 1

    def unpin(self, entry_id: str) -> None:
        entry = self._entries.get(entry_id)
        if entry is not None and entry.pins:
            entry.pins -= 1

    def get(self, entry_id: str) -> Entry | None:
        return self._entries.get(entry_id)

    @property
    def used_bytes(self) -> int:
        """Bytes of the entries in shared memory and of the holds."""
        return (sum(e.num_bytes for e in self._entries.values() if e.region is not None)
                + sum(h.num_bytes for h in self._holds.values()))

    # ---- internals --------------------------------------------------------
    def _authorized(self, entry_id: str, secret: str) -> Entry:
        limits.check_entry_id(entry_id)
        entry = self._entries.get(entry_id)
        if entry is None:
            if entry_id in self._expired:
                raise FailedPrecondition(
                    f"entry {entry_id!r} was reserved but not committed within "
                    f"{self.config.reservation_ttl_s:g} s, and was dropped: reserve it again",
                    "RESERVATION_EXPIRED")
            raise NotFound("entry", entry_id)
        if not secret or not secret_matches(secret, entry.secret_hash):
            raise PermissionDenied("secret", f"does not match entry {entry_id!r}'s session")
        return entry

    def expire_reservations(self) -> int:
        """Drop the reservations older than the TTL that no one is writing
        (an Import pins its entry), and the holds neither renewed nor used
        within it; returns how many reservations. A writer through
        shared memory slower than the TTL would write into a freed region:
        its Commit is refused (RESERVATION_EXPIRED), and whatever entry the
        region went to meanwhile fails its checksum when read."""
        ttl = self.config.reservation_ttl_s
        if ttl <= 0:
            return 0
        now = self.clock()
        stale = [e for e in self._entries.values()
                 if e.state == State.RESERVED and not e.pins and now - e.created_at > ttl]
        for held in [h for h in self._holds.values() if now - h.renewed_at > ttl]:
            self._drop_hold(held)
            log.warning("hold_expired", hold_id=held.hold_id, owner=held.owner,
                        bytes=held.num_bytes, ttl_s=ttl)
        for entry in stale:
            self._forget(entry)
            self._expired[entry.entry_id] = now
            while len(self._expired) > EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
            log.warning("reservation_expired", entry_id=entry.entry_id, owner=entry.owner,
                        session_id=entry.session_id, bytes=entry.num_bytes, ttl_s=ttl)
        return len(stale)

    @property
    def bookkeeping_bytes(self) -> int:
        """What the entries hold in the store's own memory beside their KV."""
        return sum(limits.bookkeeping_bytes(len(e.token_ids), len(e.metadata))
                   for e in self._entries.values())

    def _check_bookkeeping(self, num_bytes: int) -> None:
        bound = limits.bookkeeping_bound(self.config.capacity_bytes)
        held = self.bookkeeping_bytes
        if held + num_bytes > bound:
            raise CapacityExhausted(
                f"the KV store's entries hold {held} bytes of token ids and metadata; "
                f"{num_bytes} more would pass its bound of {bound}: delete entries",
                Shortfall(f"kvstore:{self.config.store_id}", num_bytes, max(0, bound - held)),
                RETRY_AFTER_S)

    def _make_room(self, num_bytes: int) -> None:
        capacity = self.config.capacity_bytes
        used = self.used_bytes
        if used + num_bytes <= capacity:
            return
        candidates = sorted((e for e in self._entries.values()
                             if e.state == State.READY and not e.pins),
                            key=lambda e: e.last_used_at)
        spillable = sum(e.num_bytes for e in candidates)
        if self.config.when_full == "refuse" or used - spillable + num_bytes > capacity:
            raise CapacityExhausted(
                f"the KV store is full: {num_bytes} bytes asked, {capacity - used} free of "
                f"{capacity}" + ("" if self.config.when_full == "refuse"
                                 else f"; only {spillable} bytes can be spilled"),
                Shortfall(f"kvstore:{self.config.store_id}", num_bytes, max(0, capacity - used)),
                RETRY_AFTER_S)
        for entry in candidates:
            if used + num_bytes <= capacity:
                break
            self._spill(entry)
            used -= entry.num_bytes
        self._save()

    def _spill(self, entry: Entry) -> None:
        with self.arena.view(entry.region) as view:
            self.spill.write(entry.entry_id, view, entry.to_json())
        self.arena.free(entry.region)
        entry.region = None
        entry.state = State.SPILLED
        log.info("entry_spilled", entry_id=entry.entry_id, bytes=entry.num_bytes)

    def _restore(self, entry: Entry) -> None:
        self._make_room(entry.num_bytes)
        region = self.arena.allocate(entry.num_bytes)
        try:
            with self.arena.view(region) as view:
                self.spill.read_into(entry.entry_id, view)
                actual = checksum(view)
        except OSError as exc:
            self.arena.free(region)
            self._corrupted(entry, f"its spill file cannot be read: {exc}")
        entry.region = region
        entry.state = State.READY
        if actual != entry.checksum:
            self._corrupted(entry, "its spill file changed after it was written")
        self.spill.remove(entry.entry_id)
        self._save()
        log.info("entry_restored", entry_id=entry.entry_id, bytes=entry.num_bytes)

    def _corrupted(self, entry: Entry, why: str) -> None:
        log.error("entry_corrupted", entry_id=entry.entry_id, reason=why)
        self._forget(entry)
        self._save()
        raise FailedPrecondition(f"entry {entry.entry_id!r} is corrupted ({why}); it was "
                                 f"deleted: recompute the context", "CORRUPTED")

    def _forget(self, entry: Entry) -> None:
        self._entries.pop(entry.entry_id, None)
        if entry.region is not None:
            self.arena.free(entry.region)
            entry.region = None
        self.spill.remove(entry.entry_id)

    def _changed(self, record: dict) -> None:
        if self.save_later is None:
            self._save()
            return
        self.manifest.append(record)
        self._stale = True
        self.save_later()

    def flush(self) -> None:
        """Write the whole manifest (and start the journal afresh) if a commit
        or delete went on the journal since."""
        if self._stale and not self._closed:
            self._save()

    def _save(self) -> None:
        self._stale = False
        segments = [{"name": s.name, "size": s.size, "dedicated": s.dedicated}
                    for s in self.arena.segments()]
        entries = [e.to_json() for e in self._entries.values()
                   if e.state in (State.READY, State.SPILLED)]
        self.manifest.write(segments, entries, [h.to_json() for h in self._holds.values()])

    def _recover(self) -> None:
        data = self.manifest.read() or {}
        for raw in (*data.get("segments", []), *data.get("entries", [])):
            if not isinstance(raw, dict):
                log.warning("manifest_record_malformed", record=str(raw)[:200])
        segments = {str(raw.get("name")): raw for raw in data.get("segments", [])
                    if isinstance(raw, dict)}
        entries = {str(raw.get("entry_id")): raw for raw in data.get("entries", [])
                   if isinstance(raw, dict)}
        held = {str(raw.get("hold_id")): raw for raw in data.get("holds", [])
                if isinstance(raw, dict)}
        # The commits, deletes and holds since that snapshot, in order.
        for record in self.manifest.read_journal():
            op = record.get("op")
            if op == "commit" and isinstance(record.get("entry"), dict):
                entries[str(record["entry"].get("entry_id"))] = record["entry"]
                held.pop(str(record.get("hold_id")), None)
            elif op == "delete":
                entries.pop(str(record.get("entry_id")), None)
            elif op == "hold" and isinstance(record.get("hold"), dict):
                held[str(record["hold"].get("hold_id"))] = record["hold"]
            elif op == "unhold":
                held.pop(str(record.get("hold_id")), None)
            if op in ("commit", "hold") and isinstance(record.get("segment"), dict):
                segments.setdefault(str(record["segment"].get("name")), record["segment"])
        data = {"segments": list(segments.values()), "entries": list(entries.values())}
        for raw in data.get("segments", []):
            try:
                self.arena.adopt(str(raw["name"]), int(raw["size"]), bool(raw["dedicated"]))
            except (KeyError, TypeError, ValueError):
                log.warning("segment_record_malformed", record=str(raw)[:200])
        for raw in data.get("entries", []):
            try:
                entry = Entry.from_json(raw)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("entry_dropped", reason=f"malformed record: {exc}")
                continue
            why = self._adopt(entry)
            if why:
                log.warning("entry_dropped", entry_id=entry.entry_id, reason=why)
            else:
                self._entries[entry.entry_id] = entry
                log.info("entry_adopted", entry_id=entry.entry_id, state=entry.state,
                         bytes=entry.num_bytes)
        now = self.clock()
        for raw in held.values():
            try:
                hold = Hold.from_json(raw, now)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("hold_dropped", reason=f"malformed record: {exc}")
                continue
            if hold.hold_id in self._holds or not self.arena.claim(hold.region):
                log.warning("hold_dropped", hold_id=hold.hold_id,
                            reason="its region is not free in an adopted segment")
                continue
            self._holds[hold.hold_id] = hold
            log.info("hold_adopted", hold_id=hold.hold_id, owner=hold.owner,
                     bytes=hold.num_bytes)
        own = {s.name for s in self.arena.segments()}
        for path in self._shm_files():
            parsed = parse_segment_name(path.name)
            if parsed and parsed[0] == self.config.store_id and path.name not in own:
                path.unlink(missing_ok=True)
                log.info("stale_segment_removed", segment=path.name, store_id=parsed[0])
        kept = {e.entry_id for e in self._entries.values() if e.state == State.SPILLED}
        for entry_id in self.spill.entry_ids() - kept:
            self.spill.remove(entry_id)
            for suffix in (".kv.tmp", ".json.tmp"):
                (self.spill.path / f"lmx-{entry_id}{suffix}").unlink(missing_ok=True)
            log.info("stale_spill_removed", entry_id=entry_id)
        self.arena.trim()

    def _adopt(self, entry: Entry) -> str:
        """'' if the entry is sound and now owned again, else why not."""
        if entry.entry_id in self._entries:
            return "listed twice"
        if entry.state == State.SPILLED:
            if entry.region is not None or self.spill.size(entry.entry_id) != entry.num_bytes:
                return "spill file missing or of the wrong size"
            return ""
        region = entry.region
        if region is None or region.length != entry.num_bytes or not self.arena.claim(region):
            return "its region is not in an adopted segment"
        if checksum(self.arena.view(region)) != entry.checksum:
            self.arena.free(region)
            return "checksum mismatch"
        return ""

    def _shm_files(self) -> list[Path]:
        try:
            return [p for p in self.config.shm_dir.iterdir() if p.is_file()]
        except OSError:
            return []

    def _clean_other_stores(self) -> None:
        """Remove segments of other stores that are not running (their lock
        is free) and have no manifest to come back to."""
        for path in self._shm_files():
            parsed = parse_segment_name(path.name)
            if parsed is None or parsed[0] == self.config.store_id:
                continue
            store_id = parsed[0]
            if is_locked(self.config.shm_dir, store_id):
                continue
            if has_manifest(self.config.state_dir.parent / store_id):
                continue
            path.unlink(missing_ok=True)
            log.info("stale_segment_removed", segment=path.name, store_id=store_id)


