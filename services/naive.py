"""The naive way, for the seed scenario's comparison: one plain inference
process per agent that, as common engines do (vLLM's gpu_memory_utilization,
llama.cpp's -c), reserves device memory for its weights and a KV cache of its
whole context window up front, holds it while its agent lives, and dies if
the device cannot give it.

The device is the same simulated one the lmx stack uses: the reservation is
one Acquire from that admission with wait_ms=0, which is what allocating on a
real GPU amounts to (granted now, or out of memory). When granted, the
process loads the model for real and answers its agent's whole conversation
greedily, holding the reservation (renewed) until the end.

    python -m services.naive ADMISSION MODEL MAX_TOKENS TURNS_JSON

It reserves when told `reserve` on stdin and answers when told `go`, so that
a driver (`run_naive`: `lmx demo` and tests/system/test_seed_scenario.py)
starts all three together and gets the same outcome on every run: each
engine reserves in the agents' order while the ones before it hold theirs,
as three engines launched side by side end up doing on a real GPU.

Exit 0 with the token ids on stdout; exit 3 when "out of memory".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

OUT_OF_MEMORY = 3
RENEW_EVERY_S = 20.0
TTL_MS = 60_000


def _reservation(model: str) -> int:
    """Weights and a float32 KV cache of the whole window: what the engine
    asks for up front."""
    import torch

    from services.worker.models import default_cache_dir, estimate_weight_bytes, model_config

    cache = default_cache_dir()
    weights = estimate_weight_bytes(model, cache, torch.float32)
    config, _ = model_config(model, cache)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4 * \
        text.max_position_embeddings
    return weights + kv


def _answer(model: str, turns: list[str], max_tokens: int) -> list[list[int]]:
    """The whole conversation, one plain generate per turn on the context so far."""
    import torch

    from services.worker.models import default_cache_dir, load_model

    loaded = load_model(model, cache=default_cache_dir(), device=torch.device("cpu"),
                        dtype=torch.float32)
    loaded.model.set_attn_implementation("sdpa")   # a plain engine: no paged KV
    context = ""
    answers = []
    for turn in turns:
        context += turn
        ids = loaded.tokenizer(context, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = loaded.model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        answers.append(new)
        context += loaded.tokenizer.decode(new, skip_special_tokens=True)
    return answers


def main() -> int:
    from lmx.v1 import admission_pb2 as pb
    from lmx.v1 import admission_pb2_grpc

    address, model, max_tokens, turns = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                         json.loads(sys.argv[4]))
    needed = _reservation(model)
    if sys.stdin.readline().strip() != "reserve":
        return 2
    with grpc.insecure_channel(address) as channel:
        stub = admission_pb2_grpc.AdmissionServiceStub(channel)
        try:
            lease = stub.Acquire(pb.AcquireRequest(
                holder=pb.Holder(name=f"naive/{model}", pid=os.getpid()), bytes=needed,
                purpose=pb.PURPOSE_OTHER, wait_ms=0, ttl_ms=TTL_MS), timeout=30).lease
        except grpc.RpcError as exc:
            print(json.dumps({"error": "out of memory", "needed_bytes": needed,
                              "detail": exc.details()}), flush=True)
            return OUT_OF_MEMORY
        print(json.dumps({"reserved_bytes": needed}), flush=True)
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
            answers = _answer(model, turns, max_tokens)
            print(json.dumps({"token_ids": answers, "reserved_bytes": needed}), flush=True)
        finally:
            done.set()
            stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch), timeout=30)
    return 0


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


def run_naive(admission: str, agents: Sequence, max_tokens: int,
              timeout_s: float = 600) -> list[NaiveRun]:
    """The agents' naive engines, started together: each reserves in turn
    (the earlier ones holding theirs), then the ones that got memory answer
    their whole conversations at once."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "services.naive", admission, agent.model, str(max_tokens),
         json.dumps(list(agent.turns))],
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


if __name__ == "__main__":
    raise SystemExit(main())
