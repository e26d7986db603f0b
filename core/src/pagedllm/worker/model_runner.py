"""The one device-neutral ModelRunner: loads the model, owns the KV caches, turns a schedule into a forward and samples."""

from __future__ import annotations

import math
import time
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


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.config = config
        self.platform = platform
        self.device = platform.device(tp_rank)
        self.block_size = config.cache.block_size
        loaded = load_model(config.model, platform, self.block_size, tp_rank=tp_rank, tp_size=tp_size)
        self.model = loaded.model
        self.tokenizer_info = loaded.tokenizer_info
        self.hf_config = loaded.hf_config
        self.dtype = loaded.dtype
        self.layers = list(self.model.attention_layers())
        if not self.layers:
            raise ConfigError("the model has no attention layers; nothing to cache")
        # One metadata object serves every layer, so every layer must share a KV layout.
        self.backend = self.layers[0].backend
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches: list[torch.Tensor] = [
            layer.backend.allocate_kv_cache(self.num_blocks, self.device) for layer in self.layers
        ]
        self.sampler = Sampler()
        self.model_time_s = 0.0  # cumulative forward + logits + sampling
        platform.compile_or_capture(self)

    # --- KV cache sizing ------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        total = 0
        for layer in self.layers:
            s = layer.spec
            shape = layer.backend.kv_cache_shape(1, self.block_size, s.num_kv_heads, s.head_size)
            total += math.prod(shape) * torch.empty((), dtype=s.dtype).element_size()
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

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len or self.tokenizer_info.max_model_len

    # --- one step --------------------------------------------------------------------------
    def prepare_batch(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """Input ids, positions and the attention batch, built with numpy (no per-token Python)."""
        items = out.scheduled
        bs = self.block_size
        num_seqs = len(items)
        q_lens = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((it.start for it in items), dtype=np.int64, count=num_seqs)
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        num_tokens = int(qsl[-1])
        if num_tokens == num_seqs:  # pure decode: one token per sequence
            ids = [it.seq.token_ids[it.start] for it in items]
            positions = starts
            seq_of_token = np.arange(num_seqs)
        else:
            ids = list(
                chain.from_iterable(it.seq.token_ids[it.start : it.start + it.num_new_tokens] for it in items)
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
        seq_lens = starts + q_lens

        padded = self.platform.pad_num_tokens(num_tokens, self.config)
        input_ids = np.zeros(padded, dtype=np.int64)
        input_ids[:num_tokens] = ids
        pos = np.zeros(padded, dtype=np.int64)
        pos[:num_tokens] = positions
        slot_mapping = np.full(padded, -1, dtype=np.int64)
        slot_mapping[:num_tokens] = slots

        dev = self.device
        batch = AttentionBatch(
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=bs,
        )
        return torch.from_numpy(input_ids).to(dev), torch.from_numpy(pos).to(dev), batch

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> StepResult:
        """Run one scheduled step: copy-on-write, forward, logits for sampling rows only, sample."""
        input_ids, positions, batch = self.prepare_batch(out)
        if out.copy_pairs:
            pairs = torch.tensor(out.copy_pairs, dtype=torch.int64, device=self.device)
            self.backend.copy_blocks(self.kv_caches, pairs)
        metadata = self.backend.build_metadata(batch)
        t0 = time.perf_counter()
        with set_forward_context(ForwardContext(metadata, self.kv_caches)):
            hidden = self.model.forward(input_ids, positions)  # [T, hidden]
        result = StepResult()
        qsl = batch.query_start_loc_cpu

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
        if seqs:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])  # [N, V]
            meta = SamplingMetadata.from_requests(
                [s.params for s in seqs],
                [s.prompt_token_ids for s in seqs],
                [s.output_token_ids for s in seqs],
                [s.generator for s in seqs],
                int(logits.shape[-1]),
                logits.device,
            )
            sampled = self.sampler(logits, meta)
            for s, tok, lp in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
                result.sampled[s.seq_id] = tok
                if lp is not None:
                    result.logprobs[s.seq_id] = lp

        for k, item in enumerate(out.scheduled):
            seq = item.seq
            if not seq.wants_prompt_logprobs:
                continue
            # Position p predicts prompt token p + 1; the last prompt position predicts the first output.
            end = min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1)
            if end <= item.start:
                result.prompt_logprobs[seq.seq_id] = []
                continue
            first = qsl[k]
            logits = self.model.compute_logits(hidden[first : first + end - item.start])
            next_ids = seq.token_ids[item.start + 1 : end + 1]
            result.prompt_logprobs[seq.seq_id] = compute_prompt_logprobs(
                logits, next_ids, seq.params.prompt_logprobs
            )
        self.platform.synchronize()
        self.model_time_s += time.perf_counter() - t0
        return result
