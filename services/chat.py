"""`lmx chat`: talk to a model through its worker, streaming the answer.

The worker is found through admission (ListWorkers), or given with --worker.
One-shot with -p, else interactive (an empty line or Ctrl-D ends it). Chat
models get chat turns; base models (gemma3-270m) get raw text continuation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc

from lmx.client import SERVING_STATES
from lmx.v1 import admission_pb2
from lmx.v1 import worker_pb2 as pb
from lmx.v1 import worker_pb2_grpc
from services.admission.client import AdmissionClient, error_details
from services.common import transport


async def find_worker(admission_address: str, model: str) -> str:
    async with AdmissionClient(admission_address, timeout_s=5) as admission:
        workers = await admission.list_workers(model)
    # An asleep worker takes requests too: the first one wakes it.
    ready = [w for w in workers if w.state in SERVING_STATES]
    if ready:
        return ready[0].address
    if workers:
        state = admission_pb2.WorkerState.Name(workers[0].state).removeprefix("WORKER_STATE_")
        raise LookupError(f"the worker for {model} is {state.lower()}, not ready yet; try again "
                          "shortly (lmx status shows it)")
    raise LookupError(f"no worker serves {model}; start one: lmx worker --model {model}")


async def _turn(stub, session: pb.OpenSessionResponse, text: str, args, out) -> pb.GenerateFinish:
    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb.GenerateRequest(session_id=session.session_id, token=session.token,
                                 sampling=sampling)
    if session.chat and not args.raw:
        request.message.CopyFrom(pb.ChatMessage(role="user", content=text))
    else:
        request.prompt = text
    finish = pb.GenerateFinish()
    async for reply in stub.Generate(request):
        if reply.HasField("delta"):
            out.write(reply.delta.text)
            out.flush()
        else:
            finish = reply.finish
    out.write("\n")
    return finish


async def chat(args, out=sys.stdout) -> int:
    address = args.worker or await find_worker(args.admission, args.model)
    async with transport.aio_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        session = await stub.OpenSession(pb.OpenSessionRequest(
            model=args.model if not args.worker else "", system_prompt=args.system or ""))
        try:
            if args.prompt is not None:
                await _turn(stub, session, args.prompt, args, out)
                return 0
            mode = "chat" if session.chat and not args.raw else "raw text continuation"
            print(f"{session.model} at {address} ({mode}); an empty line or Ctrl-D ends",
                  file=sys.stderr)
            loop = asyncio.get_running_loop()
            while True:
                try:
                    line = await loop.run_in_executor(None, input, "> ")
                except EOFError:
                    break
                if not line.strip():
                    break
                await _turn(stub, session, line, args, out)
        finally:
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id,
                                                           token=session.token))
    return 0


def main(argv: Sequence[str] | None = None, default_admission: str = "127.0.0.1:50051") -> int:
    parser = argparse.ArgumentParser(prog="lmx chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model name [smollm2-135m]")
    parser.add_argument("-p", "--prompt", help="one message, answered, then exit")
    parser.add_argument("--system", help="system prompt (chat models)")
    parser.add_argument("--raw", action="store_true", help="raw text, no chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy [0]")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--admission", default=default_admission, help="admission's address")
    parser.add_argument("--worker", help="a worker's address (skips the admission lookup)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(chat(args))
    except LookupError as exc:
        print(f"lmx chat: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        where = f" (field {details.field})" if details.field else ""
        print(f"lmx chat: {exc.code().name}: {details.message}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
