"""GET /metrics: Prometheus' text format. vLLM's names where they fit
(lmx:num_requests_running, lmx:time_to_first_token_seconds,
lmx:generation_tokens_total, ...), and lmx's own: each device's memory book
from admission (cap, leased, foreign, free bytes, leases, waiters), the
workers by state, and prefix reuse. Pure: counters in, text out."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import kvstore_pb2 as kpb
from services.front.reuse import ReuseStats

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STATES = {apb.WORKER_STATE_WAITING: "waiting", apb.WORKER_STATE_LOADING: "loading",
          apb.WORKER_STATE_READY: "ready", apb.WORKER_STATE_STOPPING: "stopping",
          apb.WORKER_STATE_ASLEEP: "asleep"}


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class FrontMetrics:
    running: int = 0
    requests: dict[tuple[str, int], int] = field(default_factory=dict)   # (endpoint, status)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    tool_calls: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)
    #: From admission's Watch since the front started: parks, restores,
    #: sleeps, wakes; reclaims asked and overdue; leases granted and expired.
    events: dict[str, int] = field(default_factory=dict)

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def saw(self, event: apb.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "activity":
            kind = apb.WorkerActivity.Kind.Name(event.activity.kind).removeprefix(
                "KIND_").lower()
        if kind:
            self.events[kind] = self.events.get(kind, 0) + 1


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


def render(front: FrontMetrics, reuse: ReuseStats, status: apb.StatusResponse | None,
           kvstore: kpb.GetStoreStatusResponse | None = None) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{_labels(**labels)} {value:g}")

    def histogram(name: str, help_text: str, hist: Histogram) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(BUCKETS, hist.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {hist.n}')
        out.append(f"{name}_sum {hist.total:g}")
        out.append(f"{name}_count {hist.n}")

    metric("lmx:num_requests_running", "gauge", "Requests the front is serving now.",
           [({}, front.running)])
    metric("lmx:requests_total", "counter", "Requests answered, by endpoint and HTTP status.",
           [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(front.requests.items())])
    metric("lmx:prompt_tokens_total", "counter",
           "Prompt tokens the workers computed (reused ones not counted).",
           [({}, front.prompt_tokens)])
    metric("lmx:generation_tokens_total", "counter", "Tokens generated.",
           [({}, front.generation_tokens)])
    metric("lmx:tool_calls_total", "counter", "Tool calls read from answers.",
           [({}, front.tool_calls)])
    histogram("lmx:time_to_first_token_seconds", "From the request to its first token.",
              front.ttft)
    histogram("lmx:e2e_request_latency_seconds", "From the request to its last token.",
              front.e2e)
    metric("lmx:prefix_cache_queries_total", "counter",
           "Requests looked up for a session holding a prefix of them.",
           [({}, reuse.hits + reuse.misses)])
    metric("lmx:prefix_cache_hits_total", "counter",
           "Requests sent to a session holding a prefix of them.", [({}, reuse.hits)])
    metric("lmx:prefix_reused_tokens_total", "counter",
           "Context tokens the workers kept instead of computing them again.",
           [({}, reuse.reused_tokens)])
    for name, kind, help_text in (
            ("lmx:sessions_parked_total", "session_parked", "Sessions whose KV went to the kvstore."),
            ("lmx:sessions_restored_total", "session_restored", "Sessions restored from it."),
            ("lmx:models_asleep_total", "model_asleep", "Models put to sleep (weights to host)."),
            ("lmx:models_awake_total", "model_awake", "Models woken."),
            ("lmx:reclaims_requested_total", "reclaim_requested", "Holders asked for memory."),
            ("lmx:reclaims_overdue_total", "reclaim_overdue", "Asks not answered in time."),
            ("lmx:leases_granted_total", "granted", "Leases granted."),
            ("lmx:leases_expired_total", "expired", "Leases expired (holders gone silent).")):
        metric(name, "counter", help_text + " Since the front started.",
               [({}, front.events.get(kind, 0))])
    if kvstore is not None:
        for name, attr, help_text in (
                ("lmx:kvstore_capacity_bytes", "capacity_bytes", "The kvstore's shared memory."),
                ("lmx:kvstore_used_bytes", "used_bytes", "Parked KV held in shared memory."),
                ("lmx:kvstore_spilled_bytes", "spilled_bytes", "Parked KV spilled to disk."),
                ("lmx:kvstore_entries", "num_entries", "Parked contexts held.")):
            metric(name, "gauge", help_text, [({}, getattr(kvstore, attr))])
    if status is None:
        return "\n".join(out) + "\n"
    devices = list(status.devices)
    for name, attr, help_text in (
            ("lmx:device_total_bytes", "total_bytes", "The device's memory."),
            ("lmx:device_cap_bytes", "cap_bytes", "What admission lets leases use (cap)."),
            ("lmx:device_foreign_bytes", "foreign_bytes", "Used by processes holding no lease."),
            ("lmx:device_leased_bytes", "leased_bytes", "Granted to leases."),
            ("lmx:device_free_bytes", "free_bytes", "Budget less leased."),
            ("lmx:device_leases", "num_leases", "Leases held."),
            ("lmx:num_requests_waiting", "num_waiting", "Memory requests queued in admission.")):
        metric(name, "gauge", help_text, [({"device": d.device}, getattr(d, attr))
                                          for d in devices])
    by_purpose: dict[tuple[str, str], int] = {}
    for lease in status.leases:
        key = (lease.device, apb.Purpose.Name(lease.purpose).removeprefix("PURPOSE_").lower())
        by_purpose[key] = by_purpose.get(key, 0) + lease.bytes
    metric("lmx:leased_bytes", "gauge", "Leased bytes by device and purpose.",
           [({"device": d, "purpose": p}, b) for (d, p), b in sorted(by_purpose.items())])
    workers: dict[tuple[str, str], int] = {}
    parked = 0
    for worker in status.workers:
        key = (worker.model, STATES.get(worker.state, "unknown"))
        workers[key] = workers.get(key, 0) + 1
        parked += worker.num_parked
    metric("lmx:workers", "gauge", "Workers by model and state.",
           [({"model": m, "state": s}, n) for (m, s), n in sorted(workers.items())])
    metric("lmx:worker_steps_out_of_memory_total", "counter",
           "Forward steps that ran out of device memory (each a bug: lmx plans every step's "
           "memory; the step was split and run again, or ended only its request).",
           [({"worker": w.worker_id, "model": w.model}, w.steps_out_of_memory)
            for w in status.workers])
    metric("lmx:parked_sessions", "gauge", "Sessions whose KV is parked in the kvstore.",
           [({}, parked)])
    metric("lmx:reclaims_open", "gauge", "Reclaims asked and not answered yet.",
           [({}, sum(1 for r in status.reclaims if r.state != "answered"))])
    return "\n".join(out) + "\n"
