"""Tools through a worker's input path (prompts.py, limits.py): rendered by
a template that renders them, refused with the field named by one that
does not, and conversations with tool turns checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.worker.limits import check_conversation, check_tools_json
from services.worker.prompts import prepare
from services.worker.sessions import SessionTable

CHATML_TOOLS = (Path(__file__).resolve().parents[3] / "deploy/templates/chatml-tools.jinja"
                ).read_text()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C and sunny"},
]


@dataclass
class Model:
    tokenizer: object
    name: str = "smollm2-135m"


def test_a_template_with_tools_renders_them_and_the_tool_turns(tokenizer):
    session = SessionTable().open(chat_template=CHATML_TOOLS)
    prepared = prepare(Model(tokenizer), session, conversation=CONVERSATION, tools=TOOLS)
    text = tokenizer.decode(prepared.tokens)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert prepared.message == CONVERSATION[-1] and prepared.field == "conversation"


def test_a_template_without_tools_refuses_them_naming_the_field(tokenizer):
    session = SessionTable().open()          # smollm2's own template: no tools
    with pytest.raises(InvalidArgument) as err:
        prepare(Model(tokenizer), session, conversation=CONVERSATION, tools=TOOLS)
    assert err.value.field == "conversation.tools_json"
    assert "chatml-tools.jinja" in err.value.message


def test_tool_turns_need_tools_and_may_end_a_conversation_with_them():
    check_conversation(CONVERSATION, 10_000, tools=True)
    with pytest.raises(InvalidArgument) as err:
        check_conversation(CONVERSATION, 10_000, tools=False)
    assert err.value.field == "conversation.messages[1]"
    with pytest.raises(InvalidArgument):
        check_conversation(CONVERSATION[:2], 10_000, tools=True)   # ends with the assistant


@pytest.mark.parametrize("text, problem", [
    ("{", "is not JSON"), ('{"a": 1}', "list of objects"), ("[1]", "list of objects"),
    ("[" + ",".join(["{}"] * 129) + "]", "at most 128"), ("[" + " " * (256 << 10) + "]",
                                                          "characters of JSON")])
def test_tool_json_is_checked(text, problem):
    with pytest.raises(InvalidArgument) as err:
        check_tools_json("conversation.tools_json", text)
    assert problem in err.value.message
    assert check_tools_json("x", "") == [] and check_tools_json("x", "[{}]") == [{}]



def test_the_tool_format_is_read_from_the_template():
    from pathlib import Path

    from services.worker.prompts import tool_format

    chatml = (Path(__file__).resolve().parents[3] / "deploy/templates/chatml-tools.jinja"
              ).read_text()
    llama = ("{% if tools %}Call a function as JSON: {\"name\": ..., \"parameters\": ...}"
             "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
             "{% if m is defined and m.role == 'ipython' %}<|python_tag|>{% endif %}")
    assert tool_format(chatml) == "hermes"
    assert tool_format(llama) == "llama3_json"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") == ""
    assert tool_format(chatml, "llama3_json") == "llama3_json", "the worker's --tool-format"
    assert tool_format("", "hermes") == "", "no template, no tools"
