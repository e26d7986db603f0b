"""TritonPlatform: the torch.cuda-API platform (CUDA or HIP) whose kernels are the portable Triton ones.

pagedllm-cuda and pagedllm-rocm subclass it with their name, launch configurations and vendor
rules. :class:`TritonInterpreterMode` turns either into a CPU-only platform that runs the same
kernels under Triton's interpreter (``PAGEDLLM_TRITON_INTERPRET=1``), for verification without
a GPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionSpec
from pagedllm.config import parse_dtype
from pagedllm.distributed.communicator import Communicator
from pagedllm.errors import ConfigError, PlatformError
from pagedllm.kernels.interpret import ENV_VAR, VERIFIED_ON, interpreter_active
from pagedllm.kernels.triton.attention_backend import TritonAttentionBackend
from pagedllm.kernels.triton.communicator import TensorCollectiveCommunicator
from pagedllm.kernels.triton.cuda_graphs import DecodeGraphRunner, default_capture_sizes
from pagedllm.platforms.host_memory import host_available_memory, host_total_memory
from pagedllm.platforms.platform import Platform

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

logger = logging.getLogger(__name__)


def memory_budget(total: int, free: int, utilization: float) -> int:
    """Bytes the KV cache may take: this process may fill the device up to ``utilization * total``.

    Whatever is already used (weights, activations, other processes) counts against that
    share, as with vLLM's --gpu-memory-utilization; never more than is free right now.
    """
    used = total - free
    budget = min(int(total * utilization) - used, free)
    if budget <= 0:
        gib = 2**30
        raise ConfigError(
            f"gpu_memory_utilization {utilization} allows {total * utilization / gib:.2f} GiB of "
            f"{total / gib:.2f} GiB, but {used / gib:.2f} GiB are already in use (weights, "
            "activations, other processes); raise --gpu-memory-utilization or free device memory",
            param="gpu_memory_utilization",
        )
    return budget


class TritonPlatform(Platform):
    """A GPU reached through torch.cuda (CUDA, or HIP on ROCm builds), running Triton kernels."""

    device_type = "cuda"  # ROCm builds of torch expose HIP devices as "cuda" too
    dist_backend = "nccl"  # torch's "nccl" backend is RCCL on ROCm builds
    priority = 100
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    attention_backend_class: ClassVar[type[TritonAttentionBackend]]
    communicator_class: ClassVar[type[Communicator]] = TensorCollectiveCommunicator
    bf16_requirement: ClassVar[str] = "a GPU with bfloat16 support"  # vendor wording for the dtype error

    def __init__(self) -> None:
        self.decode_graphs: DecodeGraphRunner | None = None

    # --- device queries ----------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def total_memory(self, index: int = 0) -> int:
        return torch.cuda.get_device_properties(index).total_memory

    def free_memory(self, index: int = 0) -> int:
        return torch.cuda.mem_get_info(index)[0]

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def seed_everything(self, seed: int) -> None:
        super().seed_everything(seed)
        torch.cuda.manual_seed_all(seed)

    # --- configuration and memory ------------------------------------------------------------
    def check_and_update_config(self, config: EngineConfig) -> None:
        super().check_and_update_config(config)
        if parse_dtype(config.model.dtype) == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"bfloat16 needs {self.bf16_requirement}; this is {self.device_name()}: use --dtype float16",
                param="dtype",
            )
        # Decode steps are replayed from graphs captured at these padded batch sizes.
        if not config.device.enforce_eager and config.scheduler.token_buckets is None:
            config.scheduler.token_buckets = default_capture_sizes(config.scheduler.max_num_seqs)

    def kv_cache_budget(self, config: EngineConfig) -> int:
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        index = torch.cuda.current_device()
        return memory_budget(self.total_memory(index), self.free_memory(index), config.cache.gpu_memory_utilization)

    # --- kernels, collectives, graphs --------------------------------------------------------
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return self.attention_backend_class(spec)

    def communicator(self, group: Any = None) -> Communicator:
        return self.communicator_class(group)

    def compile_or_capture(self, model_runner: Any) -> None:
        """Capture one graph per padded decode batch size (CUDA graphs; HIP graphs on ROCm)."""
        config = model_runner.config
        if config.device.enforce_eager:
            logger.info("%s: enforce_eager set, decode steps run eagerly", self.name)
            return
        step = getattr(model_runner, "decode_step_for_capture", None)
        if step is None:
            logger.warning(
                "%s: model runner has no decode_step_for_capture(batch_size); decode runs eagerly", self.name
            )
            return
        sizes = config.scheduler.token_buckets or default_capture_sizes(config.scheduler.max_num_seqs)
        self.decode_graphs = DecodeGraphRunner(step, sizes)
        self.decode_graphs.capture()
        model_runner.decode_graphs = self.decode_graphs

    def describe(self) -> dict[str, Any]:
        configs = self.attention_backend_class.launch_configs
        return {
            "kernels": "Triton (pagedllm.kernels.triton)",
            "attention": f"{self.attention_backend_class.name}: prefill {configs.prefill}, decode {configs.decode}",
            "graphs": "captured" if self.decode_graphs is not None else "not captured yet",
        }


class TritonInterpreterMode(TritonPlatform):
    """Mixin placed before a TritonPlatform subclass: same kernels, run on CPU tensors by the interpreter.

    It never claims a GPU: the device is the CPU, collectives use gloo, graphs are skipped, and
    ``verified_on`` says "verified under Triton interpreter on CPU (no GPU)".
    """

    device_type = "cpu"
    dist_backend = "gloo"
    priority = 0  # below the CPU platform: used only when asked for by name
    supported_dtypes = (torch.float32,)  # the interpreter computes in numpy; fp32 is the tested path
    verified_on = VERIFIED_ON
    communicator_class = Communicator  # gloo: the core's list-based collectives

    def __init__(self) -> None:
        super().__init__()
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        from pagedllm.kernels.triton.paged_attention import paged_attention_kernel

        # Triton fixes interpreted-or-compiled per function when it is defined: both triton's own
        # library (tl.zeros, ...) and our kernels must have been defined under the interpreter.
        interpreted = isinstance(tl.zeros, InterpretedFunction) and isinstance(paged_attention_kernel, InterpretedFunction)
        if not (interpreter_active() and interpreted):
            raise PlatformError(
                f"{ENV_VAR}=1 (or TRITON_INTERPRET=1) must be set before triton is first imported in "
                "this process: its kernels were defined for a GPU, not for the interpreter"
            )

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return "cpu (Triton interpreter)"

    def total_memory(self, index: int = 0) -> int:
        return host_total_memory()

    def free_memory(self, index: int = 0) -> int:
        # MemAvailable: page cache left by installs and model reads is reclaimable (MemFree is not).
        return host_available_memory()

    def set_device(self, index: int) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def seed_everything(self, seed: int) -> None:
        Platform.seed_everything(self, seed)

    def check_and_update_config(self, config: EngineConfig) -> None:
        Platform.check_and_update_config(self, config)
        if not config.device.enforce_eager:
            logger.info("%s: Triton interpreter mode runs eagerly (graphs need a GPU)", self.name)
            config.device.enforce_eager = True

    def kv_cache_budget(self, config: EngineConfig) -> int:
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        return memory_budget(self.total_memory(), self.free_memory(), config.cache.gpu_memory_utilization)

    def compile_or_capture(self, model_runner: Any) -> None:
        logger.info("%s: graph capture skipped: Triton interpreter mode has no GPU to capture on", self.name)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["graphs"] = "skipped (interpreter mode has no GPU)"
        info["mode"] = f"Triton interpreter ({ENV_VAR}=1): kernels run on CPU tensors, no GPU used"
        return info
