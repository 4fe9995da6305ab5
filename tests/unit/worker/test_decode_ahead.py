"""Decoding ahead (services/worker/decode_ahead.py) on the CPU, through the
static-buffer graphs (decode_graphs.py without the capture): each greedy
decode step launched before the last one's tokens are read, its rows' tokens
taken from the last step's choices on the device. The tokens must be those
of one step at a time, token for token, with generations joining (the run of
steps stops for their prompts), ending by length, by a stop string or by a
cancel in the middle of it, and weights that move; and a session's next turn
must find its context as it would without it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.worker import decode_ahead
from services.worker.engine import Finished
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable

from test_decode_graphs import few_parts, generate_all  # noqa: F401 (fixture)
from test_engine import PROMPTS, collect, run, take, tokens_of  # noqa: E402 (same directory)
from test_paged_kernels import needs_triton_interpreter  # noqa: E402

pytestmark = needs_triton_interpreter


def test_steps_launched_ahead_give_the_tokens_of_one_step_at_a_time(tiny):
    eager, _ = generate_all(tiny, graphs=False)
    ahead, runner = generate_all(tiny, graphs=True, ahead=True)
    assert ahead == eager
    assert runner.ahead_steps > 5, runner.ahead_steps
    assert runner.ahead_steps < runner.graphed_steps, "prompts joining stop the run of steps"
    moved, runner = generate_all(tiny, graphs=True, ahead=True, move_weights_after=4)
    assert moved == eager
    assert runner.graphs._version >= 1


def test_penalised_rows_are_not_run_ahead(tiny):
    """Their tokens are sampled (sampling.sample), not the graph's argmax: one step
    at a time (sampled rows likewise: test_which_rows_run_ahead)."""
    eager, _ = generate_all(tiny, graphs=False, max_tokens=10, stagger=False, penalty=2.0)
    graphed, runner = generate_all(tiny, graphs=True, max_tokens=10, stagger=False, penalty=2.0,
                                   ahead=True)
    assert graphed == eager
    assert runner.ahead_steps == 0


def two_turns(loaded, *, ahead: bool, stop: str | None = None, cancel_after: int | None = None):
    """Two generations alongside, then a second turn of the first session:
    the first turn may end by a stop string or be cancelled mid-run."""
    async def scenario(engine):
        sessions = SessionTable()
        session, other = sessions.open(), sessions.open()
        first = engine.submit(session, SamplingParams(max_tokens=14,
                                                      stop=[stop] if stop else []),
                              prompt=PROMPTS[1])
        second = engine.submit(other, SamplingParams(max_tokens=20), prompt=PROMPTS[2])
        if cancel_after is None:
            one, two = await collect(engine, first), await collect(engine, second)
            assert isinstance(one[1], Finished) and isinstance(two[1], Finished)
        else:
            one = (await take(engine, first, cancel_after), None)
            engine.cancel(first)
            two = await collect(engine, second)
        # The next turn of the first session: its context must be what it was.
        third = engine.submit(session, SamplingParams(max_tokens=8), prompt=" and then")
        three = await collect(engine, third)
        assert isinstance(three[1], Finished), three[1]
        return ([tokens_of(one[0]), tokens_of(two[0]), tokens_of(three[0])],
                "".join(d.text for d in one[0]), engine.runner)

    return run(loaded, scenario, decode_graphs=True, decode_ahead=ahead, max_batch=8,
               timeout=300)


def test_a_stop_string_or_a_cancel_in_a_run_of_steps_leaves_the_context_right(tiny):
    plain, text, _ = two_turns(tiny, ahead=False)
    assert len(text) > 12
    stop = text[len(text) // 2: len(text) // 2 + 3]       # ends the first turn mid-run
    want, _, _ = two_turns(tiny, ahead=False, stop=stop)
    got, _, runner = two_turns(tiny, ahead=True, stop=stop)
    assert got == want and len(got[0]) < len(plain[0])
    assert runner.ahead_steps > 0
    want, _, _ = two_turns(tiny, ahead=False, cancel_after=4)
    got, _, runner = two_turns(tiny, ahead=True, cancel_after=4)
    assert got == want
    assert runner.ahead_steps > 0


def test_between_steps_waits_for_the_steps_launched_ahead(tiny):
    """What runs between steps (weights moving, graphs captured) runs with
    no step launched ahead still in flight, and the run of steps stops for
    it rather than making it wait for the generations to end."""
    async def scenario(engine):
        request = engine.submit(SessionTable().open(), SamplingParams(max_tokens=40),
                                prompt=PROMPTS[0])
        while engine.runner.ahead_steps < 3:
            event = await request.out.get()
            engine.delivered(request, len(event.token_ids))
        seen = []
        await engine.between_steps(lambda: seen.append(
            (engine._chain.done(), request.done, engine.runner.ahead_steps)))
        deltas, end = await collect(engine, request)
        assert isinstance(end, Finished)
        stats = engine.stats()     # what GetStatus reports (steps_graphed, steps_ahead)
        assert (stats.steps_graphed, stats.steps_ahead) == (engine.runner.graphed_steps,
                                                           engine.runner.ahead_steps)
        return seen[0], engine.runner.ahead_steps

    (chain_done, ended, ahead_then), ahead_after = run(
        tiny, scenario, decode_graphs=True, decode_ahead=True, max_batch=8, timeout=300)
    assert chain_done and not ended, "it ran between two runs of steps, mid-generation"
    assert ahead_after > ahead_then, "steps ran ahead again after it"


def request(done=False, greedy=True, penalised=False, constraint=None, generated=0,
            max_tokens=10, tokens=5):
    return SimpleNamespace(done=done, constraint=constraint, generated=[0] * generated,
                           params=SimpleNamespace(greedy=greedy, penalised=penalised,
                                                  max_tokens=max_tokens),
                           session=SimpleNamespace(tokens=[0] * tokens))


@pytest.mark.parametrize("make, continues", [
    (lambda: request(), True),
    (lambda: request(done=True), False),
    (lambda: request(greedy=False), False),
    (lambda: request(penalised=True), False),
    (lambda: request(constraint=object()), False),
    (lambda: request(generated=8, max_tokens=10), True),     # its token now is the 9th
    (lambda: request(generated=9, max_tokens=10), False),    # ... the 10th: it ends with it
    (lambda: request(tokens=62), True),
    (lambda: request(tokens=63), False),                     # the context's last position
])
def test_which_rows_run_ahead(make, continues):
    assert decode_ahead.continuing([request(), make()], max_context=64) == \
        ([0, 1] if continues else [0])
