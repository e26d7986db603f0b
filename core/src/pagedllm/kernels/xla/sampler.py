"""Sampling inside the XLA graph: only the token ids of a step leave the device.

Rows are padded to the bucket's sequence count. Greedy rows take the argmax; random rows with
plain temperature sampling draw by the Gumbel-max trick from the device's RNG, so one graph per
bucket serves any mix of the two. Rows that need more (logprobs, penalties, logit bias, top-k/p,
min-p, min_tokens, a per-request seed) take the fallback: the padded logits go to the host and
the core's Sampler handles them exactly as on every other backend (also precompiled).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedllm.sample.sampling_params import SamplingParams


def samples_in_graph(params: SamplingParams, num_output_tokens: int, has_generator: bool) -> bool:
    """Whether a row's parameters are greedy or plain temperature sampling (what the graph computes)."""
    if params.logprobs is not None or params.logit_bias or has_generator:
        return False
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        return False
    if params.min_tokens and num_output_tokens < params.min_tokens:
        return False
    if params.greedy:
        return True
    return params.top_k in (0, -1) and params.top_p >= 1.0 and params.min_p <= 0.0


def sample_tokens(
    model: Any,
    hidden: torch.Tensor,  # [T, hidden] on the XLA device
    rows: torch.Tensor,  # [S] int64 on the device, padded with 0
    temperature: torch.Tensor,  # [S] float32 on the device; 0 marks a greedy (or padded) row
) -> torch.Tensor:  # [S] int64 token ids, still on the device
    logits = model.compute_logits(hidden.index_select(0, rows))  # [S, V] fp32
    greedy = torch.argmax(logits, dim=-1)
    scaled = logits / temperature.clamp(min=1e-6).unsqueeze(1)
    uniform = torch.rand_like(scaled).clamp(min=1e-20, max=1.0 - 1e-7)
    drawn = torch.argmax(scaled - torch.log(-torch.log(uniform)), dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


def sample_logits(model: Any, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [S, V] fp32
    return model.compute_logits(hidden.index_select(0, rows))


def padded_rows(rows: list[int], size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    out[: len(rows)] = rows
    return out
