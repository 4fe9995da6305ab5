"""Graphed decode steps (decode_graphs.py) on the CPU: the static-buffer
forward pass and its Triton kernels (run by Triton's interpreter), without
the CUDA capture itself. Generations through them equal the eager engine's
token for token (float32), with sessions joining and leaving (bucket
changes, padding rows), contexts spread over several KV chunks, a sliding
window model, and weights that move in between (the graphs follow). And
every token is a float32 reference's choice (the plain model, PyTorch's own
attention: services/worker/quality.py `choices`), which sees a wrong one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.worker import paged_kernels
from services.worker.decode_graphs import DecodeGraphs, buckets
from services.worker.engine import Finished
from services.worker.models import weights_moved
from services.worker.quality import Choices, choices
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable

from test_engine import PROMPTS, collect, run, tokens_of  # noqa: E402 (same directory)
from test_paged_kernels import needs_triton_interpreter  # noqa: E402

pytestmark = needs_triton_interpreter


@pytest.fixture(autouse=True)
def few_parts(monkeypatch):
    """Contexts split in 2 parts, not 16: the interpreter runs every
    program one after the other (test_paged_kernels.py covers other splits)."""
    monkeypatch.setattr(paged_kernels, "PARTS", 2)


def generate_all(loaded, *, graphs: bool, max_tokens: int = 12, stagger: bool = True,
                 move_weights_after: int | None = None, compile: bool = False,
                 penalty: float = 0.0, ahead: bool = False, compile_options: dict | None = None):
    """PROMPTS generated together (the later ones joining once the first
    has decoded a few tokens), with or without graphed decode steps."""
    params = SamplingParams(max_tokens=max_tokens, frequency_penalty=penalty)

    async def scenario(engine):
        sessions = SessionTable()
        first = engine.submit(sessions.open(), params, prompt=PROMPTS[0])
        head = []
        if stagger:
            while len(head) < 3:
                head.append(await first.out.get())
                engine.delivered(first, 1)
        others = [engine.submit(sessions.open(), SamplingParams(max_tokens=max_tokens - 2 * i,
                                                                frequency_penalty=penalty),
                                prompt=p) for i, p in enumerate(PROMPTS[1:])]
        if move_weights_after is not None:
            async def mover():
                while engine.runner.graphed_steps < move_weights_after:
                    await asyncio.sleep(0.005)
                weights_moved(loaded.model)
            moving = asyncio.create_task(mover())
        results = await asyncio.gather(collect(engine, first),
                                       *(collect(engine, r) for r in others))
        if move_weights_after is not None:
            await moving
        outs = [head + results[0][0]] + [r[0] for r in results[1:]]
        assert all(isinstance(r[1], Finished) for r in results), [r[1] for r in results]
        return [tokens_of(o) for o in outs], engine.runner

    return run(loaded, scenario, decode_graphs=graphs, compile_decode=compile, max_batch=8,
               decode_ahead=ahead, compile_options=compile_options, timeout=300)


def test_buckets():
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(1) == [1]


def test_graphed_decode_steps_equal_eager_ones(tiny):
    eager, _ = generate_all(tiny, graphs=False)
    graphed, runner = generate_all(tiny, graphs=True)
    assert graphed == eager
    graphs = runner.graphs
    assert graphs.checked and graphs.broken is None
    assert runner.graphed_steps > 10, runner.graphed_steps
    assert runner.storage.num_chunks > 1, "the contexts should span several KV chunks"


def test_graphs_follow_weights_that_move(tiny):
    eager, _ = generate_all(tiny, graphs=False)
    graphed, runner = generate_all(tiny, graphs=True, move_weights_after=4)
    assert graphed == eager
    assert runner.graphs._version >= 1


def test_a_sliding_window_model(gemma_tiny):
    eager, _ = generate_all(gemma_tiny, graphs=False, max_tokens=16, stagger=False)
    graphed, runner = generate_all(gemma_tiny, graphs=True, max_tokens=16, stagger=False)
    assert graphed == eager
    assert runner.graphed_steps > 5


def test_a_disagreeing_first_step_turns_graphs_off(tiny):
    """The first graphed step is checked against the eager one: a wrong
    kernel result turns graphs off, and the output stays right."""
    eager, _ = generate_all(tiny, graphs=False)
    real = paged_kernels.decode_attention

    def wrong(q, *args, **kwargs):
        return real(q, *args, **kwargs) * 0.0

    paged_kernels.decode_attention = wrong
    try:
        graphed, runner = generate_all(tiny, graphs=True)
    finally:
        paged_kernels.decode_attention = real
    assert runner.graphs.broken is not None and "disagreed" in runner.graphs.broken
    assert graphed == eager


def test_penalised_rows_are_sampled_not_the_graphs_argmax(tiny):
    """A greedy step takes the argmax the graph computed with its logits; a
    row with a penalty is still chosen by sampling.sample, as eagerly."""
    _, runner = generate_all(tiny, graphs=True, max_tokens=10, stagger=False)
    assert runner.graphed_steps > 0 and runner.argmax_steps == runner.graphed_steps
    eager, _ = generate_all(tiny, graphs=False, max_tokens=10, stagger=False, penalty=2.0)
    graphed, runner = generate_all(tiny, graphs=True, max_tokens=10, stagger=False, penalty=2.0)
    assert runner.graphed_steps > 0 and runner.argmax_steps == 0
    assert graphed == eager


@pytest.mark.slow
def test_compiled_decode_steps_equal_eager_ones(tiny):
    """torch.compile of the graphed step (compiled_decode.py; Inductor's C++
    code on the CPU): token for token the eager engine's, with buckets
    changing (one compile for one row, one for every larger batch) and the
    weights moving in between (no new compile)."""
    eager, _ = generate_all(tiny, graphs=False)
    compiled, runner = generate_all(tiny, graphs=True, compile=True, move_weights_after=4)
    forward = runner.graphs.forward
    assert forward.on, forward.broken
    assert compiled == eager
    assert runner.graphed_steps > 0
    assert len(forward.compiled_at) == 2, forward.compiled_at     # one row, and all the others
    # What the log line of each compile says: where the time went, and
    # whether Inductor's cache served the graphs (a warm cache: hits)
    from services.worker.compiled_decode import compile_report

    report = compile_report()
    assert report["fxgraph_cache_hits"] + report["fxgraph_cache_misses"] >= 2, report
    assert report["phase_seconds"]["trace"] > 0, report


def test_a_compile_that_fails_leaves_the_graphed_step_as_it_was(tiny, monkeypatch):
    """No compiler (or an operator Inductor cannot lower): logged once,
    the step runs the model as it is, tokens unchanged."""
    import torch

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager, _ = generate_all(tiny, graphs=False)
    graphed, runner = generate_all(tiny, graphs=True, compile=True)
    assert graphed == eager
    assert runner.graphs.forward.broken == "RuntimeError: no C++ compiler found"
    assert runner.graphed_steps > 0


def test_tuned_compiles_with_inductors_coordinate_descent_tuning(tiny, monkeypatch):
    """--compile-decode tuned: the same compile with Inductor's
    coordinate_descent_tuning among torch.compile's options (recorded here;
    the compile itself is the plain forward pass)."""
    import torch

    from services.worker import compiled_decode
    from services.worker.settings import load_settings

    asked = []

    def recording(fn, **kwargs):
        asked.append(kwargs.get("options"))
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    settings = load_settings(["--model", "m", "--compile-decode", "tuned"], {})
    assert compiled_decode.enabled(settings.compile_decode, graphs=True)
    assert not compiled_decode.enabled(settings.compile_decode, graphs=False)
    options = compiled_decode.options(settings.compile_decode)
    assert options == {"coordinate_descent_tuning": True}
    assert compiled_decode.options("auto") == {}
    eager, _ = generate_all(tiny, graphs=False)
    tuned, runner = generate_all(tiny, graphs=True, compile=True, compile_options=options)
    assert tuned == eager and runner.graphs.forward.on
    assert asked == [options]
    with pytest.raises(Exception, match="compile_decode"):
        load_settings(["--model", "m", "--compile-decode", "fast"], {})


def test_the_compile_caches_live_under_the_model_cache_unless_named(monkeypatch, tmp_path):
    """A worker's compiled step is kept under its model cache (a container's
    cache volume), not Inductor's /tmp default that goes with the container;
    a folder the environment names wins."""
    from services.worker import compiled_decode

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = compiled_decode.keep_caches_in(tmp_path)
    assert folder == tmp_path / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compile" / "triton")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "compile"), "Inductor reads it"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert compiled_decode.keep_caches_in(tmp_path) == Path("/elsewhere")


def test_models_that_graphs_cannot_serve_are_refused_clearly(tiny):
    from services.worker.kv_storage import KVStorage

    storage = KVStorage(tiny.kv_shape, 64, tiny.device)
    graphs = DecodeGraphs(tiny, storage, block_size=12, max_batch=4, capture=False)
    assert graphs.broken is not None and "powers of 2" in graphs.broken


def reference_choices(loaded, outputs: list[list[int]]) -> Choices:
    """The tokens of PROMPTS' generations teacher-forced through the same
    model with PyTorch's own attention (services/worker/quality.py)."""
    total = Choices(0, 0, 0)
    for prompt, tokens in zip(PROMPTS, outputs):
        total += choices(loaded.model, loaded.tokenizer(prompt)["input_ids"], tokens,
                         loaded.device, loaded.vocab_limit)
    return total


@pytest.mark.parametrize("fixture", ["tiny", pytest.param("gemma_tiny", marks=pytest.mark.slow)])
def test_graphed_tokens_are_a_float32_references_choices(fixture, request):
    """Issue 21's check of the decode path on the CPU: every token of the
    graphed generations is the plain model's own choice."""
    loaded = request.getfixturevalue(fixture)
    outputs, runner = generate_all(loaded, graphs=True, max_tokens=8, stagger=False)
    assert runner.graphed_steps >= 8 - 1, (
        f"{runner.graphed_steps} decode steps through the graphs' path")
    lengths = [8, *(8 - 2 * i for i in range(len(PROMPTS) - 1))]
    assert [len(o) for o in outputs] == lengths, f"sessions ended early: {outputs}"
    total = reference_choices(loaded, outputs)
    assert total.same == total.positions == sum(lengths), (
        f"{fixture}: the engine's float32 tokens are the reference's choice at {total.same} of "
        f"{total.positions} positions: {total.as_dict()}")


def test_the_reference_check_sees_tokens_it_would_not_choose(tiny):
    right, _ = generate_all(tiny, graphs=False, max_tokens=8, stagger=False)
    wrong = [[(t + 1) % tiny.vocab_limit for t in tokens] for tokens in right]
    assert reference_choices(tiny, right).agreement == 1.0
    checked = reference_choices(tiny, wrong)
    assert checked.same == 0 and checked.agreement_near_ties < 0.5, checked.as_dict()
