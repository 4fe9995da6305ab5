"""The Python client of lmx: find a model's worker through admission, open
sessions on it and stream their generations.

    from lmx.client import Client

    with Client() as lmx:                          # admission at 127.0.0.1:50051
        with lmx.session("smollm2-135m") as chat:
            for piece in chat.send("Write a haiku about memory."):
                print(piece.text, end="", flush=True)
            print(chat.finish.completion_tokens, "tokens")

A session keeps its context (KV) between turns on the worker; lmx may park it
in the kvstore and restore it when memory is short, which a client only sees
as a later first token. Everything is blocking and thread-safe: one thread
per agent is the simple way to run several at once. Errors are `ClientError`,
with the gRPC code and, where the server gave them, the field at fault and
when to retry.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from lmx.v1 import admission_pb2 as apb
from lmx.v1 import admission_pb2_grpc
from lmx.v1 import worker_pb2 as wpb
from lmx.v1 import worker_pb2_grpc
from services.common import transport

DEFAULT_ADMISSION = "127.0.0.1:50051"

#: Worker states that take requests: an asleep worker wakes for one.
SERVING_STATES = (apb.WORKER_STATE_READY, apb.WORKER_STATE_ASLEEP)


class ClientError(Exception):
    """A call lmx refused or could not answer."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "",
                 retry_after_s: float | None = None):
        where = f" (field {field})" if field else ""
        super().__init__(f"{code.name}: {message}{where}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


def _error(exc: grpc.RpcError) -> ClientError:
    from services.admission.client import error_details

    details = error_details(exc)
    return ClientError(details.code, details.message, details.field, details.retry_after_s)


@dataclass(frozen=True)
class Piece:
    """A piece of a streamed answer: its text and token ids."""
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finish:
    """How a generation ended (reason: stop, length, stop_string,
    context_window) and its token counts."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int


class Session:
    """A conversation on one worker. `send` adds a user turn (a chat model)
    or raw text (a base model, or raw=True) and streams the answer."""

    def __init__(self, client: Client, address: str, opened: wpb.OpenSessionResponse):
        self._client = client
        self.address = address
        self.session_id = opened.session_id
        self.token = opened.token
        self.model = opened.model
        self.chat = opened.chat
        self.max_context = opened.max_context
        #: How the last generation ended (None before the first).
        self.finish: Finish | None = None
        self._closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, text: str, *, raw: bool = False, max_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
             seed: int | None = None, stop: tuple[str, ...] = ()) -> Iterator[Piece]:
        """Stream the answer to `text` (greedy by default). The iterator must
        be read to its end (or closed) for the session to take another turn."""
        sampling = wpb.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k, stop=list(stop))
        if seed is not None:
            sampling.seed = seed
        request = wpb.GenerateRequest(session_id=self.session_id, token=self.token,
                                      sampling=sampling)
        if self.chat and not raw:
            request.message.CopyFrom(wpb.ChatMessage(role="user", content=text))
        else:
            request.prompt = text
        return self._stream(request)

    def generate(self, text: str, **kwargs) -> str:
        """`send`, read to the end: the whole answer."""
        return "".join(piece.text for piece in self.send(text, **kwargs))

    def _stream(self, request: wpb.GenerateRequest) -> Iterator[Piece]:
        self.finish = None
        calls = self._client._worker(self.address).Generate(request)
        try:
            for reply in calls:
                if reply.HasField("delta"):
                    yield Piece(reply.delta.text, tuple(reply.delta.token_ids))
                else:
                    f = reply.finish
                    self.finish = Finish(
                        wpb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_").lower(),
                        f.prompt_tokens, f.completion_tokens, f.context_tokens)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            calls.cancel()      # a no-op once the stream ended; stops it if the reader left

    def park(self) -> str:
        """Move this session's KV to the kvstore now (it comes back by itself
        on the next turn); returns the kvstore entry id."""
        try:
            reply = self._client._worker(self.address).ParkSession(
                wpb.ParkSessionRequest(session_id=self.session_id, token=self.token),
                timeout=self._client.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return reply.entry_id

    def close(self) -> None:
        """Free the session's context on the worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client._worker(self.address).CloseSession(
                wpb.CloseSessionRequest(session_id=self.session_id, token=self.token),
                timeout=self._client.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise _error(exc) from None


class Client:
    """Admission's address; workers are found through it (or named)."""

    def __init__(self, admission: str = DEFAULT_ADMISSION, *, timeout_s: float = 30.0):
        self.admission_address = admission
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.close()

    # ---- admission ----
    def status(self) -> apb.StatusResponse:
        """The memory book: devices, leases, waiters, reclaims."""
        return self._call(self._admission().Status, apb.StatusRequest())

    def workers(self, model: str = "") -> list[apb.WorkerInfo]:
        return list(self._call(self._admission().ListWorkers,
                               apb.ListWorkersRequest(model=model)).workers)

    def find_worker(self, model: str) -> str:
        """The address of a worker serving `model` that takes requests now."""
        workers = self.workers(model)
        serving = [w for w in workers if w.state in SERVING_STATES]
        if serving:
            return min(serving, key=lambda w: w.num_sessions).address
        if workers:
            state = apb.WorkerState.Name(workers[0].state).removeprefix("WORKER_STATE_").lower()
            raise ClientError(grpc.StatusCode.UNAVAILABLE,
                              f"the worker for {model} is {state}, not serving yet; try again "
                              "shortly (lmx ps shows it)")
        raise ClientError(grpc.StatusCode.NOT_FOUND,
                          f"no worker serves {model}: start one (lmx up, or "
                          f"lmx worker --model {model})")

    # ---- workers ----
    def session(self, model: str = "", *, worker: str = "", system_prompt: str = "") -> Session:
        """Open a session on `model`'s worker (found through admission), or
        on the worker at address `worker`."""
        if not model and not worker:
            raise ValueError("session() needs a model or a worker address")
        address = worker or self.find_worker(model)
        opened = self._call(self._worker(address).OpenSession,
                            wpb.OpenSessionRequest(model=model, system_prompt=system_prompt))
        return Session(self, address, opened)

    def worker_status(self, address: str) -> wpb.GetStatusResponse:
        return self._call(self._worker(address).GetStatus, wpb.GetStatusRequest())

    # ---- plumbing ----
    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = transport.channel(address)
            return channel

    def _admission(self) -> admission_pb2_grpc.AdmissionServiceStub:
        return admission_pb2_grpc.AdmissionServiceStub(self._channel(self.admission_address))

    def _worker(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(self._channel(address))
