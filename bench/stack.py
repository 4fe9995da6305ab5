"""How long the stack takes: `lmx up` until every service is SERVING, the
first answer through the Python client, `lmx ps`, and `lmx down` until every
process is gone. The default stack file (deploy/lmx.toml: smollm2-135m and
gemma3-270m) on free ports, models already converted in the cache (one
untimed `lmx up` first converts them if needed). `--runs` repetitions.

    .venv/bin/python bench/stack.py            # make bench-stack

Writes bench/results/stack-<device>-<date>.json and stack-<device>-latest.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("LMX_CACHE", str(ROOT / ".cache" / "lmx"))

from benchkit import cpu_model, git_commit  # noqa: E402

from lmx.client import Client  # noqa: E402
from services.common.launch import free_port  # noqa: E402
from services.stack.config import DEFAULT_STACK  # noqa: E402


def stack_copy(directory: Path, device: str) -> Path:
    """deploy/lmx.toml on free ports, workers on `device`."""
    doc = tomllib.loads(DEFAULT_STACK.read_text())
    lines = [f'[admission]\nlisten = "127.0.0.1:{free_port("127.0.0.1")}"\n',
             f'[kvstore]\nlisten = "127.0.0.1:{free_port("127.0.0.1")}"\n'
             f'keep-on-stop = false\nstore-id = "bench{os.getpid()}"\n'
             f'state-dir = "{directory / "kvstate"}"\n']
    for worker in doc["worker"]:
        lines.append(f'[[worker]]\nmodel = "{worker["model"]}"\n'
                     f'listen = "127.0.0.1:{free_port("127.0.0.1")}"\ndevice = "{device}"\n')
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lmx.toml"
    path.write_text("\n".join(lines))
    return path


def one_run(directory: Path, device: str) -> dict:
    path = stack_copy(directory, device)
    env = {**os.environ, "LMX_STACK_DIR": str(directory / "run")}
    admission = tomllib.loads(path.read_text())["admission"]["listen"]
    t0 = time.perf_counter()
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--stack", str(path)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    state = directory / "run" / "stack.json"
    while not state.exists():
        if up.poll() is not None:
            raise RuntimeError(f"lmx up exited: {up.stdout.read()}")
        time.sleep(0.02)
    ready_s = time.perf_counter() - t0
    result = {"up_to_ready_s": round(ready_s, 3)}
    with Client(admission, timeout_s=300) as client:
        for model in ("smollm2-135m", "gemma3-270m"):
            t = time.perf_counter()
            with client.session(model) as session:
                first = None
                for _ in session.send("Hello", raw=True, max_tokens=8):
                    first = first or time.perf_counter() - t
            result[f"first_token_{model}_s"] = round(first or 0, 3)
    t = time.perf_counter()
    ps = subprocess.run([sys.executable, "-m", "services.cli", "ps"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
    result["ps_s"] = round(time.perf_counter() - t, 3)
    assert ps.returncode == 0, ps.stderr
    t = time.perf_counter()
    down = subprocess.run([sys.executable, "-m", "services.cli", "down"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    up.wait(60)
    result["down_s"] = round(time.perf_counter() - t, 3)
    assert down.returncode == 0, down.stderr
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu", help="the workers' --device [cpu]")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="lmx-bench-stack-") as tmp:
        one_run(Path(tmp) / "warm", args.device)     # converts the models if needed; untimed
        runs = [one_run(Path(tmp) / f"run{i}", args.device) for i in range(args.runs)]
    keys = runs[0].keys()
    result = {"benchmark": "stack", "date": started.isoformat(timespec="seconds"),
              "commit": git_commit(), "device": args.device,
              "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count()},
              "runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in keys}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"stack-{args.device}-{started.date()}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    (out / f"stack-{args.device}-latest.json").write_text(json.dumps(result, indent=1))
    for key, value in result["median"].items():
        print(f"{key:<32} {value:8.3f} s (median of {len(runs)})")
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
