"""What weight quantization costs each model: over bench/data/quality.txt
(prose, code and a recipe; about 700 tokens), teacher forced, the share of
positions whose most likely next token is the 16-bit model's (and within a
near tie of it), and the perplexity of both (services/worker/quality.py).

    python bench/quality.py                                  # CPU: the real models
    python bench/quality.py --device cuda --models synthetic:qwen2.5-1.5b,...

The reference is the same weights unquantized in the run's dtype (float32 on
the CPU, bfloat16 on CUDA). A synthetic model's random weights give flat
logits, so its agreement says little; its perplexity ratio still shows the
drift. Writes bench/results/quality-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.benchkit import card_slug, cpu_model, git_commit, write_report  # noqa: E402
from services.worker.models import default_cache_dir, load_model  # noqa: E402
from services.worker.quality import compare, log_probs  # noqa: E402
from services.worker.quantize import QuantSpec  # noqa: E402

TEXT = ROOT / "bench" / "data" / "quality.txt"
#: As QuantSpec names them: "-emb-none" keeps the embeddings and head in the
#: dtype (--quantize-embeddings none), else they are int8.
SPECS = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-emb-none")


def spec_of(name: str) -> QuantSpec:
    embeddings = "none" if name.endswith("-emb-none") else "int8"
    name = name.removesuffix("-emb-none")
    if name.startswith("int4-g"):
        return QuantSpec("int4", int(name.removeprefix("int4-g")), embeddings)
    return QuantSpec(name, embeddings=embeddings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = default_cache_dir()
    text = TEXT.read_text()
    results = []
    for name in args.models.split(","):
        # Built in host memory, as a quantized model is (a synthetic one's
        # random weights are drawn on the CPU then), and moved: the same weights.
        reference = load_model(name, cache=cache, device=torch.device("cpu"), dtype=dtype,
                               quant=QuantSpec())
        reference.model.to(device)
        ids = reference.tokenizer(text)["input_ids"]
        ref = log_probs(reference.model, ids, device)
        base_bytes, vocab_limit = reference.weight_bytes, reference.vocab_limit
        del reference
        for spec_name in args.specs.split(","):
            started = time.monotonic()
            loaded = load_model(name, cache=cache, device=device, dtype=dtype,
                                quant=spec_of(spec_name))
            quality = compare(ref, log_probs(loaded.model, ids, device), ids, vocab_limit)
            row = {"model": name, "quantize": spec_name, "dtype": str(dtype).split(".")[-1],
                   "weight_bytes": loaded.weight_bytes, "reference_weight_bytes": base_bytes,
                   **quality.as_dict(), "seconds": round(time.monotonic() - started, 1)}
            results.append(row)
            print(f"{name:24} {spec_name:18} agreement {quality.agreement:6.1%} "
                  f"(near ties {quality.agreement_near_ties:6.1%})  perplexity "
                  f"{quality.perplexity:8.2f} vs {quality.reference_perplexity:8.2f} "
                  f"(x{quality.perplexity_ratio:.3f})  weights {loaded.weight_bytes / 2**20:8.1f}"
                  f" MiB of {base_bytes / 2**20:8.1f}", flush=True)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    report = {"benchmark": "quality", "device": str(device), "card": card,
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "text": str(TEXT.relative_to(ROOT)), "tokens": len(ids), "results": results}
    slug = card_slug(card) if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else \
        ROOT / "bench" / "results" / f"quality-{slug}-{report['date']}.json"
    write_report(report, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
