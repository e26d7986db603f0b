"""A tiny model on the CUDA backend's Triton kernels (interpreter mode) gives transformers' logits."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm.attention.backend import AttentionBatch
from pagedllm.config import ModelConfig
from pagedllm.model.forward_context import ForwardContext, set_forward_context
from pagedllm.model.loader import load_model
from pagedllm.model.testing import make_tiny_model
from pagedllm.ops.registry import OPS
from pagedllm.plugin_registry import PluginRegistry

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter-mode test; this machine has a GPU", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from pagedllm_cuda import hooks  # noqa: E402
from pagedllm_cuda.platform import CudaInterpreterPlatform  # noqa: E402

BLOCK = 4


@pytest.mark.parametrize("arch", ["gemma2"])  # GQA, sliding window, soft-cap, gelu_tanh, fused add-norms
def test_prefill_and_decode_logits_match_transformers(arch, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = make_tiny_model(arch, tmp_path / arch)
    registry = PluginRegistry()
    try:
        hooks.pagedllm_register(registry=registry)  # Triton ops through the registry, as when selected
        assert OPS.owner("rms_norm") == "pagedllm-cuda (triton)"
        model = load_model(ModelConfig(model=path, dtype="float32"), CudaInterpreterPlatform(), BLOCK).model
        layers = model.attention_layers()
        kv_caches = [layer.backend.allocate_kv_cache(8, "cpu") for layer in layers]
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(0)).tolist()
        table = [[6, 1, 4]]
        got = []
        # One prefill of 8 tokens (longer than gemma2's window of 5), then one paged decode step.
        for chunk, start in ((ids[:8], 0), (ids[8:], 8)):
            batch = AttentionBatch.build([len(chunk)], [start + len(chunk)], table, BLOCK)
            meta = layers[0].backend.build_metadata(batch)
            with torch.no_grad(), set_forward_context(ForwardContext(meta, kv_caches)):
                hidden = model(torch.tensor(chunk), torch.arange(start, start + len(chunk)))
                got.append(model.compute_logits(hidden))
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=0)
    finally:
        registry.reset()
