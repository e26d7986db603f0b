"""TPU attention: this package's Pallas ragged paged attention kernel, torch-xla's as the fallback.

On a TPU the step's keys/values are scattered into the cache as on every XLA backend, then the
Pallas kernel (pagedllm_tpu.kernels) runs as a TPU custom call through torch-xla. If it cannot
be lowered (an older libtpu or jax), torch-xla's own ragged_paged_attention kernel is used. Off
a TPU (the XLA:CPU twin) the portable XLA-op attention runs. The TPU paths were never run here:
no TPU was available; the kernel is verified in jax's TPU-interpret mode only.
"""

from __future__ import annotations

import functools
import logging

import torch

from pagedllm.kernels.xla.attention_backend import XlaAttentionBackend, XlaAttentionMetadata

logger = logging.getLogger(__name__)


@functools.cache
def on_tpu(device: torch.device) -> bool:
    import torch_xla.core.xla_model as xm

    return device.type == "xla" and xm.xla_device_hw(device) == "TPU"


class TpuAttentionBackend(XlaAttentionBackend):
    name = "tpu-pallas"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.use_pallas = True

    def forward(self, query, key, value, kv_cache, metadata: XlaAttentionMetadata):
        if not on_tpu(query.device):
            return super().forward(query, key, value, kv_cache, metadata)
        self.write_kv(kv_cache, key, value, metadata.slot_mapping)
        bs = self.spec.block_size
        k_pages = kv_cache[0].view(-1, bs, *kv_cache.shape[2:])  # [num_blocks, bs, KVH, D]
        v_pages = kv_cache[1].view(-1, bs, *kv_cache.shape[2:])
        if self.use_pallas:
            try:
                return self._pallas(query, k_pages, v_pages, metadata)
            except Exception as exc:  # lowering failed: say why once, then use torch-xla's kernel
                logger.warning("tpu: Pallas attention failed (%s); using torch-xla's ragged_paged_attention", exc)
                self.use_pallas = False
        return self._torch_xla_kernel(query, k_pages, v_pages, metadata)

    def _pallas(self, query, k_pages, v_pages, metadata):
        from torch_xla.experimental.custom_kernel import make_kernel_from_pallas

        from pagedllm_tpu.kernels.ragged_paged_attention import ragged_paged_attention

        s = self.spec
        fn = functools.partial(ragged_paged_attention, scale=s.scale, sliding_window=s.sliding_window, soft_cap=s.logit_soft_cap)
        kernel = make_kernel_from_pallas(fn, lambda q, *_: [(q.shape, q.dtype)])
        return kernel(query, k_pages, v_pages, metadata.token_seq.int(), metadata.token_pos.int(),
                      metadata.batch.block_tables.int())

    def _torch_xla_kernel(self, query, k_pages, v_pages, metadata):
        from torch_xla.experimental.custom_kernel import ragged_paged_attention

        s = self.spec
        batch = metadata.batch
        # torch-xla's layout interleaves keys and values per head: [pages, bs, 2 * KVH, D].
        kv_pages = torch.stack((k_pages, v_pages), dim=3).flatten(2, 3)
        num_seqs = torch.tensor([batch.num_seqs], dtype=torch.int32, device=query.device)
        return ragged_paged_attention(
            query, kv_pages, batch.seq_lens.int(), batch.block_tables.int(), batch.query_start_loc.int(), num_seqs,
            sm_scale=s.scale, sliding_window=s.sliding_window, soft_cap=s.logit_soft_cap, use_kernel=True,
        )
