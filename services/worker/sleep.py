"""A model's weights out of device memory and back: sleep and wake.

Sleep copies every parameter and buffer into one flat host buffer (pinned on
a GPU host, allocated once per process and kept, so that the next sleep does
not pin again) and frees the device copies; wake allocates one flat device
buffer, copies the host buffer into it in one transfer (pinned, so at PCIe
speed) and points every parameter and buffer at its slice. Tied weights
(one tensor under two names) are moved once.

Parameters do not change while the model serves, so the host buffer still
holds them after a wake: later sleeps copy only the buffers (small; a model
may keep state in them) and free the parameters' device copies, which
halves what a swap between models moves over the link. A new plan (more or
fewer layers streamed) or a new host buffer copies everything again.

On the CPU the device is host memory: sleeping keeps the tensors where they
are (there is nothing to free), and only the lease goes back; waking is then
free. Pure torch; called from a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import time
from dataclasses import dataclass

import structlog
import torch

from services.worker.models import weights_moved

log = structlog.get_logger(__name__)

ALIGN = 256   # bytes: every slice of the flat buffers starts on this boundary


@dataclass(frozen=True, slots=True)
class _Slot:
    module: torch.nn.Module
    name: str
    is_param: bool
    offset: int
    num_bytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Moved:
    num_bytes: int
    seconds: float


class WeightStash:
    def __init__(self, model: torch.nn.Module, device: torch.device, moves: bool | None = None,
                 skip: Iterable[torch.Tensor] = ()):
        self.model = model
        #: Tensors that are not moved (a streamed model's streamed layers:
        #: their weights are in host memory already, their device memory is
        #: the streamer's ring).
        self._skip = {id(t) for t in skip}
        self.device = device
        #: Whether sleeping really moves the tensors (on a CPU device only when
        #: asked, for tests of the mechanics).
        self.moves = device.type != "cpu" if moves is None else moves
        self.cuda = device.type == "cuda"
        self.asleep = False
        self._slots: list[_Slot] = []
        self._host: torch.Tensor | None = None
        self.num_bytes = 0
        #: Called first when the model goes to sleep: what else holds device
        #: memory for these weights lets it go (the decode graphs and their
        #: pool), so that the sleep gives back all but the lease it keeps.
        self.before_sleep: Callable[[], None] | None = None
        #: Whether the host buffer holds the parameters as they are on the
        #: device (since the last sleep's copy: they do not change).
        self._host_current = False

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Move none of `tensors` from now on (planned again at the next sleep)."""
        skip = {id(t) for t in tensors}
        if skip != self._skip:
            # Planned again at the next sleep; the host buffer is kept if
            # it is large enough (fewer tensors move when more layers stream).
            self._skip = skip
            self._slots, self.num_bytes = [], 0
            self._host_current = False

    def _plan(self) -> None:
        seen: dict[int, None] = {}
        offset = 0
        slots = []
        for module in self.model.modules():
            for name, tensor, is_param in (
                    [(n, p, True) for n, p in module.named_parameters(recurse=False)]
                    + [(n, b, False) for n, b in module.named_buffers(recurse=False)]):
                if tensor is None or id(tensor) in seen or id(tensor) in self._skip:
                    continue
                seen[id(tensor)] = None
                size = tensor.numel() * tensor.element_size()
                slots.append(_Slot(module, name, is_param, offset, size, tensor.dtype,
                                   tuple(tensor.shape)))
                offset += -(-size // ALIGN) * ALIGN
        self._slots = slots
        self.num_bytes = offset

    def prepare(self) -> float:
        """Allocate (and pin) the host buffer now, so that the first sleep is
        one copy at PCIe speed rather than seconds of pinning on the way to
        answering a reclaim. Returns the seconds it took (0 if done already
        or nothing moves)."""
        if not self.moves or (self._slots and self._host is not None):
            return 0.0
        started = time.perf_counter()
        if not self._slots:
            self._plan()
        if self._host is not None and self._host.numel() < self.num_bytes:
            self._host = None
        if self._host is None:
            self._host_current = False
            self._host = torch.empty(self.num_bytes, dtype=torch.uint8, pin_memory=self.cuda)
        seconds = time.perf_counter() - started
        log.info("stash_prepared", bytes=self.num_bytes, pinned=self.cuda,
                 seconds=round(seconds, 3))
        return seconds

    def sleep(self) -> Moved:
        """Weights to host memory, device copies freed."""
        if self.asleep:
            return Moved(0, 0.0)
        started = time.perf_counter()
        if not self.moves:
            self.asleep = True
            return Moved(0, time.perf_counter() - started)
        if self.before_sleep is not None:
            self.before_sleep()
        self.prepare()
        copied = self._copy_out(parameters=not self._host_current)
        self._host_current = True
        weights_moved(self.model)
        with torch.no_grad():
            for slot in self._slots:
                self._set(slot, torch.empty(0, dtype=slot.dtype, device=self.device))
        if self.cuda:
            # No reference to a weight may be left here: after a wake every
            # weight is a view of one buffer, and one view kept alive (a loop
            # variable) kept all of it reserved.
            torch.cuda.empty_cache()
        self.asleep = True
        moved = Moved(self.num_bytes, time.perf_counter() - started)
        log.info("model_asleep", bytes=moved.num_bytes, copied_bytes=copied,
                 seconds=round(moved.seconds, 4))
        return moved

    def _copy_out(self, parameters: bool) -> int:
        """Every buffer into the host buffer, and every parameter when asked
        (its own frame: no reference to a device tensor outlives it). The
        bytes copied."""
        assert self._host is not None
        copied = 0
        with torch.no_grad():
            for slot in self._slots:
                if slot.is_param and not parameters:
                    continue
                flat = self._get(slot).detach().reshape(-1).view(torch.uint8)
                self._host[slot.offset:slot.offset + slot.num_bytes].copy_(flat, non_blocking=True)
                copied += slot.num_bytes
        self._sync()
        return copied

    def wake(self) -> Moved:
        """Weights back on the device: one allocation, one copy."""
        if not self.asleep:
            return Moved(0, 0.0)
        started = time.perf_counter()
        if not self.moves:
            self.asleep = False
            return Moved(0, time.perf_counter() - started)
        assert self._host is not None
        flat = torch.empty(self.num_bytes, dtype=torch.uint8, device=self.device)
        flat.copy_(self._host[:self.num_bytes], non_blocking=True)
        with torch.no_grad():
            for slot in self._slots:
                piece = flat[slot.offset:slot.offset + slot.num_bytes]
                self._set(slot, piece.view(slot.dtype).view(slot.shape))
        weights_moved(self.model)
        self._sync()
        self.asleep = False
        moved = Moved(self.num_bytes, time.perf_counter() - started)
        log.info("model_awake", bytes=moved.num_bytes, seconds=round(moved.seconds, 4),
                 gb_s=round(moved.num_bytes / max(moved.seconds, 1e-9) / 1e9, 1))
        return moved

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _get(slot: _Slot) -> torch.Tensor:
        return getattr(slot.module, slot.name)

    @staticmethod
    def _set(slot: _Slot, tensor: torch.Tensor) -> None:
        current = getattr(slot.module, slot.name)
        if slot.is_param:
            current.data = tensor     # the same Parameter object: tied names follow
        else:
            slot.module._buffers[slot.name] = tensor


class StreamedStash:
    """A streamed model's sleep (services/worker/streaming.py): the resident
    weights go to host memory as WeightStash moves them, and the ring is
    freed (the streamed layers live in host memory already); waking makes
    the ring again and refills it."""

    def __init__(self, stash: WeightStash, streamer):
        self.stash = stash
        self.streamer = streamer

    @property
    def asleep(self) -> bool:
        return self.stash.asleep

    @property
    def moves(self) -> bool:
        return self.stash.moves

    def prepare(self) -> float:
        self.stash.exclude(self.streamer.streamed_parameters())
        return self.stash.prepare()

    def sleep(self) -> Moved:
        # Layers made resident since the last sleep move with the others now.
        self.stash.exclude(self.streamer.streamed_parameters())
        moved = self.stash.sleep()
        if self.stash.moves:
            self.streamer.release_ring()
        return moved

    def wake(self) -> Moved:
        if self.stash.moves:
            self.streamer.restore_ring()
        return self.stash.wake()
