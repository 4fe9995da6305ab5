"""Entry point of the admission server."""

from __future__ import annotations

from collections.abc import Sequence

from services.admission.settings import AdmissionSettings, load_settings
from services.common.server import App, run_service


def _app(settings: AdmissionSettings) -> App:
    from services.admission.app import AdmissionApp

    return AdmissionApp(settings)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("admission", load_settings, _app, argv)
