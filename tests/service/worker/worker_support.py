"""Real worker servers as subprocesses, a small synchronous client for
WorkerService, and the Hugging Face reference the worker is compared with.

Workers are started with `python -m services.worker --listen 127.0.0.1:0`
(the port the server took is read from its "server_ready" log line) and the
converted-model cache of LMX_CACHE (else <repo>/.cache/lmx). The first start
of a model converts its GGUF (a minute or two), so start-up waits long.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmx.v1 import worker_pb2 as wpb
from lmx.v1 import worker_pb2_grpc
from services.admission.client import ErrorDetails, error_details
from services.common.parent import child_env

from ..support import REPO_ROOT, server_ready_address

WORKER_SERVICE = "lmx.v1.WorkerService"
#: Converting a GGUF the first time takes 40-110 s on a small machine.
WORKER_START_TIMEOUT_S = 300.0
WORKER_STOP_TIMEOUT_S = 15.0
#: Deadline of a unary worker call; a whole generation gets GENERATE_TIMEOUT_S.
RPC_TIMEOUT_S = 10.0
GENERATE_TIMEOUT_S = 60.0

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
#: The shared smollm2 worker's window is cut to this (a too-long prompt is cheap to build).
SHARED_MAX_CONTEXT = 512


def cache_dir() -> Path:
    """The converted-model cache the tests and their workers share."""
    return Path(os.environ.get("LMX_CACHE") or REPO_ROOT / ".cache" / "lmx")


def worker_env() -> dict[str, str]:
    """The environment of a worker: no stray LMX_* settings, the shared cache."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LMX_")}
    env["LMX_CACHE"] = str(cache_dir())
    return child_env(env)   # stops if this test process dies


# ---- worker processes ---------------------------------------------------------

@dataclass
class WorkerProcess:
    """`python -m services.worker` on a free loopback port."""

    model: str
    admission: str
    flags: tuple[str, ...]
    log_path: Path
    proc: subprocess.Popen | None = None
    address: str = ""
    _log_file: object = field(default=None, repr=False)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "services.worker", "--model", self.model,
                "--listen", "127.0.0.1:0", "--admission", self.admission,
                "--log-format", "json", *self.flags]

    def launch(self) -> WorkerProcess:
        """Start the process; `wait_ready` waits for it."""
        if self.proc is None:
            self._log_file = open(self.log_path, "wb")
            self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=worker_env(),
                                         stdin=subprocess.DEVNULL, stdout=self._log_file,
                                         stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> WorkerProcess:
        """Until the log says server_ready and health says SERVING."""
        assert self.proc is not None, "launch() first"
        if self.address:
            return self
        deadline = time.monotonic() + timeout_s
        while True:
            address = self.ready_address()
            if address:
                break
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                raise AssertionError(f"worker {self.model} exited with {code} before it was "
                                     f"ready ({' '.join(self.argv)}); log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker {self.model} logged no server_ready within "
                                     f"{timeout_s}s; log:\n{self.log_tail()}")
            time.sleep(0.05)
        last = "no answer"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE),
                                          timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        self.address = address
                        return self
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"health of worker {self.model} at {address} not SERVING "
                             f"(last: {last}); log:\n{self.log_tail()}")

    def ready_address(self) -> str:
        return server_ready_address(self.log())

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[dict]:
        """The JSON lines of the log (tqdm progress bars and the like skipped)."""
        lines = []
        for line in self.log().splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                lines.append(json.loads(line[start:]))
            except ValueError:
                continue
        return lines

    def log_tail(self, num_chars: int = 6000) -> str:
        text = self.log()
        return text if len(text) <= num_chars else "...\n" + text[-num_chars:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> str:
        """The health status name of WorkerService (or the error's code)."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class WorkerFleet:
    """Worker processes shared by the tests of a session, by key. `launch`
    starts one without waiting (so that several load at once), `ready` waits."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.workers: dict[str, WorkerProcess] = {}

    def launch(self, key: str, model: str, admission: str, *flags: str) -> WorkerProcess:
        worker = self.workers.get(key)
        if worker is None:
            worker = WorkerProcess(model, admission, tuple(flags), self.log_dir / f"{key}.log")
            self.workers[key] = worker
        return worker.launch()

    def ready(self, key: str, model: str, admission: str, *flags: str) -> WorkerProcess:
        return self.launch(key, model, admission, *flags).wait_ready()

    def stop(self, key: str) -> str | None:
        """Stop one; a problem to report (or None)."""
        worker = self.workers.pop(key)
        if worker.proc is not None and not worker.alive():
            return (f"worker {key} died during the tests (exit code {worker.proc.returncode}); "
                    f"log:\n{worker.log_tail()}")
        code = worker.stop()
        if code != 0:
            return f"worker {key} exited with {code} after SIGTERM; log:\n{worker.log_tail()}"
        return None

    def stop_all(self) -> list[str]:
        return [problem for key in list(self.workers) if (problem := self.stop(key))]


def launch_smollm2(fleet: WorkerFleet, admission: str) -> WorkerProcess:
    """The session's shared SmolLM2 worker (started once, however often asked)."""
    return fleet.launch("smollm2", SMOLLM2, admission, "--max-context", str(SHARED_MAX_CONTEXT))


def launch_gemma3(fleet: WorkerFleet, admission: str) -> WorkerProcess:
    """The session's shared Gemma 3 worker."""
    return fleet.launch("gemma3", GEMMA3, admission)


# ---- a synchronous client ------------------------------------------------------

@dataclass
class Opened:
    session_id: str
    token: str
    reply: wpb.OpenSessionResponse


@dataclass
class Generation:
    """What one Generate streamed."""

    token_ids: list[int]
    text: str
    finish: wpb.GenerateFinish | None
    num_deltas: int

    @property
    def reason(self) -> str:
        return wpb.FinishReason.Name(self.finish.reason) if self.finish else "none"


def generate_request(session: Opened, *, prompt: str | None = None,
                     message: tuple[str, str] | None = None, max_tokens: int | None = 16,
                     **sampling) -> wpb.GenerateRequest:
    request = wpb.GenerateRequest(session_id=session.session_id, token=session.token)
    if prompt is not None:
        request.prompt = prompt
    if message is not None:
        request.message.CopyFrom(wpb.ChatMessage(role=message[0], content=message[1]))
    if max_tokens is not None:
        request.sampling.CopyFrom(wpb.SamplingParams(max_tokens=max_tokens, **sampling))
    return request


def collect(stream: Iterator[wpb.GenerateResponse]) -> Generation:
    ids: list[int] = []
    text: list[str] = []
    finish = None
    num_deltas = 0
    for response in stream:
        kind = response.WhichOneof("kind")
        assert finish is None, f"Generate streamed a {kind} after its finish"
        if kind == "delta":
            num_deltas += 1
            ids.extend(response.delta.token_ids)
            text.append(response.delta.text)
        else:
            assert kind == "finish", f"Generate streamed a response with no kind: {response!r}"
            finish = response.finish
    return Generation(ids, "".join(text), finish, num_deltas)


class WorkerClient:
    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, **fields) -> Opened:
        reply = self.stub.OpenSession(wpb.OpenSessionRequest(**fields), timeout=RPC_TIMEOUT_S)
        assert reply.session_id and reply.token, f"OpenSession gave no id or token: {reply!r}"
        return Opened(reply.session_id, reply.token, reply)

    def close_session(self, session: Opened) -> wpb.CloseSessionResponse:
        return self.stub.CloseSession(
            wpb.CloseSessionRequest(session_id=session.session_id, token=session.token),
            timeout=RPC_TIMEOUT_S)

    def generate(self, session: Opened, *, timeout: float = GENERATE_TIMEOUT_S,
                 **fields) -> Generation:
        """A whole generation; it must end with a finish."""
        result = collect(self.stub.Generate(generate_request(session, **fields), timeout=timeout))
        assert result.finish is not None, f"Generate ended without a finish: {result!r}"
        return result

    def status(self) -> wpb.GetStatusResponse:
        return self.stub.GetStatus(wpb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)


def rpc_error(call, *args, **kwargs) -> tuple[grpc.RpcError, ErrorDetails]:
    """Run a unary call or consume a stream, expecting it to fail; the error
    and its rich details."""
    kwargs.setdefault("timeout", RPC_TIMEOUT_S)
    try:
        answer = call(*args, **kwargs)
        if isinstance(answer, grpc.Call) or hasattr(answer, "__next__"):
            answer = collect(answer)
    except grpc.RpcError as exc:
        return exc, error_details(exc)
    raise AssertionError(f"the call succeeded but should have failed: {args!r} -> {answer!r}")


def run_concurrently(jobs: dict, timeout_s: float) -> dict:
    """{name: callable} -> {name: result}, all started at once, each bounded."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        deadline = time.monotonic() + timeout_s
        results = {}
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                raise AssertionError(f"{name} did not finish within {timeout_s}s") from None
        return results


# ---- the Hugging Face reference --------------------------------------------------

class Reference:
    """A model loaded the plain Hugging Face way, in float32 on the CPU, and
    its greedy `generate`, to compare the worker with."""

    def __init__(self, name: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from services.worker.models import converted_dir

        # The worker converts the GGUF into the shared cache on its first
        # start; converted_dir takes the same lock, so this only reads.
        path = converted_dir(name, cache_dir())
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.eos = self.tokenizer.eos_token_id

    def prompt_ids(self, prompt: str) -> list[int]:
        """A raw prompt opening a session: the tokenizer's special tokens included."""
        return self.tokenizer(prompt)["input_ids"]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.lru_cache(maxsize=64)
    def greedy(self, input_ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.eos)
        inputs = torch.tensor([input_ids])
        with torch.inference_mode():
            out = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                      generation_config=config)
        return out[0, len(input_ids):].tolist()

    def text(self, ids: list[int], eos_ids: frozenset[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in eos_ids],
                                     skip_special_tokens=True)
