"""Decoding ahead: the next decode step is launched before the host has read
this one's tokens, so that the device computes it while the host reads,
streams and checks those (SGLang's overlap scheduler, vLLM's asynchronous
scheduling do the same).

A graphed greedy decode step computes its rows' tokens on the device (the
graph's own argmax, decode_graphs.py). The step after it needs, per row, one
more KV slot, which the host can reserve without the token, and the token
itself, which the graph takes from the previous step's choices on the
device (`DecodeGraphs.run(feed=...)`). So the engine launches step N+1, then
reads step N's tokens (its own event: N+1 goes on), then hands them out;
meanwhile N+1 runs. Without it, the device waited for the host between any
two steps: on an H100 a compiled Llama-1B decode step took 1.5 ms of device
time and 2.05 ms as the runner saw it (docs/benchmarks.md).

What may run ahead (the engine asks `continuing` after each launch):
  - plain greedy rows only (no sampling, penalty or grammar: their tokens
    are the graph's argmax), of a step that replays a captured, checked
    graph;
  - only while nothing else is to be scheduled: no prompt waiting, no pause
    asked, the memory lease fresh, every running generation in the step
    (none starves);
  - not a row whose generation ends at step N by length (max_tokens or the
    context): that is known before its token.
A row whose generation ends at step N otherwise (an end-of-sequence token, a
stop string, a cancel) was computed once more for nothing: its token is
dropped. Its KV is right all the same: step N+1 wrote the KV of step N's
token, which the session keeps (its next turn starts after it); a cancelled
generation's context is cut back to what its caller received, as always.

Pure Python: the engine owns the loop (engine.Engine._decode_ahead).
"""

from __future__ import annotations

def enabled(setting: str, graphs: bool) -> bool:
    """`auto`: wherever decode steps are graphed."""
    return setting == "auto" and graphs


def plain_greedy(row) -> bool:
    """A generation (engine Request) or a step's row (runner StepItem) whose
    token is its logits' argmax: greedy, no penalty, no constraint
    (sampling.sample would do nothing more)."""
    params = row.params
    return params.greedy and not params.penalised and row.constraint is None


def continuing(batch: list, max_context: int) -> list[int]:
    """The rows of a launched step (engine Requests, its token not read)
    whose next step may be launched now: plain greedy, not ended, and not
    ending by length with this step's token."""
    return [row for row, request in enumerate(batch)
            if not request.done and plain_greedy(request)
            and len(request.generated) + 1 < request.params.max_tokens
            and len(request.session.tokens) + 1 < max_context]
