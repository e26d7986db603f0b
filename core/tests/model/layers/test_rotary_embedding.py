from __future__ import annotations

import pytest
import torch
import transformers
from pagedllm.model.layers.rotary_embedding import RotaryEmbedding, rope_inv_freq
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    },
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_inverse_frequencies_match_transformers(case: str) -> None:
    params = dict(ROPE_CASES[case])
    config = transformers.LlamaConfig(
        hidden_size=1024,
        num_attention_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters=params,
    )
    if params["rope_type"] == "default":  # transformers keeps this one on the model class
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref_inv, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config, device="cpu")
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    inv, scale = rope_inv_freq(config.rope_parameters, 128, config.max_position_embeddings)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)


def test_unknown_rope_type_is_rejected_with_the_supported_list() -> None:
    with pytest.raises(ValueError, match="supported: default, linear, llama3, yarn"):
        rope_inv_freq({"rope_type": "longrope", "rope_theta": 1.0}, 64, 1024)


def test_rotation_preserves_norms_and_position_zero_is_identity() -> None:
    rope = RotaryEmbedding(16, 16, 32, {"rope_type": "default", "rope_theta": 10000.0}, 32)
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    q2, k2 = rope(torch.tensor([0, 5, 31]), q, k)
    torch.testing.assert_close(q2[0], q[0])
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k2.norm(dim=-1), k.norm(dim=-1))
    assert not torch.allclose(q2[1], q[1])


def test_yarn_attention_factor_scales_the_cache() -> None:
    params = ROPE_CASES["yarn"]
    rope = RotaryEmbedding(64, 64, 8, params, 131072)
    _, scale = rope_inv_freq(params, 64, 131072)
    assert scale > 1.0
    cos0 = rope.cos_sin_cache[0, :32]
    torch.testing.assert_close(cos0, torch.full_like(cos0, scale))
