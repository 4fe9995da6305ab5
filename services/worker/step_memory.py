"""The step memory plan: how many bytes of device memory one forward step
needs beyond the weights and the KV pool, as a function of its shape.

A step's transient memory (activations, the eager path's gathered K/V and
masks, logits and sampling) is not bounded by anything the leases see: an
eager decode of 28 sessions at a few thousand tokens of context needs ten
times what one 2,048-token prefill needs, and the CUDA allocator, capped at
the leases, raises inside the step. vLLM bounds it by construction: it
profiles the worst step it will ever schedule and never schedules a larger
one. lmx does the same with a formula instead of a profile of every shape:

- `StepMemoryPlan.step_bytes(shape)` is an upper bound on a step's peak
  transient bytes (checked against `torch.cuda.max_memory_allocated` on a GPU
  by tests/gpu/test_step_memory_gpu.py and bench/step_memory.py, every
  synthetic shape up to 3B, batch 1 to 128, contexts to the model's window);
- the worker's base lease holds `workspace_bytes(...)`: the plan of the
  largest step its limits allow (one --max-prefill-tokens prefill, one row
  at the longest context, a graphed decode of --max-batch rows);
- the engine's scheduler admits rows and prompt tokens into a step only
  while `fits` says the step stays within that workspace, and the runner
  splits any step that would not (services/worker/runner.py), so no step
  the worker runs asks for more than its lease holds.

The formula follows what the model's code allocates (Hugging Face decoder
layers: projections, rotary, RMSNorm in float32, gated MLP; lmx's paged
attention: K/V gathered from the pool, grouped heads expanded, the mask,
SDPA's memory-efficient kernel; logits and sampling), each term rounded up,
then a margin for the allocator's rounding. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Added to every plan: the allocator rounds each block up (512 B, 2 MiB
#: segments) and a step holds a few dozen small tensors (indices, positions).
FIXED_MARGIN_BYTES = 24 << 20
#: cuBLAS's workspace for a stream, allocated at its first matrix product
#: there (32 MiB on Hopper, and cuBLASLt's): the first eager step of a
#: stream, and again after a sleep freed them. Measured on an H100 as
#: 32.3 MiB of the first, smallest eager step.
CUBLAS_WORKSPACE_BYTES = 40 << 20
#: And a share of the planned bytes, for what the formula rounds down.
RELATIVE_MARGIN = 0.15
#: Rows of the first graphed step that are computed eagerly too, to check
#: the graphs (decode_graphs.CHECK_ROWS; decode_graphs imports torch).
CHECK_ROWS = 8
#: Sampling works one row at a time over the vocabulary in float32 (scores,
#: a sort's values and its int64 indices, softmax, cumulative sums, masks):
#: this many float32 copies.
SAMPLING_VOCAB_COPIES = 14


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The sizes of a decoder-only model that a step's memory depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    itemsize: int              # bytes per element of activations (the model's dtype)
    rotary_sets: int = 1       # Gemma 3 keeps two (local and global layers)
    softcap: bool = False      # attention logits soft-capped: the math path runs
    logit_softcap: bool = False   # final logits soft-capped: two more copies of them
    #: Quantized weights de-quantized one matrix at a time inside a layer
    #: (services/worker/quantize.py dequant_bytes): the largest such transient.
    dequant_bytes: int = 0
    #: Copies of the logits the output head makes beyond its output: an int8
    #: head's per-chunk products before they are joined (quantize.Int8Head).
    head_copies: int = 0

    @classmethod
    def from_config(cls, config, itemsize: int) -> ModelDims:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        model_type = getattr(text, "model_type", "")
        return cls(hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, vocab=text.vocab_size, itemsize=itemsize,
                   rotary_sets=2 if model_type.startswith("gemma3") else 1,
                   softcap=bool(getattr(text, "attn_logit_softcapping", None)),
                   logit_softcap=bool(getattr(text, "final_logit_softcapping", None)))


@dataclass(frozen=True, slots=True)
class StepShape:
    """What the scheduler knows of a step before it runs."""

    rows: int                  # sequences
    tokens: int                # new tokens, all rows together
    max_new: int               # the most new tokens of one row
    max_len: int               # the longest context of one row, its new tokens included
    graphed: bool = False      # a decode step replayed from a CUDA graph
    checked: bool = True       # False: the first graphed step, also run eagerly to check it

    @classmethod
    def of(cls, rows: list[tuple[int, int]], graphed: bool = False,
           checked: bool = True) -> StepShape:
        """From (new tokens, context length) per row."""
        if not rows:
            return cls(0, 0, 0, 0, graphed, checked)
        return cls(len(rows), sum(n for n, _ in rows), max(n for n, _ in rows),
                   max(length for _, length in rows), graphed, checked)

    def plus(self, new_tokens: int, context: int) -> StepShape:
        return StepShape(self.rows + 1, self.tokens + new_tokens, max(self.max_new, new_tokens),
                         max(self.max_len, context), self.graphed, self.checked)


class StepMemoryPlan:
    def __init__(self, dims: ModelDims, *, math_attention: bool = False, scale: float = 1.0):
        self.dims = dims
        #: The attention runs SDPA's math kernel (the CPU, soft-capped
        #: logits): it materialises the scores in float32.
        self.math_attention = math_attention or dims.softcap
        #: Raised above 1 when a warm-up step measured more than the plan
        #: (services/worker/app.py logs it as step_plan_below_measured).
        self.scale = scale

    # ---- the terms -------------------------------------------------------
    def activation_bytes(self, tokens: int) -> int:
        """Per layer, what the decoder holds at its peak for `tokens` packed
        tokens, plus what lives through the whole forward pass (embeddings,
        the residual stream, rotary cos/sin)."""
        d = self.dims
        b = d.itemsize
        qkv = (d.heads + 2 * d.kv_heads) * d.head_dim
        per_token = (b * (6 * d.hidden            # residual, norm out, attention out, o_proj, adds
                          + 4 * d.intermediate    # gate, act(gate), up, their product
                          + 3 * qkv               # projections, rotary's copies and halves
                          + 2 * d.heads * d.head_dim)
                     + 2 * 4 * d.hidden           # RMSNorm's float32 copy and its square
                     + 4 * b * d.head_dim * d.rotary_sets)   # cos, sin and their products
        return tokens * per_token

    def attention_bytes(self, shape: StepShape) -> int:
        """Eager paged attention for one layer (services/worker/attention.py):
        K and V gathered for every row's whole context, grouped heads
        expanded, queries padded, the mask in bool and in the model's dtype."""
        d = self.dims
        b = d.itemsize
        keys = shape.rows * shape.max_len
        queries = shape.rows * shape.max_new
        gathered = 4 * keys * d.kv_heads * d.head_dim * b     # K, V, and a chunk's index_select
        # K and V with grouped heads expanded, and room for one copy the
        # kernel may make into its own layout.
        expanded = 3 * keys * d.heads * d.head_dim * b if d.heads != d.kv_heads else 0
        padded_q = 4 * queries * d.heads * d.head_dim * b     # q, contiguous q, out, packed out
        mask = shape.rows * shape.max_new * (shape.max_len + 16) * (3 + 2 * b)
        indices = 16 * keys + 24 * queries                    # gather slots, positions, masks
        scores = 0
        if self.math_attention:
            # float32 scores and softmax, and float32 copies of Q, K and V.
            scores = (3 * queries * d.heads * shape.max_len * 4
                      + 2 * keys * d.heads * d.head_dim * 4 + queries * d.heads * d.head_dim * 4)
        return gathered + expanded + padded_q + mask + indices + scores

    def logits_bytes(self, rows: int) -> int:
        """The kept rows' logits (and a soft-capped copy), then sampling."""
        d = self.dims
        return (3 + d.head_copies) * rows * d.vocab * d.itemsize \
            + SAMPLING_VOCAB_COPIES * d.vocab * 4 + 16 * rows

    # ---- a step ------------------------------------------------------------
    def eager_bytes(self, shape: StepShape) -> int:
        if not shape.rows:
            return 0
        return (self.activation_bytes(shape.tokens) + self.attention_bytes(shape)
                + self.logits_bytes(shape.rows) + self.dims.dequant_bytes)

    def graphed_bytes(self, shape: StepShape) -> int:
        """A replayed decode step allocates nothing in its graph's pool (held
        apart, in the base lease): only sampling its logits."""
        return self.logits_bytes(0) + 16 * shape.rows if shape.rows else 0

    def step_bytes(self, shape: StepShape) -> int:
        """The peak transient bytes of a step of this shape, margins included."""
        if not shape.rows:
            return 0
        if shape.graphed:
            raw = self.graphed_bytes(shape)
            if not shape.checked:
                # The first graphed step's first CHECK_ROWS rows are computed
                # eagerly as well, and the logits compared in float32
                # (decode_graphs.check).
                rows = min(shape.rows, CHECK_ROWS)
                raw += (self.eager_bytes(StepShape(rows, rows, 1, shape.max_len))
                        + 4 * rows * self.dims.vocab * 4)
        else:
            raw = self.eager_bytes(shape) + CUBLAS_WORKSPACE_BYTES
        return int(raw * self.scale * (1 + RELATIVE_MARGIN)) + FIXED_MARGIN_BYTES

    def graph_pool_bytes(self, sizes: list[int], parts: int) -> int:
        """The decode graphs' shared pool (decode_graphs.py), before it is
        measured: every bucket's logits (each graph keeps its output), and
        the largest bucket's activations, queries and flash-decoding
        partials (the smaller buckets reuse those blocks: captured largest
        first)."""
        if not sizes:
            return 0
        d = self.dims
        top = max(sizes)
        logits = ((3 if d.logit_softcap else 1) * sum(sizes) + d.head_copies * top) \
            * d.vocab * d.itemsize
        partials = top * d.heads * parts * (d.head_dim + 2) * 4
        queries = 4 * top * d.heads * d.head_dim * d.itemsize
        raw = logits + self.activation_bytes(top) + partials + queries + \
            d.dequant_bytes + CUBLAS_WORKSPACE_BYTES
        return int(raw * self.scale * (1 + RELATIVE_MARGIN)) + FIXED_MARGIN_BYTES

    def fits(self, shape: StepShape, workspace_bytes: int) -> bool:
        return self.step_bytes(shape) <= workspace_bytes

    def workspace_bytes(self, *, max_batch: int, max_prefill_tokens: int, max_context: int,
                        graphs: bool) -> int:
        """What the base lease holds for steps: the largest of the steps the
        scheduler must be able to run whole at its limits (one prefill of
        max_prefill_tokens, one row decoding at the longest context, a
        decode of max_batch rows: graphed, or eager at a short context).
        Larger steps are split to fit it."""
        prefill = min(max_prefill_tokens, max(1, max_context - 1))
        shapes = [StepShape(1, prefill, prefill, prefill),
                  StepShape(1, 1, 1, max_context),
                  StepShape(max_batch, max_batch, 1, min(max_context, 256))]
        if graphs:
            shapes.append(StepShape(max_batch, max_batch, 1, max_context, graphed=True))
        return max(self.step_bytes(shape) for shape in shapes)

    def largest_chunk(self, base: StepShape, pending: int, context_before: int,
                      workspace_bytes: int) -> int:
        """The most of a row's `pending` tokens (its context holding
        `context_before` already) that a step already shaped `base` can take
        within the workspace; 0 if not even one."""
        def fits(count: int) -> bool:
            return self.fits(base.plus(count, context_before + count), workspace_bytes)

        if pending <= 0 or not fits(1):
            return 0
        if fits(pending):
            return pending
        low, high = 1, pending          # fits(low), not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return low


#: The base lease's room for the allocator's own cache: blocks freed inside
#: segments still in use, that a later step of another shape cannot take.
ALLOCATOR_SLACK_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class BaseLease:
    """What the worker's base ("weights") lease holds, term by term (the KV
    pool has a lease of its own, grown a chunk at a time)."""

    weights: int          # on the device: all of them, or the resident part and the ring
    overhead: int         # the CUDA context, with room for kernels loaded later
    workspace: int        # the largest step (StepMemoryPlan.workspace_bytes)
    graph_pool: int = 0   # the decode graphs' pool: estimated, then measured
    staging: int = 0      # a park's or restore's buffers, beside a step
    slack: int = 0        # the allocator's cache (ALLOCATOR_SLACK_BYTES on a GPU)

    @property
    def total(self) -> int:
        return (self.weights + self.overhead + self.workspace + self.graph_pool + self.staging
                + self.slack)

    def fields(self) -> dict[str, int]:
        return {"weight_bytes": self.weights, "overhead_bytes": self.overhead,
                "workspace_bytes": self.workspace, "graph_pool_bytes": self.graph_pool,
                "staging_bytes": self.staging, "slack_bytes": self.slack, "bytes": self.total}
