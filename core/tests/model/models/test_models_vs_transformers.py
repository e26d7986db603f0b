"""Every architecture against HF transformers on the same random weights: prefill, decode, mixed batches."""

from __future__ import annotations

import pytest
import torch
import transformers
from pagedllm.attention.backend import AttentionBatch
from pagedllm.config import ModelConfig
from pagedllm.model.forward_context import ForwardContext, set_forward_context
from pagedllm.model.loader import load_model
from pagedllm.model.testing import TINY_ARCHITECTURES, ReferencePlatform

BLOCK = 4
ATOL = 1e-4


class Runner:
    """Drives a loaded model through paged steps the way a model runner does (reference attention)."""

    def __init__(self, path: str, num_blocks: int = 16) -> None:
        self.loaded = load_model(ModelConfig(model=path, dtype="float32"), ReferencePlatform(), BLOCK)
        self.model = self.loaded.model
        layers = self.model.attention_layers()
        self.backend = layers[0].backend
        self.kv_caches = [layer.backend.allocate_kv_cache(num_blocks, "cpu") for layer in layers]

    def step(self, chunks: list[tuple[list[int], int]], tables: list[list[int]]) -> list[torch.Tensor]:
        """chunks: (new token ids, position of the first) per sequence -> logits of each chunk."""
        ids = [t for toks, _ in chunks for t in toks]
        positions = [p + i for toks, p in chunks for i in range(len(toks))]
        batch = AttentionBatch.build(
            [len(t) for t, _ in chunks], [p + len(t) for t, p in chunks], tables, BLOCK
        )
        with (
            torch.no_grad(),
            set_forward_context(ForwardContext(self.backend.build_metadata(batch), self.kv_caches)),
        ):
            hidden = self.model(torch.tensor(ids), torch.tensor(positions))
            logits = self.model.compute_logits(hidden)
        return list(logits.split([len(t) for t, _ in chunks]))


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def load_hf(path: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_prefill_then_paged_decode_matches_transformers(arch: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch)
    runner, hf = Runner(path), load_hf(path)
    seq = prompt(12, seed=1)  # longer than the tiny sliding windows (5, 6)
    table = [[7, 2, 11, 0, 5]]  # scattered blocks: the paging must be right
    (logits,) = runner.step([(seq, 0)], table)
    torch.testing.assert_close(logits, hf_logits(hf, seq), atol=ATOL, rtol=0)
    for _ in range(4):
        seq.append(int(logits[-1].argmax()))
        (logits,) = runner.step([([seq[-1]], len(seq) - 1)], table)
        torch.testing.assert_close(logits[-1], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_mixed_batch_of_chunked_prefill_prefill_and_decode_matches_transformers(
    arch: str, tiny_model_dir
) -> None:
    path = tiny_model_dir(arch)
    runner, hf = Runner(path), load_hf(path)
    a, b = prompt(11, seed=2), prompt(6, seed=3)
    tables = [[1, 4, 9], [3, 8]]
    runner.step([(a[:5], 0)], tables[:1])  # first chunk of a
    out_a, out_b = runner.step([(a[5:], 5), (b, 0)], tables)  # rest of a + all of b
    torch.testing.assert_close(out_a, hf_logits(hf, a)[5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, hf_logits(hf, b), atol=ATOL, rtol=0)
    a.append(int(out_a[-1].argmax()))
    b.append(int(out_b[-1].argmax()))
    out_a, out_b = runner.step([([a[-1]], len(a) - 1), ([b[-1]], len(b) - 1)], tables)
    torch.testing.assert_close(out_a[0], hf_logits(hf, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b[0], hf_logits(hf, b)[-1], atol=ATOL, rtol=0)


def test_gemma2_prompt_is_long_enough_for_the_sliding_window_to_matter(tiny_model_dir, tmp_path) -> None:
    """Guards the test above: with a window wider than the prompt the logits must change."""
    from pagedllm.model.testing import make_tiny_model

    seq = prompt(12, seed=1)
    narrow = Runner(tiny_model_dir("gemma2")).step([(seq, 0)], [[0, 1, 2]])[0]
    wide_path = make_tiny_model("gemma2", tmp_path / "wide", sliding_window=64)
    wide = Runner(wide_path).step([(seq, 0)], [[0, 1, 2]])[0]
    assert (narrow[:5] - wide[:5]).abs().max() < 1e-5  # inside the window: identical
    assert (narrow[-1] - wide[-1]).abs().max() > 1e-3


def test_gemma2_logits_are_soft_capped(tiny_model_dir) -> None:
    (logits,) = Runner(tiny_model_dir("gemma2")).step([(prompt(6, seed=4), 0)], [[0, 1]])
    assert logits.dtype == torch.float32
    assert logits.abs().max() < 3.0  # final_logit_softcapping of the tiny config


def test_attention_layers_are_in_layer_order_with_their_specs(tiny_model_dir) -> None:
    model = Runner(tiny_model_dir("gemma2")).model
    layers = model.attention_layers()
    assert [a.layer_idx for a in layers] == [0, 1]
    assert [a.spec.sliding_window for a in layers] == [5, None]  # Gemma 2 alternates
    assert layers[0].spec.logit_soft_cap == 2.0
    assert layers[0].spec.scale == pytest.approx(24**-0.5)  # query_pre_attn_scalar


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bfloat16_model_tracks_transformers_in_bfloat16(arch: str, tiny_model_dir) -> None:
    from pagedllm.model.testing import prefill_logits

    path = tiny_model_dir(arch)
    model = load_model(ModelConfig(model=path, dtype="bfloat16"), ReferencePlatform(), BLOCK).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager"
    )
    seq = prompt(10, seed=5)
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].float()
    ours = prefill_logits(model, seq, block_size=BLOCK)
    assert ours.dtype == torch.float32  # logits are always fp32
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding, not a different computation
