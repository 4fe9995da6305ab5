"""The generation engine: continuous batching over one copy of the weights.

One loop on the event loop decides each step (scheduler), runs the forward
pass in a single compute thread (runner), and hands the sampled tokens back
to the callers' streams. Sessions join and leave between steps. KV blocks
come from the pool; when it is short, the engine asks for one more chunk of
KV lease in the background, and a request that cannot get its blocks within
`kv_wait_s` fails with RESOURCE_EXHAUSTED. Memory goes back a chunk at a
time when sessions close.

Fencing: before each step the engine makes sure its leases are still held
(Memory.fresh; past a lease's TTL since its last renewal, as after a
SIGSTOP, it renews first): a lost lease means the memory may be someone
else's, so no step runs and every generation ends with ABORTED.

Prompts and decodes run in separate steps (see _schedule): a prompt step
computes at most max_prefill_tokens tokens, a long prompt in chunks of
that size, with a decode step of the running sessions between two chunks
(chunked prefill), so that one long prompt never stalls the others for
more than a chunk, and a step's workspace stays within what the lease was
sized for.

Preemption: when every running generation waits for a KV block and none
can come (the lease cannot grow, and the worker has no idle session to
park), the newest generation gives its blocks to the others and goes back
to the head of the queue; when blocks free up it is prefilled again from its
tokens so far (recomputed, as vLLM does) and goes on where it stopped. Its
caller's stream only pauses.

Invariant between steps, per session: the pool holds KV for the first
pool.length(id) tokens of session.tokens; the rest (the last sampled token,
or a new prompt) is fed in the session's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
import torch

from services.common.errors import (
    Aborted,
    CapacityExhausted,
    FailedPrecondition,
    InvalidArgument,
    LmxError,
    NotFound,
    Shortfall,
)
from services.worker import decode_ahead
from services.worker.decode_graphs import DecodeGraphs
from services.worker.kv_pool import BlockPool
from services.worker.limits import CONTEXT_LENGTH_EXCEEDED
from services.worker.kv_storage import KVStorage
from services.worker.memory import Memory
from services.worker.models import LoadedModel
from services.worker.prompts import Prepared, prepare
from services.worker.runner import ModelRunner, StepItem
from services.worker.step_memory import StepMemoryPlan, StepShape
from services.worker.sampling import SamplingParams, make_generator
from services.worker.sessions import Session
from services.worker.tokens import Detokenizer, common_prefix

log = structlog.get_logger(__name__)

FINISH_STOP = "stop"              # end-of-sequence token
FINISH_LENGTH = "length"          # max_tokens reached
FINISH_STOP_STRING = "stop_string"
FINISH_CONTEXT = "context_window"  # the model's window is full


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return n
    return 0


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int
    reused_tokens: int = 0     # of the context before this turn, kept (not computed again)


@dataclass(frozen=True, slots=True)
class Failed:
    error: LmxError


@dataclass(eq=False)
class Request:
    session: Session
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    base_len: int                       # context length before this request's output
    chat_turn: bool
    detok: Detokenizer
    enqueued_at: float = field(default_factory=time.monotonic)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    held: str = ""                      # text not sent yet: it may begin a stop string
    delivered: int = 0                  # tokens the caller has received
    cancelled: bool = False
    done: bool = False
    blocked_since: float | None = None  # waiting for KV blocks since
    constraint: object = None           # its grammar (constraints.py), or None


#: A request blocked on KV this long means growing the lease is slow (it
#: waits in admission's queue): the worker then parks its own idle sessions.
KV_SHORT_AFTER_S = 0.25
#: Every running generation blocked on KV this long (and no relief under
#: way): the newest is preempted so that the others can go on.
PREEMPT_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_blocks: int
    num_used_blocks: int
    kv_bytes: int
    steps: int
    tokens_generated: int
    preemptions: int = 0
    prefill_chunks: int = 0     # steps' prompt chunks that did not end their prompt
    steps_split: int = 0        # steps run in parts to fit the workspace (runner.py)
    steps_out_of_memory: int = 0   # steps that ran out of device memory (each a bug)
    workspace_bytes: int = 0    # what the base lease holds for a step (0: unbounded)
    steps_graphed: int = 0      # decode steps that replayed a CUDA graph
    steps_ahead: int = 0        # of those, launched before the step before was read


class Engine:
    def __init__(self, loaded: LoadedModel, memory: Memory, *, block_size: int = 16,
                 chunk_bytes: int = 32 << 20, kv_wait_s: float = 10.0,
                 max_batch: int = 64, max_prefill_tokens: int = 2048, spare_chunks: int = 1,
                 decode_graphs: bool = False, compile_decode: bool = False,
                 compile_options: dict | None = None,
                 decode_ahead: bool = False, step_plan: StepMemoryPlan | None = None):
        self.loaded = loaded
        self.memory = memory
        per_block = block_size * loaded.kv_shape.bytes_per_token
        blocks_per_chunk = max(1, chunk_bytes // per_block)
        self.pool = BlockPool(block_size, blocks_per_chunk)
        self.storage = KVStorage(loaded.kv_shape, blocks_per_chunk * block_size, loaded.device)
        graphs = (DecodeGraphs(loaded, self.storage, block_size=block_size, max_batch=max_batch,
                               compile=compile_decode, compile_options=compile_options)
                  if decode_graphs else None)
        self.runner = ModelRunner(loaded, self.storage, graphs, step_plan)
        #: Greedy decode steps launched before the last one's tokens are read
        #: (decode_ahead.py); only where decode steps are graphed.
        self.decode_ahead = decode_ahead and graphs is not None
        self._decode_cursor = 0     # where the next decode step starts when not all rows fit
        self.kv_wait_s = kv_wait_s
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.spare_chunks = spare_chunks
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._slots: dict[str, list[int]] = {}
        self._busy: dict[str, Request] = {}
        self._allocating = 0                               # restores waiting for blocks
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmx-compute")
        self._loop_task: asyncio.Task | None = None
        self._resize_task: asyncio.Task | None = None
        self._step: asyncio.Future | None = None          # the forward pass in flight
        self._chain: asyncio.Future | None = None         # steps launched ahead, until all read
        self._between = 0                                 # between_steps calls waiting
        self._unsafe_step: asyncio.Future | None = None   # it may read blocks freed since
        self._growth_error: CapacityExhausted | None = None
        self._steps = 0
        self._tokens_generated = 0
        self._preemptions = 0
        self._prefill_chunks = 0       # prompt chunks that did not end their prompt
        self._last_step_prompts = False
        #: pause(): nothing is scheduled until resume(); requested by setting
        #: the future, carried out by the loop between two steps.
        self._paused = False
        self._pause_asked: asyncio.Future | None = None
        #: Called (bytes short) when a request waits for KV memory: the worker
        #: parks its own idle sessions then (services/worker/pressure.py).
        #: True while that relief is under way (the request keeps waiting).
        self.on_kv_short: Callable[[int], bool] | None = None

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="engine")

    async def close(self) -> None:
        for request in [*self._waiting, *self._running]:
            self._fail(request, FailedPrecondition("the worker is shutting down",
                                                   reason="SHUTTING_DOWN"))
        for task in (self._loop_task, self._resize_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def wait_settled(self, timeout_s: float = 10.0) -> None:
        """Until no KV resize is in flight and unused chunks went back."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            resizing = self._resize_task is not None and not self._resize_task.done()
            if not resizing and self.pool.num_removable_chunks() <= (
                    0 if not self._busy or self._paused else self.spare_chunks):
                return
            self._maybe_shrink()
            await asyncio.sleep(0.01)

    def stats(self) -> EngineStats:
        usage = self.pool.usage()
        runner = self.runner
        return EngineStats(len(self._waiting), len(self._running), usage.num_blocks,
                           usage.num_used_blocks, self.storage.num_bytes, self._steps,
                           self._tokens_generated, self._preemptions, self._prefill_chunks,
                           runner.split_steps, runner.out_of_memory,
                           runner.workspace_bytes or 0, runner.graphed_steps,
                           runner.ahead_steps)

    # ---- requests --------------------------------------------------------
    def submit(self, session: Session, params: SamplingParams, *, prompt: str | None = None,
               message: dict[str, str] | None = None,
               conversation: list[dict[str, str]] | None = None,
               whole_prompt: str | None = None) -> Request:
        """Append a raw prompt or a chat message to the session's context and
        queue its generation. `conversation` (the whole chat, ending with the
        user turn) or `whole_prompt` (the whole raw context) replace the
        session's: the longest prefix of its tokens that they share is kept,
        only the rest is computed (prefix reuse)."""
        return self.submit_prepared(session, params, prepare(
            self.loaded, session, prompt=prompt, message=message, conversation=conversation,
            whole_prompt=whole_prompt))

    def submit_prepared(self, session: Session, params: SamplingParams,
                        prepared: Prepared, constraint=None) -> Request:
        """Queue input already made tokens (prompts.py: off the event loop);
        `constraint`: the grammar its tokens follow (constraints.py)."""
        if session.session_id in self._busy:
            raise FailedPrecondition(f"session {session.session_id} is already generating; "
                                     "wait for it to finish or cancel it", reason="SESSION_BUSY")
        if prepared.history is not None and prepared.basis != len(session.messages):
            raise Aborted(f"session {session.session_id}'s conversation changed while this "
                          "turn was being prepared; send it again", reason="SESSION_CHANGED")
        full = prepared.tokens
        if not prepared.replace:
            keep, new_tokens = len(session.tokens), full
        else:
            keep = common_prefix(session.tokens, full)
            if prepared.message is None:
                # At least the last token is computed again: its logits start the answer.
                keep = min(keep, len(full) - 1)
            elif keep == len(full) and keep:
                keep -= 1      # the same conversation again: its last token starts the answer
            new_tokens = full[keep:]
        request = self._queue(session, params, keep, new_tokens, prepared.message,
                              prepared.field, prepared.history)
        request.constraint = constraint
        return request

    def submit_tokens(self, session: Session, params: SamplingParams,
                      token_ids: list[int]) -> Request:
        """Append token ids as they are (warm-up, restored contexts)."""
        if session.session_id in self._busy:
            raise FailedPrecondition(f"session {session.session_id} is already generating",
                                     reason="SESSION_BUSY")
        return self._queue(session, params, len(session.tokens), token_ids, None, "token_ids")

    def _queue(self, session: Session, params: SamplingParams, keep: int, new_tokens: list[int],
               message: dict[str, str] | None, field_name: str,
               history: list[dict[str, str]] | None = None) -> Request:
        loaded = self.loaded
        if not new_tokens and keep == len(session.tokens):
            raise InvalidArgument(field_name, "adds no tokens to the context")
        total = keep + len(new_tokens)
        if total >= loaded.max_context:
            raise InvalidArgument(field_name,
                                  f"the context would hold {total} tokens; {loaded.name} takes "
                                  f"at most {loaded.max_context - 1} before generating",
                                  reason=CONTEXT_LENGTH_EXCEEDED)
        self._truncate(session, keep)
        session.tokens.extend(new_tokens)
        if history is not None and history is not session.messages:
            session.messages = list(history)      # a whole conversation (or raw context) replaced it
        if message is not None:
            session.messages.append(message)
        session.busy = True
        session.last_used = time.monotonic()
        request = Request(session, len(new_tokens), params,
                          make_generator(params, loaded.device), total,
                          message is not None,
                          Detokenizer(loaded.tokenizer, loaded.eos_token_ids))
        self._busy[session.session_id] = request
        self._waiting.append(request)
        self._wake.set()
        return request

    def delivered(self, request: Request, num_tokens: int) -> None:
        request.delivered += num_tokens

    def cancel(self, request: Request) -> None:
        """The caller stopped listening: end the request now (a step in flight
        for it is ignored), keeping in the context only the tokens it
        received, so that the session takes its next turn at once."""
        if request.done:
            return
        request.cancelled = True
        if self._step is not None and not self._step.done():
            self._unsafe_step = self._step  # no shrink until it is done (see _resize)
        self._finish_cancelled(request)
        self._wake.set()

    def drop_session(self, session: Session) -> None:
        """A closed session: stop its generation, free its blocks."""
        if self._step is not None and not self._step.done():
            self._unsafe_step = self._step  # no shrink until it is done (see _resize)
        request = self._busy.get(session.session_id)
        if request is not None:
            self._finish_cancelled(request)
            # End the caller's stream (it would wait for the next token forever).
            request.out.put_nowait(Failed(NotFound("session", session.session_id,
                                                   "it was closed during this generation")))
        self.pool.free(session.session_id)
        self._slots.pop(session.session_id, None)
        self._maybe_shrink()

    def abort_all(self, error: LmxError) -> int:
        """Fail every waiting and running generation with `error` (each
        session keeps the tokens generated, all of them in its caller's stream
        ahead of the error). Returns how many."""
        if self._step is not None and not self._step.done():
            self._unsafe_step = self._step  # no shrink until it is done (see _resize)
        requests = [*self._waiting, *self._running]
        for request in requests:
            self._fail(request, error)
        return len(requests)

    # ---- parking ---------------------------------------------------------
    def kv_slots(self, session: Session) -> list[int]:
        """The slots of the session's KV in token order (to park it)."""
        session_id = session.session_id
        return list(self._slots.get(session_id, [])[: self.pool.length(session_id)])

    def release_kv(self, session: Session) -> int:
        """Free the session's blocks (it was parked); how many were freed."""
        num_blocks = len(self.pool.table(session.session_id))
        self.pool.free(session.session_id)
        self._slots.pop(session.session_id, None)
        self._maybe_shrink()
        return num_blocks

    async def allocate_kv(self, session: Session, num_tokens: int) -> list[int]:
        """Blocks for num_tokens tokens of restored KV after the session's
        (growing the KV lease if needed); RESOURCE_EXHAUSTED past kv_wait_s."""
        session_id = session.session_id
        if self.pool.length(session_id) + num_tokens > len(session.tokens):
            raise ValueError("more KV than the session has tokens")
        deadline = time.monotonic() + self.kv_wait_s
        self._allocating += 1   # no shrink of the chunks grown for it meanwhile
        try:
            while not self.pool.can_append(session_id, num_tokens):
                if time.monotonic() > deadline:
                    raise CapacityExhausted(
                        f"no KV memory to restore {num_tokens} tokens within {self.kv_wait_s:g}s",
                        Shortfall("kv", self.pool.blocks_needed(session_id, num_tokens)
                                  * self.pool.block_size * self.loaded.kv_shape.bytes_per_token,
                                  0), 1.0)
                self._grow(self.pool.blocks_needed(session_id, num_tokens))
                await asyncio.sleep(0.01)
        finally:
            self._allocating -= 1
        slots = self.pool.append(session_id, num_tokens)
        self._slots.setdefault(session_id, []).extend(slots)
        return slots

    async def pause(self) -> int:
        """Stop generating, between two steps: every running generation
        gives its KV back and waits at the head of the queue (its context is
        recomputed from its tokens when it runs again, vLLM's recompute
        preemption; the tokens it streamed stay streamed), and nothing is
        scheduled until `resume()`. For a higher-priority holder's memory.
        Returns how many generations were stopped."""
        if self._paused:
            return 0
        if self._pause_asked is None:
            self._pause_asked = asyncio.get_running_loop().create_future()
        asked = self._pause_asked
        self._wake.set()
        return await asyncio.shield(asked)

    def resume(self) -> None:
        if self._paused:
            log.info("generations_resumed", waiting=len(self._waiting))
        self._paused = False
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def _pause_now(self) -> None:
        stopped = 0
        for request in reversed([r for r in self._running if not r.done]):
            if self.pool.length(request.session.session_id):
                self._preempt(request)
            else:
                self._running.remove(request)
                self._waiting.appendleft(request)
            stopped += 1
        for request in self._waiting:
            # Queued turns of sessions with a context: that KV goes too
            # (the memory is wanted whole), recomputed when they run.
            session_id = request.session.session_id
            if self.pool.length(session_id):
                self.pool.free(session_id)
                self._slots.pop(session_id, None)
        self._paused = True
        asked, self._pause_asked = self._pause_asked, None
        if asked is not None and not asked.done():
            asked.set_result(stopped)
        log.info("generations_paused", stopped=stopped, waiting=len(self._waiting))

    async def between_steps(self, fn, *args):
        """Run `fn(*args)` on the compute thread, between two steps (it may
        change the model: no step runs meanwhile, none launched ahead is
        still on the device either)."""
        self._between += 1    # a run of steps launched ahead stops (_ahead_of)
        try:
            if self._chain is not None and not self._chain.done():
                await asyncio.shield(self._chain)
            return await self._on_compute(fn, *args)
        finally:
            self._between -= 1

    # ---- the loop --------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._reap()
            if self._pause_asked is not None:
                self._pause_now()
            if self._paused:
                self._wake.clear()
                self._maybe_shrink()      # the stopped generations' chunks go back
                await self._wake.wait()
                continue
            items, batch, complete = self._schedule()
            if not batch:
                self._wake.clear()
                if self._waiting or self._running:
                    try:  # blocked on memory: look again when something changes
                        await asyncio.wait_for(self._wake.wait(), 0.05)
                    except TimeoutError:
                        pass
                else:
                    self._maybe_shrink()  # one skipped while another resize was running
                    await self._wake.wait()
                continue
            if not self.memory.fresh() and not await self.memory.confirm():
                # The lease is gone (this worker was frozen past its TTL, or
                # admission restarted): the memory may be someone else's now.
                # Not one more step; the worker's on_lost aborted the requests.
                self.abort_all(Aborted("this worker's memory lease was lost (it expired, or "
                                       "admission restarted); retry", reason="LEASE_LOST"))
                continue
            if self._may_decode_ahead(items, batch, complete):
                await self._decode_ahead(items, batch)
                continue
            try:
                self._step = loop.run_in_executor(self._executor, self.runner.step, items)
                tokens = await self._step
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                log.error("step_failed", exc_info=exc, batch=len(batch))
                for request in batch:
                    self._fail(request, LmxError(f"the forward pass failed: {exc}"))
                continue
            self._steps += 1
            for request, token, ends_feed in zip(batch, tokens, complete):
                if isinstance(token, LmxError):
                    self._fail(request, token)   # no memory for it even alone: retryable
                elif ends_feed:
                    self._advance(request, token)

    # ---- decoding ahead (decode_ahead.py) ---------------------------------
    def _may_decode_ahead(self, items: list[StepItem], batch: list[Request],
                          complete: list[bool]) -> bool:
        """Whether this step starts a run of steps each launched before the
        last one's tokens are read: a decode step of every running
        generation, all plain greedy, on a captured graph."""
        return (self.decode_ahead and not self._between and not self._last_step_prompts
                and all(complete)
                and all(len(item.tokens) == 1 for item in items)
                and all(decode_ahead.plain_greedy(r) for r in batch)
                and self._all_running_in(batch) and self.runner.can_launch(len(items)))

    def _all_running_in(self, batch: list[Request]) -> bool:
        rows = {id(r) for r in batch}
        return all(id(r) in rows for r in self._running)

    async def _decode_ahead(self, items: list[StepItem], batch: list[Request]) -> None:
        """Launch this decode step, then while nothing else is to be
        scheduled launch each next one before reading the last one's tokens
        (decode_ahead.py); every launched step is read before this returns."""
        loop = asyncio.get_running_loop()
        runner = self.runner
        chain = loop.create_future()
        # Cancels, shrinks and between_steps see steps in flight until all are read.
        self._step = self._chain = chain
        following: list[Request] = []
        try:
            launched = await loop.run_in_executor(self._executor, runner.launch, items, None)
            if launched is None:      # the weights moved meanwhile: an ordinary step next
                for request in batch:
                    self._unreserve(request)
                return
            while True:
                following, feed, next_items = self._ahead_of(batch)
                launched_next, tokens = await loop.run_in_executor(
                    self._executor, runner.launch_then_read, next_items, feed, launched)
                self._steps += 1
                for request, token in zip(batch, tokens):
                    self._advance(request, token)
                if launched_next is None:
                    for request in following:       # reserved for a step not launched
                        self._unreserve(request)
                    return
                batch, launched, following = following, launched_next, []
        except Exception as exc:  # noqa: BLE001 - fail the steps' generations, keep serving
            log.error("step_failed", exc_info=exc, batch=len(batch), ahead=True)
            if runner.graphs is not None:
                runner.graphs.fail(exc)
            for request in {id(r): r for r in [*batch, *following]}.values():
                self._unreserve(request)
                self._fail(request, LmxError(f"the forward pass failed: {exc}"))
        finally:
            chain.set_result(None)

    def _ahead_of(self, batch: list[Request]
                  ) -> tuple[list[Request], list[int] | None, list[StepItem] | None]:
        """The step to launch before `batch`'s tokens are read: its
        generations, for each the row of `batch` whose token it feeds, and
        its items (slots reserved; the token fed is the device's). Nothing
        when something else is to be scheduled."""
        if (self._waiting or self._pause_asked is not None or self._between
                or not self.memory.fresh() or not self._all_running_in(batch)):
            return [], None, None
        rows = decode_ahead.continuing(batch, self.loaded.max_context)
        if not rows or not self.runner.can_launch(len(rows)):
            return [], None, None
        # The blocks of all the rows together (each alone may fit where all do not).
        pool = self.pool
        if sum(pool.blocks_needed(batch[row].session.session_id, 1) for row in rows) > \
                pool.num_free_blocks:
            return [], None, None
        following, items = [], []
        for row in rows:
            request = batch[row]
            reserved = self._reserve(request, 1)
            assert reserved, "the free blocks were counted for every row"
            # The token is a stand-in: the step takes its row's choice on the device.
            items.append(self._item(request, [request.session.tokens[-1]]))
            following.append(request)
        return following, rows, items

    def _unreserve(self, request: Request) -> None:
        """Back to one unfed token: the KV of a step launched ahead that was
        not read (or not launched) is not trusted."""
        self._truncate_kv(request.session.session_id, len(request.session.tokens) - 1)

    def _reap(self) -> None:
        """Cancelled requests leave; blocked ones fail past their deadline."""
        now = time.monotonic()
        for request in [*self._waiting, *self._running]:
            if request.cancelled:
                self._finish_cancelled(request)
            elif request.blocked_since is not None and (
                    now - request.blocked_since > self.kv_wait_s or self._growth_error):
                session_id = request.session.session_id
                pending = len(request.session.tokens) - self.pool.length(session_id)
                if self.pool.can_append(session_id, pending):
                    # Its memory came while a step ran: it was waiting for the
                    # compute, not for memory.
                    request.blocked_since = None
                    continue
                if (now - request.blocked_since <= self.kv_wait_s and self.on_kv_short is not None
                        and self.on_kv_short(self._short_bytes(session_id, pending))):
                    continue  # the worker is parking its own idle sessions for it
                if now - request.blocked_since <= self.kv_wait_s and self._others_progress(request):
                    continue  # blocks come back when the others finish or are preempted
                error = self._growth_error or CapacityExhausted(
                    f"no KV memory for this request within {self.kv_wait_s:g}s",
                    Shortfall("kv", self.pool.block_size, 0), 1.0)
                self._fail(request, error)
        if self._growth_error is not None and not any(
                r.blocked_since for r in [*self._waiting, *self._running]):
            self._growth_error = None

    def _schedule(self) -> tuple[list[StepItem], list[Request], list[bool]]:
        """The next step's work: its items, their requests, and for each
        whether it ends its request's feed (only then is its sampled token
        the next token; a chunk that does not is KV work only).

        Prompts and decodes run in separate steps: a decode step has one
        token per sequence, the shape CUDA graphs replay, and a prompt step
        computes at most max_prefill_tokens tokens (the workspace the lease
        was sized for). The prompt at the head of the queue takes what is
        left of that budget, so a long prompt is computed in chunks
        (chunked prefill). While both are pending, a prompt step and a
        decode step alternate: a long prompt holds the decoding sessions up
        for one chunk at a time, never for its whole length."""
        decoding = [r for r in self._running if not r.done and self._pending(r) == 1]
        prompting = bool(self._waiting) or len(decoding) < len(self._running)
        prompts_first = prompting and (not decoding or not self._last_step_prompts)
        for prompts in ((True, False) if prompts_first else (False, True)):
            items, batch, complete = (self._schedule_prompts() if prompts
                                      else self._schedule_decodes(decoding))
            if batch:
                self._last_step_prompts = prompts
                return items, batch, complete
        self._preempt_if_stalled()
        return [], [], []

    def _pending(self, request: Request) -> int:
        """Tokens of the request's session not yet in the pool (fed next)."""
        session = request.session
        return len(session.tokens) - self.pool.length(session.session_id)

    def _schedule_prompts(self) -> tuple[list[StepItem], list[Request], list[bool]]:
        """Prompts begun in earlier steps first, then the queue in order:
        each takes as many of its tokens as the step's budget has left."""
        items: list[StepItem] = []
        batch: list[Request] = []
        complete: list[bool] = []
        budget = self.max_prefill_tokens
        shape = StepShape(0, 0, 0, 0)

        def take(request: Request, grow: bool = True) -> bool | None:
            """Schedule a chunk of the request's feed; None: no budget left
            (tokens, rows or the step's memory), False: no KV blocks for it
            (with grow False: none free now, and nothing asked for)."""
            nonlocal budget, shape
            pending = self._pending(request)
            count = min(pending, budget)
            if count <= 0 or len(batch) >= self.max_batch:
                return None
            context_before = len(request.session.tokens) - pending
            count = self._fitting_chunk(shape, count, context_before)
            if count <= 0:
                return None
            if not grow and not self.pool.can_append(request.session.session_id, count):
                return False
            if not self._reserve(request, count):
                return False
            session = request.session
            start = len(session.tokens) - pending
            items.append(self._item(request, session.tokens[start:start + count]))
            batch.append(request)
            complete.append(count == pending)
            budget -= count
            shape = shape.plus(count, context_before + count)
            if count < pending:
                self._prefill_chunks += 1
            return True

        # First come, first served: a prompt short of blocks holds up the
        # ones behind it, since the blocks the others free are for it. One
        # that only a larger pool can serve (it needs more blocks than the
        # pool has in all) waits for admission instead; the ones behind it
        # go ahead meanwhile into blocks free now, asking for no growth
        # (were they held up, each such prompt would stall the queue for
        # kv_wait_s).
        blocked = False     # a prompt ahead waits for blocks the others free
        overtaking = False  # a prompt ahead waits for growth alone
        passed: list[Request] = []
        for request in self._running:
            if not request.done and self._pending(request) > 1:
                taken = take(request, grow=not overtaking)
                if taken is None:
                    break
                if not taken:
                    if not overtaking and self._waits_for_growth(request):
                        overtaking = True
                        passed.append(request)
                    else:
                        blocked = True
        index = 0
        while not blocked and index < len(self._waiting):
            request = self._waiting[index]
            taken = take(request, grow=not overtaking)
            if taken is None:
                break
            if not taken:
                if overtaking or not self._waits_for_growth(request):
                    break
                overtaking = True
                passed.append(request)
                index += 1
                continue
            del self._waiting[index]
            self._running.append(request)
        if batch:
            # The others wait for these prompts (a step of up to
            # max_prefill_tokens, seconds on a CPU), not for memory: their
            # kv_wait_s clocks restart when they are next considered. A
            # prompt that found no blocks has its growth under way already.
            # One passed over for growth waits for memory: its clock runs.
            for request in [*self._running, *self._waiting]:
                if request not in batch and request not in passed:
                    request.blocked_since = None
        return items, batch, complete

    def _waits_for_growth(self, request: Request) -> bool:
        """Whether the request needs more KV blocks than the pool has in
        all: only a larger pool (admission's grant) serves it, not the blocks
        the other sessions free."""
        session_id = request.session.session_id
        held = len(self.pool.table(session_id))
        return held + self.pool.blocks_needed(session_id, self._pending(request)) \
            > self.pool.num_blocks

    def _fitting_chunk(self, shape: StepShape, count: int, context_before: int) -> int:
        """The most of `count` prompt tokens (after `context_before` tokens of
        context) that a step shaped `shape` so far can add within the
        workspace (services/worker/step_memory.py): a long prompt at a long
        context takes smaller chunks. A step's first row always gets one
        token at least (the workspace is sized for one row at the longest
        context)."""
        runner = self.runner
        if runner.plan is None or runner.workspace_bytes is None:
            return count
        fitting = runner.plan.largest_chunk(shape, count, context_before, runner.workspace_bytes)
        return fitting if fitting or shape.rows else 1

    def _schedule_decodes(self, decoding: list[Request]
                          ) -> tuple[list[StepItem], list[Request], list[bool]]:
        """Every decoding session, up to max_batch rows and, for a step that
        will run eagerly, as many as its memory plan fits in the workspace;
        the rows left out start the next decode step (no session starves)."""
        items: list[StepItem] = []
        batch: list[Request] = []
        runner = self.runner
        if len(decoding) > 1:
            start = self._decode_cursor % len(decoding)
            decoding = decoding[start:] + decoding[:start]
        rows = decoding[: self.max_batch]
        top = runner.graphs.sizes[-1] if runner.graphs is not None else 0
        if top < len(rows) and runner.will_graph(top):
            rows = rows[:top]         # graphs only up to `top` rows fit the lease: a graphed step
        # (The first graphed step's eager check is split to the workspace by
        # the runner: it does not limit the rows here.)
        graphed = runner.will_graph(len(rows))
        feeds = []
        for request in rows:
            length = self.pool.length(request.session.session_id)
            feeds.append((request.session.tokens[length:], length))
        # One plan for all the rows; row by row only when they do not all
        # fit (a plan per row cost 64 of them a step).
        every = StepShape.of([(len(f), n + len(f)) for f, n in feeds], graphed)
        all_fit = runner.fits(every)
        shape = StepShape(0, 0, 0, 0, graphed=graphed)
        for request, (feed, length) in zip(rows, feeds):
            grown = shape.plus(len(feed), length + len(feed))
            if batch and not all_fit and not runner.fits(grown):
                break
            if not self._reserve(request, len(feed)):
                continue
            items.append(self._item(request, feed))
            batch.append(request)
            shape = grown
        self._decode_cursor += len(batch) if len(batch) < len(decoding) else 0
        return items, batch, [True] * len(batch)

    # ---- preemption ------------------------------------------------------
    def _others_progress(self, request: Request) -> bool:
        """Whether another generation is running (not blocked), or could be
        preempted to give `request` its blocks: failing it now would lose a
        generation that only has to wait."""
        others = [r for r in self._running if r is not request and not r.done]
        return any(r.blocked_since is None for r in others) or any(
            self.pool.length(r.session.session_id) for r in others)

    def _preempt_if_stalled(self) -> None:
        """Every running generation has waited PREEMPT_AFTER_S for a block and
        the worker parks none of its idle sessions: the newest gives its
        blocks back and waits at the head of the queue."""
        now = time.monotonic()
        running = [r for r in self._running if not r.done]
        if len(running) < 2 or any(r.blocked_since is None
                                   or now - r.blocked_since < PREEMPT_AFTER_S for r in running):
            return
        victim = max(running, key=lambda r: r.enqueued_at)
        if not self.pool.length(victim.session.session_id):
            return
        if self.on_kv_short is not None and self.on_kv_short(
                self._short_bytes(running[0].session.session_id, 1)):
            return  # idle sessions are being parked: their blocks come first
        self._preempt(victim)

    def _preempt(self, request: Request) -> None:
        session_id = request.session.session_id
        num_blocks = len(self.pool.table(session_id))
        tokens = self.pool.length(session_id)
        self.pool.free(session_id)
        self._slots.pop(session_id, None)
        self._running.remove(request)
        request.blocked_since = None
        self._waiting.appendleft(request)
        self._preemptions += 1
        for other in self._running:
            other.blocked_since = None   # blocks came: their clocks restart
        log.info("generation_preempted", session_id=session_id, freed_blocks=num_blocks,
                 recompute_tokens=tokens, generated=len(request.generated))

    def _reserve(self, request: Request, num_tokens: int) -> bool:
        session_id = request.session.session_id
        if not self.pool.can_append(session_id, num_tokens):
            if request.blocked_since is None:
                request.blocked_since = time.monotonic()
            self._grow(self.pool.blocks_needed(session_id, num_tokens))
            # Short only when growing takes long (queued in admission) or failed.
            short = (self._growth_error is not None
                     or time.monotonic() - request.blocked_since > KV_SHORT_AFTER_S)
            if short and self.on_kv_short is not None:
                self.on_kv_short(self._short_bytes(session_id, num_tokens))
            return False
        request.blocked_since = None
        self._slots.setdefault(session_id, []).extend(self.pool.append(session_id, num_tokens))
        return True

    def _short_bytes(self, session_id: str, num_tokens: int) -> int:
        missing = self.pool.blocks_needed(session_id, num_tokens) - self.pool.num_free_blocks
        return max(0, missing) * self.pool.block_size * self.loaded.kv_shape.bytes_per_token

    def _item(self, request: Request, feed: list[int]) -> StepItem:
        slots = self._slots[request.session.session_id]
        return StepItem(feed, slots[len(slots) - len(feed):], list(slots), request.params,
                        request.generator, request.constraint,
                        request.generated if request.params.penalised else None)

    def _advance(self, request: Request, token: int) -> None:
        if request.done:
            return
        session = request.session
        request.generated.append(token)
        session.tokens.append(token)
        self._tokens_generated += 1
        reason = None
        if token in self.loaded.eos_token_ids:
            reason = FINISH_STOP
        elif request.constraint is not None:
            request.constraint.consume(token)
            if request.constraint.complete:
                reason = FINISH_STOP          # the grammar is done
        text = request.detok.push(token)
        if request.params.stop:
            pending = request.held + text
            combined = request.text + pending
            window = max(map(len, request.params.stop))
            search_from = max(0, len(request.text) - window)
            hits = [combined.find(s, search_from) for s in request.params.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                text, request.held = combined[: min(hits)][len(request.text):], ""
                reason = FINISH_STOP_STRING
            else:  # hold back an end that may grow into a stop string
                hold = _stop_prefix_len(pending, request.params.stop)
                text, request.held = pending[: len(pending) - hold], pending[len(pending) - hold:]
        if reason is None and len(request.generated) >= request.params.max_tokens:
            reason = FINISH_LENGTH
        if reason is None and len(session.tokens) >= self.loaded.max_context:
            reason = FINISH_CONTEXT
        if reason is not None and reason != FINISH_STOP_STRING:
            text, request.held = text + request.held, ""
        request.text += text
        request.out.put_nowait(Delta(text, [token]))
        if reason is not None:
            self._finish(request, reason)

    # ---- endings ---------------------------------------------------------
    def _finish(self, request: Request, reason: str) -> None:
        self._end(request)
        self._record_answer(request, request.text)
        request.out.put_nowait(Finished(reason, request.num_prompt_tokens, len(request.generated),
                                        len(request.session.tokens),
                                        request.base_len - request.num_prompt_tokens))

    @staticmethod
    def _record_answer(request: Request, text: str) -> None:
        """The answer joins the session's conversation: a new assistant turn
        after a user's or a tool's, or the rest of an assistant turn the
        conversation ended with (a prefill, which the answer continues)."""
        messages = request.session.messages
        if not messages:
            return
        last = messages[-1]
        if last["role"] in ("user", "tool"):
            messages.append({"role": "assistant", "content": text})
        elif last["role"] == "assistant" and request.chat_turn:
            messages[-1] = {**last, "content": (last.get("content") or "") + text}

    def _finish_cancelled(self, request: Request) -> None:
        """Keep only what the caller received."""
        if request.done:
            return
        self._end(request)
        session = request.session
        keep = request.base_len + request.delivered
        if len(session.tokens) > keep:
            self._truncate(session, keep)
        if session.messages:
            delivered = request.generated[: request.delivered]
            text = self.loaded.tokenizer.decode(
                [t for t in delivered if t not in self.loaded.eos_token_ids],
                skip_special_tokens=True)
            self._record_answer(request, text)
        log.info("generation_cancelled", session_id=session.session_id,
                 delivered=request.delivered, generated=len(request.generated))

    def _fail(self, request: Request, error: LmxError) -> None:
        if request.done:
            return
        self._end(request)
        session = request.session
        if not request.generated:
            # Nothing generated: undo the turn (its prompt too), so that a
            # retry starts from the same context.
            self._truncate(session, request.base_len - request.num_prompt_tokens)
            if request.chat_turn and session.messages and \
                    session.messages[-1]["role"] in ("user", "tool", "assistant"):
                session.messages.pop()
        # Else the session keeps every token generated: each is in the
        # caller's stream already, ahead of the error, so it receives them all.
        request.out.put_nowait(Failed(error))
        log.warning("generation_failed", session_id=session.session_id, error=error.message)

    def _end(self, request: Request) -> None:
        request.done = True
        request.session.busy = False
        self._busy.pop(request.session.session_id, None)
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        self._maybe_shrink()

    def _truncate(self, session: Session, num_tokens: int) -> None:
        del session.tokens[num_tokens:]
        self._truncate_kv(session.session_id, num_tokens)

    def _truncate_kv(self, session_id: str, num_tokens: int) -> None:
        """The session's KV cut back to its first num_tokens tokens."""
        if self.pool.length(session_id) > num_tokens:
            self.pool.truncate(session_id, num_tokens)
            del self._slots[session_id][num_tokens:]

    # ---- memory ----------------------------------------------------------
    def _grow(self, num_blocks: int) -> None:
        if self._resize_task is not None and not self._resize_task.done():
            return
        chunks = -(-max(0, num_blocks - self.pool.num_free_blocks) // self.pool.blocks_per_chunk)
        target = self.pool.num_chunks + max(1, chunks)
        self._resize_task = asyncio.create_task(self._resize(target), name="kv-grow")

    def _maybe_shrink(self) -> None:
        if self._resize_task is not None and not self._resize_task.done():
            return
        if self._allocating or any(r.blocked_since is not None
                                   for r in [*self._waiting, *self._running]):
            return  # a request or a restore waits for blocks: what is free is for it
        idle = ((not self._busy or self._paused) and not self._allocating
                and not self.pool.usage().num_used_blocks)
        spare = 0 if idle else self.spare_chunks
        removable = self.pool.num_removable_chunks() - spare
        if removable > 0:
            self._resize_task = asyncio.create_task(
                self._resize(self.pool.num_chunks - removable), name="kv-shrink")

    async def _on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _add_storage_chunks(self, count: int) -> None:
        for _ in range(count):
            self.storage.add_chunk()

    def _remove_storage_chunks(self, count: int) -> None:
        self.storage.remove_chunks(count)
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back before the lease shrinks

    async def _resize(self, target_chunks: int) -> None:
        current = self.pool.num_chunks
        chunk_bytes = self.storage.chunk_bytes
        try:
            if target_chunks > current:
                await self.memory.set_kv_bytes(target_chunks * chunk_bytes, self.kv_wait_s)
                # The storage changes on the compute thread, between two steps:
                # a step there reads its chunk list (decode graphs' address
                # table, the eager path's tensors); the pool hands the new
                # blocks out only once the chunks exist.
                await self._on_compute(self._add_storage_chunks, target_chunks - current)
                for _ in range(target_chunks - current):
                    self.pool.add_chunk()
                log.info("kv_grown", chunks=target_chunks, bytes=target_chunks * chunk_bytes)
            elif target_chunks < current:
                # A session closed during a step freed blocks that step may still read.
                while self._unsafe_step is not None and not self._unsafe_step.done():
                    await asyncio.wait([self._unsafe_step])
                count = min(self.pool.num_chunks - target_chunks, self.pool.num_removable_chunks())
                if count <= 0:
                    return
                self.pool.remove_chunks(count)
                await self._on_compute(self._remove_storage_chunks, count)
                await self.memory.set_kv_bytes(self.pool.num_chunks * chunk_bytes, 0)
                log.info("kv_shrunk", chunks=self.pool.num_chunks,
                         bytes=self.pool.num_chunks * chunk_bytes)
        except CapacityExhausted as exc:
            self._growth_error = exc
            log.warning("kv_growth_refused", message=exc.message)
        except LmxError as exc:
            self._growth_error = CapacityExhausted(exc.message, Shortfall("kv", 0, 0), 1.0)
            log.error("kv_resize_failed", message=exc.message)
        finally:
            self._wake.set()
