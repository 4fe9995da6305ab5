"""Admission as an App for the shared server bootstrap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import structlog

from lmx.v1 import admission_pb2, admission_pb2_grpc
from services.admission.book_file import BookFile, Outstanding
from services.admission.broker import Broker
from services.admission.devices import open_devices
from services.admission.ledger import Ledger, TtlLimits
from services.admission.servicer import AdmissionServicer
from services.admission.settings import AdmissionSettings
from services.common.paths import runtime_dir

log = structlog.get_logger(__name__)

SERVICE_NAME = admission_pb2.DESCRIPTOR.services_by_name["AdmissionService"].full_name


class AdmissionApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: AdmissionSettings):
        self.settings = settings
        self.book_file: BookFile | None = None
        self._book_task: asyncio.Task | None = None
        source = open_devices(settings.device_backend, settings.devices)
        memories = source.read({})
        ledger = Ledger(memories, settings.cap_fraction,
                        TtlLimits(settings.default_ttl_s, settings.min_ttl_s, settings.max_ttl_s))
        self.broker = Broker(ledger, source, max_wait_s=settings.max_wait_s,
                             sweep_interval_s=settings.sweep_interval_s,
                             poll_interval_s=settings.poll_interval_s,
                             reclaim_deadline_s=settings.reclaim_deadline_s,
                             min_resident_s=settings.min_resident_s)
        for view in ledger.devices():
            log.info("device_found", device=view.memory.device, name=view.memory.name,
                     source=view.memory.source, total_bytes=view.memory.total_bytes,
                     cap_bytes=view.cap_bytes, foreign_bytes=view.memory.foreign_bytes,
                     budget_bytes=view.budget_bytes)

    def register(self, server: grpc.aio.Server) -> None:
        admission_pb2_grpc.add_AdmissionServiceServicer_to_server(
            AdmissionServicer(self.broker), server)

    async def start(self, address: str) -> None:
        self.book_file = self._book_file(address)
        if self.book_file is not None:
            left = self.book_file.read()
            if left.leases:
                grace = min(left.longest_ttl_s, self.settings.restart_grace_max_s)
                self.broker.ledger.paused_until = self.broker.ledger.clock() + grace
                log.warning("restart_grace", previous_leases=left.leases, seconds=round(grace, 3),
                            message="the previous run left leases out: nothing is granted "
                                    "until their holders have let go")
        await self.broker.start()
        if self.book_file is not None:
            self._book_task = asyncio.create_task(self._note_book(), name="book-file")

    def _book_file(self, address: str) -> BookFile | None:
        if self.settings.state_file == "none":
            return None
        if self.settings.state_file:
            return BookFile(Path(self.settings.state_file))
        name = "admission-" + "".join(c if c.isalnum() else "-" for c in address) + ".json"
        return BookFile(runtime_dir() / name)

    def _outstanding(self) -> Outstanding:
        leases = self.broker.ledger.leases()
        return Outstanding(len(leases), max((lease.ttl_s for lease in leases), default=0.0))

    async def _note_book(self) -> None:
        while True:
            await asyncio.sleep(self.broker.sweep_interval_s)
            try:
                self.book_file.note(self._outstanding())
            except OSError as exc:   # a full or read-only disk: say so, keep serving
                log.warning("book_file_not_written", error=str(exc))
                await asyncio.sleep(5.0)

    def drain(self) -> None:
        self.broker.drain()

    async def close(self) -> None:
        if self._book_task is not None:
            self._book_task.cancel()
        left = self._outstanding()
        await self.broker.close()
        if self.book_file is not None:
            try:
                if left.leases:
                    self.book_file.note(left, force=True)
                else:
                    self.book_file.path.unlink(missing_ok=True)  # a clean stop, nothing out
            except OSError as exc:
                log.warning("book_file_not_written", error=str(exc))
