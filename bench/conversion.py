"""GGUF conversion: how long a model's first start spends de-quantizing its
GGUF into the cache, with the file parsed once for tokenizer, config and
weights (what the worker does) and parsed for each of them (transformers
alone). Each run converts into a fresh temporary cache, in a fresh process
(so nothing is cached by the process either).

    .venv/bin/python bench/conversion.py                 # both GGUF models, both ways
    .venv/bin/python bench/conversion.py --models gemma3-270m --repeats 2

Writes bench/results/conversion-cpu-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import cpu_model, git_commit, write_report  # noqa: E402

CHILD = """
import contextlib, sys, time
from pathlib import Path
from services.worker import models
if sys.argv[3] == "each":     # transformers alone: no shared reader
    models._one_gguf_parse = contextlib.nullcontext
started = time.perf_counter()
models.converted_dir(sys.argv[1], Path(sys.argv[2]))
print(time.perf_counter() - started)
"""


def convert_once(model: str, mode: str, gguf_dir: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="lmx-conv-") as cache:
        os.symlink(gguf_dir, Path(cache) / "gguf")   # an assembled GGUF is reused
        out = subprocess.run([sys.executable, "-c", CHILD, model, cache, mode], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gguf_dir = Path(tempfile.mkdtemp(prefix="lmx-gguf-"))     # removed at the end
    sys.path.insert(0, str(ROOT))
    from services.worker.models import GGUF_SOURCES
    with tempfile.TemporaryDirectory(prefix="lmx-conv-") as cache:
        os.symlink(gguf_dir, Path(cache) / "gguf")
        for model in args.models.split(","):   # assembled first, not timed (Gemma 3's parts)
            GGUF_SOURCES[model](Path(cache))
    rows = []
    for model in args.models.split(","):
        for mode in ("once", "each"):
            seconds = [convert_once(model, mode, gguf_dir) for _ in range(args.repeats)]
            rows.append({"model": model, "gguf_parsed": mode, "seconds": seconds,
                         "median_s": round(statistics.median(seconds), 1)})
            print(f"{model:14s} parsed {mode:4s}: {rows[-1]['median_s']:6.1f} s", flush=True)
    shutil.rmtree(gguf_dir, ignore_errors=True)
    today = dt.date.today().isoformat()
    report = {
        "bench": "conversion", "date": today, "commit": git_commit(), "machine": cpu_model(),
        "cpu_count": os.cpu_count(), "repeats": args.repeats,
        "definitions": {
            "seconds": "converted_dir() into an empty cache, in a fresh process: GGUF to "
                       "safetensors, config and tokenizer",
            "gguf_parsed": "once: one gguf reader shared by tokenizer, config and weights (the "
                           "worker); each: a new reader for each (transformers alone)",
        },
        "rows": rows,
    }
    write_report(report, args.out or ROOT / "bench" / "results" / f"conversion-cpu-{today}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
