"""Greedy generation through the worker's gRPC Generate equals Hugging Face
`generate` token for token (float32 on the CPU): for a session alone, and for
several sessions generating at once on the same worker (batched steps)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from .worker_support import (
    GEMMA3,
    SMOLLM2,
    Generation,
    Reference,
    WorkerClient,
    generate_request,
    launch_gemma3,
    launch_smollm2,
    rpc_error,
    run_concurrently,
)

# Worker start-up (and a first conversion) is in the fixtures, which have their own deadlines.
pytestmark = pytest.mark.timeout(180, func_only=True)

MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Input:
    """A raw prompt, or a user chat message, opening a session."""

    kind: str
    text: str

    def fields(self) -> dict:
        if self.kind == "prompt":
            return {"prompt": self.text}
        return {"message": ("user", self.text)}

    def reference_ids(self, reference: Reference) -> list[int]:
        if self.kind == "prompt":
            return reference.prompt_ids(self.text)
        return reference.chat_ids([{"role": "user", "content": self.text}])

    def __str__(self) -> str:
        return f"{self.kind} {self.text!r}"


INPUTS = {
    SMOLLM2: [
        Input("prompt", "The capital of France is"),
        Input("message", "What is the tallest mountain in the world? Answer in one sentence."),
        Input("prompt", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
        Input("prompt", "Once upon a time, in a small village by the sea, there lived an old "
                        "fisherman who"),
    ],
    GEMMA3: [
        Input("prompt", "The capital of France is"),
        Input("prompt", "Here is a list of the planets of the solar system:"),
        Input("prompt", "import numpy as np\n\ndef softmax(x):\n"),
        Input("prompt", "The recipe for a simple tomato soup: first,"),
    ],
}
#: Each model's inputs run alone; all of a model's inputs run at once.
ALONE = [(SMOLLM2, 0), (SMOLLM2, 1), (GEMMA3, 0)]


@pytest.fixture(scope="module", autouse=True)
def _launch_both(worker_fleet, worker_admission):
    """Start both workers before waiting for either: they load in parallel."""
    launch_smollm2(worker_fleet, worker_admission.address)
    launch_gemma3(worker_fleet, worker_admission.address)


@pytest.fixture(scope="module")
def workers(smollm2_worker, gemma3_worker):
    return {SMOLLM2: smollm2_worker, GEMMA3: gemma3_worker}


def generate_once(address: str, item: Input, max_tokens: int = MAX_NEW_TOKENS) -> Generation:
    """A fresh session, one greedy generation, the session closed."""
    with WorkerClient(address) as client:
        session = client.open()
        try:
            return client.generate(session, max_tokens=max_tokens, **item.fields())
        finally:
            client.close_session(session)


def assert_matches_reference(name: str, item: Input, got: Generation, reference: Reference,
                             context: str) -> None:
    input_ids = item.reference_ids(reference)
    want = reference.greedy(tuple(input_ids), MAX_NEW_TOKENS)
    eos = frozenset({reference.eos})
    where = f"{name}, {item}, {context}"
    first_diff = next((i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b),
                      min(len(got.token_ids), len(want)))
    assert got.token_ids == want, (
        f"{where}: the worker's greedy tokens differ from Hugging Face generate at position "
        f"{first_diff}:\n  worker: {got.token_ids}\n  hf:     {want}\n"
        f"  worker text: {got.text!r}\n  hf text:     {reference.text(want, eos)!r}")
    expected_text = reference.text(got.token_ids, eos)
    assert got.text == expected_text, (
        f"{where}: the streamed text is not the decoded tokens:\n  streamed: {got.text!r}\n"
        f"  decoded:  {expected_text!r}")
    finish = got.finish
    reason = "FINISH_REASON_STOP" if want and want[-1] == reference.eos else "FINISH_REASON_LENGTH"
    assert got.reason == reason, f"{where}: finish reason {got.reason}, expected {reason}"
    assert finish.prompt_tokens == len(input_ids), (
        f"{where}: finish.prompt_tokens {finish.prompt_tokens}, but the input is "
        f"{len(input_ids)} tokens as Hugging Face renders and tokenizes it")
    assert finish.completion_tokens == len(got.token_ids), (
        f"{where}: finish.completion_tokens {finish.completion_tokens} but "
        f"{len(got.token_ids)} tokens were streamed")
    assert finish.context_tokens == len(input_ids) + len(got.token_ids), (
        f"{where}: finish.context_tokens {finish.context_tokens}, expected prompt + completion "
        f"= {len(input_ids) + len(got.token_ids)}")


@pytest.mark.parametrize("name, index", ALONE, ids=[f"{n}-{INPUTS[n][i].kind}-{i}"
                                                    for n, i in ALONE])
def test_a_session_alone_matches_hugging_face(name, index, workers, references):
    item = INPUTS[name][index]
    got = generate_once(workers[name].address, item)
    assert_matches_reference(name, item, got, references(name), "a session alone")


@pytest.mark.parametrize("name", [SMOLLM2, GEMMA3])
def test_concurrent_sessions_match_hugging_face(name, workers, references):
    """Four sessions with different inputs generate at the same time: the
    worker batches them into shared steps, and each still gets exactly its
    own greedy continuation."""
    address = workers[name].address
    reference = references(name)
    for item in INPUTS[name]:  # computed before the worker runs: no contention for the cores
        reference.greedy(tuple(item.reference_ids(reference)), MAX_NEW_TOKENS)
    with WorkerClient(address) as client:
        steps_before = client.status().steps
        results = run_concurrently(
            {str(item): (lambda item=item: generate_once(address, item))
             for item in INPUTS[name]}, timeout_s=120)
        steps = client.status().steps - steps_before
    for item in INPUTS[name]:
        assert_matches_reference(name, item, results[str(item)], reference,
                                 f"one of {len(INPUTS[name])} concurrent sessions")
    total = sum(len(result.token_ids) for result in results.values())
    assert steps < total, (
        f"{name}: {len(results)} concurrent sessions generated {total} tokens in {steps} steps: "
        "they were never batched into a shared step")


def test_a_base_model_takes_a_chat_message_only_with_a_template(workers, references):
    """Gemma 3 270M has no chat template: a message is INVALID_ARGUMENT naming
    'message', and the session is still usable; a session opened with a
    chat_template renders the conversation with it, as Hugging Face does."""
    address = workers[GEMMA3].address
    reference = references(GEMMA3)
    question = "Name a primary colour."
    with WorkerClient(address) as client:
        session = client.open()
        assert not session.reply.chat, (
            f"OpenSession on the base model says chat=True: {session.reply!r}")
        _, details = rpc_error(client.stub.Generate,
                               generate_request(session, message=("user", question)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.field == "message", (
            f"a chat message to a base model gave {details.code.name} on field "
            f"{details.field!r} ({details.message}), expected INVALID_ARGUMENT on 'message'")
        after = client.generate(session, prompt="The sky is", max_tokens=2)
        finish = after.finish
        left = finish.context_tokens - finish.prompt_tokens - finish.completion_tokens
        assert left == 0, f"the refused message left {left} tokens in the context: {finish!r}"
        client.close_session(session)

        template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
                    "<start_of_turn>model\n{% endif %}")
        session = client.open(chat_template=template)
        assert session.reply.chat, "a session opened with a chat_template says chat=False"
        got = client.generate(session, message=("user", question), max_tokens=8)
        client.close_session(session)
    text = reference.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], chat_template=template, tokenize=False,
        add_generation_prompt=True)
    input_ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = reference.greedy(tuple(input_ids), 8)
    assert got.token_ids == want, (
        f"a chat message with the session's own template: worker {got.token_ids} != "
        f"Hugging Face {want} (input rendered as {text!r})")
    assert got.finish.prompt_tokens == len(input_ids), (
        f"the session's template rendered {got.finish.prompt_tokens} tokens, Hugging Face "
        f"{len(input_ids)}")



@pytest.fixture(scope="module")
def chunked_worker(worker_fleet, worker_admission):
    """SmolLM2 computing prompts 16 tokens a step (--max-prefill-tokens)."""
    worker = worker_fleet.ready("smollm2-chunked", SMOLLM2, worker_admission.address,
                                "--max-prefill-tokens", "16")
    yield worker
    problem = worker_fleet.stop("smollm2-chunked")
    if problem:
        pytest.fail(problem)


def test_prompts_computed_in_chunks_match_hugging_face(chunked_worker, references):
    """Prompts longer than a step's 16 tokens, sent at once: each is computed
    in chunks, decode steps of the others in between, and every session still
    gets exactly its greedy continuation."""
    address = chunked_worker.address
    reference = references(SMOLLM2)
    items = INPUTS[SMOLLM2]
    longest = max(len(item.reference_ids(reference)) for item in items)
    assert longest > 2 * 16, f"the inputs should need several chunks: {longest} tokens at most"
    for item in items:
        reference.greedy(tuple(item.reference_ids(reference)), MAX_NEW_TOKENS)
    results = run_concurrently({str(item): (lambda item=item: generate_once(address, item))
                                for item in items}, timeout_s=120)
    for item in items:
        assert_matches_reference(SMOLLM2, item, results[str(item)], reference,
                                 "prompts computed 16 tokens a step, concurrently")
