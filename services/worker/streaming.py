"""Layer streaming: run a model whose weights do not all fit its lease. Some
decoder layers stay resident on the device; the others live in host memory
(pinned on a GPU host, one flat buffer per layer) and are copied, before they
run, into a small ring of device buffers, each the size of one layer.

The schedule: the n-th streamed-layer execution (counting across forward
passes) runs from ring slot n % K. Once execution n is done, slot n % K is
refilled with the layer of execution n + K, on a side stream, while the next
layers compute; before execution n runs, the compute stream waits for its
copy. So with K >= 2 each copy overlaps the computation of the layers before
it. A layer's parameters are re-pointed (`param.data`) at its slot's views
just before it runs: every decoder layer has the same shapes, so one set of
views per slot serves all of them. A layer's tensors are kept as bytes, each
at an aligned offset of one flat buffer, so layers of mixed dtypes
(quantized matrices beside 16-bit norms, services/worker/quantize.py) stream
the same way.

On the CPU the same code runs with plain copies (the "device" is host
memory too), so CI tests the mechanics and the exactness.

Pure torch, no gRPC; `services/worker/app.py` builds one when the worker is
told a resident fraction below 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from services.worker.models import weights_moved
from services.worker.shared_weights import SharedHostWeights, weights_key

log = structlog.get_logger(__name__)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no model.layers to stream")
    return layers


def stream_order(num_layers: int) -> list[int]:
    """The order in which layers are streamed as less of the model stays
    resident: spread out (the middle layer first, then the quarters, ... a
    van der Corput sequence), so that at any share the streamed layers lie
    between resident ones and each copy overlaps resident layers' compute,
    instead of the last layers streaming back to back while the link idles
    during the resident ones. The first and last layers come late."""
    order: list[int] = []
    seen: set[int] = set()
    i = 1
    while len(order) < num_layers and i < 64 * max(1, num_layers):
        v, denom, k = 0.0, 1.0, i
        while k:
            denom *= 2
            v += (k & 1) / denom
            k >>= 1
        index = min(num_layers - 1, int(v * num_layers))
        if index not in seen:
            seen.add(index)
            order.append(index)
        i += 1
    return order + [x for x in range(num_layers) if x not in seen]


def streamed_indices(num_layers: int, resident_fraction: float) -> list[int]:
    """Which layers stream (sorted) so that a fraction f keeps
    round(f * num_layers) layers resident: the first ones of stream_order."""
    if not 0.0 < resident_fraction <= 1.0:
        raise ValueError(f"resident fraction must be in (0, 1], got {resident_fraction}")
    resident = max(0, min(num_layers, round(resident_fraction * num_layers)))
    return sorted(stream_order(num_layers)[:num_layers - resident])


#: Each tensor of a flat layer buffer starts at a multiple of this.
ALIGN = 256


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class StreamingInfo:
    num_layers: int
    streamed: int                 # layers in host memory
    ring_slots: int
    layer_bytes: int              # one decoder layer's weights
    host_bytes: int               # the streamed layers' weights in host memory
    ring_bytes: int               # the ring on the device

    @property
    def resident_fraction(self) -> float:
        return (self.num_layers - self.streamed) / self.num_layers


class LayerStreamer:
    """Streams `streamed` decoder layers of `model` (already loaded) through a
    ring of `ring_slots` device buffers. Call `attach()` once; `detach()`
    brings every layer back to the device (if memory allows) and removes the
    hooks."""

    def __init__(self, model: torch.nn.Module, device: torch.device, streamed: list[int],
                 ring_slots: int = 2, share_as: str | None = None,
                 shm_dir: Path = Path("/dev/shm")):
        self.model = model
        self.device = device
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.layers = [layers[i] for i in streamed]
        self.streamed = list(streamed)
        self.count = len(self.layers)
        #: The ring's size asked for; fewer slots while fewer layers stream.
        self.ring_slots = max(1, ring_slots)
        self.slots = min(self.ring_slots, self.count)
        self.ring: list[torch.Tensor] = []
        self.views: list[list[torch.Tensor]] = []
        self.host: list[torch.Tensor] = []     # per streamed layer: its flat host copy
        self.cuda = device.type == "cuda"
        self._hooks: list = []
        self._n = 0                    # streamed-layer executions so far
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._copied: list = []        # per slot: event of its last copy
        self._used: list = []          # per slot: event of its last use
        self.copy_seconds = 0.0        # CPU only: time spent copying
        self.copied_bytes = 0
        #: Where the host copies live: with `share_as` (the model's name), one
        #: shared-memory file in `shm_dir` that the workers of this model
        #: share (services/worker/shared_weights.py); else private memory.
        self.share_as = share_as
        self.shm_dir = Path(shm_dir)
        self.shared: SharedHostWeights | None = None
        self.shared_mapped = False     # True: another worker had written them
        self._registered: torch.Tensor | None = None
        # With nothing streamed yet the plan is one layer's (all alike): the
        # size a ring slot would have if memory ran short (`stream_more`).
        self._plan(self.layers or [layers[0]])

    # ---- set-up ----
    def _plan(self, layers: list[torch.nn.Module]) -> None:
        """Where each of a layer's tensors lies in its flat buffer (all the
        streamed layers alike)."""
        first = layers[0]
        signature = [(p.shape, p.dtype) for _, p in first.named_parameters()]
        for layer in layers[1:]:
            if [(p.shape, p.dtype) for _, p in layer.named_parameters()] != signature:
                raise ValueError("streamed layers differ in shape or dtype; cannot share a ring")
        self.shapes = [shape for shape, _ in signature]
        self.dtypes = [dtype for _, dtype in signature]
        self.nbytes = [int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
                       for shape, dtype in signature]
        self.offsets, offset = [], 0
        for nbytes in self.nbytes:
            self.offsets.append(offset)
            offset = _aligned(offset + nbytes)
        self.layer_bytes = offset
        #: The layer's tensors, for the shared file's key.
        self.layout = ",".join(f"{str(d).removeprefix('torch.')}{list(s)}"
                               for s, d in signature)

    def info(self) -> StreamingInfo:
        return StreamingInfo(self.num_layers, self.count, self.slots,
                             self.layer_bytes if self.count else 0,
                             self.count * self.layer_bytes, self.slots * self.layer_bytes)

    def more_frees(self, num_layers: int) -> int:
        """Device bytes that `stream_more(num_layers)` gives back: the layers'
        weights, less a new ring when none streams yet."""
        moving = min(num_layers, self.num_layers - self.count)
        ring = 0 if self.count else min(self.ring_slots, moving)
        return (moving - ring) * self.layer_bytes

    def attach(self) -> None:
        """Move the streamed layers' weights to host memory (their device
        copies are freed), make the ring, hook the layers."""
        if not self.count:
            return
        filled = False
        if self.share_as:
            self.shared = SharedHostWeights(
                weights_key(self.share_as, self.layout, self.streamed, self.layer_bytes),
                self.count * self.layer_bytes, self.shm_dir)
            try:
                buffer, filled = self.shared.open()
                whole = torch.frombuffer(buffer, dtype=torch.uint8)
            except OSError as exc:
                log.warning("shared_weights_unavailable", error=str(exc),
                            effect="this worker keeps its own host copy")
                self.shared = None
        if self.shared is None:
            whole = torch.empty(self.count * self.layer_bytes, dtype=torch.uint8, device="cpu",
                                pin_memory=self.cuda)
        elif self.cuda:
            # cudaHostRegisterPortable: the mapping becomes pinned memory.
            error = int(torch.cuda.cudart().cudaHostRegister(
                whole.data_ptr(), whole.numel() * whole.element_size(), 1))
            if error:
                log.warning("shared_weights_pin_failed", cuda_error=error,
                            effect="streamed copies run at pageable speed")
            else:
                self._registered = whole
        self.shared_mapped = filled
        self.host = [whole[i * self.layer_bytes:(i + 1) * self.layer_bytes]
                     for i in range(self.count)]
        if not filled:
            for layer, flat in zip(self.layers, self.host):
                self._to_flat(layer, flat)
            if self.shared is not None:
                self.shared.publish()
        self._make_ring()               # the streamed layers' device copies go
        if self.cuda:
            torch.cuda.empty_cache()
        self._restart()
        info = self.info()
        log.info("layers_streamed", layers=self.num_layers, streamed=self.count,
                 ring_slots=self.slots, layer_bytes=self.layer_bytes, host_bytes=info.host_bytes,
                 resident_fraction=round(info.resident_fraction, 3))

    def _restart(self) -> None:
        """The streamed set changed (or is new): hook its layers and start
        the schedule again from its first layer."""
        self._hook_layers()
        self._n = 0
        self._prefetch()

    def _hook_layers(self) -> None:
        weights_moved(self.model)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for index, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre(index)))
            self._hooks.append(layer.register_forward_hook(self._make_post(index)))

    def make_resident(self, num_layers: int) -> int:
        """Bring the first `num_layers` streamed layers back to the device
        for good (memory freed up: the lease grew). Call between forward
        passes. Returns how many moved."""
        moving = max(0, min(num_layers, self.count))
        if not moving:
            return 0
        self._sync()
        # The ones streamed last (by stream_order) come back first.
        rank = {index: r for r, index in enumerate(stream_order(self.num_layers))}
        back = set(sorted(self.streamed, key=lambda i: rank[i], reverse=True)[:moving])
        kept = []
        for index, layer, flat in zip(self.streamed, self.layers, self.host):
            if index in back:
                self._from_flat(layer, flat)
            else:
                kept.append((index, layer, flat))
        self.streamed = [index for index, _, _ in kept]
        self.layers = [layer for _, layer, _ in kept]
        self.host = [flat for _, _, flat in kept]
        self.count -= moving
        weights_moved(self.model)
        if not self.count:
            for hook in self._hooks:
                hook.remove()
            self._hooks, self.ring, self.views = [], [], []
            self.slots = 0
        else:
            if self.slots > self.count:
                self.slots = self.count
                self.ring, self.views = self.ring[:self.slots], self.views[:self.slots]
                self._copied, self._used = self._copied[:self.slots], self._used[:self.slots]
            self._restart()
        if self.cuda:
            torch.cuda.empty_cache()
        log.info("layers_made_resident", moved=moving, still_streamed=self.count,
                 resident_fraction=round(self.info().resident_fraction, 3))
        return moving

    def stream_more(self, num_layers: int) -> int:
        """Stream `num_layers` more layers (memory is short: the lease will
        shrink): the next resident ones in stream_order go to host memory
        (private buffers, pinned on CUDA) and their device copies are freed.
        A streamer with nothing streamed yet (a resident model) makes its
        ring once those copies are freed (`more_frees` counts it). Not while
        the model sleeps (its ring released). Call between forward passes.
        Returns how many moved."""
        if self.count and not self.ring:
            return 0
        layers = decoder_layers(self.model)
        streamed = set(self.streamed)
        indices = [i for i in stream_order(self.num_layers) if i not in streamed][:num_layers]
        moving = len(indices)
        if not moving:
            return 0
        self._sync()
        starting = not self.count
        if starting:
            self._plan([layers[i] for i in indices])
        added = []
        for index in indices:
            layer = layers[index]
            flat = torch.empty(self.layer_bytes, dtype=torch.uint8, device="cpu",
                               pin_memory=self.cuda)
            self._to_flat(layer, flat)
            if starting:                  # no ring yet: its device copy goes now
                for param in layer.parameters():
                    param.data = torch.empty(0, dtype=param.dtype, device=self.device)
            else:
                self._bind(layer, 0)      # its own device copy goes
            added.append((index, layer, flat))
        merged = sorted([*zip(self.streamed, self.layers, self.host), *added],
                        key=lambda item: item[0])
        self.streamed = [index for index, _, _ in merged]
        self.layers = [layer for _, layer, _ in merged]
        self.host = [flat for _, _, flat in merged]
        self.count += moving
        if starting:
            if self.cuda:
                torch.cuda.empty_cache()  # the layers' memory is the ring's now
            self.slots = min(self.ring_slots, self.count)
            self._make_ring()
        self._restart()
        if self.cuda:
            torch.cuda.empty_cache()
        log.info("layers_streamed_more", moved=moving, streamed=self.count,
                 resident_fraction=round(self.info().resident_fraction, 3))
        return moving

    def streamed_parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def release_ring(self) -> None:
        """Free the ring (the model sleeps): the streamed layers' parameters
        point at nothing until `restore_ring`."""
        if not self.count:
            return
        self._sync()
        for param in self.streamed_parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        weights_moved(self.model)
        self.ring, self.views = [], []
        if self.cuda:
            torch.cuda.empty_cache()

    def restore_ring(self) -> None:
        """The ring again (the model wakes), filled for the next pass."""
        if not self.count or self.ring:
            return
        self._make_ring()
        weights_moved(self.model)
        self._n = 0
        self._prefetch()

    def detach(self) -> None:
        """Every layer resident again (device memory for all of them is
        needed), hooks removed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        weights_moved(self.model)
        if not self.count:
            return
        self._sync()
        for layer, flat in zip(self.layers, self.host):
            self._from_flat(layer, flat)
        self.ring = []
        self.views = []
        self.close()

    def close(self) -> None:
        """Let go of the host copies (the shared file is removed by the last
        worker to close it)."""
        self._sync()
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered.data_ptr())
            self._registered = None
        self.host = []
        if self.shared is not None:
            self.shared.close()

    def _to_flat(self, layer: torch.nn.Module, flat: torch.Tensor) -> None:
        """A layer's parameters, in order, into one flat host buffer (bytes)."""
        for param, offset, nbytes in zip(layer.parameters(), self.offsets, self.nbytes):
            flat[offset:offset + nbytes].copy_(param.detach().reshape(-1).view(torch.uint8))

    def _typed(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat buffer as the layer's tensors."""
        return [flat[offset:offset + nbytes].view(dtype).view(shape)
                for offset, nbytes, dtype, shape
                in zip(self.offsets, self.nbytes, self.dtypes, self.shapes)]

    def _from_flat(self, layer: torch.nn.Module, flat: torch.Tensor) -> None:
        """A layer's parameters back on the device, each its own tensor."""
        for param, view in zip(layer.parameters(), self._typed(flat)):
            param.data = view.to(self.device, copy=True)

    def _make_ring(self) -> None:
        """The ring's device buffers, their views and events; every streamed
        layer pointed at slot 0's views (so that nothing else holds its
        weights on the device)."""
        self.ring = [torch.empty(self.layer_bytes, dtype=torch.uint8, device=self.device)
                     for _ in range(self.slots)]
        self.views = [self._views(slot) for slot in self.ring]
        for layer in self.layers:
            self._bind(layer, 0)
        if self.cuda:
            self._copied = [torch.cuda.Event() for _ in range(self.slots)]
            self._used = [torch.cuda.Event() for _ in range(self.slots)]

    def _views(self, slot: torch.Tensor) -> list[torch.Tensor]:
        return self._typed(slot)

    def _bind(self, layer: torch.nn.Module, slot: int) -> None:
        for param, view in zip(layer.parameters(), self.views[slot]):
            param.data = view

    # ---- the schedule ----
    def _copy(self, execution: int) -> None:
        """Fill slot execution % K with the layer of that execution."""
        slot = execution % self.slots
        index = execution % self.count
        if self.cuda:
            stream = self._copy_stream
            stream.wait_event(self._used[slot])
            with torch.cuda.stream(stream):
                self.ring[slot].copy_(self.host[index], non_blocking=True)
                self._copied[slot].record(stream)
        else:
            started = time.perf_counter()
            self.ring[slot].copy_(self.host[index])
            self.copy_seconds += time.perf_counter() - started
        self.copied_bytes += self.layer_bytes

    def _prefetch(self) -> None:
        for execution in range(self._n, self._n + self.slots):
            self._copy(execution)

    def _make_pre(self, index: int):
        def pre(module, args):
            if self._n % self.count != index:
                self._resync(index)
            slot = self._n % self.slots
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
            self._bind(module, slot)
        return pre

    def _make_post(self, index: int):
        def post(module, args, output):
            slot = self._n % self.slots
            if self.cuda:
                self._used[slot].record(torch.cuda.current_stream(self.device))
            self._n += 1
            self._copy(self._n - 1 + self.slots)
        return post

    def _resync(self, index: int) -> None:
        """A forward pass stopped half-way (an exception) and the schedule
        is off: wait for the copies, restart it at this layer."""
        log.warning("layer_stream_resync", expected=self._n % self.count, got=index)
        self._sync()
        self._n = index
        self._prefetch()

    def _sync(self) -> None:
        if self.cuda and self._copy_stream is not None:
            self._copy_stream.synchronize()
