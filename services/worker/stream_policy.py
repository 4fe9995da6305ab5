"""When a worker with --resident-fraction auto streams its layers to make room
for other models, and when it takes turns whole (sleeps) instead.

A streamed layer crosses the host link on every step. A decode step reads
the W bytes of a model's weights from device memory (time W / memory
bandwidth); streaming S of them adds S / link bandwidth. The copy hides
behind the compute only while S / W stays under link / memory bandwidth:
1.5% on an H100 (PCIe 5, about 50 GB/s, against 3.35 TB/s), 3-6% on the
8 GB cards of PCIe 3-4 and GDDR6 (12-25 GB/s against 256-448 GB/s). Past it
every token waits for the link. Measured on an H100 at an 8 GiB cap
(docs/benchmarks.md, 2026-12-07): three 16-bit models that each streamed
nearly all their layers to make room for one another decoded at 3-9% of
their speed alone. Sleeping instead costs the whole model's copy once per
wake (3.1-3.4 GB at 46-49 GB/s there, 0.07 s), paid once per turn of many
tokens, not once per token.

So a worker whose model fits the device alone streams at most `max_share` of
its layers (--stream-max-share) to make room; asked for more it sleeps, and
the models take turns whole. At start, when what is free now holds less than
that, it asks for all of its layers: its lease waits while admission asks the
other holders for memory. A model that does not fit the device alone streams
what it must: streaming is then its only way to run.

Pure: no torch, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

#: --stream-max-share's default: about what a decode step's compute hides on
#: common cards (above).
DEFAULT_MAX_SHARE = 0.05


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    num_layers: int
    #: The largest share of the layers streamed to make room for others.
    max_share: float
    #: Whether the model with every layer resident (and the rest of its base
    #: lease) fits what the device's leases may add up to.
    fits_alone: bool

    @property
    def max_streamed(self) -> int:
        """The most layers streamed to make room, for a model that fits alone."""
        if not self.fits_alone:
            return self.num_layers
        return min(self.num_layers, int(self.max_share * self.num_layers + 1e-9))

    def may_stream(self, streamed: int) -> bool:
        """Whether `streamed` layers streamed in all is within the policy."""
        return streamed <= self.max_streamed

    def start_layers(self, fitting: int) -> int:
        """The layers to start with resident, `fitting` being what fits the
        memory free now: those, when the rest streamed is within the policy;
        else all of them (the lease waits for the others to give memory back)."""
        fitting = max(0, min(fitting, self.num_layers))
        if self.may_stream(self.num_layers - fitting):
            return fitting
        return self.num_layers

    @classmethod
    def for_model(cls, num_layers: int, max_share: float, whole_bytes: int,
                  budget_bytes: int) -> StreamPolicy:
        """`whole_bytes`: the base lease with every layer resident;
        `budget_bytes`: what the device's leases may add up to (admission's
        budget, or --budget without one)."""
        return cls(num_layers, max_share, whole_bytes <= budget_bytes)
