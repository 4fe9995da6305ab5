"""Tool calling, prefills and response_format as the front parses them
(services/front/openai_api.py), and the grammar that forces a call
(services/front/tool_calls.py forced_grammar), compiled by llguidance."""

from __future__ import annotations

import json

import pytest

from services.front import openai_api as api
from services.front.tool_calls import FORMATS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def chat(**body):
    return api.parse_chat({"model": "m", "messages": ASK, **body}, 16)


def test_tools_are_parsed_and_tool_choice_defaults_to_auto():
    call = chat(tools=[WEATHER, ADD])
    assert call.tool_choice == api.ToolChoice("auto") and call.parses_tools
    assert [t["function"]["name"] for t in json.loads(call.tools)] == ["get_weather", "add"]
    assert call.grammar is None, "auto: the model chooses, nothing is forced"
    assert chat(tools=[WEATHER, ADD]).tools == call.tools, "the same tools, the same text"
    assert json.loads(chat(tools=[ADD]).tools)[0]["function"]["parameters"]["type"] == "object"
    none = chat(tools=[WEATHER], tool_choice="none")
    assert none.tools and not none.parses_tools and none.grammar is None


def test_a_forced_tool_choice_is_parsed():
    """Its grammar is written once the session's tool format is known
    (app.py), so the Call holds none."""
    required = chat(tools=[WEATHER, ADD], tool_choice="required")
    named = chat(tools=[WEATHER, ADD],
                 tool_choice={"type": "function", "function": {"name": "add"}})
    assert required.tool_choice.forced and named.tool_choice == api.ToolChoice("function", "add")
    assert required.grammar is None and named.grammar is None


@pytest.mark.parametrize("body, param", [
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}},
     "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_bad_tools_and_choices_are_400_naming_the_field(body, param):
    with pytest.raises(api.ApiError) as error:
        chat(**body)
    assert error.value.status == 400 and error.value.param == param, error.value.message


def test_a_tool_round_trip_in_the_history():
    """An assistant's calls (as an SDK dumps them, arguments JSON text) and
    the tool's result: kept with their ids; the same calls written another
    way are the same canonical text (the front's session cache compares
    histories)."""
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls,
                      "refusal": None},
               {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                "content": "Sunny"}]
    call = api.parse_chat({"model": "m", "messages": history, "tools": [WEATHER]}, 16)
    assistant, tool = call.messages[1:]
    assert assistant == api.Message("assistant", "", api.calls_json(calls))
    assert tool == api.Message("tool", "Sunny", "", "call_1", "get_weather")
    reordered = [{"function": {"arguments": '{"city": "Paris"}', "name": "get_weather"},
                  "type": "function", "id": "call_1", "index": 0}]
    again = api.parse_chat({"model": "m", "messages": [
        *ASK, {"role": "assistant", "tool_calls": reordered},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}], "tools": [WEATHER]}, 16)
    assert again.messages[1] == assistant
    with pytest.raises(api.ApiError) as error:
        api.parse_chat({"model": "m", "messages": [
            *ASK, {"role": "user", "content": "x", "tool_calls": calls}]}, 16)
    assert error.value.param == "messages[1].tool_calls"


def test_a_final_assistant_message_is_a_prefill():
    call = api.parse_chat({"model": "m", "messages": [
        *ASK, {"role": "assistant", "content": "It is"}]}, 16)
    assert call.prefill and call.messages[-1] == api.Message("assistant", "It is")
    with pytest.raises(api.ApiError) as error:
        api.parse_chat({"model": "m", "tools": [WEATHER], "tool_choice": "required",
                        "messages": [*ASK, {"role": "assistant", "content": "It is"}]}, 16)
    assert error.value.param == "messages"


def test_response_format_asks_for_a_json_schema():
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    assert chat(response_format={"type": "text"}).grammar is None
    assert chat(response_format={"type": "json_object"}).grammar == (
        "json_schema", '{"type": "object"}')
    kind, text = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": schema, "strict": True}}).grammar
    assert kind == "json_schema" and json.loads(text) == schema


@pytest.mark.parametrize("format_name, key", [("hermes", "arguments"),
                                               ("llama3_json", "parameters")])
def test_each_formats_forced_grammar_compiles_and_holds_only_the_named_calls(format_name, key):
    llguidance = pytest.importorskip("llguidance")
    forced = FORMATS[format_name].forced_grammar
    tools = json.dumps([WEATHER, ADD])
    for name in (None, "add"):
        assert llguidance.LLMatcher.grammar_from_lark(forced(tools, name))
    text = forced(tools, "get_weather")
    schema = json.loads(text.split("%json ", 1)[1])
    (option,) = schema["anyOf"]
    assert option["properties"]["name"] == {"const": "get_weather"}
    assert option["required"] == ["name", key]
    assert option["properties"][key]["additionalProperties"] is False, (
        "no properties beyond the parameters', as OpenAI's strict mode")
    # What the grammar lets a model write, the format's parser reads back.
    written = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                         '\n</tool_call>',
               "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo"}}'}
    byte = llguidance.LLTokenizer("byte")
    matcher = llguidance.LLMatcher(byte, llguidance.LLMatcher.grammar_from_lark(text))
    assert matcher.consume_tokens(byte.tokenize_str(written[format_name]))
    assert matcher.is_accepting(), "the grammar should accept the call as written"
    extra = llguidance.LLMatcher(byte, llguidance.LLMatcher.grammar_from_lark(text))
    assert not extra.consume_tokens(byte.tokenize_str(
        written[format_name].replace('"Oslo"', '"Oslo", "x": 1'))), "an extra argument"
    content, calls = FORMATS[format_name].extract(written[format_name])
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"})]
