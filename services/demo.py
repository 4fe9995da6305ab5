"""`lmx demo` (what `make demo` runs): three agents on one simulated 8 GiB GPU.

Launched naively, each agent would reserve its weights and a large KV cache
up front: 12 GiB on an 8 GiB card, and all but one crash. Through admission
nothing crashes: what fits is granted, what does not is refused with the
shortfall or waits its turn in a fair queue, a holder that shrinks gives the
next in line its turn, and a holder that hangs loses its lease when its TTL
runs out, so its memory goes to the others.

Everything runs against a real admission server started as a child process;
its log is written beside the summary (default out/demo/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from lmx.v1 import admission_pb2 as pb
from services.admission.app import SERVICE_NAME
from services.admission.client import AdmissionClient, error_details
from services.admission.table import render_event
from services.common.launch import start_service
from services.common.units import format_bytes

GIB = 1 << 30


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


async def _show_status(address: str) -> None:
    """Run the real `lmx status` command."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "status", "--admission", address,
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    for line in out.decode().splitlines():
        say(f"   {line}")


async def _collect(admission: AdmissionClient, events: list[pb.Event]) -> None:
    async for event in admission.watch():
        events.append(event)


async def story(address: str, ttl_s: float) -> dict:
    events: list[pb.Event] = []
    outcomes: dict[str, str] = {}
    async with AdmissionClient(address) as admission, AdmissionClient(address) as watcher:
        watch_task = asyncio.create_task(_collect(watcher, events))
        await asyncio.sleep(0.2)
        status = await admission.status()
        device = status.devices[0]
        say(f"A simulated GPU {device.device} of {format_bytes(device.total_bytes)}: leases may "
            f"use {format_bytes(device.cap_bytes)} ({device.cap_fraction:.0%}).")
        say("Naively each agent reserves weights + a 2.5 GiB KV cache up front: "
            "4.0 + 4.5 + 3.5 = 12 GiB. Admission admits only what fits.")

        step("1. granted: code-gen takes weights and KV, security-review its weights")
        code_w = await admission.acquire("agent/code-gen", int(1.5 * GIB), "weights", ttl_s=ttl_s)
        code_kv = await admission.acquire("agent/code-gen", int(2.5 * GIB), "kv", ttl_s=ttl_s)
        sec_w = await admission.acquire("agent/security-review", 2 * GIB, "weights", ttl_s=ttl_s)
        keepers = {lease.lease_id: admission.keep_alive(lease)
                   for lease in (code_w, code_kv, sec_w)}
        outcomes["code-gen weights+kv"] = "granted"
        outcomes["security-review weights"] = "granted"
        await _show_status(address)

        step("2. refused: security-review asks for 2.5 GiB of KV at once; it does not fit")
        try:
            await admission.acquire("agent/security-review", int(2.5 * GIB), "kv", ttl_s=ttl_s)
            raise RuntimeError("the demo expected a refusal here")
        except grpc.aio.AioRpcError as exc:
            details = error_details(exc)
            missing = int((details.metadata or {}).get("missing_bytes", 0))
            say(f"   {exc.code().name}: {format_bytes(missing)} missing, retry in "
                f"{details.retry_after_s:.1f}s -- a clear error instead of an out-of-memory crash")
            outcomes["security-review kv, no wait"] = exc.code().name

        step("3. queued: security-review waits for its KV; documentation waits behind it")
        sec_kv_task = asyncio.create_task(admission.acquire(
            "agent/security-review", int(2.5 * GIB), "kv", wait_s=30, ttl_s=ttl_s))
        await asyncio.sleep(0.3)
        docs_task = asyncio.create_task(admission.acquire(
            "agent/documentation", 1 * GIB, "weights", wait_s=30, ttl_s=ttl_s))
        await asyncio.sleep(0.3)
        say("   (1 GiB would fit, but documentation does not overtake the agent queued first)")
        await _show_status(address)

        step("4. code-gen finishes its turn and shrinks its KV to 0.5 GiB: security-review runs")
        code_kv = await admission.resize(code_kv, GIB // 2)
        sec_kv = await sec_kv_task
        keepers[sec_kv.lease_id] = admission.keep_alive(sec_kv)
        say(f"   security-review got {format_bytes(sec_kv.bytes)} of KV after waiting")
        outcomes["security-review kv, waited"] = "granted"

        step(f"5. expired: code-gen hangs and stops renewing; after its {ttl_s:.0f}s TTL its "
             "memory returns and documentation gets its turn")
        keepers.pop(code_w.lease_id).cancel()
        keepers.pop(code_kv.lease_id).cancel()
        started = time.monotonic()
        docs_w = await docs_task
        keepers[docs_w.lease_id] = admission.keep_alive(docs_w)
        say(f"   documentation granted {format_bytes(docs_w.bytes)} "
            f"{time.monotonic() - started:.1f}s later")
        outcomes["documentation weights, waited"] = "granted"
        try:
            await admission.renew(code_w)
        except grpc.aio.AioRpcError as exc:
            say(f"   code-gen wakes up and renews: {exc.code().name} ({error_details(exc).reason})"
                " -- it must stop using that memory")
            outcomes["code-gen renews after expiry"] = exc.code().name
        await _show_status(address)

        step("6. everyone finishes and releases")
        for keeper in keepers.values():
            keeper.cancel()
        for lease in (sec_w, sec_kv, docs_w):
            await admission.release(lease)
        say("   code-gen's last lease (its shrunk KV) expires on its own as well")
        deadline = time.monotonic() + 3 * ttl_s
        final = await admission.status()
        while final.devices[0].leased_bytes and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            final = await admission.status()
        await asyncio.sleep(0.1)  # let the last events reach the watcher
        watch_task.cancel()

    say()
    say("Events seen through Watch:")
    for event in events:
        say(f"   {event.seq:>3}  {render_event(event)}")
    kinds = [event.WhichOneof("kind") for event in events]
    return {
        "device": {"id": device.device, "total_bytes": device.total_bytes,
                   "cap_bytes": device.cap_bytes},
        "outcomes": outcomes,
        "events": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "leased_at_end": final.devices[0].leased_bytes,
        "out_of_memory_crashes": 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmx demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-size", default="8GiB", help="simulated GPU size [8GiB]")
    parser.add_argument("--ttl-s", type=float, default=2.0, help="lease TTL in the story [2]")
    parser.add_argument("--out", type=Path, default=Path("out/demo"),
                        help="where the summary and admission's log go [out/demo]")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "admission.log"
    say(f"Starting admission (log: {log_path}) ...")
    service = start_service("services.admission", SERVICE_NAME,
                            ["--device", f"cpu:0={args.device_size}", "--log-format", "json"],
                            log_path=log_path)
    try:
        summary = asyncio.run(story(service.address, args.ttl_s))
    finally:
        code = service.stop()
    summary["admission_exit_code"] = code
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say()
    say(f"Admission stopped cleanly (exit {code}). Summary: {args.out / 'summary.json'}")
    if summary["leased_at_end"] != 0 or code != 0:
        say("demo FAILED: memory still leased at the end, or admission did not stop cleanly")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
