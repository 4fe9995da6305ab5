"""The `lmx` command: one front door to the services and their tools.

    lmx admission [flags]      the admission server (python -m services.admission)
    lmx worker --model NAME    a worker serving one model (python -m services.worker)
    lmx kvstore [flags]        the KV store server (python -m services.kvstore)
    lmx front [flags]          the OpenAI-compatible HTTP front (python -m services.front)
    lmx chat [--model NAME]    talk to a model, streaming (one-shot with -p)
    lmx status [--json]        who holds which GPU memory
    lmx watch                  admission's events as they happen
    lmx up [-d] [--stack FILE] start the whole stack (deploy/lmx.toml), supervised
    lmx down                   stop it
    lmx ps                     per device the memory book, per worker its state and sessions
    lmx demo                   the main job: see `lmx demo --help`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

ADMISSION_ENV = "LMX_ADMISSION_ADDRESS"
DEFAULT_ADMISSION = "127.0.0.1:50051"


def _admission_address(args: argparse.Namespace) -> str:
    return args.admission or os.environ.get(ADMISSION_ENV) or DEFAULT_ADMISSION


async def _status(address: str, as_json: bool) -> int:
    import grpc
    from google.protobuf import json_format

    from services.admission.client import AdmissionClient
    from services.admission.table import render_status

    async with AdmissionClient(address, timeout_s=5) as admission:
        try:
            status = await admission.status()
        except grpc.aio.AioRpcError as exc:
            print(f"lmx status: cannot reach admission at {address}: {exc.code().name} "
                  f"({exc.details()}); is it running? (lmx admission, or --admission HOST:PORT)",
                  file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(json_format.MessageToDict(status, preserving_proto_field_name=True),
                         indent=2))
    else:
        print(render_status(status))
    return 0


async def _watch(address: str) -> int:
    """Print admission's events until the stream ends or SIGINT/SIGTERM: the
    signal cancels the call itself, so that the exit never waits on the
    stream (asyncio's default, cancelling the main task, sometimes left the
    process waiting under load)."""
    import signal

    import grpc

    from lmx.v1 import admission_pb2 as pb
    from services.admission.client import AdmissionClient
    from services.admission.table import render_event

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    admission = AdmissionClient(address)
    call = admission.stub.Watch(pb.WatchRequest())

    async def pump() -> int:
        try:
            async for event in call:
                print(f"{event.seq:>6}  {render_event(event)}", flush=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and stop.is_set():
                return 130
            print(f"lmx watch: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        return 0

    printing = asyncio.create_task(pump())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({printing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if printing.done():
            return printing.result()
        call.cancel()
        try:
            await asyncio.wait_for(printing, 2.0)
        except (TimeoutError, asyncio.CancelledError):
            pass
        return 130
    finally:
        stopping.cancel()
        try:
            await asyncio.wait_for(admission.close(), 2.0)
        except TimeoutError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lmx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("admission", help="run the admission server (flags: lmx admission -h)",
                        add_help=False)
    commands.add_parser("worker", help="run a worker (flags: lmx worker -h)", add_help=False)
    commands.add_parser("kvstore", help="run the KV store (flags: lmx kvstore -h)",
                        add_help=False)
    commands.add_parser("front", help="run the OpenAI-compatible HTTP front (flags: lmx front -h)",
                        add_help=False)
    commands.add_parser("chat", help="talk to a model (flags: lmx chat -h)", add_help=False)
    status = commands.add_parser("status", help="show who holds which GPU memory")
    status.add_argument("--admission", metavar="HOST:PORT",
                        help=f"admission's address (or {ADMISSION_ENV}; default {DEFAULT_ADMISSION})")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    watch = commands.add_parser("watch", help="print admission's events as they happen")
    watch.add_argument("--admission", metavar="HOST:PORT")
    commands.add_parser("demo", help="run the demo (flags: lmx demo -h)", add_help=False)
    from services.stack import commands as stack_commands
    stack_commands.add_commands(commands)

    if argv and argv[0] == "admission":
        from services.admission.main import main as admission_main
        return admission_main(argv[1:])
    if argv and argv[0] == "worker":
        from services.worker.main import main as worker_main
        return worker_main(argv[1:])
    if argv and argv[0] == "kvstore":
        from services.kvstore.main import main as kvstore_main
        return kvstore_main(argv[1:])
    if argv and argv[0] == "front":
        from services.front.main import main as front_main
        return front_main(argv[1:])
    if argv and argv[0] == "chat":
        from services.chat import main as chat_main
        return chat_main(argv[1:], os.environ.get(ADMISSION_ENV) or DEFAULT_ADMISSION)
    if argv and argv[0] == "demo":
        from services.demo import main as demo_main
        return demo_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        result = stack_commands.run(args)
        if result is not None:
            return result
        if args.command == "status":
            return asyncio.run(_status(_admission_address(args), args.json))
        if args.command == "watch":
            return asyncio.run(_watch(_admission_address(args)))
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
