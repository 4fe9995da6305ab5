"""The worker's settings: one frozen object, built once at start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.common import settings as loader
from services.common.settings import ServerFields
from services.common.errors import ConfigError
from services.common.units import parse_address, parse_bytes
from services.worker.stream_policy import DEFAULT_MAX_SHARE

DEFAULT_LISTEN = "127.0.0.1:50061"
#: --resident-fraction auto: the largest share of the layers that fits now.
AUTO = 0.0


def parse_fraction(text: str) -> float:
    """'auto' (AUTO) or a number in (0, 1]."""
    if str(text).strip().lower() == "auto":
        return AUTO
    return float(text)
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: --compile-decode (services/worker/compiled_decode.py).
COMPILE_MODES = ("auto", "tuned", "off")
#: --decode-ahead (services/worker/decode_ahead.py).
AHEAD_MODES = ("auto", "off")
#: --quantize and --quantize-group-size (services/worker/quantize.py).
QUANTIZE_MODES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
#: --quantize-embeddings: the input embeddings and output head when quantized.
EMBEDDING_MODES = ("int8", "none")


@dataclass(frozen=True)
class WorkerSettings(ServerFields):
    model: str = field(default="smollm2-135m", metadata={
        "help": "smollm2-135m, gemma3-270m, synthetic:<shape> or a model directory"})
    listen: str = field(default=DEFAULT_LISTEN, metadata={"help": "HOST:PORT to serve on"})
    advertise: str = field(default="", metadata={
        "help": "address clients should use, when not the listen address"})
    admission: str = field(default="127.0.0.1:50051", metadata={
        "help": "admission's address; 'none' runs without admission inside --budget"})
    kvstore: str = field(default="127.0.0.1:50052", metadata={
        "help": "the kvstore's address, for ParkSession/RestoreSession; 'none' disables parking"})
    park_ahead_bytes: int = field(default=64 << 20, metadata={
        "help": "shared memory held in the kvstore ahead of the next park: a park that fits "
                "it takes one round trip instead of two (0: none; a larger park reserves)",
        "parse": parse_bytes})
    budget: int = field(default=8 << 30, metadata={
        "help": "device bytes to stay within when running without admission",
        "parse": parse_bytes})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    admission_device: str = field(default="", metadata={
        "help": "admission's id for this device (default: matched by GPU UUID, else cpu:0)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (float32 on CPU; bfloat16 on a card of compute capability 8.0 or newer, "
                "float16 on an older one) | float32 | bfloat16 | float16"})
    quantize: str = field(default="none", metadata={
        "help": "weights of the decoder layers: none (the dtype) | int8 (per output channel) | "
                "int4 (groups of --quantize-group-size); weight-only, with PyTorch's int8 and "
                "int4 (tinygemm) kernels; norms stay in the dtype, embeddings and the output "
                "head as --quantize-embeddings says"})
    quantize_group_size: int = field(default=32, metadata={
        "help": "int4: input weights per scale and zero point (32 | 64 | 128 | 256; a layer "
                "whose width it does not divide takes the largest that does). 32, GGUF's "
                "block: a Q4_0 or Q4_1 model keeps its exact weights; larger groups save "
                "up to 0.09 bytes a weight and lose quality (docs/benchmarks.md)"})
    quantize_embeddings: str = field(default="int8", metadata={
        "help": "with --quantize int8 or int4, the input embeddings and output head (one "
                "tensor where tied): int8 (groups of 32 with a scale each, GGUF's Q8_0: "
                "0.42 GB of a Llama-3.2-3B's 0.79 in 16 bits) | none (kept in the dtype)"})
    cache_dir: str = field(default="", metadata={
        "help": "converted-model cache (default LMX_CACHE or ~/.cache/lmx)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    kv_chunk_bytes: int = field(default=32 << 20, metadata={
        "help": "KV lease growth step", "parse": parse_bytes})
    kv_wait_s: float = field(default=10.0, metadata={
        "help": "how long a request waits for KV memory before RESOURCE_EXHAUSTED"})
    wake_wait_s: float = field(default=30.0, metadata={
        "help": "how long a request to a sleeping model waits for the memory to wake it "
                "before RESOURCE_EXHAUSTED with a retry hint"})
    max_turn_s: float = field(default=30.0, metadata={
        "help": "asked to sleep for another model, the longest this one goes on generating "
                "before it pauses its generations (they go on when it wakes again)"})
    max_batch: int = field(default=64, metadata={"help": "sessions per decode step"})
    max_prefill_tokens: int = field(default=2048, metadata={
        "help": "prompt tokens per step (a longer prompt is computed in chunks, the running "
                "sessions decoding in between)"})
    max_sessions: int = field(default=1024, metadata={"help": "open sessions at most"})
    max_prompt_chars: int = field(default=1_000_000, metadata={
        "help": "longest prompt or chat message, in characters (longer is INVALID_ARGUMENT)"})
    chat_template: str = field(default="", metadata={
        "help": "a Jinja chat template file in place of the model's own (e.g. "
                "deploy/templates/chatml-tools.jinja: ChatML with tools, for tool calling)"})
    client_templates: str = field(default="sandboxed", metadata={
        "help": "chat templates sent by clients (OpenSession.chat_template): sandboxed "
                "(rendered in a child process, bounded by --template-timeout-s) | off "
                "(refused with INVALID_ARGUMENT)"})
    tool_format: str = field(default="auto", metadata={
        "help": "how the chat template asks the model to write tool calls, which the OpenAI "
                "front parses: auto (from the template: <tool_call> blocks are hermes, "
                "<|python_tag|> is llama3_json) | hermes | llama3_json"})
    template_timeout_s: float = field(default=2.0, metadata={
        "help": "longest a client's chat template may take to render (past it, "
                "INVALID_ARGUMENT)"})
    max_context: int = field(default=0, metadata={
        "help": "cap on a session's context (0: the model's window)"})
    lease_ttl_s: float = field(default=10.0, metadata={"help": "TTL of the worker's leases"})
    priority: int = field(default=0, metadata={
        "help": "priority of this worker's leases in admission (-1000..1000): a holder is asked "
                "to give memory back only for waiters of its priority or higher"})
    pin_model: bool = field(default=False, metadata={
        "help": "never put the model to sleep under memory pressure (its sessions' idle KV "
                "may still be parked)"})
    min_awake_s: float = field(default=0.0, metadata={
        "help": "a quantum: asked to sleep less than this long after it woke, the model goes on "
                "taking new requests while it has work, and sleeps when the quantum is over or "
                "it falls idle (fewer swaps; the model waiting for the memory waits up to this "
                "much longer)"})
    resident_fraction: float = field(default=1.0, metadata={
        "help": "share of the decoder layers kept on the device (0 < f <= 1), or auto: the "
                "largest share admission can grant now; the others stay in host memory and are "
                "streamed through a ring of --stream-ring layers", "parse": parse_fraction})
    stream_max_share: float = field(default=DEFAULT_MAX_SHARE, metadata={
        "help": "with --resident-fraction auto, the largest share of its layers a worker whose "
                "model fits the device alone streams to make room for other models; asked for "
                "more, it sleeps and the models take turns whole (a streamed layer crosses the "
                "host link every step: services/worker/stream_policy.py). A model that does "
                "not fit alone streams what it must"})
    stream_ring: int = field(default=2, metadata={
        "help": "device buffers (one layer each) the streamed layers are copied through"})
    stream_grow_interval_s: float = field(default=5.0, metadata={
        "help": "how often a worker streaming with --resident-fraction auto checks whether "
                "admission could now hold more of its layers, and brings them back to the device "
                "(0: never)"})
    share_streamed_weights: bool = field(default=True, metadata={
        "help": "keep the streamed layers in a shared-memory file that the other workers of "
                "this model on this host map instead of holding their own copy"})
    weights_shm_dir: str = field(default="/dev/shm", metadata={
        "help": "where that file lives"})
    cuda_graphs: str = field(default="auto", metadata={
        "help": "auto: decode steps replay CUDA graphs on a CUDA card of compute capability "
                "8.0 or newer (Triton kernels attend over the paged KV in place; the first "
                "graphed step is checked against the eager one), eager on older cards | off: "
                "eager decode steps"})
    cuda_stack_bytes: int = field(default=0, metadata={
        "help": "per-thread GPU stack the worker's CUDA context reserves, for every thread the "
                "card can run at once (0: CUDA's default, 1 KiB: 264 MiB of an H100); the "
                "driver grows it for a kernel that needs more"})
    compile_decode: str = field(default="auto", metadata={
        "help": "auto: the graphed decode step's forward pass is compiled by torch.compile "
                "(Inductor fuses the norms, rotary embedding, activations and residual adds "
                "around the matrix products; two compiles at the warm-up, cached under the model "
                "cache's compile/ for the next start) | tuned: the same with Inductor's "
                "coordinate descent tuning (batch-1 matrix products as tuned reductions, "
                "gpt-fast's setting; a longer first compile) | off: captured as the model runs it"})
    decode_ahead: str = field(default="auto", metadata={
        "help": "auto: where decode steps are graphed, a greedy decode step is launched before "
                "the last one's tokens are read, so that the device computes while the host "
                "streams them (services/worker/decode_ahead.py) | off: one step at a time"})
    grace_s: float = field(default=5.0, metadata={"help": "shutdown grace period"})
    log_format: str = field(default="auto", metadata={"help": "auto | json | console"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def __post_init__(self) -> None:
        loader.check_common(self)
        if not (0.0 < self.resident_fraction <= 1.0 or self.resident_fraction == AUTO):
            raise ConfigError("resident_fraction", f"must be in (0, 1] or auto, got "
                                                   f"{self.resident_fraction}")
        if not 0.0 <= self.stream_max_share <= 1.0:
            raise ConfigError("stream_max_share", f"must be in [0, 1], got "
                                                  f"{self.stream_max_share}")
        if self.stream_ring < 1:
            raise ConfigError("stream_ring", "must be at least 1")
        if self.advertise:
            try:
                parse_address(self.advertise)
            except ValueError as exc:
                raise ConfigError("advertise", str(exc)) from None
        if self.admission != "none":
            try:
                parse_address(self.admission)
            except ValueError as exc:
                raise ConfigError("admission", str(exc), fix="HOST:PORT, or none") from None
        if self.kvstore != "none":
            try:
                parse_address(self.kvstore)
            except ValueError as exc:
                raise ConfigError("kvstore", str(exc), fix="HOST:PORT, or none") from None
        if self.cuda_graphs not in ("auto", "off"):
            raise ConfigError("cuda_graphs", f"unknown value {self.cuda_graphs!r}",
                              fix="auto | off")
        if self.cuda_stack_bytes < 0:
            raise ConfigError("cuda_stack_bytes", f"must not be negative, got "
                                                  f"{self.cuda_stack_bytes}")
        if self.compile_decode not in COMPILE_MODES:
            raise ConfigError("compile_decode", f"unknown value {self.compile_decode!r}",
                              fix=" | ".join(COMPILE_MODES))
        if self.decode_ahead not in AHEAD_MODES:
            raise ConfigError("decode_ahead", f"unknown value {self.decode_ahead!r}",
                              fix=" | ".join(AHEAD_MODES))
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError("quantize", f"unknown mode {self.quantize!r}",
                              fix=" | ".join(QUANTIZE_MODES))
        if self.quantize_group_size not in GROUP_SIZES:
            raise ConfigError("quantize_group_size", f"got {self.quantize_group_size}",
                              fix=" | ".join(map(str, GROUP_SIZES)))
        if self.quantize_embeddings not in EMBEDDING_MODES:
            raise ConfigError("quantize_embeddings", f"unknown mode {self.quantize_embeddings!r}",
                              fix=" | ".join(EMBEDDING_MODES))
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"unknown dtype {self.dtype!r}", fix=" | ".join(DTYPES))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"unknown device {self.device!r}",
                              fix="auto, cpu, cuda or cuda:N")
        for name in ("block_size", "kv_chunk_bytes", "max_batch", "max_prefill_tokens",
                     "max_sessions", "budget", "max_prompt_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be positive")
        if self.max_context < 0:
            raise ConfigError("max_context", "must not be negative")
        if self.park_ahead_bytes < 0:
            raise ConfigError("park_ahead_bytes", "must not be negative", fix="0 for none")
        if self.chat_template:
            try:
                with open(self.chat_template, encoding="utf-8") as template:
                    template.read(1)
            except OSError as exc:
                raise ConfigError("chat_template", f"cannot read {self.chat_template}: "
                                                   f"{exc.strerror}") from None
        if self.tool_format not in ("auto", "hermes", "llama3_json"):
            raise ConfigError("tool_format", f"unknown format {self.tool_format!r}",
                              fix="auto | hermes | llama3_json")
        if self.client_templates not in ("sandboxed", "off"):
            raise ConfigError("client_templates", f"unknown mode {self.client_templates!r}",
                              fix="sandboxed | off")
        if not 0 <= self.max_turn_s <= 3600:
            raise ConfigError("max_turn_s", "must be in [0, 3600]")
        if not 0 < self.wake_wait_s <= 3600:
            raise ConfigError("wake_wait_s", "must be in (0, 3600]")
        if not 0 < self.template_timeout_s <= 600:
            raise ConfigError("template_timeout_s", "must be in (0, 600]")
        if not -1000 <= self.priority <= 1000:
            raise ConfigError("priority", "must be within -1000..1000")
        if not 0 <= self.min_awake_s <= 3600:
            raise ConfigError("min_awake_s", "must be in [0, 3600]")
        for name in ("kv_wait_s", "lease_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be positive")


def load_settings(argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> WorkerSettings:
    return loader.load(WorkerSettings, "worker", argv, environ,
                       description="lmx worker: serves one model to many agent sessions")
