"""CpuAttentionBackend against the core's reference backend, and its KV-cache bookkeeping."""

from __future__ import annotations

import os
import random

import pytest
import torch
from pagedllm.plugin import AttentionBatch, AttentionSpec, ReferenceAttentionBackend
from pagedllm_cpu.attention import DECODE_CHUNK_BYTES, KERNEL_MAX_QUERIES, CpuAttentionBackend
from pagedllm_cpu.kernels import clib
from pagedllm_cpu.kernels import ipex as ipex_kernels
from pagedllm_cpu.platform import CpuPlatform

ATOL = RTOL = 1e-5


_PATH = {"path": "c-kernels"}
# IPEX's paged attention is tested where it is installed for this torch (tox -e cpu-ipex).
_IPEX = ["ipex"] if ipex_kernels.ipex_status().usable else []


@pytest.fixture(autouse=True, params=["c-kernels", "torch", *_IPEX])
def attention_path(request: pytest.FixtureRequest):
    """Every test runs with the C kernels (fp32 default), with the torch-only path, and with IPEX's
    paged attention where it is installed."""
    if request.param == "c-kernels" and clib.status()[0] is None:
        pytest.skip(f"C kernels unavailable: {clib.status()[1]}")
    _PATH["path"] = request.param
    yield request.param
    _PATH["path"] = "c-kernels"


def make_backend(spec: AttentionSpec) -> CpuAttentionBackend:
    """The backend the platform hands out, with its C kernels switched off for the torch-path run,
    or IPEX's (which the platform picks for the dtypes the C kernels do not cover) for the IPEX run."""
    if _PATH["path"] == "ipex":
        return CpuAttentionBackend(spec, ipex=ipex_kernels.load())
    backend = CpuPlatform().attention_backend(spec)
    if _PATH["path"] == "torch":
        backend.kernels = None
        backend.ipex = None
    return backend


def _tables(
    seq_lens: list[int], block_size: int, spare: int, rng: random.Random
) -> tuple[list[list[int]], int]:
    """Random, non-contiguous block tables (with unused blocks in between) for these sequences."""
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for n in need:
        tables.append(free[:n])
        free = free[n:]
    return tables, num_blocks


def _ref_to_cpu_layout(ref_cache: torch.Tensor) -> torch.Tensor:
    # reference [2, nb, bs, H, D] -> cpu [2, nb, H, bs, D]
    return ref_cache.transpose(2, 3).contiguous()


def run_both(
    spec: AttentionSpec,
    query_lens: list[int],
    context_lens: list[int],
    pad: int = 0,
    seed: int = 0,
    backend: CpuAttentionBackend | None = None,
    stale_nan: bool = False,
) -> dict:
    """Run reference and CPU backends on the same random batch and starting cache contents."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    tables, num_blocks = _tables(seq_lens, spec.block_size, spare=3, rng=rng)
    batch = AttentionBatch.build(
        query_lens, seq_lens, tables, spec.block_size, pad_tokens_to=sum(query_lens) + pad
    )
    t = batch.num_tokens
    q = torch.randn(t, spec.num_heads, spec.head_size, dtype=spec.dtype)
    k = torch.randn(t, spec.num_kv_heads, spec.head_size, dtype=spec.dtype)
    v = torch.randn(t, spec.num_kv_heads, spec.head_size, dtype=spec.dtype)
    ref = ReferenceAttentionBackend(spec)
    cpu = backend or make_backend(spec)
    ref_cache = torch.randn(
        ref.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size), dtype=spec.dtype
    )
    if stale_nan:
        # Slots no sequence has written hold NaN: a kernel must never read past a sequence's end.
        used = torch.zeros(num_blocks * spec.block_size, dtype=torch.bool)
        for table, seq_len in zip(tables, seq_lens, strict=True):
            pos = torch.arange(seq_len)
            used[torch.tensor(table)[pos // spec.block_size] * spec.block_size + pos % spec.block_size] = True
        ref_cache.view(2, -1, spec.num_kv_heads, spec.head_size)[:, ~used] = float("nan")
    cpu_cache = _ref_to_cpu_layout(ref_cache)
    before = cpu_cache.clone()
    ref_out = ref.forward(q, k, v, ref_cache, batch)
    cpu_out = cpu.forward(q, k, v, cpu_cache, cpu.build_metadata(batch))
    return dict(
        batch=batch,
        ref_out=ref_out,
        cpu_out=cpu_out,
        ref_cache=ref_cache,
        cpu_cache=cpu_cache,
        before=before,
        key=k,
        value=v,
        cpu=cpu,
        num_blocks=num_blocks,
        n=sum(query_lens),
    )


# A mixed batch: prefills, decodes, chunked prefills with cached context and an empty slot.
MIXED_Q = [7, 1, 1, 0, 5, 1, 3]
MIXED_CTX = [0, 17, 40, 6, 12, 0, 33]


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("head_size", [64, 128])
# GQA ratio 1, 2, 3, 4, 8 (the C kernel keeps a group of up to 4 heads of 64, or 2 of 128, in registers)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 4), (6, 2), (8, 2), (8, 1)])
def test_mixed_batch_matches_reference(
    block_size: int, head_size: int, num_heads: int, num_kv_heads: int
) -> None:
    spec = AttentionSpec(num_heads, num_kv_heads, head_size, head_size**-0.5, torch.float32, block_size)
    r = run_both(spec, MIXED_Q, MIXED_CTX, pad=2, seed=block_size + head_size + num_kv_heads)
    torch.testing.assert_close(r["cpu_out"][: r["n"]], r["ref_out"][: r["n"]], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [1, 4, 19, 1000])
@pytest.mark.parametrize("block_size", [1, 16])
def test_sliding_window_matches_reference(window: int, block_size: int) -> None:
    spec = AttentionSpec(6, 2, 64, 0.125, torch.float32, block_size, sliding_window=window)
    r = run_both(spec, MIXED_Q, MIXED_CTX, seed=window)
    torch.testing.assert_close(r["cpu_out"][: r["n"]], r["ref_out"][: r["n"]], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 1)])
def test_logit_soft_cap_matches_reference(window: int | None, num_heads: int, num_kv_heads: int) -> None:
    spec = AttentionSpec(num_heads, num_kv_heads, 64, 0.125, torch.float32, 16, window, logit_soft_cap=2.5)
    r = run_both(spec, MIXED_Q, MIXED_CTX, seed=3)
    torch.testing.assert_close(r["cpu_out"][: r["n"]], r["ref_out"][: r["n"]], atol=ATOL, rtol=RTOL)


def test_decode_only_batch_split_into_chunks_matches_reference() -> None:
    # Long contexts force several decode chunks; lengths vary so chunks pad differently.
    spec = AttentionSpec(9, 3, 64, 0.125, torch.float32, 16)
    per_seq_bytes = 2 * 3 * 64 * 4 * 528
    n = 2 * DECODE_CHUNK_BYTES // per_seq_bytes + 3
    rng = random.Random(1)
    ctx = [rng.randint(1, 527) for _ in range(n)]
    r = run_both(spec, [1] * n, ctx, seed=5)
    meta = r["cpu"].build_metadata(r["batch"])
    assert len(r["cpu"]._decode_chunks(r["cpu_cache"], meta)) >= 2
    torch.testing.assert_close(r["cpu_out"], r["ref_out"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("soft_cap", [None, 2.5])
def test_never_written_nan_slots_are_not_read(block_size: int, soft_cap: float | None) -> None:
    spec = AttentionSpec(8, 2, 64, 0.125, torch.float32, block_size, logit_soft_cap=soft_cap)
    r = run_both(spec, MIXED_Q, MIXED_CTX, pad=2, stale_nan=True)
    assert not r["cpu_out"][: r["n"]].isnan().any()
    torch.testing.assert_close(r["cpu_out"][: r["n"]], r["ref_out"][: r["n"]], atol=ATOL, rtol=RTOL)


def test_single_token_prompts_and_full_prefills_match_reference() -> None:
    spec = AttentionSpec(6, 2, 64, 0.125, torch.float32, 16)
    # The last prefill is longer than the C kernel takes: SDPA beside the kernel in one step.
    r = run_both(spec, [1, 9, 1, 33, KERNEL_MAX_QUERIES + 5], [0, 0, 0, 0, 0], seed=7)
    assert len(r["cpu"].build_metadata(r["batch"]).plan_for_kernel().torch_prefills) == 1
    torch.testing.assert_close(r["cpu_out"], r["ref_out"], atol=ATOL, rtol=RTOL)


def test_bfloat16_matches_reference_within_declared_tolerance() -> None:
    spec = AttentionSpec(6, 2, 64, 0.125, torch.bfloat16, 16, logit_soft_cap=None)
    r = run_both(spec, MIXED_Q, MIXED_CTX, seed=11)
    torch.testing.assert_close(r["cpu_out"][: r["n"]], r["ref_out"][: r["n"]], atol=2e-2, rtol=2e-2)


def _bf16_cache_run(spec: AttentionSpec, query_lens: list[int], context_lens: list[int], seed: int) -> dict:
    """The CPU backend on a bf16 cache beside fp32 activations, and the reference backend on the fp32
    widening of the same cache with this step's keys and values rounded to bf16 as the cache keeps them."""
    if _PATH["path"] == "ipex":
        pytest.skip("IPEX keeps the KV cache in the model's dtype")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    tables, num_blocks = _tables(seq_lens, spec.block_size, spare=3, rng=rng)
    batch = AttentionBatch.build(query_lens, seq_lens, tables, spec.block_size)
    t = batch.num_tokens
    q = torch.randn(t, spec.num_heads, spec.head_size)
    k = torch.randn(t, spec.num_kv_heads, spec.head_size)
    v = torch.randn(t, spec.num_kv_heads, spec.head_size)
    ref = ReferenceAttentionBackend(AttentionSpec(**{**_fields(spec), "kv_cache_dtype": None}))
    cpu = make_backend(spec)
    assert cpu.supports_kv_cache_dtype(torch.bfloat16)
    ref_cache = torch.randn(ref.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size))
    ref_cache = ref_cache.to(torch.bfloat16).float()
    cpu_cache = cpu.allocate_kv_cache(num_blocks, "cpu")
    assert cpu_cache.dtype == torch.bfloat16
    cpu_cache.copy_(_ref_to_cpu_layout(ref_cache))
    rounded = (k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float())
    ref_out = ref.forward(q, *rounded, ref_cache, batch)
    cpu_out = cpu.forward(q, k, v, cpu_cache, cpu.build_metadata(batch))
    return dict(ref_out=ref_out, cpu_out=cpu_out, ref_cache=ref_cache, cpu_cache=cpu_cache)


def _fields(spec: AttentionSpec) -> dict:
    return {name: getattr(spec, name) for name in AttentionSpec.__dataclass_fields__}


@pytest.mark.parametrize("head_size,soft_cap", [(64, None), (128, None), (80, None), (64, 2.5)])
def test_a_bf16_kv_cache_decodes_as_fp32_does_on_the_rounded_values(head_size: int, soft_cap: float | None) -> None:
    """Decodes read everything from the cache: the same results as fp32 attention over the values the
    bf16 cache holds (head sizes 64/128 take the kernel's register path, 80 and soft-capping the other)."""
    spec = AttentionSpec(6, 2, head_size, head_size**-0.5, torch.float32, 16, None, soft_cap, torch.bfloat16)
    r = _bf16_cache_run(spec, [1] * 5, [0, 17, 40, 3, 90], seed=head_size)
    torch.testing.assert_close(r["cpu_out"], r["ref_out"], atol=ATOL, rtol=RTOL)
    # This step's keys and values were written rounded to nearest even, as torch rounds.
    torch.testing.assert_close(r["cpu_cache"].float(), _ref_to_cpu_layout(r["ref_cache"]), atol=0, rtol=0)


@pytest.mark.parametrize("long_prefill", [0, KERNEL_MAX_QUERIES + 22])
def test_a_bf16_kv_cache_in_a_mixed_batch_attends_to_the_rounded_values(long_prefill: int) -> None:
    """Prefills too, fresh ones included (the C kernel's short ones, and SDPA's past KERNEL_MAX_QUERIES,
    which attend to this step's keys without reading the cache), see the keys and values as the cache
    keeps them: a prompt attends as it would on a prefix-cache hit or in later steps."""
    spec = AttentionSpec(6, 2, 64, 0.125, torch.float32, 16, kv_cache_dtype=torch.bfloat16)
    extra_q, extra_ctx = ([long_prefill, long_prefill], [0, 9]) if long_prefill else ([], [])
    r = _bf16_cache_run(spec, MIXED_Q + extra_q, MIXED_CTX + extra_ctx, seed=4)
    torch.testing.assert_close(r["cpu_out"], r["ref_out"], atol=ATOL, rtol=RTOL)


def test_write_kv_rounds_to_bf16_exactly_as_torch_does() -> None:
    kernels, why = clib.status()
    if kernels is None:
        pytest.skip(f"C kernels unavailable: {why}")
    torch.manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-40, -1e-45])
    ties = (torch.arange(64, dtype=torch.int32) * 0x10000 + 0x3F808000).view(torch.float32)  # exact halves
    values = torch.cat([special, ties, torch.randn(64 * 3 - special.numel() - ties.numel()) * 100])
    key = values.view(1, 3, 64).contiguous()
    value = (-values).view(1, 3, 64).contiguous()
    cache = torch.zeros(2, 2, 3, 16, 64, dtype=torch.bfloat16)
    kernels.write_kv(key, value, cache, torch.tensor([21]))
    for written, src in ((cache[0, 1, :, 5], key[0]), (cache[1, 1, :, 5], value[0])):
        nan = src.isnan()  # any NaN stays a NaN (torch's own scalar and vector casts differ in its bits)
        assert torch.equal(written.isnan(), nan)
        assert torch.equal(written[~nan].view(torch.int16), src[~nan].to(torch.bfloat16).view(torch.int16))
    cache[:, 1, :, 5] = 0
    assert not cache.view(torch.int16).any()  # nothing else written


def test_a_kv_cache_dtype_the_backend_does_not_keep_is_refused() -> None:
    spec = AttentionSpec(6, 2, 64, 0.125, torch.float32, 16, kv_cache_dtype=torch.float16)
    assert not CpuAttentionBackend(spec).supports_kv_cache_dtype(torch.float16)
    bf16_model = AttentionSpec(6, 2, 64, 0.125, torch.bfloat16, 16, kv_cache_dtype=torch.float32)
    assert not CpuAttentionBackend(bf16_model).supports_kv_cache_dtype(torch.float32)
    if _IPEX:
        assert not CpuAttentionBackend(spec, ipex=ipex_kernels.load()).supports_kv_cache_dtype(torch.bfloat16)


def test_kv_written_exactly_at_slots_and_nothing_else_touched() -> None:
    spec = AttentionSpec(6, 2, 64, 0.125, torch.float32, 16)
    r = run_both(spec, MIXED_Q, MIXED_CTX, pad=3)
    cpu, cache, batch = r["cpu"], r["cpu_cache"], r["batch"]
    slots = batch.slot_mapping
    written = slots[slots >= 0]
    keys, values = cpu.read_kv(cache, written)
    assert torch.equal(keys, r["key"][: r["n"]]) and torch.equal(values, r["value"][: r["n"]])
    untouched = torch.ones(r["num_blocks"] * spec.block_size, dtype=torch.bool)
    untouched[written] = False
    all_slots = torch.arange(untouched.numel())[untouched]
    old_k, old_v = cpu.read_kv(r["before"], all_slots)
    new_k, new_v = cpu.read_kv(cache, all_slots)
    assert torch.equal(old_k, new_k) and torch.equal(old_v, new_v)
    # The CPU cache holds exactly what the reference cache holds, in its own layout.
    assert torch.equal(cache, _ref_to_cpu_layout(r["ref_cache"]))


def test_padding_only_batch_writes_nothing_and_does_not_crash() -> None:
    spec = AttentionSpec(4, 2, 64, 0.125, torch.float32, 16)
    cpu = make_backend(spec)
    cache = torch.randn(cpu.kv_cache_shape(4, 16, 2, 64))
    before = cache.clone()
    batch = AttentionBatch.build([0, 0], [3, 5], [[1], [2]], 16, pad_tokens_to=4)
    out = cpu.forward(
        torch.randn(4, 4, 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64), cache, cpu.build_metadata(batch)
    )
    assert out.shape == (4, 4, 64)
    assert torch.equal(cache, before)


def test_read_kv_returns_tokens_in_slot_order() -> None:
    spec = AttentionSpec(4, 2, 8, 0.125, torch.float32, 4)
    cpu = make_backend(spec)
    cache = torch.randn(cpu.kv_cache_shape(5, 4, 2, 8))
    slots = torch.tensor([13, 0, 7])
    keys, values = cpu.read_kv(cache, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(keys[i], cache[0, s // 4, :, s % 4])
        assert torch.equal(values[i], cache[1, s // 4, :, s % 4])


def test_copy_blocks_copies_whole_blocks_exactly_in_every_layer() -> None:
    spec = AttentionSpec(4, 2, 8, 0.125, torch.float32, 4)
    cpu = make_backend(spec)
    caches = [torch.randn(cpu.kv_cache_shape(6, 4, 2, 8)) for _ in range(3)]
    before = [c.clone() for c in caches]
    cpu.copy_blocks(caches, torch.tensor([[0, 3], [5, 1]], dtype=torch.int64))
    for c, b in zip(caches, before, strict=True):
        expected = b.clone()
        expected[:, 3], expected[:, 1] = b[:, 0], b[:, 5]
        assert torch.equal(c, expected)


def test_copy_blocks_with_no_pairs_is_a_no_op() -> None:
    cpu = make_backend(AttentionSpec(4, 2, 8, 0.125, torch.float32, 4))
    cache = torch.randn(cpu.kv_cache_shape(2, 4, 2, 8))
    before = cache.clone()
    cpu.copy_blocks([cache], torch.empty((0, 2), dtype=torch.int64))
    assert torch.equal(cache, before)


def test_metadata_from_plain_batch_is_accepted() -> None:
    spec = AttentionSpec(6, 2, 64, 0.125, torch.float32, 16)
    r = run_both(spec, [3, 1], [0, 5])
    batch = r["batch"]
    cache = r["cpu_cache"].clone()
    q = torch.randn(batch.num_tokens, 6, 64)
    k = torch.randn(batch.num_tokens, 2, 64)
    out_meta = r["cpu"].forward(q, k, k, cache.clone(), r["cpu"].build_metadata(batch))
    out_plain = r["cpu"].forward(q, k, k, cache.clone(), batch)
    assert torch.equal(out_meta, out_plain)


def test_invalid_sliding_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="sliding_window"):
        CpuAttentionBackend(AttentionSpec(4, 2, 8, 0.125, torch.float32, 4, sliding_window=0))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_is_zeroed_and_committed_only_where_written(dtype: torch.dtype) -> None:
    spec = AttentionSpec(4, 2, 64, 0.125, dtype, 16)
    cpu = make_backend(spec)
    before = _rss_bytes()
    cache = cpu.allocate_kv_cache(4096, "cpu")  # 2 x 4096 blocks x 2 heads x 16 x 64: 64 or 128 MiB
    assert cache.shape == cpu.kv_cache_shape(4096, 16, 2, 64) and cache.dtype == dtype
    assert cache.is_contiguous() and cache.device.type == "cpu"
    assert _rss_bytes() - before < 16 << 20  # nothing faulted in yet
    cache[1, 7].fill_(3.0)
    assert torch.count_nonzero(cache) == cache[1, 7].numel()  # zeros everywhere else
    assert torch.equal(cache[1, 7], torch.full_like(cache[1, 7], 3.0))


def test_an_empty_kv_cache_is_allowed() -> None:
    cpu = make_backend(AttentionSpec(4, 2, 64, 0.125, torch.float32, 16))
    assert cpu.allocate_kv_cache(0, "cpu").shape == cpu.kv_cache_shape(0, 16, 2, 64)
