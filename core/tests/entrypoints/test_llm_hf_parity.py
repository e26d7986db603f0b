"""Greedy LLM.generate matches HF transformers generate (fp32) token for token, vLLM's rule at a divergence.

At the first position where the two sides pick different tokens, each side's token must be among
the other side's top-5 (a near tie that fp32 rounding may break either way); comparison stops there.
"""

from __future__ import annotations

import os

import pytest
import torch
from pagedllm.entrypoints.llm import LLM
from pagedllm.model.testing import TINY_ARCHITECTURES, ReferencePlatform, make_tiny_model
from pagedllm.sample.sampling_params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")

NEW_TOKENS = 32
TOP = 5


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[dict[int, float]]]:
    """Greedy continuation with HF's own KV cache, and each step's top-5 logprobs from the raw logits.

    A plain loop rather than ``generate``: EOS must neither stop it nor be masked (ignore_eos
    semantics), which ``generate``'s min_new_tokens would do by suppressing EOS.
    """
    tokens: list[int] = []
    tops: list[dict[int, float]] = []
    ids = torch.tensor([prompt_ids])
    past = None
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            vals, idx = lp.topk(TOP)
            tops.append(dict(zip(idx.tolist(), vals.tolist(), strict=True)))
            tokens.append(int(idx[0]))
            ids = idx[:1].view(1, 1)
    return tokens, tops


def assert_close_greedy(
    ours: list[int], our_tops: list, theirs: list[int], their_tops: list, what: str
) -> int:
    """vLLM's check_logprobs_close: identical, or at the first divergence each token is in the other's top-5."""
    assert len(ours) == len(theirs) == NEW_TOKENS, what
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            assert a in their_tops[i], (
                f"{what}: at token {i} we chose {a}, not in HF's top-{TOP} {their_tops[i]}"
            )
            assert b in our_tops[i], f"{what}: at token {i} HF chose {b}, not in our top-{TOP} {our_tops[i]}"
            return i
    return len(ours)


def run_parity(llm: LLM, hf_model, prompts: list[list[int]]) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    outs = llm.generate(prompts, params, use_tqdm=False)
    agreed = []
    for prompt, out in zip(prompts, outs, strict=True):
        ours = out.outputs[0].token_ids
        our_tops = [{t: lp.logprob for t, lp in pos.items()} for pos in out.outputs[0].logprobs]
        theirs, their_tops = hf_greedy(hf_model, prompt, NEW_TOKENS)
        agreed.append(assert_close_greedy(ours, our_tops, theirs, their_tops, f"prompt {prompt[:6]}..."))
    return agreed


TINY_PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 77)), [7]]


@pytest.mark.parametrize(
    "arch", [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow) for a in TINY_ARCHITECTURES]
)
def test_greedy_matches_transformers_on_tiny_models(arch, tmp_path):
    import transformers

    torch.manual_seed(0)
    path = make_tiny_model(arch, tmp_path / arch, seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=128, platform=ReferencePlatform())
    agreed = run_parity(llm, hf, TINY_PROMPTS)
    # Random tiny models rarely produce near ties; most prompts must agree on every token.
    assert sum(a == NEW_TOKENS for a in agreed) >= len(TINY_PROMPTS) - 1, agreed


@pytest.mark.slow
def test_greedy_matches_transformers_on_the_default_model():
    import transformers
    from pagedllm.model.loader.source import default_gguf_path

    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    llm = LLM(dtype="float32", kv_cache_memory="256MiB", max_model_len=512)
    tok = llm.get_tokenizer()
    texts = ["Hello", "The capital of France is", "def fibonacci(n):"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    prompts = [tok.encode(t) for t in texts] + [tok.encode(chat, add_special_tokens=False)]
    agreed = run_parity(llm, hf, prompts)
    assert sum(a == NEW_TOKENS for a in agreed) >= len(prompts) - 1, agreed
