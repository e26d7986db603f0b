"""Structured outputs through the engine on a tiny random Llama with a byte-level vocabulary:
constraints hold with n > 1, stop strings, preemption, chunked prefill and prefix caching, and
unconstrained neighbours decode exactly as they do alone."""

from __future__ import annotations

import json
import re

import pytest

from pagedllm.entrypoints.llm import LLM
from pagedllm.errors import InvalidRequestError
from pagedllm.model.testing import ReferencePlatform
from pagedllm.sample.sampling_params import SamplingParams

REGEX = r"[a-d]{3}-[0-9]{2}"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"type": "string", "enum": ["x", "yy", "zzz"]}},
          "required": ["n", "tag"], "additionalProperties": False}
FREE = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]


def _llm(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", platform=ReferencePlatform(), **{"num_gpu_blocks_override": 256, **kw})


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return _llm(tiny_llama)


def _regex(n: int = 1, temperature: float = 1.0, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=temperature, seed=7, max_tokens=40,
                          structured_outputs={"regex": REGEX}, **kw)


def test_regex_choice_and_schema_hold_for_every_sample(llm):
    outs = llm.generate(["hello", "world", "json"], [
        _regex(n=4),
        SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=20, structured_outputs={"choice": ["alpha", "beta"]}),
        SamplingParams(n=2, temperature=0.9, seed=2, max_tokens=60, structured_outputs={"json": SCHEMA}),
    ])
    assert all(re.fullmatch(REGEX, o.text) for o in outs[0].outputs)
    assert all(o.text in ("alpha", "beta") for o in outs[1].outputs)
    for o in outs[2].outputs:
        obj = json.loads(o.text)
        assert 0 <= obj["n"] <= 99 and obj["tag"] in ("x", "yy", "zzz")
    assert all(o.finish_reason == "stop" for r in outs for o in r.outputs)


def test_free_rows_decode_exactly_as_without_constrained_neighbours(llm):
    prompts = ["The cat", "A dog", "Some bird"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, FREE * 3)]
    mixed = llm.generate(prompts + ["x", "y"], FREE * 3 + [_regex(n=2), _regex(temperature=0)])
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert all(re.fullmatch(REGEX, o.text) for r in mixed[3:] for o in r.outputs)


def test_stop_strings_cut_constrained_output(llm):
    out = llm.generate(["q"], SamplingParams(temperature=0, max_tokens=40, stop=["-"],
                                             structured_outputs={"regex": REGEX}))[0].outputs[0]
    assert re.fullmatch(r"[a-d]{3}", out.text) and out.finish_reason == "stop"


def test_constraints_survive_preemption_chunked_prefill_and_prefix_hits(tiny_llama):
    # 12 blocks of 16 tokens for 8 requests of ~80 tokens each: a 32-token budget chunks every prompt
    # and admits requests the cache cannot hold all at once, so some are preempted and recomputed;
    # the last prompt, sent again, hits the prefix cache.
    llm = _llm(tiny_llama, num_gpu_blocks_override=12, max_num_batched_tokens=32, max_num_seqs=8)
    prompts = [f"prompt number {i} is some seventy bytes long, which takes five blocks" for i in range(8)]
    outs = llm.generate(prompts, [_regex(temperature=1.0), _regex(temperature=0)] * 4)
    assert all(re.fullmatch(REGEX, o.outputs[0].text) for o in outs)
    assert llm.llm_engine.engine_core.stats().num_preemptions > 0
    again = llm.generate(prompts[-1:], _regex(temperature=0))[0]
    assert again.outputs[0].text == outs[-1].outputs[0].text and again.num_cached_tokens > 0


def test_bad_constraints_fail_at_admission_and_the_engine_keeps_working(llm):
    with pytest.raises(InvalidRequestError, match="regex"):
        llm.generate(["x"], SamplingParams(structured_outputs={"regex": "[unclosed"}))
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        llm.generate(["x"], SamplingParams(structured_outputs={"json": {"type": "object", "properties": 3}}))
    assert re.fullmatch(REGEX, llm.generate(["x"], _regex())[0].outputs[0].text)


def test_llguidance_backend_is_selectable(tiny_llama):
    llm = _llm(tiny_llama, structured_outputs_backend="llguidance")
    assert llm.llm_engine.engine_core.structured.backend_name == "llguidance"
    outs = llm.generate(["a", "b"], [_regex(n=3), SamplingParams(temperature=0, max_tokens=60,
                                                                 structured_outputs={"json": SCHEMA})])
    assert all(re.fullmatch(REGEX, o.text) for o in outs[0].outputs)
    json.loads(outs[1].outputs[0].text)


def test_a_request_waiting_for_its_grammar_does_not_hold_up_others(llm, monkeypatch):
    import threading

    engine = llm.llm_engine
    manager = engine.engine_core.structured
    backend = manager.backend()
    release = threading.Event()
    real_compile = backend.compile

    def slow_compile(params):
        assert release.wait(120), "the test never released the compilation"
        return real_compile(params)

    monkeypatch.setattr(backend, "compile", slow_compile)
    engine.add_request("slow", "x", SamplingParams(temperature=0, max_tokens=40,
                                                    structured_outputs={"regex": r"[0-9]{4}-slow"}))
    engine.add_request("free", "y", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    finished: dict[str, str] = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].text
        if "free" in finished:
            break
    assert "free" in finished and "slow" not in finished
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].text
    assert re.fullmatch(r"[0-9]{4}-slow", finished["slow"])


OPEN_STRINGS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["tags"], "additionalProperties": False}


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance"])
def test_json_near_its_token_budget_closes_instead_of_being_cut(tiny_llama, backend):
    # A random model writes strings until max_tokens; near the budget only closing tokens remain.
    llm = _llm(tiny_llama, structured_outputs_backend=backend)
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=24, structured_outputs={"json": OPEN_STRINGS})
    out = llm.generate(["tags:"], params)[0].outputs
    for o in out:
        assert o.finish_reason == "stop", o.text
        assert isinstance(json.loads(o.text)["tags"], list)
    assert any(len(o.token_ids) >= 20 for o in out)  # the budget, not the model, ended some of them
