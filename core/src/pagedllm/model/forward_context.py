"""The per-step forward context: attention metadata and KV caches that every Attention layer reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class ForwardContext:
    """What one model step shares across layers; set by the model runner around ``model.forward``."""

    attn_metadata: Any  # what backend.build_metadata(batch) returned, shared by all layers
    kv_caches: list[torch.Tensor]  # one per attention layer, in layer order


_CURRENT: ForwardContext | None = None


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``ctx`` current for the duration of the block; restores the previous one after (nesting is safe)."""
    global _CURRENT
    previous = _CURRENT
    _CURRENT = ctx
    try:
        yield ctx
    finally:
        _CURRENT = previous


def get_forward_context() -> ForwardContext:
    """The current step's context; calling a model outside ``set_forward_context`` is a bug."""
    if _CURRENT is None:
        raise RuntimeError("no forward context is set; wrap model.forward in set_forward_context(...)")
    return _CURRENT
