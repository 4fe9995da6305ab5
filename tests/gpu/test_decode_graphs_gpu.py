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


def float32_reference(shape: str, cache):
    """The worker's own bfloat16 weights of `shape` (load_model's seed),
    upcast to float32, as bench/worker.py's reference. Built in float32 the
    reference had the same weights while the layers were drawn on the CPU
    (to 6783507); since 1c5b21b they are drawn on the device, and on an H100
    a check against that read 0% for llama-1b eager, graphed and compiled
    alike (8d96686)."""
    from services.worker.models import build_synthetic, model_config

    config, _ = model_config(f"synthetic:{shape}", cache)
    return build_synthetic(config, torch.device("cuda"), torch.bfloat16, 0).float()


@pytest.mark.timeout(300)     # the compiled case compiles its step (tens of seconds)
@pytest.mark.parametrize("compile", [True, False])
def test_graphed_decode_in_bfloat16_agrees_with_eager(cache, compile, record_property):
    """Graphed (and compiled) bfloat16 steps against eager ones: where a
    prompt's tokens first part, the two tokens are a near tie of the float32
    reference of the same weights (random weights leave many; after the
    parting the sessions decode different texts). Until 526ad81 this asked
    that the first four tokens be the same: compiled, llama-1b parted at the
    4th and 2nd token of two prompts while the compiled tokens were the
    reference's choice, or a near tie, at >= 99% of positions (H100)."""
    from services.worker.models import load_model
    from services.worker.quality import NEAR_TIE_NATS, log_probs

    loaded = load_model("synthetic:llama-1b", cache=cache, device=torch.device("cuda"),
                        dtype=torch.bfloat16)
    eager, _ = generate(loaded, graphs=False)
    graphed, runner = generate(loaded, graphs=True, compile=compile)
    assert runner.graphs.broken is None
    assert runner.graphs.forward.on is compile, runner.graphs.forward.broken
    vocab_limit = loaded.vocab_limit
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    del loaded, runner
    torch.cuda.empty_cache()
    same = sum(a == b for e, g in zip(eager, graphed) for a, b in zip(e, g))
    total = sum(len(e) for e in eager)
    partings = []
    reference = None
    for index, (prompt, e, g) in enumerate(zip(prompts, eager, graphed)):
        at = next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), None)
        if at is None:
            continue
        if reference is None:
            reference = float32_reference("llama-1b", cache)
        with torch.inference_mode():
            row = log_probs(reference, prompt + e[:at + 1], torch.device("cuda"))[-1, :vocab_limit]
        top = row.max().item()
        partings.append({"prompt": index, "token": at,
                         "eager_gap_nats": round(top - row[e[at]].item(), 4),
                         "graphed_gap_nats": round(top - row[g[at]].item(), 4)})
    record_property("agreement", f"{same}/{total}")
    record_property("partings", str(partings))
    print(f"bf16 compile={compile}: {same}/{total} tokens as eager; partings {partings}")
    far = [p for p in partings
           if max(p["eager_gap_nats"], p["graphed_gap_nats"]) > NEAR_TIE_NATS]
    assert not far, (f"compile={compile}: {same}/{total} tokens as eager; where these prompts' "
                     f"tokens part, one of the two is more than {NEAR_TIE_NATS} nats below the "
                     f"float32 reference's choice: {far}")


#: The shapes of the three architectures the worker serves, at sizes where
#: random weights give logits that are not flat (smollm2-135m's repeat the
#: input token): issue 21's check of the decode path against the same
#: weights in float32.
REFERENCE_SHAPES = ["llama-1b", "qwen2.5-1.5b", "gemma3-1b"]


@pytest.mark.timeout(300)     # compiling gemma3-1b's step took 126 s once (H100, 526ad81)
@pytest.mark.parametrize("shape, mode", [(shape, "compiled") for shape in REFERENCE_SHAPES]
                         + [("llama-1b", "graphed"), ("llama-1b", "eager")])
def test_graphed_bfloat16_decode_chooses_the_float32_references_tokens(cache, shape, mode,
                                                                         record_property):
    """The worker's greedy tokens (bfloat16, graphed decode steps, paged
    Triton kernels), teacher-forced through a float32 copy of the same
    weights with PyTorch's own attention: at least 99% its choices,
    counting near ties (services/worker/quality.py). `mode`: the worker's
    own (graphed steps, compiled), graphed but not compiled, or eager: where
    a drop comes from."""
    from services.worker.models import load_model
    from services.worker.quality import Choices, choices

    device = torch.device("cuda")
    loaded = load_model(f"synthetic:{shape}", cache=cache, device=device, dtype=torch.bfloat16)
    graphed, runner = generate(loaded, graphs=mode != "eager", compile=mode == "compiled")
    if mode != "eager":
        assert runner.graphs.broken is None and runner.graphed_steps > 10, runner.graphs.broken
        assert runner.graphs.forward.on is (mode == "compiled"), runner.graphs.forward.broken
    if mode == "compiled":   # the compile's seconds and phases, and the cache's hits
        from services.worker.compiled_decode import compile_report

        record_property("compile", str({"seconds": round(runner.graphs.forward.seconds, 1),
                                        **compile_report()}))
    vocab_limit = loaded.vocab_limit
    prompts = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    del loaded, runner
    torch.cuda.empty_cache()
    reference = float32_reference(shape, cache)
    total = Choices(0, 0, 0)
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, graphed):
            total += choices(reference, prompt, tokens, device, vocab_limit)
    print(f"{shape}: {total.as_dict()}")
    record_property("choices", str(total.as_dict()))
    assert total.positions >= 100 and total.agreement_near_ties >= 0.99, (
        f"{shape} ({mode}): the worker's bfloat16 tokens are the float32 "
        f"reference's choice at "
        f"{total.agreement:.1%} of {total.positions} positions, {total.agreement_near_ties:.1%} "
        "counting near ties (at least 99% expected)")
