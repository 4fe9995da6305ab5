"""The Hermes tool-call format parsed from whole answers and from deltas
(services/front/tool_calls.py)."""

from __future__ import annotations

import json
import random

import pytest

from services.front.tool_calls import CLOSE, OPEN, StreamingParser, extract

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {}}'


def test_a_whole_answer_with_two_calls_and_text():
    text = f"Let me check.\n{OPEN}\n{WEATHER}\n{CLOSE}\n{OPEN}{TIME}{CLOSE}"
    content, calls = extract(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    assert calls[0].to_openai(0) == {"id": calls[0].id, "type": "function", "index": 0,
                                     "function": {"name": "get_weather",
                                                  "arguments": calls[0].arguments}}


@pytest.mark.parametrize("body", ["not json", '["a list"]', '{"arguments": {}}',
                                  '{"name": "f", "arguments": [1]}'])
def test_a_block_that_is_not_a_call_stays_in_the_content(body):
    text = f"a {OPEN}{body}{CLOSE} b"
    assert extract(text) == (text, [])


def test_arguments_as_json_text_and_parameters_are_read():
    content, calls = extract(f'{OPEN}{{"name": "f", "arguments": "{{\\"x\\": 1}}"}}{CLOSE}')
    assert json.loads(calls[0].arguments) == {"x": 1}
    content, calls = extract(f'{OPEN}{{"name": "g", "parameters": {{"y": 2}}}}{CLOSE}')
    assert calls[0].name == "g" and json.loads(calls[0].arguments) == {"y": 2}


def test_a_block_cut_short_is_content():
    text = f"x {OPEN}{WEATHER[:20]}"
    assert extract(text) == (text, [])


def test_no_tags_is_plain_content():
    assert extract("just words < and > signs") == ("just words < and > signs", [])


def stream(text: str, sizes: list[int]) -> tuple[str, list]:
    parser = StreamingParser()
    deltas, at = [], 0
    for size in sizes:
        deltas += parser.push(text[at:at + size])
        at += size
    deltas += parser.push(text[at:]) + parser.finish()
    content = "".join(d.content for d in deltas)
    return content, [d.call for d in deltas if d.call is not None]


@pytest.mark.parametrize("seed", range(20))
def test_deltas_in_any_pieces_give_what_the_whole_answer_gives(seed):
    rng = random.Random(seed)
    text = f"Sure <b>.\n{OPEN}\n{WEATHER}\n{CLOSE}\nand {OPEN}{TIME}{CLOSE} <tool_ done"
    sizes = [rng.randint(1, 7) for _ in range(len(text))]
    content, calls = stream(text, sizes)
    whole_content, whole_calls = extract(text)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert content.strip() == whole_content   # the same text, the blocks taken out


def test_text_that_might_open_a_tag_is_held_then_released():
    parser = StreamingParser()
    assert [d.content for d in parser.push("hello <tool")] == ["hello "]
    assert [d.content for d in parser.push("box>")] == ["<toolbox>"]
    assert parser.finish() == []


def test_a_block_never_closed_comes_out_at_the_end():
    parser = StreamingParser()
    assert parser.push(f"a {OPEN}{{\"name\"") [0].content == "a "
    assert [d.content for d in parser.finish()] == [f'{OPEN}{{"name"']


def test_the_chatml_tools_template_renders_calls_the_parser_reads_back():
    """deploy/templates/chatml-tools.jinja writes an assistant's calls in the
    format this parser reads: a round trip gives the same calls."""
    from pathlib import Path

    from services.worker.templates import render

    source = (Path(__file__).resolve().parents[3] / "deploy/templates/chatml-tools.jinja"
              ).read_text()
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "c2", "type": "function", "function": {"name": "get_time",
                                                           "arguments": "{}"}}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    text = render(source, [{"role": "user", "content": "Weather?"},
                           {"role": "assistant", "content": "Checking.", "tool_calls": calls},
                           {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}],
                  {}, 10**6, tools=tools)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    answer = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, parsed = extract(answer)
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    plain = render(source, [{"role": "user", "content": "hi"}], {}, 10**6)
    assert plain == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ---- llama3_json -------------------------------------------------------------------------
def test_llama3_json_calls_whole_and_streamed():
    from services.front.tool_calls import Llama3Json

    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "parameters": {}}')
    content, calls = Llama3Json.extract(text)
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    for answer in ("It is sunny.", 'Say {"name": "x"}', '{"name": "x", "parameters": 3}',
                   '{"broken": '):
        assert Llama3Json.extract(answer) == (answer, []), answer
    for pieces in (list(text), [text[:7], text[7:30], text[30:]]):
        parser = Llama3Json.streaming()
        out = [d for piece in pieces for d in parser.push(piece)] + parser.finish()
        assert [d.call.name for d in out if d.call] == ["get_weather", "get_time"]
        assert not any(d.content for d in out), "calls only: no content"
    parser = Llama3Json.streaming()
    out = [d for piece in ["", " It", " is", " sunny"] for d in parser.push(piece)]
    assert "".join(d.content for d in out) == " It is sunny", "content streams as it comes"
    assert parser.finish() == []
    parser = Llama3Json.streaming()
    assert parser.push("<|py") == [], "a tag's beginning is held"
    assert "".join(d.content for d in parser.push("thon! no") + parser.finish()) == \
        "<|python! no"
