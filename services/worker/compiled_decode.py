"""The decode step's forward pass compiled by torch.compile (Inductor).

A graphed decode step (decode_graphs.py) removes the cost of launching its
kernels, not the kernels: run eagerly, a Llama decoder layer is dozens of
small elementwise, concatenation and reduction kernels around its matrix
products (RMSNorm alone is six), each too short to use the memory system.
Compiled, Inductor fuses each run of them into one Triton kernel
(normalisation, rotary embedding, the gated MLP's activation, the residual
adds), and the CUDA graph is captured on the compiled code, as gpt-fast
does with `mode="reduce-overhead"`.

What the compiler does not see: the paged attention is one opaque operator
(paged_kernels.paged_decode), since its writes go through the KV chunks'
address table.

Shapes: the batch is the only dimension that changes. It is marked
dynamic for batches of several rows, and Dynamo specialises one row, so a
worker compiles twice whatever its buckets (Inductor's and Triton's caches
keep the result for the next start of the same model: under the worker's
cache, `<LMX_CACHE>/compile`, so that a container's next start finds them
on its cache volume; /tmp, Inductor's default, goes with the container.
On an H100 the two compiles took 26 s for Llama-1B and 90-126 s for the
Qwen2.5-1.5B and Gemma-3-1B shapes). Left to Dynamo's
automatic dynamic shapes, the first bucket captured (the largest) compiled
static and the next one again: three compiles, 52 s for Llama-1B on an
H100. Weights are inputs of the compiled code, not constants: a sleep, a
wake or a move of the weights needs a new capture (decode_graphs.py), not a
new compile.

`tuned` (--compile-decode tuned) compiles with Inductor's coordinate
descent tuning, gpt-fast's setting: with it Inductor turns a matrix product
of one row (the batch-1 step, compiled for one row) into a reduction it
fuses and tunes, which its own comment says is what reaches the memory
bandwidth on a GPU, where cuBLAS's kernels for one row do not (measured on
an H100: the compiled Llama-1B step's matrix products took 1.21 ms of its
1.51, against 0.82 ms to read the weights once). The tuning lengthens the
first compile; the multi-row steps are unchanged.

A compile that fails (no C++ compiler for the CPU's Inductor, an operator
it cannot lower) turns compiling off for this worker, logged once
(`decode_compile_off`); decode steps then run the model as it is, still
graphed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)


#: Inductor's options for --compile-decode tuned.
TUNED = {"coordinate_descent_tuning": True}


def enabled(setting: str, graphs: bool) -> bool:
    """Whether decode steps run compiled: `auto` or `tuned` wherever they
    are graphed (the compile is paid once, at the warm-up's capture)."""
    return setting in ("auto", "tuned") and graphs


def keep_caches_in(cache: Path) -> Path:
    """Inductor's and Triton's caches in `cache`/compile (set before the
    first compile; the compile workers inherit it), unless
    TORCHINDUCTOR_CACHE_DIR names a folder already. Returns the folder."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "compile")))
    # Inductor puts its own Triton kernels under its folder; this puts the
    # worker's hand-written ones (paged_kernels, kv_copy_kernels) beside them.
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def options(setting: str) -> dict:
    """Inductor's options of a --compile-decode setting."""
    return dict(TUNED) if setting == "tuned" else {}


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
            plan) -> torch.Tensor:
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, lmx_plan=plan,
                logits_to_keep=0)
    return out.logits[0]


class CompiledForward:
    """`__call__(model, input_ids, position_ids, plan)` -> logits [rows,
    vocab]: compiled while that works, the plain forward pass after."""

    def __init__(self, enabled: bool = True, options: dict | None = None):
        self.broken: str | None = None if enabled else "off"
        self.options = dict(options or {})
        self.compiled_at: list[int] = []     # the batch sizes that compiled (or recompiled)
        self.seconds = 0.0                   # spent in calls that compiled
        self._fn: Callable | None = None

    @property
    def on(self) -> bool:
        return self.broken is None

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor,
                 position_ids: torch.Tensor, plan) -> torch.Tensor:
        if self.broken is not None:
            return _logits(model, input_ids, position_ids, plan)
        if self._fn is None:
            self._fn = torch.compile(_logits, options=self.options or None)
        if input_ids.shape[1] > 1:
            # The batch is dynamic from the first compile of a batch of
            # several rows (the worker captures its largest bucket first),
            # not after a second one: two compiles, not three.
            for tensor, dim in [(input_ids, 1), (position_ids, 1),
                                *((t, 0) for t in plan.row_tensors())]:
                torch._dynamo.mark_dynamic(tensor, dim)
        frames = _frames()
        started = time.perf_counter()
        try:
            logits = self._fn(model, input_ids, position_ids, plan)
        except Exception as exc:  # noqa: BLE001 - run as it is rather than not at all
            self.broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("decode_compile_off", reason=self.broken)
            return _logits(model, input_ids, position_ids, plan)
        if _frames() != frames:
            seconds = time.perf_counter() - started
            self.seconds += seconds
            self.compiled_at.append(int(input_ids.shape[1]))
            log.info("decode_step_compiled", rows=int(input_ids.shape[1]),
                     seconds=round(seconds, 2), **compile_report())
        return logits

    def release_workers(self) -> None:
        """Stop Inductor's compile worker processes (one per core, each a
        Python with torch loaded) once the warm-up's compiles are done: they
        would otherwise stay a minute. A later compile starts them again."""
        if self._fn is None:
            return
        try:
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()
        except Exception as exc:  # noqa: BLE001 - only memory is at stake
            log.warning("compile_workers_not_released", error=str(exc))


#: The compile's phases named in the log (torch._dynamo.utils.compile_times):
#: Dynamo's tracing, AOTAutograd, Inductor's code generation, the wait for
#: the kernels' compiles, and loading the generated module.
PHASES = {"bytecode_tracing": "trace", "create_aot_dispatcher_function": "aot",
          "GraphLowering.codegen": "codegen", "async_compile.wait": "kernels",
          "PyCodeCache.load_by_key_path": "load"}


def compile_report() -> dict:
    """Where this process's compiles spent their time, in seconds per phase
    (PHASES), and whether Inductor's graph cache served them (hits and
    misses: a hit is a compile the cache saved, under <LMX_CACHE>/compile or
    TORCHINDUCTOR_CACHE_DIR). Totals so far, for the log; {} where torch
    does not say."""
    from torch._dynamo.utils import compile_times, counters

    try:
        names, values = compile_times(repr="csv")
    except Exception:  # noqa: BLE001 - a log line's figures, not worth failing for
        return {}
    phases = {}
    for name, value in zip(names, values):
        if name in PHASES:
            phases[PHASES[name]] = round(sum(float(v) for v in str(value).split(",")
                                             if v.strip()), 2)
    inductor = counters["inductor"]
    return {"phase_seconds": phases, "fxgraph_cache_hits": inductor.get("fxgraph_cache_hit", 0),
            "fxgraph_cache_misses": inductor.get("fxgraph_cache_miss", 0)}


def _frames() -> int:
    """Frames Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)
