"""InputProcessor: tokenization, defaults and admission checks with the real numbers in the message."""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
import pytest
from pagedllm.config import EngineConfig
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.errors import ContextLengthExceededError, InvalidRequestError
from pagedllm.sample.sampling_params import SamplingParams


class CharTokenizer:
    """One token per character (id = byte + 1), BOS = 0 when add_special_tokens."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [b + 1 for b in text.encode()]

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template, **kw):
        assert tokenize is False
        return jinja2.Template(chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kw
        )


@dataclass
class Info:
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    chat_template: str | None = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    bos_token_id: int | None = 0
    max_model_len: int = 64
    vocab_size: int = 300
    generation_defaults: dict = field(default_factory=dict)
    model_name: str = "char"


def make(num_blocks: int | None = None, **info) -> InputProcessor:
    return InputProcessor(EngineConfig(), Info(**info), num_kv_blocks=num_blocks)


def test_text_is_tokenized_with_bos_and_eos_ids_are_filled():
    req = make().process("r1", "hi", SamplingParams(max_tokens=4))
    assert req.prompt_token_ids == [0, ord("h") + 1, ord("i") + 1]
    assert req.sampling_params.eos_token_ids == [2] and req.prompt == "hi"


def test_callers_params_are_not_mutated():
    sp = SamplingParams(max_tokens=None)
    proc = make()
    a = proc.process("a", "x", sp)
    b = proc.process("b", "xyz", sp)
    assert sp.max_tokens is None and sp.eos_token_ids == []
    assert (a.sampling_params.max_tokens, b.sampling_params.max_tokens) == (62, 60)


def test_empty_prompts_are_rejected():
    with pytest.raises(InvalidRequestError, match="empty"):
        make().process("r", "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        make().process("r", [], SamplingParams())


def test_token_ids_outside_the_vocab_are_rejected():
    with pytest.raises(InvalidRequestError, match="300"):
        make().process("r", [1, 300], SamplingParams())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        make().process("r", [1, -1], SamplingParams())


def test_stop_token_ids_are_checked_against_the_vocab():
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        make().process("r", [1], SamplingParams(stop_token_ids=[999]))


def test_context_overflow_names_prompt_length_max_tokens_and_limit():
    with pytest.raises(ContextLengthExceededError) as e:
        make().process("r", list(range(1, 41)), SamplingParams(max_tokens=30))
    msg = str(e.value)
    assert "64" in msg and "40" in msg and "30" in msg and "70" in msg
    assert e.value.code == "context_length_exceeded" and e.value.http_status == 400


def test_prompt_filling_the_context_leaves_no_room():
    with pytest.raises(ContextLengthExceededError, match="64"):
        make().process("r", list(range(1, 65)), SamplingParams(max_tokens=None))


def test_request_bigger_than_the_whole_kv_cache_is_rejected():
    proc = make(num_blocks=2)  # 2 blocks x 16 tokens
    with pytest.raises(ContextLengthExceededError, match="32 tokens"):
        proc.process("r", list(range(1, 21)), SamplingParams(max_tokens=20))
    assert (
        proc.process("r", list(range(1, 21)), SamplingParams(max_tokens=12)).sampling_params.max_tokens == 12
    )


def test_chat_template_override_wins_and_missing_template_is_an_error():
    proc = make()
    msgs = [{"role": "user", "content": "yo"}]
    assert proc.apply_chat_template(msgs) == "<user>yo<assistant>"
    assert proc.apply_chat_template(msgs, chat_template="{{ messages[0].content }}!") == "yo!"
    with pytest.raises(InvalidRequestError, match="chat template"):
        make(chat_template=None).apply_chat_template(msgs)


def test_broken_template_is_a_request_error():
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        make().apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ 1 / 0 }}")


def test_more_samples_than_max_num_seqs_is_rejected():
    proc = InputProcessor(EngineConfig(), Info())
    proc.config.scheduler.max_num_seqs = 2
    with pytest.raises(InvalidRequestError, match="max_num_seqs=2"):
        proc.process("r", [1], SamplingParams(n=3))
