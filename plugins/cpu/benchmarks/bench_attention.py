"""Decode-attention microbenchmark: the CPU backend (torch and C kernels) vs naive gather + SDPA vs the reference (and IPEX).

Default shape is SmolLM2-135M's attention (9 query heads, 3 KV heads, head size 64) at a decode
batch of 64 sequences with 512 tokens of context each, fp32, block size 16, random block tables.
Each row is the best of several repeats of one layer's forward (KV write + attention).

    python plugins/cpu/benchmarks/bench_attention.py [--batch 64] [--context 512] [--threads 2]

With ``intel_extension_for_pytorch`` matching torch installed, the IPEX path is timed too.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pagedllm.plugin import AttentionBatch, AttentionSpec, ReferenceAttentionBackend
from pagedllm_cpu.attention import CpuAttentionBackend
from pagedllm_cpu.kernels import clib
from pagedllm_cpu.kernels import ipex as ipex_kernels


def best_ms(fn: Callable[[], object], repeats: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best * 1e3


def naive_gather_sdpa(
    spec: AttentionSpec,
    query: torch.Tensor,
    token_major: tuple[torch.Tensor, torch.Tensor],
    batch: AttentionBatch,
) -> torch.Tensor:
    """A first attempt: token-major cache, one padded slot gather, repeat_interleave for GQA, SDPA."""
    keys, values = token_major  # [num_slots, H_kv, D] each (the reference backend's layout)
    bs, group = batch.block_size, spec.num_heads // spec.num_kv_heads
    max_len = batch.max_seq_len
    pos = torch.arange(max_len)
    slots = batch.block_tables.to(torch.long)[:, pos // bs] * bs + pos % bs  # [B, max_len]
    k = keys[slots].transpose(1, 2).repeat_interleave(group, dim=1)  # [B, heads, max_len, D]
    v = values[slots].transpose(1, 2).repeat_interleave(group, dim=1)
    mask = (pos.view(1, -1) < batch.seq_lens.view(-1, 1)).view(-1, 1, 1, max_len)
    return F.scaled_dot_product_attention(query.unsqueeze(2), k, v, attn_mask=mask, scale=spec.scale).squeeze(
        2
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip-reference", action="store_true", help="the reference is slow (per-token write)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    b, ctx, bs = args.batch, args.context, args.block_size
    spec = AttentionSpec(args.heads, args.kv_heads, args.head_size, args.head_size**-0.5, torch.float32, bs)
    blocks_per_seq = -(-ctx // bs)
    num_blocks = b * blocks_per_seq + 8
    order = list(range(num_blocks))
    random.Random(0).shuffle(order)
    tables = [order[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(b)]
    batch = AttentionBatch.build([1] * b, [ctx] * b, tables, bs)

    torch.manual_seed(0)
    q = torch.randn(b, spec.num_heads, spec.head_size)
    k = torch.randn(b, spec.num_kv_heads, spec.head_size)
    v = torch.randn(b, spec.num_kv_heads, spec.head_size)
    cpu = CpuAttentionBackend(spec)
    cache = torch.randn(cpu.kv_cache_shape(num_blocks, bs, spec.num_kv_heads, spec.head_size))
    meta = cpu.build_metadata(batch)
    cpu.forward(q, k, v, cache, meta)  # writes this step's keys so every variant reads the same cache
    _, nb, h, _, d = cache.shape
    token_major = (
        cache[0].transpose(1, 2).reshape(nb * bs, h, d),
        cache[1].transpose(1, 2).reshape(nb * bs, h, d),
    )
    expected = naive_gather_sdpa(spec, q, token_major, batch)

    print(
        f"decode attention, one layer: batch {b} x context {ctx}, heads {spec.num_heads}/{spec.num_kv_heads}, "
        f"head size {spec.head_size}, block size {bs}, fp32, {torch.get_num_threads()} threads"
    )
    rows: list[tuple[str, float]] = []
    rows.append(
        ("cpu-torch (this backend)", best_ms(lambda: cpu.forward(q, k, v, cache, meta), args.repeats, 5))
    )
    rows.append(
        (
            "cpu-torch incl. build_metadata",
            best_ms(lambda: cpu.forward(q, k, v, cache, cpu.build_metadata(batch)), args.repeats, 5),
        )
    )
    rows.append(
        (
            "naive gather + SDPA",
            best_ms(lambda: naive_gather_sdpa(spec, q, token_major, batch), args.repeats, 2),
        )
    )
    torch.testing.assert_close(cpu.forward(q, k, v, cache, meta), expected, atol=1e-5, rtol=1e-5)

    kernels, why = clib.status()
    if kernels is not None:
        c = CpuAttentionBackend(spec, kernels=kernels)
        c_meta = c.build_metadata(batch)
        torch.testing.assert_close(c.forward(q, k, v, cache, c_meta), expected, atol=1e-5, rtol=1e-5)
        rows.append(
            ("cpu-c (C kernels)", best_ms(lambda: c.forward(q, k, v, cache, c_meta), args.repeats, 5))
        )
    else:
        print(f"(C kernels not timed: {why})")

    status = ipex_kernels.ipex_status()
    if status.usable:
        ipex = CpuAttentionBackend(spec, ipex=ipex_kernels.load())
        ipex_meta = ipex.build_metadata(batch)
        torch.testing.assert_close(ipex.forward(q, k, v, cache, ipex_meta), expected, atol=1e-5, rtol=1e-5)
        rows.append(
            (
                f"cpu-ipex (IPEX {status.version})",
                best_ms(lambda: ipex.forward(q, k, v, cache, ipex_meta), args.repeats, 5),
            )
        )
    else:
        print(f"(IPEX not timed: {status.reason})")

    if not args.skip_reference:
        ref = ReferenceAttentionBackend(spec)
        ref_cache = cache.transpose(2, 3).contiguous()
        rows.append(("reference backend", best_ms(lambda: ref.forward(q, k, v, ref_cache, batch), 1, 1)))

    base = dict(rows)["naive gather + SDPA"]
    for name, ms in rows:
        print(f"  {name:<34} {ms:9.2f} ms   {base / ms:5.2f}x vs naive")


if __name__ == "__main__":
    main()
