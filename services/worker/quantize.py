"""Weight-only quantization of a model's decoder layers (--quantize), with
PyTorch's own kernels, the ones torchao's Int4WeightOnlyConfig and
Int8WeightOnlyConfig and gpt-fast call:

  int8  each output channel's weights as int8 with one scale (symmetric),
        converted to the activations' dtype inside the product and scaled
        after it (gpt-fast's WeightOnlyInt8Linear; torch.compile fuses the
        conversion into the product). Half the bytes of a 16-bit weight at
        rest; the conversion's transient is one matrix (`dequant_bytes`).
  int4  groups of `group_size` input weights as 4-bit integers with a scale
        and a zero point per group (asymmetric, tinygemm's convention:
        w = (q - 8) * scale + zero).
        CUDA, compute capability 8.0 or newer, bfloat16: the tinygemm kernel
        torch.ops.aten._weight_int4pack_mm on the tile-packed layout of
        _convert_weight_to_int4pack. Elsewhere (the CPU, an older card,
        float16, a shape tinygemm does not take): the nibbles are unpacked
        and de-quantized into the activations' dtype for each product
        ("dequant"), the same bytes at rest. PyTorch's CPU kernels
        (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) measured 35 to
        70 times slower than that for a prefill of 800 rows and 2 to 17
        times slower for one row on the CI's CPU (float32, no AMX; a
        1536 x 576 matrix), so the CPU de-quantizes too.

Every nn.Linear inside the decoder layers is replaced (attention
projections, MLP); embeddings, norms and the output head stay in the
model's dtype. The quantized tensors are Parameters (requires_grad off), so
whatever walks a model's parameters (layer streaming, sleep, the weight
count) sees their real bytes. A layer's packed layout belongs to the kernel
of the device it was packed for: it may rest in host memory (streaming,
sleep) but runs only there.

Pure torch, no gRPC. `plan_bytes` counts a quantized model's bytes on the
meta device for the lease and the weight plan before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker import device as devices
from services.worker.settings import GROUP_SIZES
from services.worker.settings import QUANTIZE_MODES as MODES

#: tinygemm's inner K tiles, largest first (K must be a multiple of 16 x it).
INNER_K_TILES = (8, 4, 2)


@dataclass(frozen=True)
class QuantSpec:
    mode: str = "none"
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"the int4 group size must be one of "
                             f"{', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def __str__(self) -> str:
        return f"int4-g{self.group_size}" if self.mode == "int4" else self.mode


def _group_for(in_features: int, wanted: int) -> int | None:
    """The largest group size up to `wanted` that divides the input width."""
    for size in sorted(GROUP_SIZES, reverse=True):
        if size <= wanted and in_features % size == 0:
            return size
    return None


def tinygemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether _weight_int4pack_mm runs here: bfloat16 on a card of compute
    capability 8.0 or newer."""
    return dtype == torch.bfloat16 and devices.modern(device)


def _int4_kernel(device: torch.device, dtype: torch.dtype, out_features: int,
                 in_features: int) -> tuple[str, int]:
    """(kernel, inner K tiles) for a matrix: "tinygemm" or "dequant"."""
    if tinygemm_supported(device, dtype) and out_features % 8 == 0:
        for tiles in INNER_K_TILES:
            if in_features % (tiles * 16) == 0:
                return "tinygemm", tiles
    return "dequant", 0


#: Quantizing works through a matrix this many elements at a time (rows
#: whole), so that its float32 transients stay near 64 MiB on the device.
BLOCK_ELEMENTS = 1 << 22


def _row_blocks(weight: torch.Tensor, device: torch.device):
    """The matrix's rows in blocks, each a float32 copy on `device`."""
    rows = max(1, BLOCK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield weight[start:start + rows].detach().to(device=device, dtype=torch.float32,
                                                     copy=True)


class Int8Linear(torch.nn.Module):
    """y = x W^T * scale (+ bias), W int8 per output channel."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device) -> Int8Linear:
        dtype = linear.weight.dtype
        qs, scales = [], []
        for w in _row_blocks(linear.weight, device):
            # The scale as it is kept (the dtype), so that each weight lands
            # within half a step of its value.
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(dtype).float()
            qs.append(torch.round(w.div_(scale[:, None])).clamp_(-128, 127).to(torch.int8))
            scales.append(scale.to(dtype))
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(torch.cat(qs), torch.cat(scales), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8"


class Int4Linear(torch.nn.Module):
    """y = x W^T (+ bias), W in 4-bit groups of `group_size` (see the module
    docstring for the kernels). `packed` is in the layout of `kernel`."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                 bias: torch.Tensor | None, out_features: int, in_features: int,
                 group_size: int, kernel: str):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.group_size, self.kernel = group_size, kernel
        self.packed = torch.nn.Parameter(packed, requires_grad=False)
        #: [in / group, out, 2]: each group's (scale, zero), tinygemm's layout.
        self.scales_and_zeros = torch.nn.Parameter(scales_and_zeros, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device,
                    group_size: int) -> Int4Linear | None:
        out_features, in_features = linear.weight.shape
        group = _group_for(in_features, group_size)
        if group is None:
            return None
        dtype = linear.weight.dtype
        kernel, tiles = _int4_kernel(device, dtype, out_features, in_features)
        nibbles, pairs = [], []
        for w in _row_blocks(linear.weight, device):
            rows = w.shape[0]
            grouped = w.view(-1, group)
            low, high = grouped.amin(dim=1, keepdim=True), grouped.amax(dim=1, keepdim=True)
            # Scales and zeros as kept (the dtype): w = (q - 8) * scale + zero.
            scales = ((high - low) / 15.0).clamp(min=1e-6).to(dtype).float()
            zeros = (low + scales * 8.0).to(dtype).float()
            q = grouped.sub_(zeros).div_(scales).add_(8.0).round_().clamp_(0, 15) \
                .to(torch.uint8).view(rows, in_features)
            nibbles.append(q[:, ::2] << 4 | q[:, 1::2])                 # [rows, in / 2]
            pairs.append(torch.stack([scales.view(rows, -1), zeros.view(rows, -1)], dim=2)
                         .to(dtype))
        nibbles = torch.cat(nibbles)
        scales_and_zeros = torch.cat(pairs).transpose(0, 1).contiguous()  # [groups, out, 2]
        if kernel == "tinygemm":
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
        else:
            packed = nibbles
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(packed, scales_and_zeros, bias, out_features, in_features, group, kernel)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` ("dequant" layout only)."""
        groups = self.in_features // self.group_size
        q = torch.stack([self.packed >> 4, self.packed & 0xF], dim=2) \
            .view(self.out_features, groups, self.group_size)
        sz = self.scales_and_zeros.transpose(0, 1).to(dtype)     # [out, groups, 2]
        w = q.to(dtype).sub_(8).mul_(sz[..., 0:1]).add_(sz[..., 1:2])
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(
                x.reshape(-1, shape[-1]), self.packed, self.group_size, self.scales_and_zeros)
            y = y.reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4, "
                f"group={self.group_size}, kernel={self.kernel}")


def _decoder_linears(model: torch.nn.Module):
    """(parent, attribute, linear) for every nn.Linear in the decoder layers."""
    from services.worker.streaming import decoder_layers

    for layer in decoder_layers(model):
        yield from _linears(layer)


def _linears(layer: torch.nn.Module):
    for parent in layer.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear:
                yield parent, name, child


@dataclass(frozen=True)
class Quantized:
    """What quantize_model did: matrices per kernel, those left as they
    were, and the bytes before and after."""
    kernels: dict[str, int]
    kept: int
    bytes_before: int
    bytes_after: int

    def __add__(self, other: Quantized) -> Quantized:
        kernels = dict(self.kernels)
        for kernel, count in other.kernels.items():
            kernels[kernel] = kernels.get(kernel, 0) + count
        return Quantized(kernels, self.kept + other.kept, self.bytes_before + other.bytes_before,
                         self.bytes_after + other.bytes_after)


def quantize_model(model: torch.nn.Module, spec: QuantSpec, device: torch.device,
                   place: torch.device | None = None) -> Quantized:
    """Replace the decoder layers' linear layers in place, one at a time (so
    a device holds at most one 16-bit matrix beyond the quantized ones): each
    is quantized and packed for `device`'s kernel, and its tensors are left
    on `place` (default `device`; host memory for layers that will stream)."""
    from services.worker.streaming import decoder_layers

    done = Quantized({}, 0, 0, 0)
    for layer in decoder_layers(model):
        done += quantize_layer(layer, spec, device, place)
    return done


def quantize_layer(layer: torch.nn.Module, spec: QuantSpec, device: torch.device,
                   place: torch.device | None = None) -> Quantized:
    """quantize_model for one decoder layer."""
    place = device if place is None else place
    kernels: dict[str, int] = {}
    kept = before = after = 0
    with torch.no_grad():
        for parent, name, linear in list(_linears(layer)):
            before += module_bytes(linear)
            if spec.mode == "int8":
                new = Int8Linear.from_linear(linear, device)
                kernel = "int8"
            else:
                new = Int4Linear.from_linear(linear, device, spec.group_size)
                kernel = f"int4-{new.kernel}" if new is not None else "kept"
            if new is None:
                kept += 1
                after += module_bytes(linear)
                continue
            new.to(place)
            setattr(parent, name, new)
            kernels[kernel] = kernels.get(kernel, 0) + 1
            after += module_bytes(new)
    return Quantized(kernels, kept, before, after)


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters (a layer, a linear)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def model_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's parameters and buffers, each tensor once
    (tied embeddings are one tensor)."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def linear_bytes(out_features: int, in_features: int, bias: bool, spec: QuantSpec,
                 dtype: torch.dtype) -> int:
    """The bytes a decoder linear layer takes quantized by `spec`."""
    item = torch.empty((), dtype=dtype).element_size()
    extra = out_features * item if bias else 0
    if spec.mode == "int8":
        return out_features * in_features + out_features * item + extra
    if spec.mode == "int4":
        group = _group_for(in_features, spec.group_size)
        if group is not None:
            return out_features * in_features // 2 + \
                in_features // group * out_features * 2 * item + extra
    return out_features * in_features * item + extra


def plan_bytes(model: torch.nn.Module, spec: QuantSpec, dtype: torch.dtype) -> tuple[int, int]:
    """(all weights, one decoder layer) in bytes once quantized by `spec`,
    counted on a model built on the meta device."""
    from services.worker.streaming import decoder_layers

    total = model_bytes(model)
    first = decoder_layers(model)[0]
    layer = module_bytes(first)
    if not spec.on:
        return total, layer
    in_first = {id(m) for m in first.modules()}
    saved_first = 0
    for parent, name, linear in _decoder_linears(model):
        out_features, in_features = linear.weight.shape
        saved = module_bytes(linear) - linear_bytes(out_features, in_features,
                                                     linear.bias is not None, spec, dtype)
        total -= saved
        if id(linear) in in_first:
            saved_first += saved
    return total, layer - saved_first


def dequant_bytes(dims, spec: QuantSpec, device: torch.device, dtype: torch.dtype) -> int:
    """The transient a step needs to de-quantize one matrix at a time (int8,
    and int4 where tinygemm does not run): the largest decoder matrix
    in the activations' dtype, and for int4 its unpacked nibbles and
    expanded scales and zeros besides. 0 where every matrix runs on a kernel
    that reads the packed form. `dims`: step_memory.ModelDims."""
    # The projections as merged_projections.py merges them (where it does
    # not, the parts are smaller: these bound them).
    shapes = [((dims.heads + 2 * dims.kv_heads) * dims.head_dim, dims.hidden),   # qkv_proj
              (dims.hidden, dims.heads * dims.head_dim),                        # o_proj
              (2 * dims.intermediate, dims.hidden),                             # gate_up_proj
              (dims.hidden, dims.intermediate)]                                 # down_proj
    item = torch.empty((), dtype=dtype).element_size()
    if spec.mode == "int8":
        return max(n * k for n, k in shapes) * item
    if spec.mode == "int4":
        slow = [n * k for n, k in shapes
                if _group_for(k, spec.group_size) is not None
                and _int4_kernel(device, dtype, n, k)[0] == "dequant"]
        # int16 nibbles (two sets), then the weight, the expanded scales and
        # zeros and a product in the activations' dtype
        return max(slow, default=0) * (4 * item + 4)
    return 0
