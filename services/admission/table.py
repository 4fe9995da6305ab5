"""`lmx status` as text: who holds the GPU, like `ollama ps` for the device."""

from __future__ import annotations

from lmx.v1 import admission_pb2 as pb
from services.common.units import format_bytes

PURPOSE_NAMES = {pb.PURPOSE_WEIGHTS: "weights", pb.PURPOSE_KV: "kv",
                 pb.PURPOSE_WORKSPACE: "workspace", pb.PURPOSE_OTHER: "other"}


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def render_status(status: pb.StatusResponse) -> str:
    lines = _table(
        ["DEVICE", "NAME", "TOTAL", "CAP", "FOREIGN", "LEASED", "FREE", "LEASES", "WAITING"],
        [[d.device, d.name, format_bytes(d.total_bytes),
          f"{format_bytes(d.cap_bytes)} ({d.cap_fraction:.0%})", format_bytes(d.foreign_bytes),
          format_bytes(d.leased_bytes), format_bytes(d.free_bytes), str(d.num_leases),
          str(d.num_waiting)] for d in status.devices])
    lines.append("")
    if status.leases:
        lines += _table(
            ["LEASE", "HOLDER", "PID", "PURPOSE", "DEVICE", "BYTES", "AGE", "RENEWED", "EXPIRES IN"],
            [[lease.lease_id, lease.holder.name, str(lease.holder.pid),
              PURPOSE_NAMES.get(lease.purpose, "?"), lease.device, format_bytes(lease.bytes),
              f"{lease.age_s:.1f}s", f"{lease.since_renewal_s:.1f}s ago",
              f"{lease.expires_in_ms / 1000:.1f}s"] for lease in status.leases])
    else:
        lines.append("no leases")
    if status.workers:
        lines.append("")
        lines += _table(
            ["WORKER", "MODEL", "ADDRESS", "STATE", "DEVICE", "SESSIONS", "PARKED", "SEEN"],
            [[w.worker_id, w.model, w.address,
              pb.WorkerState.Name(w.state).removeprefix("WORKER_STATE_").lower(), w.device,
              str(w.num_sessions), str(w.num_parked), f"{w.updated_s_ago:.1f}s ago"]
             for w in status.workers])
    if status.waiters:
        lines.append("")
        lines += _table(
            ["QUEUE", "HOLDER", "PURPOSE", "DEVICE", "BYTES", "PRIORITY", "WAITED", "FOR"],
            [[str(i + 1), w.holder.name, PURPOSE_NAMES.get(w.purpose, "?"), w.device or "any",
              format_bytes(w.bytes), str(w.priority), f"{w.waited_s:.1f}s",
              f"resize {w.lease_id}" if w.lease_id else "new lease"]
             for i, w in enumerate(status.waiters)])
    if status.reclaims:
        lines.append("")
        lines += _table(
            ["RECLAIM", "FROM", "PURPOSE", "BYTES", "FOR", "STATE", "FREED", "DETAIL"],
            [[r.reclaim_id, r.lease.holder.name, PURPOSE_NAMES.get(r.lease.purpose, "?"),
              format_bytes(r.bytes), r.for_holder, r.state,
              format_bytes(r.freed_bytes) if r.state == "answered" else "", r.detail]
             for r in status.reclaims])
    return "\n".join(lines)


def render_event(event: pb.Event) -> str:
    kind = event.WhichOneof("kind")
    body = getattr(event, kind) if kind else None
    if kind in ("granted", "released", "expired", "resized"):
        lease = body.lease
        text = (f"{kind:<8} {lease.holder.name:<24} {PURPOSE_NAMES.get(lease.purpose, '?'):<9} "
                f"{format_bytes(lease.bytes):>10} on {lease.device}")
        if kind == "resized":
            text += f" (was {format_bytes(body.old_bytes)})"
        if kind == "granted" and body.waited_s > 0.001:
            text += f" after waiting {body.waited_s:.1f}s"
        return text
    if kind in ("queued", "left"):
        waiter = body.waiter
        text = (f"{kind:<8} {waiter.holder.name:<24} {PURPOSE_NAMES.get(waiter.purpose, '?'):<9} "
                f"{format_bytes(waiter.bytes):>10} on {waiter.device or 'any'}")
        if kind == "left":
            text += f" ({pb.WaiterLeft.Reason.Name(body.reason).removeprefix('REASON_').lower()})"
        return text
    if kind in ("reclaim_requested", "reclaim_answered", "reclaim_overdue"):
        r = body.reclaim
        verb = {"reclaim_requested": "reclaim", "reclaim_answered": "gave",
                "reclaim_overdue": "overdue"}[kind]
        text = (f"{verb:<8} {r.lease.holder.name:<24} {PURPOSE_NAMES.get(r.lease.purpose, '?'):<9} "
                f"{format_bytes(r.freed_bytes if kind == 'reclaim_answered' else r.bytes):>10} "
                f"for {r.for_holder}")
        if kind == "reclaim_answered":
            text += f" ({r.detail})"
        if kind == "reclaim_overdue":
            text += f" ({body.overdue_s:.1f}s past its deadline)"
        return text
    if kind == "activity":
        a = body
        what = pb.WorkerActivity.Kind.Name(a.kind).removeprefix("KIND_").lower()
        subject = f"session {a.session_id}" if a.session_id else f"model {a.model}"
        return (f"{what:<16} {a.worker_id}: {subject}, {format_bytes(a.bytes)} in "
                f"{a.seconds * 1000:.0f} ms ({a.reason})")
    return f"event {event.seq}"
