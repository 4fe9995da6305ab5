"""Entry point of a worker server (one per model)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from services.common.server import App, run_service
from services.worker.settings import WorkerSettings, load_settings


#: torch's CUDA allocator, before torch loads: expandable segments map device
#: memory page by page into one growing range, instead of rounding each
#: tensor of 1-10 MiB into a segment of its own 20 MiB. Without them a
#: Qwen2.5-3B shape's 250 weight tensors wasted 145 MiB while loading and
#: overran the lease admission had granted for them. A value the user set
#: is kept.
ALLOCATOR_CONF = "expandable_segments:True"


def _app(settings: WorkerSettings) -> App:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_CONF)
    from services.worker.app import WorkerApp  # torch and transformers load here

    return WorkerApp(settings)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("worker", load_settings, _app, argv)
