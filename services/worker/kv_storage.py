"""The KV pool's tensors: one pair (K, V) of tensors per chunk, each
[num_layers, slots_per_chunk, num_kv_heads, head_dim]. A global slot s lives
in chunk s // slots_per_chunk at s % slots_per_chunk. Chunks are allocated
and freed one at a time, in step with the KV lease."""

from __future__ import annotations

from dataclasses import dataclass

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
    positions (in the caller's flat order) they belong to."""

    groups: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]  # (chunk, local, positions)

    @classmethod
    def build(cls, slots: torch.Tensor, slots_per_chunk: int) -> SlotGroups:
        chunk_of = torch.div(slots, slots_per_chunk, rounding_mode="floor")
        local = slots - chunk_of * slots_per_chunk
        chunks = torch.unique(chunk_of).tolist()
        if len(chunks) == 1:
            positions = torch.arange(slots.numel(), device=slots.device)
            return cls(((chunks[0], local, positions),))
        groups = []
        for chunk in chunks:
            positions = torch.nonzero(chunk_of == chunk).flatten()
            groups.append((chunk, local[positions], positions))
        return cls(tuple(groups))


class KVStorage:
    def __init__(self, shape: KVShape, slots_per_chunk: int, device: torch.device):
        self.shape = shape
        self.slots_per_chunk = slots_per_chunk
        self.device = device
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []

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

    def remove_chunks(self, count: int) -> None:
        for _ in range(count):
            self._k.pop()
            self._v.pop()

    def write(self, layer: int, groups: SlotGroups, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [num_tokens, kv_heads, head_dim] for the grouped slots."""
        for chunk, local, positions in groups.groups:
            self._k[chunk][layer].index_copy_(0, local, key.index_select(0, positions))
            self._v[chunk][layer].index_copy_(0, local, value.index_select(0, positions))

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

    def read_tokens(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers' K and V at these slots: [num_layers, n, kv_heads, head_dim]
        (parking a context, tests)."""
        groups = SlotGroups.build(slots.to(self.device), self.slots_per_chunk)
        keys, values = zip(*(self.gather(layer, groups, slots.numel())
                             for layer in range(self.shape.num_layers)))
        return torch.stack(keys), torch.stack(values)
