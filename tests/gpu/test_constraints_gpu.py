"""Constrained decoding on CUDA (services/worker/constraints.py): sessions
under a JSON schema and a forced tool call's grammar, batched with free ones,
through decode graphs in bfloat16; every constrained answer is what its
grammar accepts and ends where it does, the free ones run on."""

from __future__ import annotations

import asyncio
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"]}}}])


def test_constrained_and_free_sessions_share_graphed_steps():
    from services.front.tool_calls import extract, forced_grammar
    from services.worker.constraints import Grammars, GrammarSpec
    from services.worker.engine import FINISH_STOP, Delta, Engine
    from services.worker.memory import FixedMemory
    from services.worker.models import default_cache_dir, load_model
    from services.worker.prompts import prepare
    from services.worker.sampling import SamplingParams
    from services.worker.sessions import SessionTable

    loaded = load_model("synthetic:llama-1b", cache=default_cache_dir(),
                        device=torch.device("cuda"), dtype=torch.bfloat16)
    grammars = Grammars(loaded.tokenizer, loaded.eos_token_ids)
    specs = [GrammarSpec("json_schema", json.dumps({**PERSON, "x-guidance": {
        "whitespace_flexible": False}})), GrammarSpec("lark", forced_grammar(TOOLS, None)),
        None, None] * 2

    async def main():
        engine = Engine(loaded, FixedMemory(16 << 30), max_batch=16, decode_graphs=True)
        engine.start()
        try:
            sessions = SessionTable()
            requests = []
            for i, spec in enumerate(specs):
                session = sessions.open()
                requests.append(engine.submit_prepared(
                    session, SamplingParams(max_tokens=160, temperature=0.7, seed=i),
                    prepare(loaded, session, prompt=f"Request {i}:"),
                    grammars.compile(spec) if spec is not None else None))
            outs = []
            for request in requests:
                text = []
                while True:
                    event = await request.out.get()
                    if not isinstance(event, Delta):
                        break
                    text.append(event.text)
                    engine.delivered(request, len(event.token_ids))
                outs.append(("".join(text), event))
            return outs, engine.runner.graphed_steps
        finally:
            await engine.close()

    outs, graphed = asyncio.run(main())
    assert graphed > 0, "the decode steps should be graphed"
    for spec, (text, end) in zip(specs, outs):
        if spec is None:
            assert end.completion_tokens > 0
            continue
        assert end.reason == FINISH_STOP, (text, end)
        if spec.kind == "json_schema":
            person = json.loads(text)
            assert set(person) == {"name", "age"} and 0 <= person["age"] <= 120
        else:
            content, calls = extract(text)
            assert content == "" and [c.name for c in calls] == ["get_weather"], text
            assert set(json.loads(calls[0].arguments)) == {"city"}
