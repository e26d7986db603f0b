"""The model-parity oracle: computed in a background interpreter it equals the in-process oracle exactly."""

from __future__ import annotations

import os

from pagedllm_conformance import generation


def test_background_oracle_equals_in_process_oracle(tmp_path) -> None:
    from pagedllm.model.testing import make_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = make_tiny_model("llama", tmp_path / "tiny-llama", seed=0)
    prompts, max_tokens = ("hello there", "a"), 5
    generation.start_background_oracle(path, prompts, max_tokens)
    key = (path, prompts, max_tokens)
    background = generation._collect_background(key)
    assert background is not None
    in_process = generation._reference_generate(path, prompts, max_tokens)
    assert background == in_process
    assert all(len(g.token_ids) == max_tokens and len(g.logprobs) == max_tokens for g in background)
