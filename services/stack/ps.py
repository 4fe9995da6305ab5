"""`lmx ps` as text: like `ollama ps`, for the whole GPU. Per device its
memory book (total, cap, foreign, leased, free); per worker its model, state,
how its weights are held (the dtype, int8 or int4), lease, sessions (active
and parked) and when its lease was last renewed. All from one admission
Status call."""

from __future__ import annotations

from lmx.v1 import admission_pb2 as pb
from services.admission.table import _table
from services.common.units import format_bytes


def worker_state(info: pb.WorkerInfo) -> str:
    state = pb.WorkerState.Name(info.state).removeprefix("WORKER_STATE_").lower()
    if 0.0 < info.resident_fraction < 1.0:
        state += f" (streaming, {info.resident_fraction:.0%} resident)"
    return state


def render_ps(status: pb.StatusResponse) -> str:
    lines = _table(
        ["DEVICE", "NAME", "TOTAL", "CAP", "FOREIGN", "LEASED", "FREE", "WAITING"],
        [[d.device, d.name, format_bytes(d.total_bytes),
          f"{format_bytes(d.cap_bytes)} ({d.cap_fraction:.0%})", format_bytes(d.foreign_bytes),
          format_bytes(d.leased_bytes), format_bytes(d.free_bytes), str(d.num_waiting)]
         for d in status.devices])
    lines.append("")
    if not status.workers:
        lines.append("no workers (lmx up starts the stack)")
        return "\n".join(lines)
    rows = []
    for worker in sorted(status.workers, key=lambda w: (w.device, w.model, w.worker_id)):
        leases = [lease for lease in status.leases
                  if lease.holder.pid == worker.pid and lease.device == worker.device
                  and lease.holder.name == f"worker/{worker.model}"]
        leased = sum(lease.bytes for lease in leases)
        renewed = (f"{min(lease.since_renewal_s for lease in leases):.1f}s ago"
                   if leases else "-")
        active = worker.num_sessions - worker.num_parked
        rows.append([worker.model, worker_state(worker), worker.weights or "-", worker.device,
                     format_bytes(leased),
                     str(active), str(worker.num_parked), renewed, worker.address])
    lines += _table(["MODEL", "STATE", "WEIGHTS", "DEVICE", "LEASE", "ACTIVE", "PARKED",
                     "RENEWED", "ADDRESS"], rows)
    return "\n".join(lines)
