"""Parking a session's KV in the kvstore and restoring it, on this worker or
another of the same model.

The bytes are K then V, each [layers][tokens][kv_heads][head_dim] of the
worker's dtype, contiguous (the kvstore's KVLayout). The link reserves,
commits and opens entries; services/worker/kv_transfer.py copies between the
pool and the shared-memory region, off the event loop (on a GPU: pinned, on
a side stream), and checks the checksum; the pool and the session table
change on the loop. A parked session keeps its tokens and messages but no KV
blocks; a Generate on it restores it first (or, if its entry is gone or
corrupted, recomputes the context from its tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import structlog
import torch

from services.common.errors import CapacityExhausted, FailedPrecondition, NotFound
from services.kvstore.entry import Layout
from services.worker.engine import Engine
from services.worker.kv_transfer import ChecksumMismatch, KVTransfer, RegionError
from services.worker.models import LoadedModel
from services.worker.sessions import Session, SessionTable

if TYPE_CHECKING:  # the link speaks grpc; parking itself does not
    from services.worker.kv_link import Held, KVStoreLink, OpenedEntry

log = structlog.get_logger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: After a failed Hold, parks reserve for this long before the next try,
#: doubled after each failure in a row up to HOLD_RETRY_MAX_S.
HOLD_RETRY_S = 5.0
HOLD_RETRY_MAX_S = 300.0


# ---- entries -------------------------------------------------------------------

def model_version(loaded: LoadedModel) -> str:
    """Changes whenever the weights could: config, weight bytes and dtype."""
    config = loaded.model.config.to_json_string(use_diff=False)
    text = f"{config}\n{loaded.weight_bytes}\n{DTYPE_NAMES[loaded.kv_shape.dtype]}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- park and restore ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Parked:
    entry_id: str
    num_tokens: int
    freed_blocks: int


@dataclass(frozen=True, slots=True)
class ParkedAt:
    """Where a park wrote a session's KV: the entry's region, the checksum
    of its bytes and their tokens (Session.parked_at)."""
    region: object
    checksum: int
    num_tokens: int

    def matches(self, entry: OpenedEntry) -> bool:
        """Whether the kvstore still has the entry where it was written."""
        region = entry.region
        return ((region.segment, region.offset, region.length)
                == (self.region.segment, self.region.offset, self.region.length)
                and entry.checksum == self.checksum
                and entry.layout.num_tokens == self.num_tokens)


@dataclass(frozen=True, slots=True)
class Restored:
    session: Session
    num_tokens: int


class Parking:
    """`park_ahead_bytes`: shared memory held in the kvstore ahead of the next
    park (0: none). A park that fits writes there at once and makes its entry
    in one round trip (Place) instead of two (Reserve, then Commit), and the
    reply holds the next region; a larger one reserves as before."""

    def __init__(self, loaded: LoadedModel, engine: Engine, sessions: SessionTable,
                 link: KVStoreLink | None, park_ahead_bytes: int = 0):
        self.loaded = loaded
        self.engine = engine
        self.sessions = sessions
        self.link = link
        self.park_ahead_bytes = park_ahead_bytes if link is not None else 0
        #: The region held for the next park (None: none yet, or in use).
        self._held: Held | None = None
        self._holding: asyncio.Task | None = None   # getting or renewing it
        self._wanted = asyncio.Event()                # a park used it up
        #: The inode of its segment file when it came (None: not noted yet): a
        #: park writes there only into that very file (not a restarted
        #: kvstore's new file of the same name, whose region may be another
        #: entry's). Set with _held, always (_hold).
        self._held_inode: int | None = None
        self._hold_secret = secrets.token_hex(16)
        self.model_version = model_version(loaded)
        self.transfer = KVTransfer(engine.storage, block_size=engine.pool.block_size)
        self._calls: set[asyncio.Task] = set()   # RPCs nothing waits for
        #: Sessions a previous run of this worker (same worker id, the
        #: kvstore's owner) parked: session id -> entry id. The first request
        #: with such a session id and its token brings it back (adopt).
        self._orphans: dict[str, str] = {}
        #: (kind, session_id, bytes, seconds, reason) after each park and restore.
        self.on_activity: Callable[[str, str, int, float, str], None] | None = None

    def close(self) -> None:
        """Unmap (and unpin) the kvstore's segments."""
        self.transfer.close()

    # ---- a region held ahead of the next park ----
    def hold_ahead(self) -> None:
        """Get a region for the next park, and keep it renewed, in the
        background (one task; woken when a park used the region up)."""
        if not self.park_ahead_bytes:
            return
        if self._holding is None or self._holding.done():
            self._holding = asyncio.create_task(self._keep_held(), name="kv-hold")
        elif self._held is None:
            self._wanted.set()

    async def _keep_held(self) -> None:
        link = self._link()
        renewed = time.monotonic()
        failures = 0                              # in a row: the retries back off
        while True:
            self._wanted.clear()
            held, wait_s = self._held, None
            retry_s = min(HOLD_RETRY_S * 2 ** failures, HOLD_RETRY_MAX_S)
            try:
                if held is None:
                    held = await link.hold(self.park_ahead_bytes, self._hold_secret)
                    inode = await asyncio.to_thread(self.transfer.prepare, held.region)
                    if self._held is None:
                        self._hold(held, inode)
                    else:                        # a park's Place brought one meanwhile
                        await link.release_hold(held)
                    renewed = time.monotonic()
                elif held.ttl_s > 0 and time.monotonic() - renewed >= held.ttl_s / 3:
                    await link.hold(0, held.secret, renew=held.hold_id)
                    renewed = time.monotonic()
                if self._held is not None and self._held.ttl_s > 0:
                    wait_s = max(0.5, self._held.ttl_s / 3 - (time.monotonic() - renewed))
                failures = 0
            except asyncio.CancelledError:
                raise
            except NotFound:                     # expired, or the kvstore restarted
                if held is not None and self._held is held:
                    self._hold(None)
                continue                         # hold anew at once
            except RegionError as exc:           # its segment is not reachable from here
                if held is not None:
                    if self._held is held:
                        self._hold(None)
                    await link.release_hold(held)
                log.info("kv_hold_unusable", reason=str(exc), retry_s=retry_s)
                wait_s, failures = retry_s, failures + 1
            except CapacityExhausted as exc:     # the kvstore is full: parks reserve
                log.info("kv_hold_refused", reason=exc.message, retry_s=retry_s)
                wait_s, failures = retry_s, failures + 1
            except Exception as exc:  # noqa: BLE001 - parks reserve meanwhile
                # Once a run of failures (a kvstore not started yet): parks say why.
                (log.warning if not failures else log.debug)(
                    "kv_hold_failed", error=str(exc), retry_s=retry_s)
                wait_s, failures = retry_s, failures + 1
            try:
                await asyncio.wait_for(self._wanted.wait(), wait_s)
            except TimeoutError:
                pass

    async def release(self) -> None:
        """Stop holding (at stop): the region goes back to the kvstore."""
        if self._holding is not None:
            self._holding.cancel()
            await asyncio.gather(self._holding, return_exceptions=True)
        held = self._held
        self._hold(None)
        if held is not None and self.link is not None:
            await self.link.release_hold(held)

    async def _note_inode(self, held: Held) -> None:
        """The inode of a hold's segment, as soon as the hold came (a Place's
        reply): mapped now, off the next park's path."""
        try:
            inode = await asyncio.to_thread(self.transfer.prepare, held.region)
        except RegionError as exc:
            log.info("kv_hold_gone", hold_id=held.hold_id, reason=str(exc))
            if self._held is held:
                self._hold(None)
                self.hold_ahead()
            return
        if self._held is held:
            self._held_inode = inode

    def _hold(self, held: Held | None, inode: int | None = None) -> None:
        self._held, self._held_inode = held, inode

    def _take_hold(self, num_bytes: int) -> tuple[Held | None, int | None]:
        """The held region and its inode when the entry fits it (taken: no
        other park writes there meanwhile)."""
        held, inode = self._held, self._held_inode
        if held is None or num_bytes > held.region.length:
            return None, None
        self._hold(None)
        return held, inode

    def layout(self, num_tokens: int) -> Layout:
        shape = self.loaded.kv_shape
        return Layout(model=self.loaded.name, model_version=self.model_version,
                      dtype=DTYPE_NAMES[shape.dtype], num_layers=shape.num_layers,
                      num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                      num_tokens=num_tokens, block_size=self.engine.pool.block_size)

    def _link(self) -> KVStoreLink:
        if self.link is None:
            raise FailedPrecondition("parking is disabled on this worker (--kvstore none); "
                                     "restart it with --kvstore HOST:PORT", "PARKING_DISABLED")
        return self.link

    async def park(self, session: Session, reason: str = "request") -> Parked:
        link = self._link()
        if session.parked_entry:
            raise FailedPrecondition(f"session {session.session_id} is already parked "
                                     f"(entry {session.parked_entry})", "ALREADY_PARKED")
        if session.busy or session.moving or session.entering:
            raise FailedPrecondition(f"session {session.session_id} is generating or moving; "
                                     "wait for it to finish", "SESSION_BUSY")
        slots = self.engine.kv_slots(session)
        if not slots:
            raise FailedPrecondition(f"session {session.session_id} holds no KV yet",
                                     "NOTHING_TO_PARK")
        started = time.perf_counter()
        session.moving = True
        try:
            metadata = json.dumps({"messages": session.messages,
                                   "chat_template": session.chat_template}).encode()
            layout = self.layout(len(slots))
            placed = await self._park_in_hold(session, slots, layout, metadata)
            if placed is not None:
                entry_id, region, crc = placed
            else:
                reservation = await link.reserve(layout, session.session_id, session.token,
                                                 list(session.tokens), metadata)
                entry_id, region = reservation.entry_id, reservation.region
                try:
                    crc = await asyncio.to_thread(self.transfer.park, slots, region)
                    await link.commit(entry_id, session.token, crc)
                except RegionError as exc:
                    await link.delete(entry_id, session.token)
                    raise _unreachable_region(exc) from None
                except BaseException:
                    await link.delete(entry_id, session.token)
                    raise
            freed = self.engine.release_kv(session)
            session.parked_entry = entry_id
            session.parked_at = ParkedAt(region, crc, len(slots))
        finally:
            session.moving = False
        log.info("session_parked", session_id=session.session_id, entry_id=entry_id,
                 tokens=len(slots), bytes=layout.num_bytes, freed_blocks=freed, reason=reason)
        self._activity("session_parked", session.session_id, layout.num_bytes,
                       time.perf_counter() - started, reason)
        return Parked(entry_id, len(slots), freed)

    async def _park_in_hold(self, session: Session, slots, layout: Layout, metadata: bytes):
        """The park through the region held ahead, when the entry fits it:
        (entry id, its region, checksum); None to reserve instead (no hold,
        too small, or gone: the kvstore restarted or it expired)."""
        held, inode = self._take_hold(layout.num_bytes)
        if held is None:
            self.hold_ahead()
            return None
        region = held.region.prefix(layout.num_bytes)
        try:
            if inode is None:                    # its Place's reply came just now
                inode = await asyncio.to_thread(self.transfer.prepare, held.region)
            crc = await asyncio.to_thread(self.transfer.park, slots, region, inode)
            entry_id, following = await self._link().place(
                held, layout, session.session_id, session.token, list(session.tokens),
                metadata, crc)
        except (NotFound, RegionError) as exc:   # expired, or the kvstore restarted
            log.info("kv_hold_gone", hold_id=held.hold_id, reason=str(exc))
            self.hold_ahead()
            return None
        except BaseException:
            if self._held is None:               # still the kvstore's: used next time
                self._hold(held, inode)
            raise
        if following is not None and self._held is not None:   # _keep_held made one meanwhile
            self._background(self._link().release_hold(following))
        elif following is not None:
            self._hold(following)
            self._background(self._note_inode(following))
        self.hold_ahead()
        return entry_id, region, crc

    # ---- a previous run's parked sessions ----
    async def find_orphans(self) -> int:
        """At start: the entries this worker id parked before (a crash and a
        restart on the same address); their sessions come back on use."""
        if self.link is None:
            return 0
        entries = await self.link.list_own()
        for entry_id, session_id, state in entries:
            if state in ("ready", "spilled") and session_id:
                self._orphans.setdefault(session_id, entry_id)
        if self._orphans:
            log.info("parked_sessions_found", sessions=len(self._orphans),
                     owner=self.link.owner)
        return len(self._orphans)

    def orphan_entry(self, session_id: str) -> str | None:
        return self._orphans.get(session_id)

    async def adopt_orphan(self, session_id: str, token: str) -> Session:
        """A session a previous run of this worker parked, back under its own
        id (the kvstore checks the token against the entry's secret)."""
        # Taken first: a second request for it meanwhile is NOT_FOUND, not a
        # second restore of the same entry.
        entry_id = self._orphans.pop(session_id)
        try:
            restored = await self.restore(entry_id, token, session_id=session_id)
        except BaseException:
            self._orphans.setdefault(session_id, entry_id)   # a wrong token, say
            raise
        log.info("session_adopted", session_id=session_id, entry_id=entry_id,
                 tokens=restored.num_tokens)
        return restored.session

    async def restore(self, entry_id: str, token: str, session_id: str | None = None) -> Restored:
        """The entry into a new session (keeping the token, and `session_id`
        when given); the entry is then deleted, and a session of this worker
        parked in it goes away."""
        link = self._link()
        started = time.perf_counter()
        fetched = await link.open(entry_id, token)
        self._check_layout(fetched.layout, len(fetched.token_ids))
        try:
            meta = json.loads(fetched.metadata or b"{}")
            messages = [{"role": str(m["role"]), "content": str(m["content"])}
                        for m in meta.get("messages", [])]
            template = meta.get("chat_template") or None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FailedPrecondition(f"entry {entry_id!r} has unreadable metadata ({exc})",
                                     "BAD_METADATA") from None
        session = self.sessions.adopt(token, template, messages, fetched.token_ids,
                                      session_id=session_id)
        try:
            await self._fill(session, fetched)
        except BaseException:
            self.engine.release_kv(session)
            self.sessions.remove(session.session_id)
            raise
        old = self.sessions.find_parked(entry_id)
        if old is not None:
            self.sessions.remove(old.session_id)
        await link.delete(entry_id, token)
        log.info("session_restored", session_id=session.session_id, entry_id=entry_id,
                 tokens=fetched.layout.num_tokens,
                 moved_from=old.session_id if old is not None else "another worker")
        self._activity("session_restored", session.session_id, fetched.layout.num_bytes,
                       time.perf_counter() - started, "restore")
        return Restored(session, fetched.layout.num_tokens)

    async def unpark(self, session: Session) -> None:
        """Before a Generate on a parked session: its KV back in the pool; if
        its entry is gone or corrupted, its tokens are recomputed instead."""
        link = self._link()
        entry_id = session.parked_entry
        assert entry_id is not None
        started = time.perf_counter()
        session.moving = True
        known, session.parked_at = session.parked_at, None
        try:
            try:
                if known is not None:
                    fetched = await self._fill_where_parked(session, entry_id, known)
                else:
                    # Its tokens and chat are the session's own: not fetched again.
                    fetched = await link.open(entry_id, session.token, contents=False)
                    self._check_layout(fetched.layout, len(session.tokens))
                    await self._fill(session, fetched)
            except NotFound:
                self.sessions.remove(session.session_id)
                raise NotFound("session", session.session_id,
                               f"its parked entry {entry_id} was restored elsewhere "
                               "(RestoreSession) or deleted") from None
            except FailedPrecondition as exc:
                if exc.reason not in RECOMPUTABLE:
                    raise
                log.warning("restore_recomputes", session_id=session.session_id,
                            entry_id=entry_id, reason=exc.reason, error=exc.message)
                # Visible beyond the log: a Watch event (lmx watch) says the
                # context was recomputed, and why (a corrupted entry above all).
                self._activity("session_restored", session.session_id, 0,
                               time.perf_counter() - started,
                               f"recomputed: entry {entry_id} {exc.reason.lower()}")
                session.parked_entry = None
                if exc.reason != "CORRUPTED":  # a corrupted entry is deleted already
                    self._delete_later(entry_id, session.token)
                return
            session.parked_entry = None
        finally:
            session.moving = False
        # In the background: the caller submits its request right away, with
        # no await between (a sleep must not slip in and park the session).
        self._delete_later(entry_id, session.token)
        log.info("session_unparked", session_id=session.session_id, entry_id=entry_id,
                 tokens=fetched.layout.num_tokens)
        self._activity("session_restored", session.session_id, fetched.layout.num_bytes,
                       time.perf_counter() - started, "request")

    def _activity(self, kind: str, session_id: str, num_bytes: int, seconds: float,
                  reason: str) -> None:
        if self.on_activity is not None:
            self.on_activity(kind, session_id, num_bytes, seconds, reason)

    def forget(self, session: Session) -> None:
        """A closed parked session: delete its entry in the background."""
        if session.parked_entry and self.link is not None:
            self._delete_later(session.parked_entry, session.token)

    def _delete_later(self, entry_id: str, token: str) -> None:
        self._background(self._link().delete(entry_id, token))

    def _background(self, call) -> None:
        """An RPC whose answer nothing waits for (kept referenced until done)."""
        task = asyncio.create_task(call)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _check_layout(self, layout: Layout, num_token_ids: int) -> None:
        expected = self.layout(layout.num_tokens)
        if replace(layout, block_size=expected.block_size) != expected:
            raise FailedPrecondition(
                f"the entry was parked by {layout.model} version {layout.model_version} "
                f"({layout.dtype}, {layout.num_layers} layers, {layout.num_kv_heads} KV heads, "
                f"head dim {layout.head_dim}); this worker serves {expected.model} version "
                f"{expected.model_version} ({expected.dtype}): restore it on a worker of that "
                "model and dtype", "LAYOUT_MISMATCH")
        if not 0 < layout.num_tokens <= num_token_ids < self.loaded.max_context:
            raise FailedPrecondition(f"the entry's {num_token_ids} tokens do not fit this "
                                     f"worker's context of {self.loaded.max_context}",
                                     "LAYOUT_MISMATCH")

    async def _fill_where_parked(self, session: Session, entry_id: str,
                                 known: ParkedAt) -> OpenedEntry:
        """A session this worker parked: its KV is copied from where the park
        wrote it while Open asks the kvstore whether the entry is still there
        (the round trip is hidden behind the copy). If it is not (spilled and
        brought back elsewhere, say), or the copy failed its checksum, the KV
        is copied again from where Open says, as `_fill` does."""
        opening = asyncio.ensure_future(self._link().open(entry_id, session.token,
                                                          contents=False))
        copying: asyncio.Future | None = None
        try:
            slots = await self.engine.allocate_kv(session, known.num_tokens)
            copying = asyncio.ensure_future(asyncio.to_thread(
                self.transfer.restore, slots, known.region, known.checksum))
            fetched = await opening
            self._check_layout(fetched.layout, len(session.tokens))
            copied = (await asyncio.gather(copying, return_exceptions=True))[0]
        except BaseException:
            if not opening.cancel() and not opening.cancelled():
                opening.exception()      # retrieved: raised above or superseded
            if copying is not None and not copying.done():
                await asyncio.wait([copying])   # it writes into the slots until it ends
            self.engine.release_kv(session)
            raise
        if copied is None and known.matches(fetched):
            return fetched
        log.info("restore_copied_again", session_id=session.session_id, entry_id=entry_id,
                 why="moved" if not known.matches(fetched) else type(copied).__name__)
        self.engine.release_kv(session)
        await self._fill(session, fetched)
        return fetched

    async def _fill(self, session: Session, entry: OpenedEntry) -> None:
        """The entry's KV into new blocks of the session, checked; on a
        checksum mismatch the entry is deleted and CORRUPTED raised."""
        slots = await self.engine.allocate_kv(session, entry.layout.num_tokens)
        try:
            await asyncio.to_thread(self.transfer.restore, slots, entry.region, entry.checksum)
        except ChecksumMismatch as exc:
            self.engine.release_kv(session)
            log.error("entry_corrupted", entry_id=entry.entry_id, error=str(exc))
            await self._link().delete(entry.entry_id, session.token)
            raise FailedPrecondition(f"entry {entry.entry_id!r} is corrupted (its bytes do not "
                                     "have its checksum); it was not used and is deleted: "
                                     "recompute the context", "CORRUPTED") from None
        except RegionError as exc:
            self.engine.release_kv(session)
            raise _unreachable_region(exc) from None
        except BaseException:
            self.engine.release_kv(session)
            raise


#: Restore failures after which a parked session recomputes its context.
RECOMPUTABLE = frozenset({"CORRUPTED", "LAYOUT_MISMATCH", "BAD_METADATA",
                          "KVSTORE_UNAVAILABLE", "SHM_UNREACHABLE"})


def _unreachable_region(exc: RegionError) -> FailedPrecondition:
    return FailedPrecondition(f"the kvstore's shared memory is not readable here ({exc}): "
                              "run the worker on the kvstore's host, with access to its "
                              "--shm-dir", "SHM_UNREACHABLE")
