"""The KV store as an App for the shared server bootstrap."""

from __future__ import annotations

import asyncio
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
        clean_stale=settings.clean_stale, max_entry_bytes=settings.max_entry_bytes,
        reservation_ttl_s=settings.reservation_ttl_s, spare_bytes=settings.spare_bytes)


class KVStoreApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: KVStoreSettings):
        self.settings = settings
        self.store = Store(store_config(settings))
        self._sweeper: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._manifest_stale = asyncio.Event()
        # Before serving: a store already running under this id is a clear error.
        self.store.start()

    def register(self, server: grpc.aio.Server) -> None:
        kvstore_pb2_grpc.add_KVStoreServiceServicer_to_server(
            KVStoreServicer(self.store, self.settings.export_chunk_bytes), server)

    async def start(self, address: str) -> None:
        if self.settings.reservation_ttl_s > 0:
            self._sweeper = asyncio.create_task(self._sweep(), name="kvstore-reservations")
        if self.settings.manifest_delay_s > 0:
            self.store.save_later = self._manifest_stale.set
            self._writer = asyncio.create_task(self._write_behind(), name="kvstore-manifest")

    async def _write_behind(self) -> None:
        """The whole manifest, off the commits' and deletes' path: each of
        them went on its journal (a line, services/kvstore/manifest.py); the
        manifest is rewritten once per --manifest-delay-s at most, for all
        that came meanwhile, and the journal starts afresh."""
        while True:
            await self._manifest_stale.wait()
            await asyncio.sleep(self.settings.manifest_delay_s)
            self._manifest_stale.clear()
            self.store.flush()

    async def _sweep(self) -> None:
        """Uncommitted reservations are dropped past their TTL even when no
        request comes to trigger it."""
        period = max(0.5, self.settings.reservation_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            self.store.expire_reservations()

    def drain(self) -> None:
        pass

    async def close(self) -> None:
        for task in (self._sweeper, self._writer):
            if task is not None:
                task.cancel()
        self.store.flush()
        self.store.close()
