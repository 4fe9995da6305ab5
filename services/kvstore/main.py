"""Entry point of the KV store server."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.server import App, run_service
from services.kvstore.settings import KVStoreSettings, load_settings


def _app(settings: KVStoreSettings) -> App:
    from services.kvstore.app import KVStoreApp

    return KVStoreApp(settings)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("kvstore", load_settings, _app, argv)
