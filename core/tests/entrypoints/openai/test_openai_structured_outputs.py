"""Structured outputs and tool calling end to end: `pagedllm serve` of the default model (SmolLM2-135M)
driven by the official openai client: parse() with pydantic models, regex / choice, tools, bad input."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai_server import RemoteServer
from structured_models import MODELS, PROMPTS, Person, Rating, Status, Weather

MAX_TOKENS = 300


@pytest.fixture(scope="module")
def server():
    from pagedllm.model.loader.source import default_gguf_path

    srv = RemoteServer(default_gguf_path(), ["--max-num-seqs", "16", "--max-model-len", "2048",
                                             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def _model_name(client) -> str:
    return client.models.list().data[0].id


def _parse(client, model_cls, temperature: float, seed: int = 0):
    return client.chat.completions.parse(
        model=_model_name(client),
        messages=[{"role": "user", "content": PROMPTS[model_cls.__name__]}],
        response_format=model_cls, temperature=temperature, max_tokens=MAX_TOKENS, seed=seed,
    )


@pytest.mark.parametrize("model_cls,temperature", [(Person, 0.0), (Weather, 0.8), (Rating, 0.0), (Status, 0.8)],
                         ids=["Person-0.0", "Weather-0.8", "Rating-0.0", "Status-0.8"])
def test_parse_returns_a_validating_object(client, model_cls, temperature):
    r = _parse(client, model_cls, temperature)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, model_cls)
    model_cls.model_validate_json(msg.content)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda m: m.__name__)
def test_parse_validates_for_twenty_models(client, model_cls, temperature):
    for seed in range(2):
        r = _parse(client, model_cls, temperature, seed)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        model_cls.model_validate_json(r.choices[0].message.content)


@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_regex_and_choice_are_always_met(client, field):
    name = _model_name(client)
    regex, choices = r"[A-Z]{2}-[0-9]{3}", ["yes", "no", "maybe"]
    body_regex = {"structured_outputs": {"regex": regex}} if field == "structured_outputs" else {"guided_regex": regex}
    body_choice = {"structured_outputs": {"choice": choices}} if field == "structured_outputs" else {
        "guided_choice": choices}
    r = client.completions.create(model=name, prompt="A licence plate:", max_tokens=20, temperature=1.0, n=4,
                                  seed=1, extra_body=body_regex)
    for c in r.choices:
        assert re.fullmatch(regex, c.text), c.text
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=10, temperature=1.0, n=4, seed=2, extra_body=body_choice)
    for c in r.choices:
        assert c.message.content in choices


def test_json_object_and_json_schema_response_formats(client):
    name = _model_name(client)
    # json_object bounds nothing: a prompt asking for a small object keeps a 135M model from looping inside it.
    ask = 'Reply with a JSON object whose only key is "ok", set to true.'
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": ask}],
                                       response_format={"type": "json_object"}, max_tokens=MAX_TOKENS, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "ok?"}], max_tokens=50, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema, "strict": True}})
    assert set(json.loads(r.choices[0].message.content)) == {"ok"}


def test_streamed_constrained_output_equals_the_whole_response(client):
    name = _model_name(client)
    kw = dict(model=name, messages=[{"role": "user", "content": PROMPTS["Person"]}], temperature=0,
              max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
                  "name": "p", "schema": Person.model_json_schema()}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == whole
    Person.model_validate_json(whole)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]


def _tool_request(client, tool_choice, stream: bool, messages=None, **kw):
    messages = messages or [{"role": "user", "content": "What is the weather in Paris?"}]
    args = dict(model=_model_name(client), messages=messages, tools=TOOLS, tool_choice=tool_choice,
                max_tokens=MAX_TOKENS, temperature=0, **kw)
    if not stream:
        msg = client.chat.completions.create(**args).choices[0]
        return msg.message.content, [(c.function.name, c.function.arguments) for c in msg.message.tool_calls or []], \
            msg.finish_reason
    calls: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **args):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, ["", ""])
                if d.function and d.function.name:
                    entry[0] += d.function.name
                if d.function and d.function.arguments:
                    entry[1] += d.function.arguments
            finish = ch.finish_reason or finish
    return content or None, [tuple(v) for _, v in sorted(calls.items())], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_named_tool_choice_calls_that_function_with_parsing_arguments(client, stream):
    content, calls, _ = _tool_request(client, {"type": "function", "function": {"name": "get_weather"}}, stream)
    assert content is None and len(calls) == 1 and calls[0][0] == "get_weather"
    args = json.loads(calls[0][1])
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_tool_choice_returns_calls_with_parsing_arguments(client, stream):
    content, calls, finish = _tool_request(client, "required", stream, parallel_tool_calls=False)
    assert finish == "tool_calls" and content is None and len(calls) == 1
    name, arguments = calls[0]
    props = {t["function"]["name"]: t["function"]["parameters"]["required"] for t in TOOLS}
    assert set(json.loads(arguments)) == set(props[name])


HERMES_SYSTEM = (
    "You are a function calling assistant. You never answer questions yourself: for every question you call a "
    'function, replying with exactly <tool_call>{"name": <function name>, "arguments": <arguments object>}'
    "</tool_call>. Functions: get_weather(city, unit), get_time(zone)."
)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_choice_with_hermes_parser_round_trip(client, stream):
    # SmolLM2's template does not show the tools to the model, so the system prompt and two examples do.
    messages = [
        {"role": "system", "content": HERMES_SYSTEM},
        {"role": "user", "content": "What time is it in UTC?"},
        {"role": "assistant", "content": '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'},
        {"role": "user", "content": "What is the weather in Rome, in fahrenheit?"},
        {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", '
                                         '"unit": "fahrenheit"}}</tool_call>'},
        {"role": "user", "content": "What is the weather in Paris, in celsius?"},
    ]
    content, calls, finish = _tool_request(client, "auto", stream, messages=messages)
    assert calls, f"the model wrote no tool call: {content!r}"
    assert finish == "tool_calls" and content is None
    assert calls[0][0] == "get_weather" and json.loads(calls[0][1]) == {"city": "Paris", "unit": "celsius"}


def test_assistant_tool_calls_and_tool_results_go_through_the_template(client):
    # A conversation continuing after a tool result (arguments arrive as a JSON string, as OpenAI sends them).
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_9", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "-3 C, snow"},
    ]
    content, calls, finish = _tool_request(client, "none", False, messages=messages, )
    assert content and not calls and finish in ("stop", "length")


def _status(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=60)


BAD_BODIES = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "JSON schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "grammar"),
    ({"guided_choice": []}, "choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "only one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}}, "launch_rockets"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "name"),
]


def test_bad_constraints_are_400_in_openai_shape_and_the_server_stays_up(server, client):
    for body, needle in BAD_BODIES:
        r = _status(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 5, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", err
    r = _status(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "guided_regex": "[z-a]"})
    assert r.status_code == 400 and "regex" in r.json()["error"]["message"]
    ok = client.chat.completions.create(model=_model_name(client), messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_auto_tool_choice_without_the_flag_is_400(tmp_path):
    from pagedllm.entrypoints.openai.chat_tool_calls import make_parser
    from pagedllm.entrypoints.openai.structured_request import ToolMode
    from pagedllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="enable-auto-tool-choice"):
        make_parser(ToolMode("auto", TOOLS), enable_auto=False, parser_name=None)


SCHEMAS = [Person, Weather, Rating, Status, Person, Weather, Rating, Status]
FREE_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is",
                "In 1969, the", "Water boils at", "My favourite colour is", "The quick brown fox"]


def test_concurrent_constrained_and_free_requests(client):
    """16 at once, half constrained with different schemas: constrained ones validate, free ones are
    token-for-token their solo greedy runs (the bitmask leaves unconstrained rows untouched)."""
    name = _model_name(client)

    def free(prompt):
        return client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    def constrained(i):
        return _parse(client, SCHEMAS[i], 0.0 if i % 2 else 0.8, seed=i)

    solo = [free(p) for p in FREE_PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        free_f = [pool.submit(free, p) for p in FREE_PROMPTS]
        cons_f = [pool.submit(constrained, i) for i in range(len(SCHEMAS))]
        together = [f.result() for f in free_f]
        parsed = [f.result() for f in cons_f]
    assert together == solo
    for i, r in enumerate(parsed):
        SCHEMAS[i].model_validate_json(r.choices[0].message.content)
