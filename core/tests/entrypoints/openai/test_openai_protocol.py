"""Request models turn into validated SamplingParams; bad values raise InvalidRequestError."""

import math

import pytest
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.errors import InvalidRequestError
from pydantic import ValidationError


def test_completion_fields_map_to_sampling_params():
    req = CompletionRequest(prompt="hi", max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1,
                            presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, seed=3,
                            stop="x", logprobs=2, n=2, logit_bias={"5": 10.0})
    p = req.to_sampling_params({})
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (7, 0.5, 0.9, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.seed) == (0.5, -0.5, 1.2, 3)
    assert p.stop == ["x"] and p.logprobs == 2 and p.n == 2 and p.logit_bias == {5: 10.0}


def test_model_generation_defaults_fill_only_unset_fields():
    defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 20}
    p = CompletionRequest(prompt="hi", temperature=0.0).to_sampling_params(defaults)
    assert p.temperature == 0.0 and p.top_p == 0.8 and p.top_k == 20


def test_completion_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(InvalidRequestError):
        CompletionRequest(prompt=[]).prompts()


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {"1": 1000.0}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_out_of_range_completion_fields_are_invalid_request_errors(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        CompletionRequest(prompt="hi", **fields).to_sampling_params({})
    assert info.value.param == param and info.value.http_status == 400


def test_wrong_types_fail_pydantic_validation():
    with pytest.raises(ValidationError):
        CompletionRequest(prompt={"a": 1})
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", max_tokens="many")
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "wizard", "content": "x"}])


def test_chat_max_completion_tokens_wins_and_logprobs_map():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                max_completion_tokens=9, logprobs=True, top_logprobs=3)
    p = req.to_sampling_params({})
    assert p.max_tokens == 9 and p.logprobs == 3
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).to_sampling_params({}).max_tokens is None


def test_chat_rejects_unsupported_features():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    for extra, param in (({"top_logprobs": 2}, "top_logprobs"),
                         ({"tools": [{"type": "function"}]}, "tools"),
                         ({"response_format": {"type": "yaml"}}, "response_format")):
        with pytest.raises(InvalidRequestError) as info:
            ChatCompletionRequest(**base, **extra).to_sampling_params({})
        assert info.value.param == param


def test_chat_content_parts_are_flattened_and_empty_messages_rejected():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}])
    assert req.template_messages() == [{"role": "user", "content": "a\nb"}]
    with pytest.raises(InvalidRequestError):
        ChatCompletionRequest(messages=[]).template_messages()
    with pytest.raises(InvalidRequestError):
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).template_messages()


def test_unknown_fields_are_accepted_but_reported(caplog):
    req = CompletionRequest(prompt="hi", frobnicate=3)
    with caplog.at_level("WARNING", logger="pagedllm.entrypoints.openai.protocol"):
        req.to_sampling_params({})
    assert "frobnicate" in caplog.text
