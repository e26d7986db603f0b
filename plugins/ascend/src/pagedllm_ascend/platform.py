"""The Ascend platform (device ``npu`` through torch_npu), and its twin under triton-ascend's interpreter on CPU."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from pagedllm.plugin import AttentionBackend, AttentionSpec, Communicator, ConfigError, Platform

from pagedllm_ascend.attention import select_attention_backend, triton_attention_backend_class
from pagedllm_ascend.communicator import HcclCommunicator
from pagedllm_ascend.fused_attention import FUSED_DTYPES
from pagedllm_ascend.npu import autoload_enabled, import_torch_npu
from pagedllm_ascend.settings import ENV_VAR as PATH_VAR
from pagedllm_ascend.settings import attention_path

if TYPE_CHECKING:
    from pagedllm.plugin import EngineConfig

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """The padded decode batch sizes graphs are captured at (the core's spread; imported lazily with triton)."""
    from pagedllm.kernels.triton.cuda_graphs import default_capture_sizes as sizes

    return sizes(max_num_seqs)


class AscendPlatform(Platform):
    """Huawei Ascend NPUs (Atlas A2/A3, 910B) through torch_npu; attention path from PAGEDLLM_ASCEND_ATTENTION."""

    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    priority = 100
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    verified_on = "Ascend NPU (torch_npu)"

    def __init__(self) -> None:
        self.torch_npu = import_torch_npu()  # registers torch.npu and the "hccl" backend
        self.path = attention_path()
        if self.path == "fused":
            self.supported_dtypes = FUSED_DTYPES
        self.decode_graphs: Any = None

    # --- device queries ----------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def device_count(self) -> int:
        return torch.npu.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.npu.get_device_name(index)

    def total_memory(self, index: int = 0) -> int:
        return torch.npu.get_device_properties(index).total_memory

    def free_memory(self, index: int = 0) -> int:
        return torch.npu.mem_get_info(index)[0]

    def set_device(self, index: int) -> None:
        torch.npu.set_device(index)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def seed_everything(self, seed: int) -> None:
        super().seed_everything(seed)
        torch.npu.manual_seed_all(seed)

    # --- configuration and memory ------------------------------------------------------------
    def check_and_update_config(self, config: EngineConfig) -> None:
        try:
            super().check_and_update_config(config)
        except ConfigError as exc:
            if self.path != "fused" or exc.param != "dtype":
                raise
            raise ConfigError(f"{exc}: the fused attention ops take float16/bfloat16 ({PATH_VAR}=triton runs float32)",
                              param="dtype") from exc
        if config.device.enforce_eager:
            return
        if self.path == "fused":
            # _npu_paged_attention and the fused inference attention take sequence lengths from the
            # host; a captured graph would freeze them, so decode steps run eagerly on this path.
            logger.info("ascend: fused attention path runs decode eagerly (no NPU graph capture)")
            config.device.enforce_eager = True
        elif config.scheduler.token_buckets is None:
            config.scheduler.token_buckets = default_capture_sizes(config.scheduler.max_num_seqs)

    def kv_cache_budget(self, config: EngineConfig) -> int:
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        index = torch.npu.current_device()
        total, free = self.total_memory(index), self.free_memory(index)
        # As on GPUs: this process may fill the NPU up to utilization * total, counting what is in use.
        budget = min(int(total * config.cache.gpu_memory_utilization) - (total - free), free)
        if budget <= 0:
            raise ConfigError(
                f"gpu_memory_utilization {config.cache.gpu_memory_utilization} leaves no NPU memory for the "
                f"KV cache ({(total - free) / 2**30:.2f} of {total / 2**30:.2f} GiB in use); raise it or free memory",
                param="gpu_memory_utilization",
            )
        return budget

    # --- kernels, collectives, graphs --------------------------------------------------------
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return select_attention_backend(spec, self.path)

    def communicator(self, group: Any = None) -> Communicator:
        return HcclCommunicator(group)

    def compile_or_capture(self, model_runner: Any) -> None:
        """Capture one NPU graph per padded decode batch size (Triton path; the fused path runs eagerly)."""
        config = model_runner.config
        if config.device.enforce_eager:
            logger.info("%s: enforce_eager set, decode steps run eagerly", self.name)
            return
        step = getattr(model_runner, "decode_step_for_capture", None)
        if step is None:
            logger.warning("%s: model runner has no decode_step_for_capture(batch_size); decode runs eagerly", self.name)
            return
        from pagedllm_ascend.kernels.npu_graphs import NpuDecodeGraphRunner

        sizes = config.scheduler.token_buckets or default_capture_sizes(config.scheduler.max_num_seqs)
        self.decode_graphs = NpuDecodeGraphRunner(step, sizes)
        self.decode_graphs.capture()
        model_runner.decode_graphs = self.decode_graphs

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "attention": f"{self.path} ({PATH_VAR})",
            "torch_npu": getattr(self.torch_npu, "__version__", "unknown"),
            "device_backend_autoload": "on" if autoload_enabled() else "off (torch_npu imported by the platform)",
            "graphs": "captured" if self.decode_graphs is not None else "not captured",
        }
        if self.path == "triton":
            configs = triton_attention_backend_class().launch_configs  # type: ignore[attr-defined]
            info["launch"] = f"Ascend configs: prefill {configs.prefill}, decode {configs.decode}"
        return info
