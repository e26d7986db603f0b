"""StructuredOutputsParams, admission validation and both grammar libraries on a byte-level tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pagedllm.errors import InvalidRequestError
from pagedllm.model.testing import tiny_tokenizer
from pagedllm.sample.sampling_params import SamplingParams
from pagedllm.structured.backend import bitmask_width, make_backend, validate
from pagedllm.structured.params import StructuredOutputsParams

BACKENDS = ["xgrammar", "llguidance"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _eos(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_params_need_exactly_one_constraint_and_accept_a_dict_in_sampling_params():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(InvalidRequestError, match="unknown key"):
        StructuredOutputsParams.from_dict({"regexp": "a"})
    p = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert isinstance(p.structured_outputs, StructuredOutputsParams) and p.structured_outputs.kind == "choice"


def test_equal_schemas_share_a_key_and_property_order_is_kept():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    b = StructuredOutputsParams(json='{"type": "object", "properties": {"b": {}, "a": {}}}')
    assert a.key() == b.key()
    assert a.schema_text().index('"b"') < a.schema_text().index('"a"')


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,what", [
    ({"json": {"type": "nonsense"}}, "JSON schema"),
    ({"regex": "a(b"}, "regex"),
    ({"grammar": "root ::= missing_rule"}, "grammar"),
])
def test_uncompilable_constraints_are_400s_naming_what_failed(backend, spec, what):
    with pytest.raises(InvalidRequestError, match=f"cannot be compiled by {backend}") as info:
        validate(StructuredOutputsParams.from_dict(spec, origin="response_format"), backend)
    assert what in str(info.value) and info.value.param == "response_format"


def _generate(backend, params: StructuredOutputsParams, tokenizer, choose) -> str:
    """Walk the grammar token by token, picking with ``choose`` among the allowed tokens."""
    eos = _eos(tokenizer)
    vocab = len(tokenizer)
    b = make_backend(backend, tokenizer, vocab, [eos])
    m = b.matcher(b.compile(params))
    out = []
    for _ in range(200):
        mask = torch.full((1, bitmask_width(vocab)), -1, dtype=torch.int32)
        b.fill_bitmask([m], mask, [0])
        allowed = [t for t in range(vocab) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
        assert allowed, "the grammar allows nothing"
        tok = choose(allowed)
        assert m.accept_token(tok)
        if tok == eos:
            assert m.is_terminated()
            return tokenizer.decode(out)
        out.append(tok)
    raise AssertionError("the grammar never ended")


@pytest.mark.parametrize("backend", BACKENDS)
def test_walking_the_mask_yields_text_that_matches(backend, tokenizer):
    import random

    rng = random.Random(0)

    def pick(allowed):
        # Prefer ending: the eos token when allowed, else a random allowed token.
        eos = _eos(tokenizer)
        return eos if eos in allowed and rng.random() < 0.5 else rng.choice(allowed)

    text = _generate(backend, StructuredOutputsParams(regex=r"[a-c]{2}-[0-9]{1,3}"), tokenizer, pick)
    assert re.fullmatch(r"[a-c]{2}-[0-9]{1,3}", text), text
    text = _generate(backend, StructuredOutputsParams(choice=["yes", "no"]), tokenizer, pick)
    assert text in ("yes", "no")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "s": {"type": "string", "maxLength": 3}},
              "required": ["n", "s"], "additionalProperties": False}
    obj = json.loads(_generate(backend, StructuredOutputsParams(json=schema), tokenizer, pick))
    assert set(obj) == {"n", "s"} and 0 <= obj["n"] <= 9 and len(obj["s"]) <= 3
