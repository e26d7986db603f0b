"""The NPU platform's rules (attention path, dtypes, graphs) and the path selection, with torch_npu replaced by the test stand-in."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
import torch_npu_standin
from pagedllm.plugin import AttentionSpec, ConfigError, EngineConfig, PlatformError
from pagedllm_ascend import attention as ascend_attention
from pagedllm_ascend import platform as ascend_platform
from pagedllm_ascend.communicator import HcclCommunicator
from pagedllm_ascend.fused_attention import AscendFusedAttentionBackend

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def npu_platform(monkeypatch):
    """AscendPlatform whose torch_npu import yields the stand-in (its device queries are never called here)."""
    def make(path: str) -> ascend_platform.AscendPlatform:
        monkeypatch.setenv("PAGEDLLM_ASCEND_ATTENTION", path)
        monkeypatch.setattr(ascend_platform, "import_torch_npu", lambda: torch_npu_standin)
        return ascend_platform.AscendPlatform()
    return make


def test_platform_identity_is_npu_with_hccl(npu_platform) -> None:
    platform = npu_platform("fused")
    assert (platform.name, platform.device_type, platform.dist_backend) == ("ascend", "npu", "hccl")
    assert platform.default_dtype() == torch.bfloat16


def test_fused_path_refuses_float32_and_runs_decode_eagerly(npu_platform, caplog) -> None:
    platform = npu_platform("fused")
    with pytest.raises(ConfigError, match="PAGEDLLM_ASCEND_ATTENTION=triton runs float32"):
        platform.check_and_update_config(_config("float32"))
    config = _config("bfloat16")
    with caplog.at_level(logging.INFO):
        platform.check_and_update_config(config)
    assert config.device.enforce_eager and "decode eagerly" in caplog.text


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton path needs triton-ascend")
def test_triton_path_captures_decode_at_padded_batch_sizes(npu_platform) -> None:
    platform = npu_platform("triton")
    config = _config("float32")
    config.scheduler.max_num_seqs = 20
    platform.check_and_update_config(config)
    assert not config.device.enforce_eager and config.scheduler.token_buckets == [1, 2, 4, 8, 16, 20]


def test_fused_path_layers_use_fused_ops_and_others_fall_back_to_triton(monkeypatch) -> None:
    import pagedllm_ascend.npu as npu_module

    monkeypatch.setattr(npu_module, "import_torch_npu", lambda: torch_npu_standin)
    plain = AttentionSpec(8, 2, 64, 0.125, torch.bfloat16, block_size=16)
    assert isinstance(ascend_attention.select_attention_backend(plain, "fused"), AscendFusedAttentionBackend)
    if not HAS_TRITON:
        return
    from pagedllm_ascend.kernels.triton_attention import AscendTritonAttentionBackend

    windowed = AttentionSpec(8, 2, 64, 0.125, torch.bfloat16, block_size=16, sliding_window=32)
    assert isinstance(ascend_attention.select_attention_backend(windowed, "fused"), AscendTritonAttentionBackend)
    assert isinstance(ascend_attention.select_attention_backend(plain, "triton"), AscendTritonAttentionBackend)


def test_hccl_communicator_refuses_a_gloo_group(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(PlatformError, match="HCCL process group"):
            HcclCommunicator()
    finally:
        dist.destroy_process_group()


def _config(dtype: str) -> EngineConfig:
    config = EngineConfig()
    config.model.dtype = dtype
    return config
