"""Entry point of a worker server (one per model)."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.server import App, run_service
from services.worker.settings import WorkerSettings, load_settings


def _app(settings: WorkerSettings) -> App:
    from services.worker.app import WorkerApp  # torch and transformers load here

    return WorkerApp(settings)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("worker", load_settings, _app, argv)
