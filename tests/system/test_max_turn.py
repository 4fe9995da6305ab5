"""No model holds the device against another model's waiting request past
a quantum (issue 19: an endless generation kept its model "draining" for
minutes, and a request for the other model waited 478 s).

Real processes on loopback: admission (a simulated 1400 MiB device, room for
one of the two models at a time), a kvstore, a smollm2-135m worker and a
gemma3-270m worker, both with --max-turn-s 2. smollm2 generates a long
answer; a request for gemma3 then gets its first token within the turn plus
a wake, while smollm2's answer is not finished; smollm2's answer then goes
on, to the same tokens as one never paused."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from service.kvstore.support import kvstore_servers  # noqa: E402
from service.support import admission_servers  # noqa: E402
from service.worker.worker_support import (  # noqa: E402
    GEMMA3,
    GENERATE_TIMEOUT_S,
    SHARED_MAX_CONTEXT,
    SMOLLM2,
    WorkerClient,
    WorkerProcess,
    generate_request,
)

pytestmark = pytest.mark.timeout(400, func_only=True)

MAX_TURN_S = 2.0
LONG = 200          # tokens: about 15 s on the CI's CPU, several turns of MAX_TURN_S
PROMPT = "Count: one, two,"


def test_a_long_generation_pauses_at_the_end_of_its_turn_for_another_model(tmp_path):
    with admission_servers(tmp_path) as start_admission, kvstore_servers(tmp_path) as start_kv:
        kvstore = start_kv()
        admission = start_admission("--device", "cpu:0=1400MiB", "--reclaim-deadline-s", "30")
        flags = ("--max-context", str(SHARED_MAX_CONTEXT), "--kvstore", kvstore.address,
                 "--max-turn-s", str(MAX_TURN_S))
        smollm2 = WorkerProcess(SMOLLM2, admission.address, flags, tmp_path / "smollm2.log")
        gemma3 = WorkerProcess(GEMMA3, admission.address, flags, tmp_path / "gemma3.log")
        smollm2.launch().wait_ready()
        gemma3.launch().wait_ready()
        try:
            with WorkerClient(smollm2.address) as small, WorkerClient(gemma3.address) as other:
                control = small.open()
                want = small.generate(control, prompt=PROMPT, max_tokens=LONG,
                                      timeout=GENERATE_TIMEOUT_S * 4).token_ids
                small.close_session(control)
                assert len(want) == LONG, "the long answer ended early: pick another prompt"

                session = small.open()
                got: list[int] = []
                done = threading.Event()

                def long_answer() -> None:
                    for reply in small.stub.Generate(
                            generate_request(session, prompt=PROMPT, max_tokens=LONG),
                            timeout=GENERATE_TIMEOUT_S * 4):
                        if reply.HasField("delta"):
                            got.extend(reply.delta.token_ids)
                    done.set()

                runner = threading.Thread(target=long_answer)
                runner.start()
                while len(got) < 8:                    # smollm2 is generating
                    time.sleep(0.01)
                asked = time.monotonic()
                stream = other.stub.Generate(generate_request(
                    other.open(), prompt="The capital of France is", max_tokens=4),
                    timeout=GENERATE_TIMEOUT_S)
                next(iter(stream))                     # gemma3's first token
                first_token_s = time.monotonic() - asked
                at_first_token = len(got)
                list(stream)
                runner.join(GENERATE_TIMEOUT_S * 4)
                assert done.is_set()
                assert at_first_token < LONG, (
                    "gemma3 got its turn only once smollm2's answer was over")
                assert first_token_s < MAX_TURN_S + 20, first_token_s
                assert got == want, "the paused answer went on differently"
                assert "turn_over" in smollm2.log()
        finally:
            smollm2.kill()
            gemma3.kill()
