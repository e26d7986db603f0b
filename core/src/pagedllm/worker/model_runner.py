"""The one device-neutral ModelRunner: loads the model, owns the KV caches, turns a schedule into a forward and samples."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from pagedllm.attention.backend import AttentionBatch
from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput, StepResult
from pagedllm.errors import ConfigError
from pagedllm.model.forward_context import ForwardContext, set_forward_context
from pagedllm.model.loader import load_model
from pagedllm.platforms.platform import Platform
from pagedllm.sample.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs


@dataclass(slots=True)
class HostInputs:
    """One step's inputs on the host (numpy), before padding and transfer."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int64
    seq_lens: np.ndarray  # [S] int64
    block_tables: np.ndarray  # [S, max_blocks] int32
    slot_mapping: np.ndarray  # [T] int64
    max_query_len: int


@dataclass(slots=True)
class DecodeBuffers:
    """Persistent device inputs of captured decode steps (one row per sequence)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    query_start_loc: torch.Tensor  # [N + 1] int32, always 0..N: one query token per sequence
    seq_lens: torch.Tensor  # [N] int32
    block_tables: torch.Tensor  # [N, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [N] int64

    @classmethod
    def allocate(cls, max_seqs: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        return cls(
            input_ids=torch.zeros(max_seqs, dtype=torch.int64, device=device),
            positions=torch.zeros(max_seqs, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(max_seqs + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_seqs, dtype=torch.int32, device=device),
            block_tables=torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device),
            slot_mapping=torch.full((max_seqs,), -1, dtype=torch.int64, device=device),
        )

    def fill(self, h: HostInputs, size: int) -> None:
        """Copy a decode step's inputs in; rows n..size are inert padding (attend to one slot, write none)."""
        n = h.input_ids.shape[0]
        width = h.block_tables.shape[1]
        ids = np.zeros(size, dtype=np.int64)
        ids[:n] = h.input_ids
        pos = np.zeros(size, dtype=np.int64)
        pos[:n] = h.positions
        lens = np.ones(size, dtype=np.int32)
        lens[:n] = h.seq_lens
        slots = np.full(size, -1, dtype=np.int64)
        slots[:n] = h.slot_mapping
        tables = np.zeros((size, self.block_tables.shape[1]), dtype=np.int32)
        tables[:n, :width] = h.block_tables
        dev = self.input_ids.device
        self.input_ids[:size].copy_(torch.from_numpy(ids).to(dev, non_blocking=True))
        self.positions[:size].copy_(torch.from_numpy(pos).to(dev, non_blocking=True))
        self.seq_lens[:size].copy_(torch.from_numpy(lens).to(dev, non_blocking=True))
        self.slot_mapping[:size].copy_(torch.from_numpy(slots).to(dev, non_blocking=True))
        self.block_tables[:size].copy_(torch.from_numpy(tables).to(dev, non_blocking=True))


def _platform_inference_context(method: Any) -> Any:
    """Run a ModelRunner method under its platform's no-autograd context (inference_mode by default)."""

    @functools.wraps(method)
    def wrapper(self: ModelRunner, *args: Any, **kwargs: Any) -> Any:
        with self.platform.inference_context():
            return method(self, *args, **kwargs)

    return wrapper


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        platform: Platform,
        tp_rank: int = 0,
        tp_size: int = 1,
        pp_rank: int = 0,
        pp_size: int = 1,
    ) -> None:
        self.config = config
        self.platform = platform
        self.device = platform.device(tp_rank)
        self.block_size = config.cache.block_size
        loaded = load_model(
            config.model,
            platform,
            self.block_size,
            tp_rank=tp_rank,
            tp_size=tp_size,
            pp_rank=pp_rank,
            pp_size=pp_size,
            kv_cache_dtype=config.cache.kv_cache_dtype,
        )
        self.model = loaded.model
        self.tokenizer_info = loaded.tokenizer_info
        self.hf_config = loaded.hf_config
        self.dtype = loaded.dtype
        self.layers = list(self.model.attention_layers())
        if not self.layers:
            raise ConfigError("the model has no attention layers; nothing to cache")
        # One metadata object serves every layer, so every layer must share a KV layout.
        self.backend = self.layers[0].backend
        self.world_size = tp_size * pp_size
        # Only the last pipeline stage computes logits (its tensor-parallel ranks together: the
        # vocabulary-parallel head gathers across them); only its rank 0, the driver, samples.
        self.computes_logits = pp_rank == pp_size - 1
        self.is_driver = tp_rank == 0 and self.computes_logits
        self.num_blocks = self._agree_num_blocks(self._decide_num_blocks())
        # Static-shape platforms reserve blocks past the scheduler's (padded slots write there).
        self.kv_caches: list[torch.Tensor] = [
            layer.backend.allocate_kv_cache(self.num_blocks + platform.reserved_kv_blocks, self.device) for layer in self.layers
        ]
        self.sampler = Sampler(getattr(platform, "greedy_argmax", None))
        self.model_time_s = 0.0  # cumulative forward + logits + sampling
        self._decode_buffers: DecodeBuffers | None = None
        self.decode_graphs: Any = None  # set by a platform that captures decode steps
        platform.compile_or_capture(self)

    # --- KV cache sizing ------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        total = 0
        for layer in self.layers:
            s = layer.spec
            shape = layer.backend.kv_cache_shape(1, self.block_size, s.num_kv_heads, s.head_size)
            total += math.prod(shape) * torch.empty((), dtype=s.cache_dtype).element_size()
        return total

    def _decide_num_blocks(self) -> int:
        override = self.config.cache.num_gpu_blocks_override
        if override is not None:
            return override
        per_block = self.bytes_per_block()
        budget = self.platform.kv_cache_budget(self.config)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"the KV cache budget of {budget} bytes holds no block (one block of {self.block_size} tokens "
                f"takes {per_block} bytes); raise --kv-cache-memory",
                param="kv_cache_memory",
            )
        # Blocks beyond what max_num_seqs full-length sequences could ever use would sit idle.
        useful = self.config.scheduler.max_num_seqs * -(-self.max_model_len // self.block_size)
        return int(min(num_blocks, useful))

    def _agree_num_blocks(self, num_blocks: int) -> int:
        """All ranks share one block table, so all take the smallest rank's block count."""
        if self.world_size == 1:
            return num_blocks
        mine = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        return int(self.platform.communicator().all_gather(mine, dim=0).min())

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len or self.tokenizer_info.max_model_len

    # --- one step --------------------------------------------------------------------------
    def host_inputs(self, out: SchedulerOutput) -> HostInputs:
        """The step's inputs as numpy arrays, built without per-token Python."""
        items = out.scheduled
        bs = self.block_size
        num_seqs = len(items)
        q_lens = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((it.start for it in items), dtype=np.int64, count=num_seqs)
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        num_tokens = int(qsl[-1])
        if num_tokens == num_seqs:  # pure decode: one token per sequence
            ids = np.fromiter((it.seq.token_ids[it.start] for it in items), dtype=np.int64, count=num_seqs)
            positions = starts
            seq_of_token = np.arange(num_seqs)
        else:
            ids = np.fromiter(
                chain.from_iterable(
                    it.seq.token_ids[it.start : it.start + it.num_new_tokens] for it in items
                ),
                dtype=np.int64,
                count=num_tokens,
            )
            seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
            positions = np.arange(num_tokens) - qsl[seq_of_token] + starts[seq_of_token]
        # Scatter every block table into one padded array with a handful of numpy calls.
        lens = np.fromiter(map(len, out.block_tables), dtype=np.int64, count=num_seqs)
        flat = np.fromiter(chain.from_iterable(out.block_tables), dtype=np.int32, count=int(lens.sum()))
        row_of = np.repeat(np.arange(num_seqs), lens)
        col_of = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lens) - lens, lens)
        tables = np.zeros((num_seqs, int(lens.max())), dtype=np.int32)
        tables[row_of, col_of] = flat
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        return HostInputs(ids, positions, qsl, starts + q_lens, tables, slots, int(q_lens.max()))

    def prepare_batch(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """Input ids, positions and the attention batch on the device, padded as the platform asks."""
        return self.device_inputs(self.platform.pad_host_inputs(self.host_inputs(out), self))

    def device_inputs(self, h: HostInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """Host inputs moved to the device, tokens padded by ``platform.pad_num_tokens``."""
        num_tokens = h.input_ids.shape[0]
        padded = self.platform.pad_num_tokens(num_tokens, self.config)
        input_ids, pos, slot_mapping = h.input_ids, h.positions, h.slot_mapping
        if padded > num_tokens:
            input_ids = np.concatenate([input_ids, np.zeros(padded - num_tokens, dtype=np.int64)])
            pos = np.concatenate([pos, np.zeros(padded - num_tokens, dtype=np.int64)])
            slot_mapping = np.concatenate([slot_mapping, np.full(padded - num_tokens, -1, dtype=np.int64)])
        dev = self.device
        batch = AttentionBatch(
            query_start_loc=torch.from_numpy(h.query_start_loc.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(h.seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(h.block_tables).to(dev),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            max_query_len=h.max_query_len,
            max_seq_len=int(h.seq_lens.max()),
            query_start_loc_cpu=h.query_start_loc.tolist(),
            seq_lens_cpu=h.seq_lens.tolist(),
            block_size=self.block_size,
        )
        return torch.from_numpy(input_ids).to(dev), torch.from_numpy(pos).to(dev), batch

    # --- captured decode steps (for platforms whose compile_or_capture records graphs) ------
    def decode_step_for_capture(self, num_seqs: int) -> torch.Tensor:  # [num_seqs, hidden]
        """One decode forward over the first ``num_seqs`` rows of persistent input buffers.

        A graph captured from this replays with whatever the buffers hold; the host-side lists
        in the batch are placeholders, so only backends that read the device tensors may
        capture (the CPU backend does so through a plan over these buffers, see its capture.py).
        """
        return self.decode_forward_for_capture(*self.decode_inputs_for_capture(num_seqs))

    def decode_inputs_for_capture(self, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(input_ids, positions, attention metadata) over the persistent buffers' first ``num_seqs`` rows."""
        if self._decode_buffers is None:
            self._decode_buffers = DecodeBuffers.allocate(
                self.config.scheduler.max_num_seqs, -(-self.max_model_len // self.block_size), self.device
            )
        b = self._decode_buffers
        batch = AttentionBatch(
            query_start_loc=b.query_start_loc[: num_seqs + 1],
            seq_lens=b.seq_lens[:num_seqs],
            block_tables=b.block_tables[:num_seqs],
            slot_mapping=b.slot_mapping[:num_seqs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(num_seqs + 1)),
            seq_lens_cpu=[self.max_model_len] * num_seqs,
            block_size=self.block_size,
        )
        return b.input_ids[:num_seqs], b.positions[:num_seqs], self.backend.build_metadata(batch)

    def decode_forward_for_capture(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: Any
    ) -> torch.Tensor:  # [num_seqs, hidden]
        """The model forward alone (what a capture records), given decode_inputs_for_capture's result."""
        with set_forward_context(ForwardContext(metadata, self.kv_caches)):
            return self.model.forward(input_ids, positions)

    def _replay_decode(self, out: SchedulerOutput) -> tuple[torch.Tensor, float] | None:
        """Run a pure-decode step through a captured graph if one fits: (hidden, replay start time); else None."""
        graphs = self.decode_graphs
        num_seqs = len(out.scheduled)
        if graphs is None or out.num_scheduled_tokens != num_seqs or self._decode_buffers is None:
            return None
        size = graphs.padded_size(num_seqs)
        if size is None:
            return None
        h = self.host_inputs(out)
        b = self._decode_buffers
        width = h.block_tables.shape[1]
        if width > b.block_tables.shape[1]:
            return None
        b.fill(h, size)
        t0 = time.perf_counter()
        return graphs.replay(num_seqs), t0

    @_platform_inference_context
    def execute_model(self, out: SchedulerOutput) -> StepResult:
        """Run one scheduled step: copy-on-write, forward, logits for sampling rows only, sample."""
        if out.copy_pairs:
            pairs = torch.tensor(out.copy_pairs, dtype=torch.int64, device=self.device)
            self.backend.copy_blocks(self.kv_caches, pairs)
        replayed = self._replay_decode(out)
        if replayed is None:
            input_ids, positions, batch = self.prepare_batch(out)
            metadata = self.backend.build_metadata(batch)
            t0 = time.perf_counter()
            with set_forward_context(ForwardContext(metadata, self.kv_caches)):
                hidden = self.model.forward(input_ids, positions)  # [T, hidden]
            qsl = batch.query_start_loc_cpu
        else:
            hidden, t0 = replayed
            qsl = list(range(len(out.scheduled) + 1))
        result = StepResult()

        rows: list[int] = []
        seqs: list[Any] = []
        forks = out.forks
        for k, item in enumerate(out.scheduled):
            if item.samples:
                rows.append(qsl[k + 1] - 1)
                seqs.append(item.seq)
                if forks and item.seq.seq_id in forks:
                    for sibling in forks[item.seq.seq_id]:
                        rows.append(qsl[k + 1] - 1)
                        seqs.append(sibling)
        sampled = None
        if seqs and self.world_size == 1 and out.structured is None:
            # A platform may sample inside its own graph (XLA: only token ids leave the device).
            sampled = self.platform.sample(self, hidden, rows, seqs)  # None: the default below
        if seqs and sampled is None and self.computes_logits:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])  # [N, V]
        if seqs and sampled is None and self.is_driver:
            if out.structured is not None:
                out.structured.apply(logits)  # structured outputs: disallowed tokens of constrained rows -> -inf
            meta = SamplingMetadata.from_requests(
                [s.params for s in seqs],
                [s.prompt_token_ids for s in seqs],
                [s.output_token_ids for s in seqs],
                [s.generator for s in seqs],
                int(logits.shape[-1]),
                logits.device,
            )
            sampled = self.sampler(logits, meta)
        if sampled is not None:
            for s, tok, lp in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
                result.sampled[s.seq_id] = tok
                if lp is not None:
                    result.logprobs[s.seq_id] = lp

        for k, item in enumerate(out.scheduled):
            seq = item.seq
            if not seq.wants_prompt_logprobs or not self.computes_logits:
                continue
            # Position p predicts prompt token p + 1; the last prompt position predicts the first output.
            end = min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1)
            if end <= item.start:
                result.prompt_logprobs[seq.seq_id] = []
                continue
            first = qsl[k]
            logits = self.model.compute_logits(hidden[first : first + end - item.start])
            if not self.is_driver:
                continue
            next_ids = seq.token_ids[item.start + 1 : end + 1]
            result.prompt_logprobs[seq.seq_id] = compute_prompt_logprobs(
                logits, next_ids, seq.params.prompt_logprobs
            )
        self.platform.synchronize()
        self.model_time_s += time.perf_counter() - t0
        return result
