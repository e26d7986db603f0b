"""Gated MLP activations over a fused [gate | up] projection, through the ops registry."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.ops import OPS


class SiluAndMul(nn.Module):
    """[T, 2d] -> silu(gate) * up, [T, d] (Llama, Qwen, Mistral)."""

    # The gated MLP may hand this activation its projection's weight instead of the projection's
    # output (OPS.packed_linear_silu_and_mul), for platforms that fuse the two.
    fuses_with_linear = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """[T, 2d] -> gelu_tanh(gate) * up, [T, d] (Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS.gelu_tanh_and_mul(x)


_ACTIVATIONS = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
}


def get_act_and_mul(name: str) -> nn.Module:
    """The gated activation for an HF ``hidden_act`` / ``hidden_activation`` name."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None
