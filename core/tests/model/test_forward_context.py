from __future__ import annotations

import pytest
import torch
from pagedllm.model.forward_context import ForwardContext, get_forward_context, set_forward_context


def test_context_is_visible_inside_and_restored_after_nesting() -> None:
    outer = ForwardContext(attn_metadata="outer", kv_caches=[torch.zeros(1)])
    inner = ForwardContext(attn_metadata="inner", kv_caches=[])
    with set_forward_context(outer):
        assert get_forward_context() is outer
        with set_forward_context(inner):
            assert get_forward_context() is inner
        assert get_forward_context() is outer
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()


def test_context_is_cleared_when_the_forward_raises() -> None:
    with pytest.raises(ValueError):
        with set_forward_context(ForwardContext(None, [])):
            raise ValueError("boom")
    with pytest.raises(RuntimeError):
        get_forward_context()
