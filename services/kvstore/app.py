"""The KV store as an App for the shared server bootstrap."""

from __future__ import annotations

from pathlib import Path

import grpc
import structlog

from lmx.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.servicer import KVStoreServicer
from services.kvstore.settings import KVStoreSettings
from services.kvstore.store import Store, StoreConfig

log = structlog.get_logger(__name__)

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStoreService"].full_name


def store_config(settings: KVStoreSettings) -> StoreConfig:
    return StoreConfig(
        shm_dir=Path(settings.shm_dir), store_id=settings.store_id,
        segment_bytes=settings.segment_bytes, capacity_bytes=settings.capacity_bytes,
        when_full=settings.when_full, spill_dir=Path(settings.spill_dir),
        state_dir=Path(settings.state_dir), keep_on_stop=settings.keep_on_stop,
        clean_stale=settings.clean_stale, max_entry_bytes=settings.max_entry_bytes)


class KVStoreApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: KVStoreSettings):
        self.settings = settings
        self.store = Store(store_config(settings))
        # Before serving: a store already running under this id is a clear error.
        self.store.start()

    def register(self, server: grpc.aio.Server) -> None:
        kvstore_pb2_grpc.add_KVStoreServiceServicer_to_server(
            KVStoreServicer(self.store, self.settings.export_chunk_bytes), server)

    async def start(self, address: str) -> None:
        pass

    def drain(self) -> None:
        pass

    async def close(self) -> None:
        self.store.close()
