"""The naive way, for the seed scenario's comparison: one plain inference
process per agent that, as common engines do (vLLM's gpu_memory_utilization,
llama.cpp's -c), reserves device memory for its weights and a KV cache of its
whole context window up front, holds it while its agent lives, and dies if
the device cannot give it.

Two devices:

- the simulated one the CPU stack uses (`--admission ADDRESS`): the
  reservation is one Acquire from that admission with wait_ms=0, which is
  what allocating on a real GPU amounts to (granted now, or out of memory);
  when granted the process loads the model in float32 on the CPU and
  answers, holding the reservation (renewed) until the end;
- a real CUDA GPU (`--device cuda`): the process loads the model onto the
  card in its 16-bit dtype (or `--quantize`d, as lmx's workers would hold
  it) and allocates a KV cache of the whole window there; the card itself
  says out of memory. `emulated_card` makes a large card a small one for
  it: a ballast process holds all but the card's size.

    python -m services.naive MODEL MAX_TOKENS TURNS_JSON --admission ADDRESS
    python -m services.naive MODEL MAX_TOKENS TURNS_JSON --device cuda [--quantize int4]
    python -m services.naive --card-bytes N         # the ballast

It reserves when told `reserve` on stdin and answers when told `go`, so that
a driver (`run_naive`, or `launch` on an empty device: `lmx demo`,
bench/seed_scenario.py --naive, tests/system/test_seed_scenario.py) starts
them together and gets the same outcome on every run: each engine reserves
in the agents' order while the ones before it hold theirs, as engines
launched side by side end up doing.

Exit 0 with the token ids on stdout; exit 3 when out of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

OUT_OF_MEMORY = 3
RENEW_EVERY_S = 20.0
TTL_MS = 60_000


def _reservation(model: str, dtype, quant=None) -> tuple[int, int]:
    """(weights, a KV cache of the model's whole context window) in bytes:
    what the engine asks for up front, counted by the worker's own weight
    plan (on the meta device)."""
    from services.worker.models import default_cache_dir, model_config, weight_plan
    from services.worker.quantize import QuantSpec

    cache = default_cache_dir()
    plan = weight_plan(model, cache, dtype, quant or QuantSpec())
    config, _ = model_config(model, cache)
    return plan.total_bytes, plan.kv_bytes_per_token * \
        config.get_text_config().max_position_embeddings


def _out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or the driver's when even a context does not fit."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _answer(loaded, turns: list[str], max_tokens: int) -> list[list[int]]:
    """The whole conversation, one plain generate per turn on the context so far."""
    import torch

    loaded.model.set_attn_implementation("sdpa")   # a plain engine: no paged KV
    device = next(loaded.model.parameters()).device
    context = ""
    answers = []
    for turn in turns:
        context += turn
        ids = loaded.tokenizer(context, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=max_tokens, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        answers.append(new)
        context += loaded.tokenizer.decode(new, skip_special_tokens=True)
    return answers


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _on_simulated_device(address: str, model: str, max_tokens: int, turns: list[str]) -> int:
    import torch

    from lmx.v1 import admission_pb2 as pb
    from lmx.v1 import admission_pb2_grpc
    from services.worker.models import default_cache_dir, load_model

    needed = sum(_reservation(model, torch.float32))   # float32 on the simulated device
    if sys.stdin.readline().strip() != "reserve":
        return 2
    with grpc.insecure_channel(address) as channel:
        stub = admission_pb2_grpc.AdmissionServiceStub(channel)
        try:
            lease = stub.Acquire(pb.AcquireRequest(
                holder=pb.Holder(name=f"naive/{model}", pid=os.getpid()), bytes=needed,
                purpose=pb.PURPOSE_OTHER, wait_ms=0, ttl_ms=TTL_MS), timeout=30).lease
        except grpc.RpcError as exc:
            _say(error="out of memory", needed_bytes=needed, detail=exc.details())
            return OUT_OF_MEMORY
        _say(reserved_bytes=needed)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(RENEW_EVERY_S):
                stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, epoch=lease.epoch),
                           timeout=30)

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            if sys.stdin.readline().strip() != "go":
                return 2
            loaded = load_model(model, cache=default_cache_dir(), device=torch.device("cpu"),
                                dtype=torch.float32)
            _say(token_ids=_answer(loaded, turns, max_tokens), reserved_bytes=needed)
        finally:
            done.set()
            stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch), timeout=30)
    return 0


def _on_cuda(model: str, max_tokens: int, turns: list[str], quantize: str) -> int:
    """Weights and a KV cache of the whole window, really allocated on the
    card; the card's own out-of-memory error ends the process."""
    import torch

    from services.worker.device import resolve_dtype
    from services.worker.models import default_cache_dir, load_model
    from services.worker.quantize import QuantSpec

    if sys.stdin.readline().strip() != "reserve":
        return 2
    device = torch.device("cuda:0")
    dtype = resolve_dtype("auto", device)
    quant = QuantSpec(quantize)
    weight_bytes, kv_bytes = _reservation(model, dtype, quant)
    needed = weight_bytes + kv_bytes
    try:
        torch.cuda.init()
        loaded = load_model(model, cache=default_cache_dir(), device=device, dtype=dtype,
                            quant=quant)
        kv = torch.empty(kv_bytes, dtype=torch.uint8, device=device)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer; the rest re-raised
        if not _out_of_memory(exc):
            raise
        _say(error="out of memory", needed_bytes=needed, weight_bytes=weight_bytes,
             kv_bytes=kv_bytes, detail=str(exc).splitlines()[0][:300])
        return OUT_OF_MEMORY
    reserved = torch.cuda.memory_reserved(device)
    _say(reserved_bytes=reserved, needed_bytes=needed, weight_bytes=weight_bytes,
         kv_bytes=kv_bytes, dtype=str(dtype).removeprefix("torch."), quantize=str(quant))
    if sys.stdin.readline().strip() != "go":
        return 2
    try:
        answers = _answer(loaded, turns, max_tokens)
    except Exception as exc:  # noqa: BLE001 - as above
        if not _out_of_memory(exc):
            raise
        _say(error="out of memory", during="answer", detail=str(exc).splitlines()[0][:300])
        return OUT_OF_MEMORY
    del kv
    _say(token_ids=answers, reserved_bytes=reserved)
    return 0


def _hold_card(card_bytes: int) -> int:
    """The ballast: allocate all of GPU 0 but `card_bytes` (this process's
    own context included), say what is left, hold it until stdin closes."""
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(0)
    hold = free - card_bytes
    if hold < 0:
        _say(error=f"the card has {free} bytes free, fewer than the {card_bytes} asked for")
        return 2
    ballast = torch.empty(hold, dtype=torch.uint8, device="cuda:0")
    _say(held_bytes=ballast.numel(), free_bytes=torch.cuda.mem_get_info(0)[0],
         total_bytes=total)
    sys.stdin.read()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.naive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("max_tokens", nargs="?", type=int)
    parser.add_argument("turns", nargs="?", help="the agent's turns, a JSON list")
    parser.add_argument("--admission", help="the simulated device's admission")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="cuda: the weights as lmx's workers would hold them")
    parser.add_argument("--card-bytes", type=int,
                        help="be the ballast: leave this many bytes of GPU 0 free")
    args = parser.parse_args(argv)
    if args.card_bytes is not None:
        return _hold_card(args.card_bytes)
    if args.turns is None:
        parser.error("MODEL MAX_TOKENS TURNS_JSON are needed")
    turns = json.loads(args.turns)
    if args.device == "cuda":
        return _on_cuda(args.model, args.max_tokens, turns, args.quantize)
    if not args.admission:
        parser.error("the simulated device needs --admission")
    return _on_simulated_device(args.admission, args.model, args.max_tokens, turns)


@dataclass
class NaiveRun:
    agent: str
    model: str
    exit_code: int
    reply: dict
    stderr: str

    @property
    def outcome(self) -> str:
        return {0: "ran", OUT_OF_MEMORY: "out of memory"}.get(self.exit_code,
                                                             f"failed ({self.exit_code})")

    def record(self) -> dict:
        """For a result JSON: the outcome and what the engine said, less its tokens."""
        return {"agent": self.agent, "model": self.model, "outcome": self.outcome,
                "exit_code": self.exit_code,
                **{k: v for k, v in self.reply.items() if k != "token_ids"},
                **({"stderr_tail": self.stderr[-1500:]}
                   if self.outcome not in ("ran", "out of memory") else {})}


def run_naive(agents: Sequence, max_tokens: int, *, admission: str | None = None,
              device: str = "cpu", quantize: str = "none",
              timeout_s: float = 600) -> list[NaiveRun]:
    """The agents' naive engines, started together: each reserves in turn
    (the earlier ones holding theirs), then the ones that got memory answer
    their whole conversations at once. On the simulated device of
    `admission`, or on GPU 0 (`device="cuda"`; see `emulated_card`)."""
    where = ["--device", "cuda", "--quantize", quantize] if device == "cuda" else \
        ["--admission", admission]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "services.naive", agent.model, str(max_tokens),
         json.dumps(list(agent.turns)), *where],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for agent in agents]
    firsts = []
    try:
        for proc in procs:                  # in order, each while the earlier hold theirs
            proc.stdin.write("reserve\n")
            proc.stdin.flush()
            firsts.append(proc.stdout.readline())   # reserved, or out of memory (exiting)
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass
        runs = []
        for agent, proc, first in zip(agents, procs, firsts):
            stdout, stderr = proc.communicate(timeout=timeout_s)
            lines = [line for line in (first + stdout).strip().splitlines()
                     if line.startswith("{")]
            reply: dict = {}
            for line in lines:
                reply.update(json.loads(line))
            runs.append(NaiveRun(agent.name, agent.model, proc.returncode, reply, stderr))
        return runs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@dataclass
class Launch:
    runs: list[NaiveRun]
    card: dict            # what the ballast said (GPU), else empty


def launch(agents: Sequence, max_tokens: int, *, cuda: bool, size_bytes: int,
           quantize: str = "none", log_path=None, timeout_s: float = 600) -> Launch:
    """The naive launch on an empty device of `size_bytes`: GPU 0 shrunk to
    it by a ballast, or a fresh simulated device of that size (its
    admission logging to `log_path`)."""
    if cuda:
        with emulated_card(size_bytes) as card:
            return Launch(run_naive(agents, max_tokens, device="cuda", quantize=quantize,
                                    timeout_s=timeout_s), card)
    from services.common.launch import start_service

    device = start_service("services.admission", "lmx.v1.AdmissionService",
                           ["--device", f"cpu:0={size_bytes}B", "--log-format", "json",
                            "--state-file", "none"], log_path=log_path, timeout_s=60)
    try:
        return Launch(run_naive(agents, max_tokens, admission=device.address,
                                timeout_s=timeout_s), {})
    finally:
        device.stop(60)


@contextlib.contextmanager
def emulated_card(card_bytes: int) -> Iterator[dict]:
    """GPU 0 made a card of `card_bytes` for what runs inside: a ballast
    process holds the rest of its memory until the block ends. Yields what
    the ballast said (held_bytes, free_bytes, total_bytes)."""
    proc = subprocess.Popen([sys.executable, "-m", "services.naive", "--card-bytes",
                             str(card_bytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        said = json.loads(line) if line.startswith("{") else {}
        if "held_bytes" not in said:
            proc.kill()
            raise RuntimeError(f"the ballast could not shrink the card: "
                               f"{said.get('error') or proc.stderr.read()[-1500:]}")
        yield said
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
