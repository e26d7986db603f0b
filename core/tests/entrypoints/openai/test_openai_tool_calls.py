"""Tool parsers, tool-call streams and how request fields become one output constraint (no server)."""

from __future__ import annotations

import json

import pytest
from pagedllm.entrypoints.openai.chat_tool_calls import ToolCallStream, complete, finish_reason
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.entrypoints.openai.structured_request import required_tools_schema, tool_mode
from pagedllm.entrypoints.openai.tool_parsers import HermesToolParser, Llama3JsonToolParser
from pagedllm.errors import InvalidRequestError

TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now"}},
]


def _chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_hermes_parser_finds_calls_and_keeps_the_text_before_them():
    p = HermesToolParser(["add", "now"])
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' \
           '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    parsed = p.parse(text)
    assert parsed.content == "Let me add."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.calls] == [
        ("add", {"a": 1, "b": 2}), ("now", {})]


def test_hermes_blocks_that_do_not_parse_or_name_unknown_tools_stay_text():
    p = HermesToolParser(["add"])
    for text in ['<tool_call>{"name": "add", "arguments": {</tool_call>', '<tool_call>{"name": "rm", "arguments": {}}'
                                                                         '</tool_call>', "plain answer"]:
        parsed = p.parse(text)
        assert parsed.calls == [] and parsed.content == text


def test_llama3_json_parser_reads_semicolon_separated_calls():
    p = Llama3JsonToolParser(["add", "now"])
    parsed = p.parse('<|python_tag|>{"name": "add", "parameters": {"a": 3, "b": 4}}; {"name": "now", "parameters": {}}')
    assert parsed.content is None and [c.function.name for c in parsed.calls] == ["add", "now"]
    assert p.parse("The answer is 7.").calls == []


def test_streamed_named_call_sends_the_name_once_then_argument_deltas():
    stream = ToolCallStream(tool_mode(_chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})),
                            None)
    pieces = ['{"a": ', "1, ", '"b": 2}']
    deltas = [stream.feed(p, i == len(pieces) - 1)[1] for i, p in enumerate(pieces)]
    assert deltas[0][0].function.name == "add" and deltas[0][0].id
    assert all(d[0].function.name is None and d[0].id is None for d in deltas[1:])
    assert json.loads("".join(d[0].function.arguments for d in deltas)) == {"a": 1, "b": 2}


def test_streamed_auto_call_holds_back_a_possible_marker_and_sends_calls_at_the_end():
    stream = ToolCallStream(tool_mode(_chat(tools=TOOLS, tool_choice="auto")), HermesToolParser(["add", "now"]))
    assert stream.feed("Sure <tool", False) == ("Sure ", [])  # "<tool" may open a call
    assert stream.feed('_call>{"name": "now", "arguments": {}}', False) == ("", [])
    content, deltas = stream.feed("</tool_call>", True)
    assert content == "" and deltas[0].function.name == "now" and json.loads(deltas[0].function.arguments) == {}
    assert finish_reason(stream.mode, stream.calls, "stop") == "tool_calls"


def test_required_output_becomes_calls_and_a_cut_array_stays_text():
    mode = tool_mode(_chat(tools=TOOLS, tool_choice="required"))
    content, calls = complete(mode, None, '[{"name": "add", "parameters": {"a": 1, "b": 1}}]')
    assert content is None and calls[0].function.name == "add"
    assert complete(mode, None, '[{"name": "add", "param')[1] is None
    schema = required_tools_schema(mode, parallel=False)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2


def test_request_fields_map_to_one_constraint():
    assert CompletionRequest(prompt="x", guided_regex="a+").structured().regex == "a+"
    assert CompletionRequest(prompt="x", structured_outputs={"choice": ["a"]}).structured().choice == ["a"]
    fmt = _chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"},
                                                                        "strict": True}})
    assert fmt.structured().json == {"type": "object"} and fmt.structured().origin == "response_format"
    assert _chat(response_format={"type": "json_object"}).structured().json_object
    named = _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}).structured()
    assert named.json == {"type": "object"} and named.origin == "tool_choice"
    assert _chat(tools=TOOLS, tool_choice="auto").structured() is None
    assert _chat(response_format={"type": "text"}).structured() is None


@pytest.mark.parametrize("kw,needle", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"response_format": {"type": "json_schema"}}, "needs"),
    ({"response_format": {"type": "yaml"}}, "not supported"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "only one"),
])
def test_malformed_constraint_fields_are_400s(kw, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        _chat(**kw).structured()
