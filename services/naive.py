"""The naive way, for the seed scenario's comparison: one plain inference
process per agent that, as common engines do (vLLM's gpu_memory_utilization,
llama.cpp's -c), reserves device memory for its weights and a KV cache of its
whole context window up front, and dies if the device cannot give it.

The device is the same simulated one the lmx stack uses: the reservation is
one Acquire from that admission with wait_ms=0, which is what allocating on a
real GPU amounts to (granted now, or out of memory). When granted, it loads
the model for real and answers its prompt greedily.

    python -m services.naive ADMISSION MODEL PROMPT MAX_TOKENS

Used by `lmx demo` and tests/system/test_seed_scenario.py.

Exit 0 with the token ids on stdout; exit 3 when "out of memory".
"""

from __future__ import annotations

import json
import os
import sys

import grpc
import torch

from lmx.v1 import admission_pb2 as pb
from lmx.v1 import admission_pb2_grpc
from services.worker.models import default_cache_dir, estimate_weight_bytes, load_model, model_config

OUT_OF_MEMORY = 3


def main() -> int:
    address, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cache = default_cache_dir()
    weights = estimate_weight_bytes(model, cache, torch.float32)
    config, _ = model_config(model, cache)
    text = config.get_text_config()
    window = text.max_position_embeddings
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4 * window
    with grpc.insecure_channel(address) as channel:
        stub = admission_pb2_grpc.AdmissionServiceStub(channel)
        try:
            lease = stub.Acquire(pb.AcquireRequest(
                holder=pb.Holder(name=f"naive/{model}", pid=os.getpid()), bytes=weights + kv,
                purpose=pb.PURPOSE_OTHER, wait_ms=0, ttl_ms=120_000), timeout=30).lease
        except grpc.RpcError as exc:
            print(json.dumps({"error": "out of memory", "needed_bytes": weights + kv,
                              "detail": exc.details()}))
            return OUT_OF_MEMORY
        try:
            loaded = load_model(model, cache=cache, device=torch.device("cpu"),
                                dtype=torch.float32)
            ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
            loaded.model.set_attn_implementation("sdpa")   # a plain engine: no paged KV
            with torch.no_grad():
                out = loaded.model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
            print(json.dumps({"token_ids": out[0, ids.shape[1]:].tolist(),
                              "reserved_bytes": weights + kv}))
        finally:
            stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id, epoch=lease.epoch), timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
