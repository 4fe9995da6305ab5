"""Graphed decode steps on a real GPU: the CUDA graphs are captured and
replayed, and the Triton kernels compiled; the step's forward pass compiled
by torch.compile as the worker runs it (--compile-decode auto), and not.
The same generations with and without them, in float32 (exact) and in
bfloat16 (agreement rate, and a float32 reference's choices).

Run on a CUDA host with `pytest -m gpu tests/gpu`. Skipped without a GPU.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
           "def fibonacci(n):", "1, 2, 3, 4,", "The history of the Roman Empire begins with"]


def generate(loaded, graphs: bool, max_tokens: int = 32, compile: bool = True,
             ahead: bool = False):
    from services.worker.engine import Delta, Engine, Finished
    from services.worker.memory import FixedMemory
    from services.worker.sampling import SamplingParams
    from services.worker.sessions import SessionTable

    async def main():
        engine = Engine(loaded, FixedMemory(8 << 30), decode_graphs=graphs, max_batch=8,
                        chunk_bytes=1 << 20, compile_decode=graphs and compile,
                        decode_ahead=ahead)
        engine.start()
        try:
            sessions = SessionTable()
            requests = [engine.submit(sessions.open(), SamplingParams(max_tokens=max_tokens - i),
                                      prompt=p) for i, p in enumerate(PROMPTS)]
            outs = []
            for request in requests:
                tokens = []
                while True:
                    event = await request.out.get()
                    if not isinstance(event, Delta):
                        assert isinstance(event, Finished), event
                        break
                    tokens.extend(event.token_ids)
                    engine.delivered(request, 1)
                outs.append(tokens)
            return outs, engine.runner
        finally:
            await engine.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def cache():
    from services.worker.models import converted_dir, default_cache_dir

    cache = default_cache_dir()
    converted_dir("smollm2-135m", cache)
    return cache


# Compiled where a compile is quick (two layers) and in the reference check
# below (the worker's path, three 16-28 layer shapes); smollm2-135m's 30
# layers as captured uncompiled (its architecture is llama-tiny's).
@pytest.mark.parametrize("shape,compile", [("llama-tiny", True), ("llama-tiny", False),
                                           ("gemma3-tiny", True), ("smollm2-135m", False)])
def test_graphed_decode_equals_eager_in_float32(cache, shape, compile):
    from services.worker.models import load_model

    loaded = load_model(f"synthetic:{shape}", cache=cache, device=torch.device("cuda"),
                        dtype=torch.float32)
    eager, _ = generate(loaded, graphs=False)
    graphed, runner = generate(loaded, graphs=True, compile=compile)
    assert runner.graphs.broken is None and runner.graphs.checked
    assert runner.graphs.num_graphs > 0 and runner.graphed_steps > 10
    assert runner.graphs.forward.on is compile, runner.graphs.forward.broken
    assert graphed == eager


def test_graphs_captured_after_another_engines_graphs_were_freed(cache):
    """Graphs captured in a process where other graphs were captured,
    destroyed and their memory given back to the driver (as a worker's are
    at a sleep, a move of its weights or a limit, then captured again). On
    an H100 (2026-12-07, f831fde, torch 2.11) the second engine's first
    capture raised an illegal memory access, every time the first engine's
    graphs had been collected and the allocator's cache emptied before it
    (bench/diag_graph_fault.py GC=1), never when they were still alive."""
    import gc

    from services.worker.models import load_model

    first = load_model("synthetic:llama-tiny", cache=cache, device=torch.device("cuda"),
                       dtype=torch.float32)
    _, runner = generate(first, graphs=True, compile=False)
    assert runner.graphs.num_graphs > 0
    del first, runner
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    loaded = load_model("synthetic:smollm2-135m", cache=cache, device=torch.device("cuda"),
                        dtype=torch.float32)
    eager, _ = generate(loaded, graphs=False)
    graphed, runner = generate(loaded, graphs=True, compile=False)
    assert runner.graphs.broken is None and runner.graphed_steps > 10
    assert graphed == eager


def test_decode_steps_launched_ahead_give_the_same_tokens(cache):
    """Decoding ahead (decode_ahead.py) on real graphs, pinned buffers and
    events: float32, so every token must be the one-step-at-a-time one."""
    from services.worker.models import load_model

    loaded = load_model("synthetic:llama-tiny", cache=cache, device=torch.device("cuda"),
                        dtype=torch.float32)
    one_at_a_time, _ = generate(loaded, graphs=True, compile=False)
    ahead, runner = generate(loaded, graphs=True, compile=False, ahead=True)
    assert runner.graphs.broken is None
    assert runner.ahead_steps > 10, runner.ahead_steps
    assert ahead == one_at_a_time


@pytest.mark.parametrize("compile", [True, False])
def test_graphed_decode_in_bfloat16_agrees_with_eager(cache, compile):
    from services.worker.models import load_model

    loaded = load_model("synthetic:llama-1b", cache=cache, device=torch.device("cuda"),
                        dtype=torch.bfloat16)
    eager, _ = generate(loaded, graphs=False)
    graphed, runner = generate(loaded, graphs=True, compile=compile)
    assert runner.graphs.broken is None
    same = sum(a == b for e, g in zip(eager, graphed) for a, b in zip(e, g))
    total = sum(len(e) for e in eager)
    # bf16: the first tokens agree; a near-tie may send a session elsewhere later.
    first = [e[:4] == g[:4] for e, g in zip(eager, graphed)]
    assert all(first), (f"compile={compile}: {same}/{total} tokens the same; the first four "
                        f"differ for prompts {[i for i, ok in enumerate(first) if not ok]}: "
                        f"eager {[e[:6] for e in eager]} graphed {[g[:6] for g in graphed]}")
    print(f"bf16 agreement: {same}/{total}")


#: The shapes of the three architectures the worker serves, at sizes where
#: random weights give logits that are not flat (smollm2-135m's repeat the
#: input token): issue 21's check of the decode path against the same
#: weights in float32.
REFERENCE_SHAPES = ["llama-1b", "qwen2.5-1.5b", "gemma3-1b"]


@pytest.mark.parametrize("shape, mode", [(shape, "compiled") for shape in REFERENCE_SHAPES]
                         + [("llama-1b", "graphed"), ("llama-1b", "eager")])
def test_graphed_bfloat16_decode_chooses_the_float32_references_tokens(cache, shape, mode):
    """The worker's greedy tokens (bfloat16, graphed decode steps, paged
    Triton kernels), teacher-forced through a float32 copy of the same
    weights with PyTorch's own attention: at least 99% its choices,
    counting near ties (services/worker/quality.py). `mode`: the worker's
    own (graphed steps, compiled), graphed but not compiled, or eager: where
    a drop comes from."""
    from services.worker.models import build_synthetic, load_model, model_config
    from services.worker.quality import Choices, choices

    device = torch.device("cuda")
    loaded = load_model(f"synthetic:{shape}", cache=cache, device=device, dtype=torch.bfloat16)
    graphed, runner = generate(loaded, graphs=mode != "eager", compile=mode == "compiled")
    if mode != "eager":
        assert runner.graphs.broken is None and runner.graphed_steps > 10, runner.graphs.broken
        assert runner.graphs.forward.on is (mode == "compiled"), runner.graphs.forward.broken
    vocab_limit = loaded.vocab_limit
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    del loaded, runner
    torch.cuda.empty_cache()
    config, _ = model_config(f"synthetic:{shape}", cache)
    # The worker's own bfloat16 weights (load_model's seed), upcast, as
    # bench/worker.py's reference. Built in float32 the reference had the same
    # weights while the layers were drawn on the CPU (to 6783507, where this
    # passed); since 1c5b21b they are drawn on the device, and on an H100 the
    # check read 0% for llama-1b eager, graphed and compiled alike (8d96686).
    reference = build_synthetic(config, device, torch.bfloat16, 0).float()
    total = Choices(0, 0, 0)
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, graphed):
            total += choices(reference, prompt, tokens, device, vocab_limit)
    print(f"{shape}: {total.as_dict()}")
    assert total.positions >= 100 and total.agreement_near_ties >= 0.99, (
        f"{shape} ({mode}): the worker's bfloat16 tokens are the float32 "
        f"reference's choice at "
        f"{total.agreement:.1%} of {total.positions} positions, {total.agreement_near_ties:.1%} "
        "counting near ties (at least 99% expected)")
