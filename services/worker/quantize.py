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
projections, MLP). The input embeddings and the output head (one tensor
where they are tied, as in every small model lmx ships) are held in int8,
groups of 32 with a scale each (`embeddings="int8"`, the default; "none"
keeps them in the dtype): GGUF's Q8_0, the form both shipped GGUF models'
embeddings come in, so those are kept exactly. A lookup converts only the
rows it takes; the head converts its matrix `HEAD_CHUNK_BYTES` at a time
(Ollama's Q4_K_M keeps its output matrix in 6 or 8 bits; gpt-fast's int8
handler quantizes it too). For a Llama-3.2-3B shape: 0.42 GB of its 0.79
GB of embeddings. Norms stay in the dtype. The quantized tensors are
Parameters (requires_grad off), so whatever walks a model's parameters
(layer streaming, sleep, the weight count) sees their real bytes. A layer's packed layout belongs to the kernel
of the device it was packed for: it may rest in host memory (streaming,
sleep) but runs only there.

Pure torch, no gRPC. `plan_bytes` counts a quantized model's bytes on the
meta device for the lease and the weight plan before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker import device as devices
from services.worker.settings import EMBEDDING_MODES, GROUP_SIZES
from services.worker.settings import QUANTIZE_MODES as MODES

#: tinygemm's inner K tiles, largest first (K must be a multiple of 16 x it).
INNER_K_TILES = (8, 4, 2)


@dataclass(frozen=True)
class QuantSpec:
    mode: str = "none"
    group_size: int = 32
    #: The input embeddings and output head when `mode` is on: int8 | none.
    embeddings: str = "int8"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"the int4 group size must be one of "
                             f"{', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"quantize_embeddings must be one of "
                             f"{', '.join(EMBEDDING_MODES)}, got {self.embeddings!r}")

    @classmethod
    def of(cls, settings) -> QuantSpec:
        """The spec of a worker's settings (WorkerSettings)."""
        return cls(settings.quantize, settings.quantize_group_size,
                   settings.quantize_embeddings)

    @property
    def on(self) -> bool:
        return self.mode != "none"

    @property
    def embeddings_on(self) -> bool:
        """Whether the embeddings and the output head are held in int8."""
        return self.on and self.embeddings == "int8"

    def __str__(self) -> str:
        name = f"int4-g{self.group_size}" if self.mode == "int4" else self.mode
        return name if self.embeddings_on or not self.on else f"{name}-emb-none"


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


def int8_rows(weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 matrix, one scale per row in the weight's dtype) on `device`:
    symmetric, each row's largest magnitude maps to 127."""
    dtype = weight.dtype
    qs, scales = [], []
    for w in _row_blocks(weight, device):
        # The scale as it is kept (the dtype), so that each weight lands
        # within half a step of its value.
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(dtype).float()
        qs.append(torch.round(w.div_(scale[:, None])).clamp_(-128, 127).to(torch.int8))
        scales.append(scale.to(dtype))
    return torch.cat(qs), torch.cat(scales)


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
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(*int8_rows(linear.weight, device), bias)

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


#: Embeddings are int8 in groups of this many values with one scale each:
#: GGUF's Q8_0 block, the form both shipped models' embeddings come in, so a
#: GGUF model's embeddings are kept exactly (a width it does not divide
#: takes the largest GROUP_SIZES entry that does, else one scale a row).
EMBEDDING_GROUP = 32

#: The output head converts its int8 rows to the activations' dtype this many
#: bytes at a time (the step plan's transient for it, `head_bytes`).
HEAD_CHUNK_BYTES = 16 << 20


def head_chunk_rows(hidden: int, itemsize: int) -> int:
    """Rows of the output head converted at a time: HEAD_CHUNK_BYTES' worth,
    a multiple of 128."""
    return max(128, HEAD_CHUNK_BYTES // (hidden * itemsize) // 128 * 128)


def int8_groups(weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 matrix [rows, width], scales [rows, width / group] in the
    weight's dtype) on `device`, symmetric per group of EMBEDDING_GROUP."""
    rows, width = weight.shape
    group = _group_for(width, EMBEDDING_GROUP) or width
    q, scale = int8_rows(weight.reshape(-1, group), device)
    return q.view(rows, width), scale.view(rows, width // group)


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 groups in `dtype`, scaled in place: one buffer of q's size."""
    groups = scale.shape[-1]
    grouped = q.view(*q.shape[:-1], groups, q.shape[-1] // groups).to(dtype, copy=True)
    return grouped.mul_(scale.unsqueeze(-1)).flatten(-2)


class Int8Embedding(torch.nn.Module):
    """Input embeddings as int8 in groups with a scale each (int8_groups): a
    lookup converts the rows it takes (and multiplies by a Gemma embedding's
    `embed_scale`, as Gemma3TextScaledWordEmbedding does)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _dequantize_groups(F.embedding(ids, self.weight), F.embedding(ids, self.scale),
                                  self.scale.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8, "
                f"group={self.embedding_dim // self.scale.shape[1]}")


class Int8Head(torch.nn.Module):
    """The output head on int8 groups (the embeddings' own tensors where
    they are tied): its matrix is converted `head_chunk_rows` rows at a time,
    so the transient is one chunk, not the vocabulary's 16-bit matrix."""

    def __init__(self, weight: torch.nn.Parameter, scale: torch.nn.Parameter,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.scale = scale
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = head_chunk_rows(self.in_features, x.element_size())
        # Chunks' products joined once (not written into slices: compiled,
        # each slice write would become a copy of the whole logits).
        out = torch.cat([F.linear(x, _dequantize_groups(self.weight[start:start + step],
                                                        self.scale[start:start + step], x.dtype))
                         for start in range(0, self.out_features, step)], dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8"


def quantize_embeddings(model: torch.nn.Module, device: torch.device,
                        place: torch.device | None = None) -> tuple[int, int]:
    """Replace the input embeddings, and the output head if it is a plain
    linear layer, by their int8 forms (one tensor where they are tied),
    quantized on `device` and left on `place` (default `device`). Returns
    (bytes before, bytes after)."""
    place = device if place is None else place
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if isinstance(embeddings, Int8Embedding):
        return 0, 0
    tied = head is not None and head.weight is embeddings.weight
    before = embeddings.weight.numel() * embeddings.weight.element_size()
    with torch.no_grad():
        weight, scale = int8_groups(embeddings.weight, device)
        new = Int8Embedding(weight.to(place), scale.to(place),
                            getattr(embeddings, "embed_scale", None))
        del weight, scale
        model.set_input_embeddings(new)
        after = module_bytes(new)
        if head is None or type(head) is not torch.nn.Linear:
            return before, after
        bias = None if head.bias is None else head.bias.detach().to(place)
        if tied:
            new_head = Int8Head(new.weight, new.scale, bias)
        else:
            before += module_bytes(head)
            weight, scale = int8_groups(head.weight, device)
            new_head = Int8Head(torch.nn.Parameter(weight.to(place), requires_grad=False),
                                torch.nn.Parameter(scale.to(place), requires_grad=False), bias)
            after += module_bytes(new_head)
        model.set_output_embeddings(new_head)
    return before, after


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
    if spec.embeddings_on:
        total -= _embedding_savings(model)
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


def _embedding_savings(model: torch.nn.Module) -> int:
    """The bytes quantize_embeddings saves (counted on the meta device)."""
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    matrices = [embeddings.weight]
    if head is not None and type(head) is torch.nn.Linear and head.weight is not embeddings.weight:
        matrices.append(head.weight)
    # Each element drops to one byte; each group gains a scale in the dtype.
    saved = 0
    for w in matrices:
        groups = w.shape[1] // (_group_for(w.shape[1], EMBEDDING_GROUP) or w.shape[1])
        saved += w.numel() * (w.element_size() - 1) - w.shape[0] * groups * w.element_size()
    return saved


def head_bytes(dims, spec: QuantSpec) -> int:
    """An int8 output head's transient: one chunk of its rows converted to
    the activations' dtype. Its products, then joined, are the logits twice
    over: the step plan counts that copy apart (ModelDims.head_copies). 0
    where the head is not quantized. `dims`: ModelDims."""
    if not spec.embeddings_on:
        return 0
    return min(head_chunk_rows(dims.hidden, dims.itemsize), dims.vocab) * dims.hidden * \
        dims.itemsize


def step_dims(dims, spec: QuantSpec, device: torch.device, dtype: torch.dtype):
    """`dims` (step_memory.ModelDims) with what `spec`'s weights add to a
    step: the largest conversion's transient and the int8 head's copy of
    the logits."""
    return dataclasses.replace(dims, dequant_bytes=dequant_bytes(dims, spec, device, dtype),
                               head_copies=1 if spec.embeddings_on else 0)


def dequant_bytes(dims, spec: QuantSpec, device: torch.device, dtype: torch.dtype) -> int:
    """The largest transient of a quantized step's conversions: a decoder
    matrix (`layer_dequant_bytes`) or a chunk of the int8 head (`head_bytes`);
    they run one after another."""
    return max(layer_dequant_bytes(dims, spec, device, dtype), head_bytes(dims, spec))


def layer_dequant_bytes(dims, spec: QuantSpec, device: torch.device, dtype: torch.dtype) -> int:
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
