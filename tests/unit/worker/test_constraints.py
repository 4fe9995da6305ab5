"""Constrained decoding in the engine (services/worker/constraints.py):
llama-tiny's random weights would write anything, yet under a grammar every
answer is what the grammar accepts, and ends where the grammar does."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from services.common.errors import InvalidArgument
from services.worker.constraints import Grammars, GrammarSpec
from services.worker.engine import Delta, Engine, Finished, FINISH_STOP
from services.worker.memory import FixedMemory
from services.worker.prompts import prepare
from services.worker.sampling import SamplingParams
from services.worker.sessions import SessionTable

pytest.importorskip("llguidance")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def generate(loaded, spec: GrammarSpec | None, params: SamplingParams,
             prompt: str = "A person:") -> tuple[str, Finished]:
    grammars = Grammars(loaded.tokenizer, loaded.eos_token_ids)

    async def main():
        engine = Engine(loaded, FixedMemory(1 << 30))
        engine.start()
        try:
            session = SessionTable().open()
            constraint = grammars.compile(spec) if spec is not None else None
            request = engine.submit_prepared(session, params,
                                             prepare(loaded, session, prompt=prompt), constraint)
            text = []
            while True:
                event = await asyncio.wait_for(request.out.get(), 60)
                if isinstance(event, Delta):
                    text.append(event.text)
                    engine.delivered(request, len(event.token_ids))
                else:
                    return "".join(text), event
        finally:
            await engine.close()

    return asyncio.run(main())


def test_a_json_schema_makes_random_weights_write_a_valid_object(tiny):
    free, _ = generate(tiny, None, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError):
        json.loads(free)         # without the grammar: not JSON (random weights)
    for params in (SamplingParams(max_tokens=200),
                   SamplingParams(max_tokens=200, temperature=1.0, seed=7)):
        text, end = generate(tiny, GrammarSpec("json_schema", json.dumps(
            {**PERSON, "x-guidance": {"whitespace_flexible": False}})), params)
        assert isinstance(end, Finished) and end.reason == FINISH_STOP, (text, end)
        person = json.loads(text)
        assert set(person) == {"name", "age"} and 0 <= person["age"] <= 120, text
        assert len(person["name"]) <= 12


def test_a_lark_grammar_ends_the_answer_where_it_ends(tiny):
    text, end = generate(tiny, GrammarSpec("lark", 'start: "yes" | "no"'),
                         SamplingParams(max_tokens=50))
    assert text in ("yes", "no") and end.reason == FINISH_STOP and end.completion_tokens <= 2


@pytest.mark.parametrize("spec", [
    GrammarSpec("json_schema", "{not json"),
    GrammarSpec("json_schema", json.dumps({"type": "no-such-type"})),
    GrammarSpec("lark", "start: undefined_rule"),
    GrammarSpec("regex", "a+"),
])
def test_a_bad_grammar_is_invalid_argument(tiny, spec):
    with pytest.raises(InvalidArgument) as error:
        Grammars(tiny.tokenizer, tiny.eos_token_ids).compile(spec)
    assert error.value.field == "sampling.grammar"


def test_the_mask_leaves_only_allowed_tokens(tiny):
    constraint = Grammars(tiny.tokenizer, tiny.eos_token_ids).compile(
        GrammarSpec("lark", 'start: "yes"'))
    logits = torch.zeros(tiny.vocab_limit)
    constraint.mask(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tiny.tokenizer.decode([t])) for t in allowed)


def test_a_grammar_past_llguidances_limits_is_refused_or_ends_the_answer(tiny):
    """A grammar too big for the limits is INVALID_ARGUMENT at compile; one
    whose work for a token runs past them (a hostile grammar) ends the
    answer there, instead of holding up the step of every session."""
    import llguidance

    too_big = Grammars(tiny.tokenizer, tiny.eos_token_ids,
                       llguidance.LLParserLimits(initial_lexer_fuel=10))
    with pytest.raises(InvalidArgument):
        too_big.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    pattern = {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "[a-z]+(x|y)*z"}}}
    constraint = Grammars(tiny.tokenizer, tiny.eos_token_ids,
                          llguidance.LLParserLimits(step_max_items=2)).compile(
        GrammarSpec("json_schema", json.dumps(pattern)))
    logits = torch.zeros(tiny.vocab_limit)
    constraint.mask(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and set(allowed) <= set(tiny.eos_token_ids), allowed
