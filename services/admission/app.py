"""Admission as an App for the shared server bootstrap."""

from __future__ import annotations

import grpc
import structlog

from lmx.v1 import admission_pb2, admission_pb2_grpc
from services.admission.broker import Broker
from services.admission.devices import open_devices
from services.admission.ledger import Ledger, TtlLimits
from services.admission.servicer import AdmissionServicer
from services.admission.settings import AdmissionSettings

log = structlog.get_logger(__name__)

SERVICE_NAME = admission_pb2.DESCRIPTOR.services_by_name["AdmissionService"].full_name


class AdmissionApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: AdmissionSettings):
        self.settings = settings
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
        await self.broker.start()

    def drain(self) -> None:
        self.broker.drain()

    async def close(self) -> None:
        await self.broker.close()
