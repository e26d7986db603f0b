"""Ragged paged attention as a Pallas TPU kernel: one grid step per query token of a flattened batch.

The batch is ragged (mixed prefills, chunked prefills and decodes, one after the other), so each
step reads its token's sequence and position from scalar-prefetched tables in SMEM, then walks
that sequence's pages: each page of keys and values is DMA'd from HBM into VMEM by block-table
index and folded into an online softmax (GQA by head groups, causal, optional sliding window
and logit soft-cap). Reading pages by DMA is what lets jax's TPU-interpret mode check every page
index against the cache bounds on a CPU. Correctness first: one token per grid step is the
simple schedule; batching query tokens per step is where a TPU gets its speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(
    seq_ref, pos_ref, tables_ref,  # scalar prefetch (SMEM): [T], [T], [S * B]
    q_ref,  # [1, H, D] this token's query (VMEM)
    k_hbm, v_hbm,  # [num_blocks, block_size, KVH, D] (HBM, read by DMA)
    o_ref,  # [1, H, D]
    k_buf, v_buf, sem,  # VMEM page buffers and their DMA semaphores
    *, scale: float, block_size: int, blocks_per_seq: int, group: int,
    sliding_window: int | None, soft_cap: float | None,
):
    t = pl.program_id(0)
    seq = seq_ref[t]
    pos = pos_ref[t]
    q = q_ref[0].astype(jnp.float32) * scale  # [H, D]
    num_heads, head_size = q.shape
    first_page = 0 if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0) // block_size
    last_page = pos // block_size + 1

    def page_step(i, carry):
        m, l, acc = carry  # [H, 1], [H, 1], [H, D]
        page = tables_ref[seq * blocks_per_seq + i]
        copy_k = pltpu.make_async_copy(k_hbm.at[page], k_buf, sem.at[0])
        copy_v = pltpu.make_async_copy(v_hbm.at[page], v_buf, sem.at[1])
        copy_k.start()
        copy_v.start()
        copy_k.wait()
        copy_v.wait()
        k = jnp.repeat(k_buf[...].astype(jnp.float32), group, axis=1)  # [bs, H, D]
        v = jnp.repeat(v_buf[...].astype(jnp.float32), group, axis=1)
        s = jnp.sum(q[None, :, :] * k, axis=-1).T  # [H, bs]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = i * block_size + jax.lax.broadcasted_iota(jnp.int32, (num_heads, block_size), 1)
        visible = key_pos <= pos
        if sliding_window is not None:
            visible = jnp.logical_and(visible, pos - key_pos < sliding_window)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        v = jnp.where(visible.T[:, :, None], v, 0.0)  # slots past the end may hold NaN: 0 * NaN is NaN
        alpha = jnp.exp(m - m_new)
        l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
        acc_new = alpha * acc + jnp.sum(p[:, :, None] * v.transpose(1, 0, 2), axis=1)  # [H, D]
        return m_new, l_new, acc_new

    init = (
        jnp.full((num_heads, 1), -jnp.inf, jnp.float32),
        jnp.zeros((num_heads, 1), jnp.float32),
        jnp.zeros((num_heads, head_size), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(first_page, last_page, page_step, init)
    o_ref[0] = (acc / l).astype(o_ref.dtype)


def ragged_paged_attention(
    q: jax.Array,  # [T, H, D]
    k_cache: jax.Array,  # [num_blocks, block_size, KVH, D]
    v_cache: jax.Array,
    token_seq: jax.Array,  # [T] int32: the sequence of each token
    token_pos: jax.Array,  # [T] int32: its position in that sequence
    block_tables: jax.Array,  # [S, B] int32
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, H, D]
    """Attention of every query token over its sequence's cached keys up to its own position.

    The new tokens' keys and values must already be in the cache. ``interpret=True`` runs the
    kernel in jax's TPU-interpret mode on a CPU, which raises on an out-of-bounds page read.
    """
    T, H, D = q.shape
    num_blocks, block_size, kvh, _ = k_cache.shape
    S, B = block_tables.shape
    kernel = functools.partial(
        _kernel, scale=scale, block_size=block_size, blocks_per_seq=B, group=H // kvh,
        sliding_window=sliding_window, soft_cap=soft_cap,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(T,),
        in_specs=[
            pl.BlockSpec((1, H, D), lambda t, *_: (t, 0, 0)),
            pl.BlockSpec(memory_space=pltpu.ANY),
            pl.BlockSpec(memory_space=pltpu.ANY),
        ],
        out_specs=pl.BlockSpec((1, H, D), lambda t, *_: (t, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((block_size, kvh, D), k_cache.dtype),
            pltpu.VMEM((block_size, kvh, D), v_cache.dtype),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((T, H, D), q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(
        token_seq.astype(jnp.int32), token_pos.astype(jnp.int32), block_tables.reshape(-1).astype(jnp.int32),
        q, k_cache, v_cache,
    )
