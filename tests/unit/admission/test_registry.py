"""The worker registry: entries expire unless renewed; a worker registered
with a secret owns its id while its entry lives."""

from __future__ import annotations

import pytest

from services.admission.registry import WorkerRegistry
from services.common.errors import InvalidArgument, NotFound, PermissionDenied


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def register(registry: WorkerRegistry, worker_id: str = "m@127.0.0.1:1", *, secret: str = "",
             state: str = "ready", ttl_s: float = 10.0, address: str = "127.0.0.1:1",
             model: str = "m", device: str = ""):
    return registry.register(worker_id, model, address, state, ttl_s=ttl_s, secret=secret,
                             device=device)


def test_a_registered_secret_is_needed_to_register_again_unregister_or_report():
    registry = WorkerRegistry(Clock())
    register(registry, secret="mine")
    assert "mine" not in repr(registry.secrets._hashes), "only the secret's hash is kept"
    for wrong in ("", "guess"):
        with pytest.raises(PermissionDenied):
            register(registry, secret=wrong, address="127.0.0.1:666")
        with pytest.raises(PermissionDenied):
            registry.unregister("m@127.0.0.1:1", wrong)
        with pytest.raises(PermissionDenied):
            registry.check("m@127.0.0.1:1", wrong)
    [record] = registry.workers()
    assert record.address == "127.0.0.1:1", "a refused registration changed the entry"
    register(registry, secret="mine", state="asleep")           # the owner's heartbeat
    registry.check("m@127.0.0.1:1", "mine")
    assert registry.workers()[0].state == "asleep"
    registry.unregister("m@127.0.0.1:1", "mine")
    assert not registry.workers() and not len(registry.secrets)
    register(registry, secret="another")                      # the id is free again
    registry.check("m@127.0.0.1:1", "another")


def test_an_expired_entry_frees_its_id_and_forgets_its_secret():
    clock = Clock()
    registry = WorkerRegistry(clock)
    register(registry, secret="mine", ttl_s=5)
    clock.now += 4
    register(registry, secret="mine", ttl_s=5)
    clock.now += 5.5
    assert not registry.workers() and not len(registry.secrets)
    register(registry, secret="new owner")
    with pytest.raises(PermissionDenied):
        registry.check("m@127.0.0.1:1", "mine")


def test_a_worker_registered_without_a_secret_stays_open():
    registry = WorkerRegistry(Clock())
    register(registry)
    register(registry, secret="late", state="loading")    # no claim on an open entry
    register(registry, state="ready")
    registry.check("m@127.0.0.1:1", "")
    registry.unregister("m@127.0.0.1:1")
    registry.check("unknown@127.0.0.1:2", "anything")      # nothing registered: nothing to check


def test_bad_registrations_are_refused_with_the_field():
    registry = WorkerRegistry(Clock())
    cases = [
        (dict(worker_id=""), "worker.worker_id"),
        (dict(address="nowhere"), "worker.address"),
        (dict(state="dancing"), "worker.state"),
        (dict(ttl_s=0), "ttl_ms"),
        (dict(secret="x" * 257), "secret"),
        (dict(device="x" * 257), "worker.device"),
        (dict(device="gpu\n0"), "worker.device"),
        (dict(model="m" * 257), "worker.model"),
    ]
    for change, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            register(registry, **change)
        assert caught.value.field == field, (change, caught.value)
    with pytest.raises(NotFound):
        registry.unregister("never@127.0.0.1:1")


def test_how_a_worker_holds_its_weights_is_kept_and_checked():
    registry = WorkerRegistry(Clock())
    registry.register("m@127.0.0.1:1", "m", "127.0.0.1:1", "ready", weights="int4-g128")
    assert registry.workers()[0].weights == "int4-g128"
    with pytest.raises(InvalidArgument) as caught:
        registry.register("n@127.0.0.1:2", "n", "127.0.0.1:2", "ready", weights="x" * 300)
    assert caught.value.field == "worker.weights"
    with pytest.raises(InvalidArgument):
        registry.register("n@127.0.0.1:2", "n", "127.0.0.1:2", "ready", weights="int4\n")
