"""Which of admission's devices a worker takes, when it is not told
(--admission-device) and may choose (--device auto or cuda, or a CPU worker
against several simulated devices). Pure: no gRPC, no torch.

The policy, best fit: among the devices whose free bytes hold what the
worker needs to start (its resident weights, its CUDA context, its workspace
and one KV chunk), the one with the fewest free bytes, so that the larger
holes stay for larger models; ties go to the lower id. If none has room
now, the device with the most free bytes: the worker waits in its queue
there, and admission asks that device's holders to make room."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    device: str        # admission's id: "gpu:1", "cpu:0"
    free_bytes: int    # budget less leases, now
    uuid: str = ""     # NVML UUID, "" for a simulated device


def place(need_bytes: int, candidates: Sequence[Candidate]) -> Candidate:
    if not candidates:
        raise ValueError("no device to place on")
    fitting = [c for c in candidates if c.free_bytes >= need_bytes]
    if fitting:
        return min(fitting, key=lambda c: (c.free_bytes, c.device))
    return max(sorted(candidates, key=lambda c: c.device), key=lambda c: c.free_bytes)
