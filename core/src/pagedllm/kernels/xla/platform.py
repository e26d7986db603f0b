"""XlaPlatform: a static-shape platform on torch-xla, shared by pagedllm-tpu and pagedllm-neuron.

Every step is padded to a bucket (``pad_host_inputs``), warm-up compiles every bucket before the
engine is ready (``compile_or_capture``), sampling runs in the graph (``sample``) and each step
checks torch-xla's compilation counter (``synchronize``). Subclasses give the bucket rule, the
attention backend and the device facts. :class:`XlaCpuTwinMode` runs either on XLA:CPU.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch_xla
import torch_xla.core.xla_model as xm

from pagedllm.attention.backend import AttentionBackend, AttentionSpec
from pagedllm.distributed.communicator import Communicator
from pagedllm.errors import ConfigError, PlatformError
from pagedllm.kernels.xla import spmd
from pagedllm.kernels.xla.attention_backend import XlaAttentionBackend
from pagedllm.kernels.xla.buckets import Bucket, ShapeBuckets
from pagedllm.kernels.xla.communicator import XlaCommunicator
from pagedllm.kernels.xla.compile_watch import CompileWatch, compile_count
from pagedllm.kernels.xla.padding import dummy_host_inputs, pad_host_inputs
from pagedllm.kernels.xla.sampler import padded_rows, sample_logits, sample_tokens, samples_in_graph
from pagedllm.kernels.xla_twin import ENV_VAR, VERIFIED_ON
from pagedllm.platforms.platform import Platform
from pagedllm.sample.sampler import SamplerOutput, SamplingMetadata

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

logger = logging.getLogger(__name__)


class XlaPlatform(Platform):
    """An XLA device reached through torch-xla's PJRT runtime, run with static shapes."""

    device_type = "xla"
    dist_backend = "xla"
    priority = 100
    supported_dtypes = (torch.bfloat16, torch.float32)
    reserved_kv_blocks = 1  # the dummy block padded slots write to
    samples_seeded_rows_on_host = True  # torch-xla has no device generators (see make_generator)
    attention_backend_class: ClassVar[type[AttentionBackend]] = XlaAttentionBackend
    communicator_class: ClassVar[type[Communicator]] = XlaCommunicator
    # Bucket rule (subclasses): smallest token bucket, token padding gap, block-table buckets.
    min_token_bucket: ClassVar[int] = 16
    token_padding_gap: ClassVar[int] = 0
    min_block_bucket: ClassVar[int] = 1
    fixed_block_table: ClassVar[bool] = False

    def __init__(self) -> None:
        self.buckets: ShapeBuckets | None = None
        self.dummy_block = -1
        self.block_size = 0
        self.bucket: Bucket | None = None  # the current step's
        self.watch: CompileWatch | None = None
        self.warmup_seconds = 0.0
        self.tp_size = 1
        self.mesh: Any = None  # the SPMD device mesh when tensor_parallel_size > 1

    # --- device queries ----------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def device_count(self) -> int:
        import torch_xla.runtime as xr

        return xr.global_runtime_device_count()

    def device_name(self, index: int = 0) -> str:
        return f"{xm.xla_device_hw(self.device(index))} ({self.device(index)})"

    def total_memory(self, index: int = 0) -> int:
        return int(xm.get_memory_info(self.device(index))["bytes_limit"])

    def free_memory(self, index: int = 0) -> int:
        info = xm.get_memory_info(self.device(index))
        return int(info["bytes_limit"]) - int(info["bytes_used"])

    def synchronize(self) -> None:
        """Cut and run the pending graph; then count compilations (a new one while serving warns)."""
        torch_xla.sync()
        if self.watch is not None:
            self.watch.check(str(self.bucket))

    def seed_everything(self, seed: int) -> None:
        super().seed_everything(seed)
        xm.set_rng_state(seed, device=self.device())  # the device's own RNG (torch.rand on xla)

    def inference_context(self) -> Any:
        # torch-xla cannot run ops on inference tensors ("Cannot set version_counter for inference tensor").
        return torch.no_grad()

    def make_generator(self, seed: int) -> torch.Generator:
        # torch-xla has no device generators ("XLA device type not an accelerator"), so seeded rows
        # take the host fallback sampler and their generators live on the CPU.
        g = torch.Generator(device="cpu")
        g.manual_seed(seed)
        return g

    # --- tensor parallelism: SPMD in one process ------------------------------------------------
    def check_and_update_config(self, config: EngineConfig) -> None:
        super().check_and_update_config(config)
        par = config.parallel
        if par.tensor_parallel_size == 1:
            return
        if par.pipeline_parallel_size > 1:
            raise ConfigError(f"{self.name}: pipeline parallelism is not supported on XLA", param="pipeline_parallel_size")
        if par.distributed_executor_backend is not None:
            raise ConfigError(
                f"{self.name}: tensor parallelism runs as SPMD in one process over the XLA devices; "
                f"leave distributed_executor_backend unset (got {par.distributed_executor_backend!r})",
                param="distributed_executor_backend",
            )
        self.tp_size = par.tensor_parallel_size
        self.mesh = spmd.enable(self.tp_size, self.device_count())

    def runs_tensor_parallel_in_process(self, config: EngineConfig) -> bool:
        return config.parallel.tensor_parallel_size > 1

    # --- kernels, collectives, buckets ---------------------------------------------------------
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return self.attention_backend_class(spec)

    def communicator(self, group: Any = None) -> Communicator:
        return self.communicator_class(group)

    def make_buckets(self, config: EngineConfig, max_blocks_per_seq: int) -> ShapeBuckets:
        s = config.scheduler
        return ShapeBuckets.build(
            s.max_num_batched_tokens, s.max_num_seqs, max_blocks_per_seq, self.min_token_bucket,
            self.token_padding_gap, self.min_block_bucket, self.fixed_block_table,
        )

    def pad_num_tokens(self, num_tokens: int, config: EngineConfig) -> int:
        if self.buckets is None:
            return num_tokens
        return self.buckets.select(num_tokens, 1, 1).num_tokens

    def pad_host_inputs(self, h: Any, model_runner: Any) -> Any:
        """The step's host inputs padded to their bucket (tokens, sequences, block-table width)."""
        if self.buckets is None:
            raise PlatformError(f"{self.name}: a step ran before compile_or_capture chose the shape buckets")
        width = int(-(-int(h.seq_lens.max()) // self.block_size))
        self.bucket = self.buckets.select(h.input_ids.shape[0], h.seq_lens.shape[0], max(width, h.block_tables.shape[1]))
        return pad_host_inputs(h, self.bucket, self.dummy_block, self.block_size)

    # --- sampling in the graph -----------------------------------------------------------------
    def sample(self, model_runner: Any, hidden: torch.Tensor, rows: list[int], seqs: list[Any]) -> SamplerOutput:
        torch_xla.sync()  # the forward graph runs here; hidden stays on the device
        size = self.buckets.seqs_for(hidden.shape[0]) if self.buckets else len(rows)
        if len(rows) > size:  # n > 1 forks share a row: more sample rows than sequences
            size = len(rows)
        device = hidden.device
        row_t = torch.from_numpy(padded_rows(rows, size)).to(device)
        n = len(rows)
        if all(samples_in_graph(s.params, len(s.output_token_ids), s.generator is not None) for s in seqs):
            temps = np.zeros(size, dtype=np.float32)
            temps[:n] = [0.0 if s.params.greedy else s.params.temperature for s in seqs]
            tokens = sample_tokens(model_runner.model, hidden, row_t, torch.from_numpy(temps).to(device))
            return SamplerOutput(tokens.cpu()[:n].tolist(), [None] * n)
        logits = sample_logits(model_runner.model, hidden, row_t).cpu()[:n]
        meta = SamplingMetadata.from_requests(
            [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
            [s.generator for s in seqs], int(logits.shape[-1]), "cpu",
        )
        return model_runner.sampler(logits, meta)

    # --- warm-up -------------------------------------------------------------------------------
    def compile_or_capture(self, model_runner: Any) -> None:
        """Choose the buckets, then compile every one (forward, in-graph sampler, fallback logits)."""
        config = model_runner.config
        self.block_size = model_runner.block_size
        self.dummy_block = model_runner.num_blocks  # the reserved block past the scheduler's
        max_blocks = -(-model_runner.max_model_len // self.block_size)
        self.buckets = self.make_buckets(config, max_blocks)
        self.watch = CompileWatch()
        if self.mesh is not None:
            n = spmd.shard_model(model_runner.model, model_runner.kv_caches, self.mesh)
            logger.info("%s: SPMD tensor parallel %d: %d weights and KV caches sharded over the mesh",
                        self.name, self.tp_size, n)
        if config.device.enforce_eager:
            logger.warning("%s: enforce_eager set: warm-up skipped, each bucket compiles on first use", self.name)
            return
        # Materialise the weights and the zero-filled KV caches first: left pending, they would join
        # the first bucket's graph, and serving (with them as device data) would compile it again.
        torch_xla.sync()
        start_count, t0 = compile_count(), time.perf_counter()
        buckets = self.buckets.all()
        logger.info("%s: warm-up compiles %d forward graphs (%s) plus 2 sampling graphs per token bucket",
                    self.name, len(buckets), _describe(self.buckets))
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with transformers; without it, no bar
            tqdm = None
        bar = tqdm(total=len(buckets), desc=f"{self.name} XLA warm-up", unit="graph") if tqdm else None
        sampled: set[int] = set()
        with self.inference_context():
            for bucket in buckets:
                self._warm(model_runner, bucket, bucket.num_tokens not in sampled)
                sampled.add(bucket.num_tokens)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        self.bucket = None
        self.watch.mark_ready(start_count)
        self.warmup_seconds = time.perf_counter() - t0
        logger.info("%s: warm-up compiled %d graphs in %.1f s; serving compiles none",
                    self.name, self.watch.warmup_graphs, self.warmup_seconds)

    def _warm(self, runner: Any, bucket: Bucket, with_sampling: bool) -> None:
        """One dummy step through exactly the serving path's code, in the dummy block only."""
        self.bucket = bucket
        h = dummy_host_inputs(bucket, self.dummy_block, self.block_size)
        input_ids, positions, batch = runner.device_inputs(h)
        metadata = runner.backend.build_metadata(batch)
        hidden = runner.decode_forward_for_capture(input_ids, positions, metadata)
        torch_xla.sync()
        if with_sampling:
            rows = torch.zeros(bucket.num_seqs, dtype=torch.int64).to(hidden.device)
            temps = torch.zeros(bucket.num_seqs, dtype=torch.float32).to(hidden.device)
            sample_tokens(runner.model, hidden, rows, temps).cpu()
            sample_logits(runner.model, hidden, rows).cpu()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"attention": self.attention_backend_class.name}
        if self.buckets is not None:
            info["buckets"] = _describe(self.buckets)
        if self.watch is not None and self.watch.ready_count is not None:
            info["warm-up"] = f"{self.watch.warmup_graphs} graphs in {self.warmup_seconds:.1f} s"
            info["compilations after warm-up"] = self.watch.since_ready
        if self.mesh is not None:
            info["tensor parallel"] = f"SPMD over {self.tp_size} devices (GSPMD inserts the collectives)"
        return info


def _describe(b: ShapeBuckets) -> str:
    return f"tokens {list(b.tokens)} x blocks/seq {list(b.blocks)}, seqs <= {b.max_seqs}"


class XlaCpuTwinMode(XlaPlatform):
    """Mixin placed before an XlaPlatform subclass: the same graphs, buckets and warm-up on XLA:CPU.

    It never claims the hardware: the device is torch-xla's CPU device (PJRT_DEVICE=CPU), the
    dtype float32, collectives gloo, and ``verified_on`` says "verified on XLA:CPU".
    """

    dist_backend = "gloo"
    priority = 0  # used only when asked for by name
    supported_dtypes = (torch.float32,)
    hardware: ClassVar[str] = "accelerator"
    verified_on = VERIFIED_ON.format(hardware="TPU or Neuron device")  # subclasses name their hardware

    def __init__(self) -> None:
        pjrt = os.environ.get("PJRT_DEVICE", "CPU")
        if pjrt.upper() != "CPU":
            raise PlatformError(f"{ENV_VAR}=1 runs on XLA:CPU, but PJRT_DEVICE={pjrt}; unset it or set PJRT_DEVICE=CPU")
        os.environ["PJRT_DEVICE"] = "CPU"
        super().__init__()

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def device_count(self) -> int:
        # One XLA:CPU device unless CPU_NUM_DEVICES asks for more (tensor parallelism through SPMD).
        return super().device_count()

    def device_name(self, index: int = 0) -> str:
        return f"XLA:CPU twin of {self.hardware} ({ENV_VAR}=1)"

    def total_memory(self, index: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self, index: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def communicator(self, group: Any = None) -> Communicator:
        return Communicator(group)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["mode"] = f"XLA:CPU twin ({ENV_VAR}=1): the backend's graphs on torch-xla's CPU device, no {self.hardware} used"
        return info
