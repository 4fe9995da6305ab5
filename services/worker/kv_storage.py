"""The KV pool's tensors: one pair (K, V) of tensors per chunk, each
[num_layers, slots_per_chunk, num_kv_heads, head_dim]. A global slot s lives
in chunk s // slots_per_chunk at s % slots_per_chunk. Chunks are allocated
and freed one at a time, in step with the KV lease."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True, slots=True)
class SlotGroups:
    """Slots split by chunk: for each chunk touched, the local slots and the
    positions (in the caller's flat order) they belong to; positions None
    means all of them, in order (the common case of a single chunk).

    Built from Python ints, so that planning a step needs no device sync."""

    groups: tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...]

    @classmethod
    def build(cls, slots: Sequence[int] | torch.Tensor, slots_per_chunk: int,
              device: torch.device | None = None) -> SlotGroups:
        if isinstance(slots, torch.Tensor):
            device = device or slots.device
            slots = slots.tolist()
        device = device or torch.device("cpu")
        if len(slots) > 256:   # a whole context (parking): vectorised
            return cls._build_many(slots, slots_per_chunk, device)
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for position, slot in enumerate(slots):
            chunk, local = divmod(slot, slots_per_chunk)
            entry = by_chunk.setdefault(chunk, ([], []))
            entry[0].append(local)
            entry[1].append(position)
        if len(by_chunk) == 1:
            (chunk, (local, _)), = by_chunk.items()
            return cls(((chunk, torch.tensor(local, dtype=torch.long, device=device), None),))
        return cls(tuple((chunk, torch.tensor(local, dtype=torch.long, device=device),
                          torch.tensor(positions, dtype=torch.long, device=device))
                         for chunk, (local, positions) in sorted(by_chunk.items())))

    @classmethod
    def _build_many(cls, slots: Sequence[int], slots_per_chunk: int,
                    device: torch.device) -> SlotGroups:
        flat = np.asarray(slots, dtype=np.int64)
        chunks, local = np.divmod(flat, slots_per_chunk)
        present = np.unique(chunks)
        if len(present) == 1:
            return cls(((int(present[0]), torch.from_numpy(local).to(device), None),))
        groups = []
        for chunk in present.tolist():
            positions = np.flatnonzero(chunks == chunk)
            groups.append((chunk, torch.from_numpy(local[positions]).to(device),
                           torch.from_numpy(positions).to(device)))
        return cls(tuple(groups))


class KVStorage:
    def __init__(self, shape: KVShape, slots_per_chunk: int, device: torch.device):
        self.shape = shape
        self.slots_per_chunk = slots_per_chunk
        self.device = device
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        #: Bumped whenever the chunks change (their addresses, for decode graphs).
        self.version = 0

    @property
    def chunk_bytes(self) -> int:
        return self.slots_per_chunk * self.shape.bytes_per_token

    @property
    def num_chunks(self) -> int:
        return len(self._k)

    @property
    def num_bytes(self) -> int:
        return self.num_chunks * self.chunk_bytes

    def add_chunk(self) -> None:
        dims = (self.shape.num_layers, self.slots_per_chunk, self.shape.num_kv_heads,
                self.shape.head_dim)
        self._k.append(torch.zeros(dims, dtype=self.shape.dtype, device=self.device))
        self._v.append(torch.zeros(dims, dtype=self.shape.dtype, device=self.device))
        self.version += 1

    def chunk_addresses(self, kv: int) -> list[int]:
        """The device addresses of the chunks' K (kv=0) or V (kv=1) tensors,
        in chunk order (the kernels' address tables)."""
        return [t.data_ptr() for t in (self._k if kv == 0 else self._v)]

    def remove_chunks(self, count: int) -> None:
        for _ in range(count):
            self._k.pop()
            self._v.pop()
        self.version += 1

    def write(self, layer: int, groups: SlotGroups, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [num_tokens, kv_heads, head_dim] for the grouped slots."""
        for chunk, local, positions in groups.groups:
            if positions is not None:
                key_part, value_part = key.index_select(0, positions), value.index_select(0, positions)
            else:
                key_part, value_part = key, value
            self._k[chunk][layer].index_copy_(0, local, key_part)
            self._v[chunk][layer].index_copy_(0, local, value_part)

    def gather(self, layer: int, groups: SlotGroups, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at the grouped slots: [num, kv_heads, head_dim] each."""
        if len(groups.groups) == 1:
            chunk, local, _ = groups.groups[0]
            return (self._k[chunk][layer].index_select(0, local),
                    self._v[chunk][layer].index_select(0, local))
        dims = (num, self.shape.num_kv_heads, self.shape.head_dim)
        key = torch.empty(dims, dtype=self.shape.dtype, device=self.device)
        value = torch.empty(dims, dtype=self.shape.dtype, device=self.device)
        for chunk, local, positions in groups.groups:
            key.index_copy_(0, positions, self._k[chunk][layer].index_select(0, local))
            value.index_copy_(0, positions, self._v[chunk][layer].index_select(0, local))
        return key, value

    def gather_layers(self, kv: int, first: int, last: int, groups: SlotGroups,
                      num: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """K (kv=0) or V (kv=1) of layers [first, last) at the grouped slots:
        one contiguous [last - first, num, kv_heads, head_dim] tensor (`out`
        if given)."""
        chunks = self._k if kv == 0 else self._v
        if out is None:
            out = torch.empty((last - first, num, self.shape.num_kv_heads, self.shape.head_dim),
                              dtype=self.shape.dtype, device=self.device)
        if len(groups.groups) == 1:
            chunk, local, _ = groups.groups[0]
            return torch.index_select(chunks[chunk][first:last], 1, local, out=out)
        for chunk, local, positions in groups.groups:
            out.index_copy_(1, positions, chunks[chunk][first:last].index_select(1, local))
        return out

    def write_layers(self, kv: int, first: int, last: int, groups: SlotGroups,
                     data: torch.Tensor) -> None:
        """The inverse of gather_layers: data [last - first, n, kv_heads, head_dim]."""
        chunks = self._k if kv == 0 else self._v
        for chunk, local, positions in groups.groups:
            part = data if positions is None else data.index_select(1, positions)
            chunks[chunk][first:last].index_copy_(1, local, part)

    def read_tokens(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers' K and V at these slots: [num_layers, n, kv_heads, head_dim]
        (parking a context, tests)."""
        groups = SlotGroups.build(slots.tolist(), self.slots_per_chunk, self.device)
        keys, values = zip(*(self.gather(layer, groups, slots.numel())
                             for layer in range(self.shape.num_layers)))
        return torch.stack(keys), torch.stack(values)
