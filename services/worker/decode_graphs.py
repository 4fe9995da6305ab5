"""CUDA graphs of the decode step.

Eager decoding at small batch is paced by Python launching hundreds of
small kernels per step, not by the GPU (docs/benchmarks.md, worker
benchmark). A decode step feeds one token per sequence, so its shapes
depend only on the number of sequences: for each batch-size bucket the
model's forward pass is captured once into a CUDA graph and replayed, one
launch per step.

Everything that changes from one step to the next is read from static
device buffers the graph was captured on: token ids, positions, each
sequence's new slot, block table and context length, and the KV chunks'
address table. Attention goes through `GraphPlan` (paged_attention
dispatches on it): the Triton kernels of paged_kernels.py write the new K/V
and attend over the paged pool in place. A step with fewer sequences than
its bucket pads with rows of context 0 and slot -1, which write nothing and
are dropped. The pool growing or shrinking changes only the address table,
not the graphs.

What invalidates the graphs: the weights moving (sleep, wake, layers
streamed or made resident; models.weights_moved). They are dropped and
captured again when next needed; while layers stream (forward hooks with
copies and events of their own), decode steps run eagerly.

Memory: the graphs share one pool. The worker captures every bucket during
its warm-up, before it measures what it holds, so that its base lease
covers them (measured, not guessed).

Decoding ahead (services/worker/decode_ahead.py): a step may take its
rows' tokens from the last run's greedy choices on the device (`run`'s
`feed`), so that it is launched before the host has read them; each run's
choices are copied into one of two pinned host buffers behind an event
(`greedy_to_host`), and the rows' host buffers alternate too, since the
copies of one step may still be queued while the next is filled.

Without `capture` (the CPU, tests) the same static-buffer forward runs
eagerly: everything but the capture itself is exercised.
"""

from __future__ import annotations

import time

import numpy as np
import structlog
import torch

from services.worker import paged_kernels, step_memory
from services.worker.compiled_decode import CompiledForward
from services.worker.kv_storage import KVStorage
from services.worker.models import LoadedModel, weights_version

log = structlog.get_logger(__name__)

#: Chunks the address table can name. 8 bytes each, so generous: a pool of
#: more chunks decodes eagerly.
MAX_CHUNKS = 16384
#: The first graphed step is checked against the eager one: logits as close
#: as two bf16 computations of the same function are, or graphs go off.
CHECK_MIN_COSINE = 0.995
CHECK_MAX_ERROR = 0.1
#: Of the first graphed step, this many rows are computed eagerly too and
#: compared (enough to catch a wrong kernel; the step memory plan counts
#: their eager step and the comparison's float32 copies).
CHECK_ROWS = step_memory.CHECK_ROWS


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph of their own: 1, 2, 4, then multiples of 8."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


class GraphPlan:
    """The attention of a graphed decode step: views of the static buffers
    for the first `rows` rows."""

    def __init__(self, graphs: DecodeGraphs, rows: int):
        self.rows = rows
        self.new_slots = graphs.new_slots[:rows]
        self.block_table = graphs.block_table[:rows]
        self.ctx_lens = graphs.ctx_lens[:rows]
        self.k_ptrs = graphs.k_ptrs
        self.v_ptrs = graphs.v_ptrs
        self.slots_per_chunk = graphs.storage.slots_per_chunk
        self.block_size = graphs.block_size
        self.kv_heads = graphs.storage.shape.num_kv_heads

    def row_tensors(self) -> list[torch.Tensor]:
        """The plan's tensors with one entry per row (dimension 0)."""
        return [self.new_slots, self.block_table, self.ctx_lens]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None, sliding_window: int | None) -> torch.Tensor:
        """query [1, heads, rows, dim], key/value [1, kv_heads, rows, dim] ->
        [1, rows, heads, dim]."""
        out = paged_kernels.paged_decode(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            self.new_slots, self.k_ptrs, self.v_ptrs, self.block_table, self.ctx_lens, layer,
            self.slots_per_chunk, self.block_size,
            scaling if scaling is not None else query.shape[-1] ** -0.5, sliding_window or 0)
        return out.unsqueeze(0)


class HostTokens:
    """A decode step's greedy tokens on their way to a pinned host buffer."""

    def __init__(self, buffer: torch.Tensor, rows: int, event):
        self.buffer, self.rows, self.event = buffer, rows, event

    def read(self) -> list[int]:
        """Wait for the step (only it: steps launched after it go on) and
        return its tokens."""
        if self.event is not None:
            self.event.synchronize()
        return self.buffer[:self.rows].tolist()


class DecodeGraphs:
    def __init__(self, loaded: LoadedModel, storage: KVStorage, *, block_size: int,
                 max_batch: int, capture: bool | None = None, compile: bool = False,
                 compile_options: dict | None = None):
        self.loaded = loaded
        self.storage = storage
        self.block_size = block_size
        self.device = loaded.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.sizes = buckets(max_batch)
        #: The forward pass each bucket captures: compiled (compiled_decode.py).
        self.forward = CompiledForward(compile, compile_options)
        top = self.sizes[-1]
        self.max_blocks = -(-loaded.max_context // block_size)
        device = self.device
        # Token ids, positions, new slots, context lengths and (decoding
        # ahead) which row of the last run feeds each row: rows of one
        # tensor, filled by one copy a step (each copy is a host-side op of
        # 15-30 us on the lent machines' CPUs).
        self._rows = torch.zeros((5, top), dtype=torch.long, device=device)
        self.input_ids = self._rows[0]
        self.position_ids = self._rows[1]
        self.new_slots = self._rows[2]
        self.ctx_lens = self._rows[3]
        self.feed_rows = self._rows[4]
        self.block_table = torch.zeros((top, self.max_blocks), dtype=torch.int32, device=device)
        self.k_ptrs = torch.zeros((MAX_CHUNKS,), dtype=torch.long, device=device)
        self.v_ptrs = torch.zeros((MAX_CHUNKS,), dtype=torch.long, device=device)
        pin = device.type == "cuda"
        # Two of each host buffer, used in turn: a step's copies from one may
        # still be queued behind the step before while the next is filled.
        self._host_rows = [torch.zeros((5, top), dtype=torch.long, pin_memory=pin)
                           for _ in range(2)]
        self._host_table = [torch.zeros((top, self.max_blocks), dtype=torch.int32,
                                        pin_memory=pin) for _ in range(2)]
        self._host_greedy = [torch.zeros((top,), dtype=torch.long, pin_memory=pin)
                             for _ in range(2)]
        self._turn = 0
        self._chunks_version = -1
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        #: Each bucket's greedy choices, computed in its graph after the logits.
        self._greedy: dict[int, torch.Tensor] = {}
        self._last: tuple[int, int] = (0, 0)     # (bucket, rows) of the last run
        self._pool = None
        self._stream: torch.cuda.Stream | None = None   # every capture's (see _capture)
        self._version = -1
        self._streaming = False
        #: Why decode steps run eagerly for good (None: they need not): the
        #: model or this install cannot, or the first graphed step
        #: disagreed with the eager one (`check`).
        self.broken: str | None = self._unsupported()
        self.checked = False
        #: True: not used for now (the worker's warm-up measures eager steps,
        #: then captures every bucket at once and measures their pool).
        self.held = False
        if self.broken is not None:
            log.info("decode_graphs_off", reason=self.broken)

    def _unsupported(self) -> str | None:
        config = self.loaded.model.config.get_text_config()
        if getattr(config, "attn_logit_softcapping", None):
            return "the model soft-caps its attention logits"
        return paged_kernels.supported(self.storage.shape.head_dim, self.block_size)

    # ---- when ---------------------------------------------------------------
    def applies(self, items) -> bool:
        if self.broken is not None or self.held or len(items) > self.sizes[-1]:
            return False
        if self.storage.num_chunks > MAX_CHUNKS or not self.storage.num_chunks:
            return False
        if any(len(item.tokens) != 1 for item in items):
            return False
        self._follow_weights()
        return not self._streaming

    def likely(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows will replay a graph, as far as
        the event loop can tell without touching the graphs (the scheduler
        plans its memory on it; the runner decides, and splits an eager step
        that does not fit)."""
        return (self.broken is None and not self.held and rows <= self.sizes[-1]
                and not self._streaming
                and 0 < self.storage.num_chunks <= MAX_CHUNKS
                and weights_version(self.loaded.model) == self._version)

    def _follow_weights(self) -> None:
        version = weights_version(self.loaded.model)
        if version == self._version:
            return
        if self._graphs:
            log.info("decode_graphs_dropped", graphs=len(self._graphs), reason="weights moved")
        self.invalidate()
        self._version = version
        # Streamed layers copy through forward hooks of their own.
        self._streaming = any(module._forward_pre_hooks
                              for module in self.loaded.model.modules())

    def invalidate(self) -> None:
        self._graphs.clear()
        self._logits.clear()
        self._greedy.clear()
        self._pool = None

    def release(self) -> None:
        """The model goes to sleep: the graphs, their pool and cuBLAS's
        workspaces (one per stream, 32 MiB on Hopper; no graph refers to
        them any more) are freed; all come back at the first decode step
        after the wake."""
        self.invalidate()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if self.capture and clear is not None:
            clear()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def limit(self, max_rows: int) -> None:
        """Graphs only up to `max_rows` rows (their pool did not fit the
        lease): the larger buckets are dropped, all captured again when next
        needed; larger decode steps run eagerly."""
        self.sizes = [size for size in self.sizes if size <= max_rows] or self.sizes[:1]
        log.warning("decode_graphs_limited", max_rows=self.sizes[-1])
        self.invalidate()

    def disable(self, reason: str) -> None:
        """Eager decode steps from now on, the graphs and their pool freed."""
        self.broken = reason
        log.warning("decode_graphs_off", reason=reason)
        self.invalidate()

    def fail(self, exc: BaseException) -> None:
        """A capture or replay raised: eager decode steps from now on."""
        self.broken = f"{type(exc).__name__}: {exc}"
        log.error("decode_graphs_off", reason=self.broken, exc_info=exc)
        self.invalidate()

    def check(self, graphed: torch.Tensor, eager: torch.Tensor) -> bool:
        """Compare the first graphed step's logits with the eager step's on
        the same rows; on a disagreement beyond rounding, graphs go off for
        good (logged). Returns whether they agreed."""
        self.checked = True
        a, b = graphed.float().flatten(), eager.float().flatten()
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        worst = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        agree = bool(torch.equal(graphed.argmax(-1), eager.argmax(-1)))
        good = cosine >= CHECK_MIN_COSINE and worst <= CHECK_MAX_ERROR
        log.info("decode_graphs_checked", cosine=round(cosine, 6),
                 max_relative_error=round(worst, 5),
                 same_argmax=agree, good=good)
        if not good:
            self.broken = (f"the first graphed step disagreed with the eager one "
                           f"(cosine {cosine:.4f}, max relative error {worst:.3g})")
            log.error("decode_graphs_off", reason=self.broken)
            self.invalidate()
        return good

    # ---- running --------------------------------------------------------------
    def captured(self, rows: int) -> bool:
        """Whether a step of `rows` rows replays a graph already captured
        (always, without capture): running it captures nothing."""
        if rows > self.sizes[-1]:
            return False
        return not self.capture or next(s for s in self.sizes if s >= rows) in self._graphs

    def run(self, items, feed: list[int] | None = None) -> torch.Tensor:
        """Logits [len(items), vocab] of one decode step (after `applies`).
        `feed`: row i's token is not items[i]'s but the last run's greedy
        choice for its row feed[i], taken on the device (decoding ahead; the
        step must replay a captured graph: `captured`)."""
        rows = len(items)
        size = next(s for s in self.sizes if s >= rows)
        if self.capture and not self._graphs:
            # None yet (after a wake, or the weights moved): every bucket,
            # the largest first, as at the warm-up, so that the pool is the
            # one the base lease was sized for (captured smallest first, the
            # buckets would share less of it). On padding rows.
            self._capture_sizes(self.sizes)
        previous = self._greedy[self._last[0]] if feed is not None else None
        self._fill(items, size, feed)
        if previous is not None:
            torch.index_select(previous, 0, self.feed_rows[:rows], out=self.input_ids[:rows])
        self._last = (size, rows)
        if not self.capture:
            logits = self._forward(size)
            self._greedy[size] = self._choose(logits)
            return logits[:rows]
        graph = self._graphs.get(size)
        if graph is None:
            graph = self._capture(size)
        graph.replay()
        return self._logits[size][:rows]

    def greedy_tokens(self) -> torch.Tensor:
        """The last run's greedy choice of each row (argmax of its logits
        within the tokenizer's vocabulary), computed on the device with the
        step: a greedy step then needs no sampling op of its own."""
        size, rows = self._last
        return self._greedy[size][:rows]

    def greedy_to_host(self) -> HostTokens:
        """The last run's greedy choices copied into a pinned host buffer
        behind an event, without waiting for the step: read them with
        `HostTokens.read` (decoding ahead). Two buffers in turn: the one
        before last must have been read by then."""
        size, rows = self._last
        buffer = self._host_greedy[self._turn]
        buffer[:rows].copy_(self._greedy[size][:rows], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return HostTokens(buffer, rows, event)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.argmax(logits[:, :self.loaded.vocab_limit], dim=-1)

    @torch.inference_mode()
    def capture_all(self) -> float:
        """Capture every bucket now (the worker's warm-up); returns seconds."""
        started = time.perf_counter()
        # No KV chunk is needed: capture runs on padding rows (context 0,
        # slot -1), which read and write no KV; a replay reads the chunks'
        # addresses from the table then.
        if not self.capture or self.broken is not None:
            return 0.0
        self._follow_weights()
        if self._streaming:
            return 0.0
        try:
            self._capture_sizes(self.sizes)
        except Exception as exc:  # noqa: BLE001 - decode eagerly rather than not at all
            self.fail(exc)
            return 0.0
        self.forward.release_workers()
        seconds = time.perf_counter() - started
        log.info("decode_graphs_captured", graphs=len(self._graphs), sizes=self.sizes,
                 seconds=round(seconds, 3), compiled=self.forward.on)
        return seconds

    def _capture_sizes(self, sizes: list[int]) -> None:
        self._clear_rows(self.sizes[-1])
        for size in sorted(sizes, reverse=True):   # the largest first: the others reuse its pool
            if size not in self._graphs:
                self._capture(size)

    def _forward(self, size: int) -> torch.Tensor:
        # [1, size] views whose stride follows their size (unsqueezed, not
        # sliced from [1, top]), so that a compiled step does not specialise
        # on the largest bucket's.
        return self.forward(self.loaded.model, self.input_ids[:size].unsqueeze(0),
                            self.position_ids[:size].unsqueeze(0), GraphPlan(self, size))

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        """Capture the forward pass for `size` rows. Its warm-up passes run
        for real: the rows are padding then (or this step's: they only
        write this step's K/V, as the replay will again)."""
        started = time.perf_counter()
        self._update_chunk_table()
        # One side stream for every warm-up and capture, for the worker's
        # life: cuBLAS keeps a workspace (32 MiB on Hopper) for each stream
        # it ever ran on, so a stream per capture left 32 MiB per bucket
        # allocated for good (measured on an H100: 19 buckets, 608 MiB
        # outside every lease term).
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):    # Triton compiles, cuBLAS picks its kernels: not in the graph
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop's thread (KV chunks freed, the
        # allocator capped) and the parking copies' threads go on meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, stream=stream,
                              capture_error_mode="thread_local"):
            logits = self._forward(size)
            greedy = self._choose(logits)
        self._graphs[size] = graph
        self._logits[size] = logits
        self._greedy[size] = greedy
        log.debug("decode_graph_captured", rows=size,
                  seconds=round(time.perf_counter() - started, 4))
        return graph

    def _clear_rows(self, size: int) -> None:
        self.new_slots[:size].fill_(-1)
        self.ctx_lens[:size].zero_()

    def _update_chunk_table(self) -> None:
        # The storage changes only on this (the compute) thread, between steps
        # (Engine._resize): the version and the addresses read here agree.
        version = self.storage.version
        if version == self._chunks_version:
            return
        k, v = self.storage.chunk_addresses(0), self.storage.chunk_addresses(1)
        self.k_ptrs[:len(k)].copy_(torch.tensor(k, dtype=torch.long))
        self.v_ptrs[:len(v)].copy_(torch.tensor(v, dtype=torch.long))
        self._chunks_version = version

    def _fill(self, items, size: int, feed: list[int] | None = None) -> None:
        """This step's rows into the static buffers (two small host-to-device
        copies from pinned memory), padding rows after them."""
        self._update_chunk_table()
        rows = len(items)
        block = self.block_size
        self._turn ^= 1
        host_rows, host_table = self._host_rows[self._turn], self._host_table[self._turn]
        host = host_rows.numpy()
        table = host_table.numpy()
        host[:2, :size] = 0
        host[2, :size] = -1
        host[3, :size] = 0
        if feed is not None:
            host[4, :rows] = feed
        for row, item in enumerate(items):
            length = len(item.all_slots)
            host[0, row] = item.tokens[0]
            host[1, row] = length - 1
            host[2, row] = item.new_slots[0]
            host[3, row] = length
            blocks = np.asarray(item.all_slots[::block], dtype=np.int64) // block
            table[row, :len(blocks)] = blocks
        # All of it (5 x the largest bucket, a few KiB): a copy of [:, :size]
        # is not contiguous, and torch stages such a copy through a pageable
        # host tensor, a copy that waits for the stream (decoding ahead
        # would wait for the step before). Past `size` the rows are stale
        # and no graph of this size reads them.
        self._rows.copy_(host_rows, non_blocking=True)
        self.block_table[:rows].copy_(host_table[:rows], non_blocking=True)
