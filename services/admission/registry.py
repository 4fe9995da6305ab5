"""Which worker serves which model where: workers register (and re-register
as a heartbeat), clients look a model's workers up. An entry not refreshed
within its TTL is dropped, so a dead worker disappears by itself.

A worker that registers with a secret owns its id while its entry lives:
registering again, unregistering and reporting its activity need the same
secret (secret_book.py). Once the entry is gone (unregistered, expired) the
id is free again."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from services.admission import limits
from services.admission.secret_book import SecretBook
from services.common.errors import InvalidArgument, NotFound
from services.common.units import parse_address

log = structlog.get_logger(__name__)

WORKER_STATES = ("waiting", "loading", "ready", "asleep", "stopping")


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    worker_id: str
    model: str
    address: str
    state: str
    pid: int
    device: str
    num_sessions: int
    ttl_s: float
    updated_at: float
    num_parked: int = 0
    resident_fraction: float = 1.0     # below 1: streaming the other layers
    steps_out_of_memory: int = 0       # the worker's steps that ran out of memory (bugs)
    weights: str = ""                  # "bfloat16", "int4-g128": how its layers are held


class WorkerRegistry:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_ttl_s: float = 3600.0):
        self.clock = clock
        self.max_ttl_s = max_ttl_s
        self._workers: dict[str, WorkerRecord] = {}
        self.secrets = SecretBook("worker", "registered")

    def register(self, worker_id: str, model: str, address: str, state: str, *, pid: int = 0,
                 device: str = "", num_sessions: int = 0, ttl_s: float = 10.0,
                 num_parked: int = 0, resident_fraction: float = 1.0,
                 steps_out_of_memory: int = 0, weights: str = "",
                 secret: str = "") -> WorkerRecord:
        for name, value in (("worker.worker_id", worker_id), ("worker.model", model),
                            ("worker.address", address)):
            limits.check_name(name, value)
        limits.check_name("worker.device", device, required=False)
        limits.check_name("worker.weights", weights, required=False)
        try:
            parse_address(address)
        except ValueError as exc:
            raise InvalidArgument("worker.address", str(exc)) from None
        if state not in WORKER_STATES:
            raise InvalidArgument("worker.state", f"must be one of {', '.join(WORKER_STATES)}")
        if not 0 < ttl_s <= self.max_ttl_s:
            raise InvalidArgument("ttl_ms", f"must be in (0, {self.max_ttl_s * 1000:.0f}]")
        for name, value in (("worker.num_sessions", num_sessions), ("worker.pid", pid),
                            ("worker.steps_out_of_memory", steps_out_of_memory),
                            ("worker.num_parked", num_parked)):
            if value < 0:
                raise InvalidArgument(name, f"must not be negative, got {value}")
        if num_parked > num_sessions:
            raise InvalidArgument("worker.num_parked", f"{num_parked} parked of {num_sessions} "
                                                       "sessions: at most num_sessions")
        if not 0.0 <= resident_fraction <= 1.0:   # 0: not said (an older worker): all
            raise InvalidArgument("worker.resident_fraction", "must be in [0, 1]")
        self.secrets.validate(secret)
        self.expire_due()
        previous = self._workers.get(worker_id)
        if previous is not None:
            self.secrets.check(worker_id, secret)
        else:   # a new entry: its secret (if any) owns the id from now on
            self.secrets.forget(worker_id)
            self.secrets.remember(worker_id, secret)
        record = WorkerRecord(worker_id, model, address, state, pid, device, num_sessions, ttl_s,
                              self.clock(), num_parked, resident_fraction or 1.0,
                              steps_out_of_memory, weights)
        self._workers[worker_id] = record
        if previous is None or previous.state != state:
            log.info("worker_registered", worker_id=worker_id, model=model, address=address,
                     state=state, device=device)
        return record

    def unregister(self, worker_id: str, secret: str = "") -> WorkerRecord:
        self.expire_due()
        if worker_id not in self._workers:
            raise NotFound("worker", worker_id, "it unregistered or its registration expired")
        self.secrets.check(worker_id, secret)
        record = self._workers.pop(worker_id)
        self.secrets.forget(worker_id)
        log.info("worker_unregistered", worker_id=worker_id, model=record.model)
        return record

    def expire_due(self) -> list[WorkerRecord]:
        now = self.clock()
        due = [r for r in self._workers.values() if r.updated_at + r.ttl_s <= now]
        for record in due:
            del self._workers[record.worker_id]
            self.secrets.forget(record.worker_id)
            log.warning("worker_registration_expired", worker_id=record.worker_id,
                        model=record.model, address=record.address)
        return due

    def check(self, worker_id: str, secret: str) -> None:
        """PermissionDenied if `worker_id` is registered with another secret
        (a report in its name from someone else)."""
        self.expire_due()
        self.secrets.check(worker_id, secret)

    def workers(self, model: str = "") -> list[WorkerRecord]:
        self.expire_due()
        return sorted((r for r in self._workers.values() if not model or r.model == model),
                      key=lambda r: (r.model, r.worker_id))
