"""The GGUF-block C kernels: gguf's exact dequantization, fp32 products at every row count, batch- and
thread-invariance, input checks and the build switches; then the int8-activation kernel (gguf_int8.c):
llama.cpp's quantization of the input rows reproduced exactly, products within the rounding it implies,
batch- and thread-invariance, NaN propagation and the PAGEDLLM_CPU_INT8_DOT switch."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import stat
from pathlib import Path

import gguf as gguf_package
import numpy as np
import pytest
import torch
from pagedllm.model.loader.gguf_reader import dequantize
from pagedllm.plugin import PackedWeight
from pagedllm_cpu import ops as cpu_ops
from pagedllm_cpu.kernels import clib

Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 8, 12, 13, 14
QTYPES = [Q4_0, Q4_1, Q8_0]
K_QUANTS = [Q4_K, Q5_K, Q6_K]
ALL_TYPES = QTYPES + K_QUANTS
# f16 scales (and Q4_1 mins) at the edges: subnormal, both zeros, negative, the largest finite.
EDGE_F16 = np.array([2.0**-24, 3 * 2.0**-20, 0.0, -0.0, -1.5, 0.1, 2.0**-14, 65504.0, -65504.0], np.float16)


def _random_blocks(
    rng: np.random.Generator, n: int, k: int, qtype: int
) -> torch.Tensor:  # uint8 [n, row bytes]
    rows = rng.standard_normal((n, k)).astype(np.float32)
    return torch.from_numpy(gguf_package.quants.quantize(rows, gguf_package.GGMLQuantizationType(qtype)))


def _edge_blocks(rng: np.random.Generator, qtype: int) -> torch.Tensor:
    """One block per row: every edge scale (x every edge min for Q4_1), random quants of the full range."""
    pairs = [(d, m) for d in EDGE_F16 for m in EDGE_F16] if qtype == Q4_1 else [(d, None) for d in EDGE_F16]
    rows = []
    for d, m in pairs:
        header = np.array([d] if m is None else [d, m], np.float16).view(np.uint8)
        quants = rng.integers(0, 256, 32 if qtype == Q8_0 else 16, dtype=np.uint8)
        rows.append(np.concatenate([header, quants]))
    return torch.from_numpy(np.stack(rows))


def _k_blocks(
    rng: np.random.Generator, n: int, k: int, qtype: int, scales: np.ndarray | None = None
) -> torch.Tensor:
    """K-quant blocks (gguf-py cannot quantize them): random bytes, with the f16 super-block scales
    (d, and Q4_K / Q5_K's dmin) set to ``scales`` ([n * k / 256, 2] f16) or to sane random ones."""
    nb, ts = k // 256, clib.TYPE_SIZES[qtype]
    raw = rng.integers(0, 256, (n * nb, ts), dtype=np.uint8)
    if scales is None:
        scales = rng.uniform(0.5, 2.0, (n * nb, 2)) * 10.0 ** rng.integers(-4, 0, (n * nb, 1))
    scales = np.ascontiguousarray(np.asarray(scales, np.float16).reshape(n * nb, 2))
    if qtype == Q6_K:  # d is the last field
        raw[:, 208:210] = np.ascontiguousarray(scales[:, :1]).view(np.uint8)
    else:  # d, dmin first
        raw[:, 0:4] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(n, nb * ts))


def _blocks(rng: np.random.Generator, n: int, k: int, qtype: int) -> torch.Tensor:
    return _k_blocks(rng, n, k, qtype) if qtype in K_QUANTS else _random_blocks(rng, n, k, qtype)


def _gguf_dense(qtype: int, blocks: torch.Tensor, k: int) -> torch.Tensor:  # [n, k] fp32, gguf-py's values
    dense = gguf_package.quants.dequantize(blocks.numpy(), gguf_package.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(dense, np.float32).reshape(blocks.shape[0], k))


def _loader_dense(qtype: int, blocks: torch.Tensor, k: int) -> torch.Tensor:  # [n, k] fp32, the core's values
    return dequantize(blocks.numpy().reshape(-1), qtype, (blocks.shape[0], k))


def _assert_product(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """y = x w^T + bias to fp32 accuracy: within 1e-5 of the sum of |terms| (fp64 reference).

    Why 1e-5: the kernels sum each output in 16 (AVX-512; 8 with AVX2) fp32 lanes of k / 16 fused
    multiply-adds each, then add the lanes in 4 steps; the rounding error of such a sum is at most
    (k / 16 + 4) * 2^-24 of the sum of |terms|, 6e-6 for k = 1536, the largest k used here.
    """
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    worst = float((err / scale.clamp_min(1e-30)).max()) if err.numel() else 0.0
    assert bool((err <= 1e-5 * scale).all()), f"error {worst:.3g} of the |terms| sum exceeds 1e-5"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.fixture
def kernels() -> clib.CpuKernels:
    built, why = clib.status()
    if built is None:
        pytest.skip(f"GGUF kernels unavailable: {why}")
    return built


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty kernel cache and no loaded library, for tests that change how the kernels are built."""
    clib.reset()
    monkeypatch.setenv(clib.CACHE_ENV, str(tmp_path / "kernel-cache"))
    monkeypatch.delenv(clib.KERNELS_ENV, raising=False)
    yield monkeypatch
    clib.reset()


@pytest.mark.parametrize("qtype", QTYPES)
def test_kernel_dequantization_equals_the_loaders_bit_for_bit(qtype: int, kernels) -> None:
    blocks = _random_blocks(np.random.default_rng(qtype), 7, 576, qtype)
    assert torch.equal(
        _bits(kernels.dequantize(qtype, blocks, 576)), _bits(_loader_dense(qtype, blocks, 576))
    )


@pytest.mark.parametrize("qtype", QTYPES)
def test_kernel_dequantization_of_edge_scales_equals_the_loaders_bit_for_bit(qtype: int, kernels) -> None:
    blocks = _edge_blocks(np.random.default_rng(10 + qtype), qtype)
    ours, loader = kernels.dequantize(qtype, blocks, 32), _loader_dense(qtype, blocks, 32)
    assert torch.equal(_bits(ours), _bits(loader))  # signed zeros included


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("k", [32, 64, 96, 576])
@pytest.mark.parametrize("n", [37, 5, 1])
def test_kernel_product_matches_the_dense_product_for_every_tile_shape(
    qtype: int, k: int, n: int, kernels
) -> None:
    # n not a multiple of the 4-row tile; m covers full 4-token tiles, the 1-token tile and the remainders.
    rng = np.random.default_rng(1000 * qtype + k + n)
    blocks = _random_blocks(rng, n, k, qtype)
    dense = _loader_dense(qtype, blocks, k)
    for m in [*range(1, 10), 17]:
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        _assert_product(kernels.linear(x, qtype, blocks, n), x, dense)


@pytest.mark.parametrize("qtype", QTYPES)
def test_kernel_product_of_edge_scales_matches_the_dense_product(qtype: int, kernels) -> None:
    blocks = _edge_blocks(np.random.default_rng(20 + qtype), qtype)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32))
    _assert_product(kernels.linear(x, qtype, blocks, blocks.shape[0]), x, _loader_dense(qtype, blocks, 32))


def test_kernel_rejects_mismatched_inputs_with_a_readable_error(kernels) -> None:
    blocks = _random_blocks(np.random.default_rng(0), 4, 96, Q4_1)  # rows of 96 weights
    with pytest.raises(ValueError, match=r"rejected its inputs .*x \(2, 64\), packed \(4, 60\)"):
        kernels.linear(torch.zeros(2, 64), Q4_1, blocks, 4)
    with pytest.raises(ValueError, match="rejected its inputs"):
        kernels.linear(torch.zeros(2, 96), 6, blocks, 4)
    with pytest.raises(ValueError, match="rejected type 6"):
        kernels.dequantize(6, blocks, 96)


def test_disabling_the_kernels_by_environment_is_reported(fresh_build) -> None:
    fresh_build.setenv(clib.KERNELS_ENV, "0")
    kernels, why = clib.status()
    assert kernels is None and "disabled" in why and clib.KERNELS_ENV in why
    assert not cpu_ops.packed_linear.supports(Q4_1, torch.float32)


def test_an_invalid_switch_value_names_the_variable(fresh_build) -> None:
    fresh_build.setenv(clib.KERNELS_ENV, "yes")
    with pytest.raises(ValueError, match=f"{clib.KERNELS_ENV}='yes': expected auto, 0 or 1"):
        clib.status()


def test_no_compiler_makes_the_kernels_unavailable_and_the_layers_dense(fresh_build, tmp_path) -> None:
    fresh_build.setenv("CC", str(tmp_path / "no-such-cc"))
    fresh_build.setenv("PATH", str(tmp_path))  # holds no compiler
    with pytest.raises(clib.KernelUnavailable, match="no C compiler found"):
        clib.load()
    kernels, why = clib.status()
    assert kernels is None and "no C compiler found" in why
    assert not cpu_ops.packed_linear.supports(Q4_1, torch.float32)  # auto: the model runs dense


def test_requiring_the_kernels_without_a_compiler_fails_with_the_reason(fresh_build, tmp_path) -> None:
    fresh_build.setenv("CC", str(tmp_path / "no-such-cc"))
    fresh_build.setenv("PATH", str(tmp_path))
    fresh_build.setenv(clib.KERNELS_ENV, "1")
    with pytest.raises(clib.KernelUnavailable, match=f"{clib.KERNELS_ENV}=1 .*no C compiler found"):
        cpu_ops.packed_linear.supports(Q4_1, torch.float32)


@pytest.mark.skipif(shutil.which("false") is None, reason="no false(1) here")
def test_a_compiler_that_fails_makes_the_kernels_unavailable(fresh_build) -> None:
    fresh_build.setenv("CC", shutil.which("false"))
    with pytest.raises(clib.KernelUnavailable, match="false failed to build"):
        clib.load()


def test_a_compiler_error_is_quoted_in_the_reason(fresh_build, tmp_path) -> None:
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc 1.0'\necho 'gguf_linear.c:1: error: planted' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    fresh_build.setenv("CC", str(cc))
    with pytest.raises(clib.KernelUnavailable, match="error: planted"):
        clib.load()
    assert not list((tmp_path / "kernel-cache").glob("*.so"))  # no half-built library left behind


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("cc") is None, reason="needs x86-64 and cc"
)
@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_builds_without_avx512_give_the_same_values(march: str, fresh_build, tmp_path) -> None:
    # -march=x86-64 compiles the portable loop and the software f16 conversion instead of AVX-512 /
    # F16C; -march=haswell the AVX2 kernel (register tiles for 1-2 tokens, a dequantized buffer beyond
    # and for the K-quants).
    words = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if march == "haswell" and not {"avx2", "fma", "f16c"} <= words:
        pytest.skip("this CPU cannot run an AVX2 build")
    fresh_build.setenv("CC", "cc")
    fresh_build.setattr(
        clib, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in clib.FLAGS)
    )
    portable = clib.load()
    assert portable.gguf_max_rows == (0 if march == "x86-64" else 1)
    assert portable.path.startswith(str(tmp_path / "kernel-cache"))
    assert clib.build() == clib.build()  # cached: built once per source, compiler and flags
    rng = np.random.default_rng(7)
    for qtype in QTYPES:
        edge = _edge_blocks(rng, qtype)
        assert torch.equal(_bits(portable.dequantize(qtype, edge, 32)), _bits(_loader_dense(qtype, edge, 32)))
    for qtype in ALL_TYPES:
        k = 512 if qtype in K_QUANTS else 96
        blocks = _blocks(rng, 37, k, qtype)
        dense = _gguf_dense(qtype, blocks, k)
        assert torch.equal(_bits(portable.dequantize(qtype, blocks, k)), _bits(dense))
        assert torch.equal(
            _bits(portable.rows(qtype, blocks, k, torch.tensor([36, 0]))), _bits(dense[[36, 0]])
        )
        x = torch.from_numpy(rng.standard_normal((20, k)).astype(np.float32))
        whole = portable.linear(x, qtype, blocks, 37)
        _assert_product(whole, x, dense)
        for m in (1, 2, 3, 5):  # a token row's result does not depend on how many rows came with it
            assert torch.equal(portable.linear(x[:m].contiguous(), qtype, blocks, 37), whole[:m])
        assert torch.equal(portable.linear(x, qtype, blocks, 37, threads=1), whole)


# K-quants and every format at every row count (the blocks-only path: the loader keeps no dense weight).


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantization_equals_gguf_py_bit_for_bit(qtype: int, kernels) -> None:
    rng = np.random.default_rng(30 + qtype)
    blocks = _blocks(rng, 9, 512, qtype)
    ref = _gguf_dense(qtype, blocks, 512)
    assert torch.equal(_bits(kernels.dequantize(qtype, blocks, 512)), _bits(ref))
    ids = torch.tensor([8, 0, 3, 3, 8], dtype=torch.int64)
    assert torch.equal(_bits(kernels.rows(qtype, blocks, 512, ids)), _bits(ref[ids]))


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_edge_scales_dequantize_like_gguf_py(qtype: int, kernels) -> None:
    # every pair of edge f16 values as (d, dmin): subnormal, signed zeros, negative, the largest finite;
    # the 6-bit scales and mins come from the random bytes, all 64 values of each appear
    pairs = np.array([(d, m) for d in EDGE_F16 for m in EDGE_F16], np.float16)
    blocks = _k_blocks(np.random.default_rng(40 + qtype), len(pairs), 256, qtype, pairs)
    ours, ref = kernels.dequantize(qtype, blocks, 256), _gguf_dense(qtype, blocks, 256)
    assert torch.equal(_bits(ours), _bits(ref))  # signed zeros included (65504 x 63 x 15 is finite in fp32)
    ids = torch.arange(len(pairs) - 1, -1, -1)
    assert torch.equal(_bits(kernels.rows(qtype, blocks, 256, ids)), _bits(ref[ids]))


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 256), (5, 256), (37, 512), (70, 1536), (9, 8192)])
def test_product_matches_the_dense_product_at_every_row_count(qtype: int, n: int, k: int, kernels) -> None:
    # n not a multiple of any tile (4 rows, 32-row panels); m over the register tiles (1-8), the
    # large-step path's 6-token tiles and remainders (9, 17, 64) and several token blocks (300);
    # k = 8192: 4-row panels and the smallest token blocks
    rng = np.random.default_rng(100 * qtype + n)
    blocks = _blocks(rng, n, k, qtype)
    dense = _gguf_dense(qtype, blocks, k)
    for m in [1, 2, 3, 4, 5, 8, 9, 17, 64, 300] if k < 8192 else [1, 9, 30, 50]:
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        _assert_product(kernels.linear(x, qtype, blocks, n), x, dense)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_a_rows_result_does_not_depend_on_its_batch_or_the_thread_count(qtype: int, kernels) -> None:
    rng = np.random.default_rng(200 + qtype)
    n, k = 45, 768
    blocks = _blocks(rng, n, k, qtype)
    batch = torch.from_numpy(rng.standard_normal((300, k)).astype(np.float32))
    row = batch[7:8]
    alone = kernels.linear(row.contiguous(), qtype, blocks, n, threads=1)
    for m in (3, 17, 64, 300):  # the row at position 7 (or 1) of batches small and large
        x = torch.cat([batch[:m], row]) if m < 8 else batch[:m]
        where = m if m < 8 else 7
        for threads in (1, 2):
            y = kernels.linear(x.contiguous(), qtype, blocks, n, threads=threads)
            assert torch.equal(_bits(y[where : where + 1]), _bits(alone)), (m, threads)
    assert torch.equal(
        _bits(kernels.linear(batch, qtype, blocks, n, threads=1)),
        _bits(kernels.linear(batch, qtype, blocks, n, threads=2)),
    )


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quants_need_whole_super_blocks(qtype: int, kernels) -> None:
    blocks = _k_blocks(np.random.default_rng(0), 2, 256, qtype)
    with pytest.raises(ValueError, match="rejected its inputs"):
        kernels.linear(torch.zeros(1, 288), qtype, blocks, 2)  # 288 = 9 blocks of 32, not of 256
    with pytest.raises(ValueError, match="rejected type"):
        kernels.dequantize(qtype, blocks, 288)


def test_rows_reject_ids_outside_the_matrix(kernels) -> None:
    blocks = _random_blocks(np.random.default_rng(0), 4, 64, Q8_0)
    with pytest.raises(IndexError, match="outside the 4 rows"):
        kernels.rows(Q8_0, blocks, 64, torch.tensor([0, 4]))
    with pytest.raises(IndexError, match="outside the 4 rows"):
        kernels.rows(Q8_0, blocks, 64, torch.tensor([-1]))
    assert kernels.rows(Q8_0, blocks, 64, torch.zeros(0, dtype=torch.int64)).shape == (0, 64)


# --- the int8-activation kernel (gguf_int8.c) ---


@pytest.fixture
def int8_kernels() -> clib.CpuKernels:
    built, why = clib.status()
    if built is None:
        pytest.skip(f"GGUF kernels unavailable: {why}")
    if not built.int8_dot:
        pytest.skip(f"this {built.isa} build has no int8 kernel (needs AVX-512 VNNI)")
    return built


def _quantized_input(x: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray]:
    """x as the kernel quantizes it: per block (256 for K-quants, else 32) the fp32 scale max|x| / 127
    and q = round-half-even(x * (127 / max|x|)) in [-127, 127]. Returns (scale * q in fp64, scale per element)."""
    bs = 256 if qtype in K_QUANTS else 32
    m, k = x.shape
    blocks = x.astype(np.float32).reshape(m, k // bs, bs)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((blocks * inv).astype(np.float32)), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32)
    return (d.astype(np.float64) * q).reshape(m, k), np.broadcast_to(d, blocks.shape).reshape(m, k)


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 256), (37, 512), (70, 1536), (9, 4096)])
def test_product_is_the_quantized_input_times_the_exact_weights(qtype: int, n: int, k: int, int8_kernels) -> None:
    # m over the one-row-at-a-time steps (<= 16), the 4 x 4 tiles and their remainders, and, at
    # k = 4096, several token blocks
    rng = np.random.default_rng(300 + qtype + n)
    blocks = _blocks(rng, n, k, qtype)
    dense = _gguf_dense(qtype, blocks, k).double().numpy()
    for m in [1, 2, 3, 5, 16, 17, 23, 70] if k < 4096 else [1, 7, 50]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, 3] *= 40.0  # an outlier channel, as LLM activations have
        y = int8_kernels.linear(torch.from_numpy(x), qtype, blocks, n, int8=True).double().numpy()
        xq, d = _quantized_input(x, qtype)
        ref = xq @ dense.T
        terms = np.abs(xq) @ np.abs(dense).T
        # the quantized input exactly: only fp32 rounding of the block partial sums remains (whose
        # offsets and mins may exceed the net weights a few times)
        assert np.all(np.abs(y - ref) <= 2e-4 * terms + 1e-30), (m, float(np.max(np.abs(y - ref) / terms)))
        # and against the unquantized input: at most half a step of each block's scale per weight
        bound = (d / 2) @ np.abs(dense).T + 2e-4 * (np.abs(x) @ np.abs(dense).T)
        assert np.all(np.abs(y - x.astype(np.float64) @ dense.T) <= bound), m


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_a_rows_result_does_not_depend_on_its_batch_or_the_thread_count(qtype: int, int8_kernels) -> None:
    rng = np.random.default_rng(400 + qtype)
    n, k = 45, 4096  # 4096: batches of 70 span several token blocks
    blocks = _blocks(rng, n, k, qtype)
    batch = torch.from_numpy(rng.standard_normal((70, k)).astype(np.float32))
    row = batch[7:8]
    alone = int8_kernels.linear(row.contiguous(), qtype, blocks, n, threads=1, int8=True)
    for m in (3, 16, 17, 70):
        x = torch.cat([batch[:m], row]) if m < 8 else batch[:m]
        where = m if m < 8 else 7
        for threads in (1, 2):
            y = int8_kernels.linear(x.contiguous(), qtype, blocks, n, threads=threads, int8=True)
            assert torch.equal(_bits(y[where : where + 1]), _bits(alone)), (m, threads)


@pytest.mark.parametrize("qtype", [Q4_0, Q8_0, Q4_K])
def test_nan_and_infinity_in_a_row_make_that_rows_outputs_nan(qtype: int, int8_kernels) -> None:
    rng = np.random.default_rng(5)
    blocks = _blocks(rng, 6, 512, qtype)
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))
    x[0, 100] = float("nan")
    x[2, 300] = float("inf")
    y = int8_kernels.linear(x, qtype, blocks, 6, int8=True)
    assert bool(y[0].isnan().all()) and bool(y[2].isnan().all())
    assert bool(y[1].isfinite().all())


def test_widths_the_layout_cannot_take_are_rejected_and_not_routed(int8_kernels) -> None:
    rng = np.random.default_rng(6)
    blocks = _blocks(rng, 4, 96, Q4_0)  # 3 blocks of 32: not whole pairs
    assert not int8_kernels.int8_takes(Q4_0, 96) and int8_kernels.int8_takes(Q4_0, 128)
    assert not int8_kernels.int8_takes(Q4_K, 128) and int8_kernels.int8_takes(Q4_K, 512)
    with pytest.raises(ValueError, match="rejected its inputs"):
        int8_kernels.linear(torch.zeros(1, 96), Q4_0, blocks, 4, int8=True)


def _layer(rng: np.random.Generator, qtype: int, n: int, k: int) -> tuple[torch.Tensor, PackedWeight]:
    blocks = _blocks(rng, n, k, qtype)
    return torch.empty(n, k, device="meta"), PackedWeight(ggml_type=qtype, data=blocks, in_features=k)


def test_the_switch_routes_blocks_only_layers(monkeypatch: pytest.MonkeyPatch, int8_kernels) -> None:
    rng = np.random.default_rng(7)
    weight, packed = _layer(rng, Q4_K, 8, 512)
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))
    exact = int8_kernels.linear(x, Q4_K, packed.data, 8)
    int8 = int8_kernels.linear(x, Q4_K, packed.data, 8, int8=True)
    assert not torch.equal(exact, int8)
    monkeypatch.delenv(cpu_ops.INT8_ENV, raising=False)
    assert torch.equal(cpu_ops.packed_linear(x, weight, None, packed), exact)  # off by default
    monkeypatch.setenv(cpu_ops.INT8_ENV, "on")
    assert torch.equal(cpu_ops.packed_linear(x, weight, None, packed), int8)
    assert "int8 activations, VNNI" in cpu_ops.describe_int8()
    # a width the int8 layout cannot take stays exact at every step
    weight, packed = _layer(rng, Q4_0, 8, 96)
    x = torch.from_numpy(rng.standard_normal((2, 96)).astype(np.float32))
    assert torch.equal(cpu_ops.packed_linear(x, weight, None, packed), int8_kernels.linear(x, Q4_0, packed.data, 8))


def test_decode_mode_takes_int8_below_16_rows_and_the_exact_kernel_from_16_up(
    monkeypatch: pytest.MonkeyPatch, int8_kernels
) -> None:
    rng = np.random.default_rng(8)
    weight, packed = _layer(rng, Q4_K, 8, 512)
    x = torch.from_numpy(rng.standard_normal((16, 512)).astype(np.float32))
    monkeypatch.setenv(cpu_ops.INT8_ENV, "decode")
    small, large = x[:15].contiguous(), x
    assert torch.equal(cpu_ops.packed_linear(small, weight, None, packed), int8_kernels.linear(small, Q4_K, packed.data, 8, int8=True))
    assert torch.equal(cpu_ops.packed_linear(large, weight, None, packed), int8_kernels.linear(large, Q4_K, packed.data, 8))
    assert "steps of < 16 rows" in cpu_ops.describe_int8()


def test_unset_switch_follows_the_dtype_request_and_a_set_one_wins(monkeypatch: pytest.MonkeyPatch, int8_kernels) -> None:
    from pagedllm.config import ModelConfig
    from pagedllm.plugin import EngineConfig
    from pagedllm_cpu.env_default import EnvDefault
    from pagedllm_cpu.platform import CpuPlatform

    monkeypatch.delenv(cpu_ops.INT8_ENV, raising=False)
    monkeypatch.setattr(cpu_ops, "_int8_default", EnvDefault(cpu_ops.INT8_ENV))
    platform = CpuPlatform()
    platform.check_and_update_config(EngineConfig())  # --dtype auto, on a build with VNNI
    assert cpu_ops.int8_mode() == "decode"
    platform.check_and_update_config(EngineConfig(model=ModelConfig(dtype="float32")))  # fp32 asked for
    assert cpu_ops.int8_mode() == "off" and cpu_ops.INT8_ENV not in os.environ
    assert "unset: decode with --dtype auto" in cpu_ops.describe_int8()
    monkeypatch.setenv(cpu_ops.INT8_ENV, "off")  # the user's value wins
    platform.check_and_update_config(EngineConfig())
    assert cpu_ops.int8_mode() == "off"
    monkeypatch.setenv(cpu_ops.INT8_ENV, "on")
    platform.check_and_update_config(EngineConfig(model=ModelConfig(dtype="float32")))
    assert cpu_ops.int8_mode() == "on"


def test_a_bad_switch_value_or_on_without_vnni_is_a_readable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_ops.INT8_ENV, "fast")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_INT8_DOT='fast'"):
        cpu_ops.int8_mode()
    assert "PAGEDLLM_CPU_INT8_DOT='fast'" in cpu_ops.describe_int8()
    monkeypatch.setenv(cpu_ops.INT8_ENV, "on")
    built, _ = clib.status()
    if built is not None:
        with pytest.raises(ValueError, match="no AVX-512 VNNI"):
            cpu_ops.check_int8_mode(dataclasses.replace(built, int8_dot=False))
        monkeypatch.setenv(cpu_ops.INT8_ENV, "decode")
        with pytest.raises(ValueError, match="decode but this .* no AVX-512 VNNI"):
            cpu_ops.check_int8_mode(dataclasses.replace(built, int8_dot=False))
        monkeypatch.setenv(cpu_ops.INT8_ENV, "on")
    with pytest.raises(ValueError, match="not built"):
        cpu_ops.check_int8_mode(None)
    monkeypatch.setenv(cpu_ops.INT8_ENV, "off")
    cpu_ops.check_int8_mode(None)  # off needs nothing


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_amx_kernel_on_blocks_equals_it_on_their_dequantized_weight_for_every_format(qtype: int, kernels) -> None:
    """The AMX kernel dequantizes the blocks in registers as it packs its bf16 tiles: the same
    products, bit for bit, as packing the loader's dequantized fp32 weight (the K-quants' sub-block
    scales and mins included; the 32-weight formats with every edge scale too)."""
    if not kernels.amx_bf16:
        pytest.skip("no AMX tiles here (CPU flags, build or OS permission)")
    rng = np.random.default_rng(40 + qtype)
    cases = [_blocks(rng, 40, 512, qtype)]
    if qtype in QTYPES:
        edge = _edge_blocks(rng, qtype)
        cases.append(edge.repeat(1, 2).reshape(edge.shape[0], -1))  # two blocks a row: k = 64
    for blocks in cases:
        n, k = blocks.shape[0], blocks.shape[1] // clib.TYPE_SIZES[qtype] * clib.BLOCK_WEIGHTS[qtype]
        dense = _loader_dense(qtype, blocks, k)
        x = torch.from_numpy(rng.standard_normal((37, k)).astype(np.float32))
        assert torch.equal(kernels.linear(x, qtype, blocks.contiguous(), n, amx=True), kernels.amx_dense(x, dense))


# Each format's compact tile format (gguf_linear.c, "Compact kept tiles") and its bytes a weight.
COMPACT = {Q4_0: (2, 0.75), Q4_1: (1, 0.75), Q4_K: (1, 0.75), Q8_0: (3, 1.25), Q5_K: (3, 1.25), Q6_K: (4, 1.5)}


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_compact_kept_tiles_give_the_bf16_tiles_products_bit_for_bit(qtype: int, kernels) -> None:
    """A quantized weight's tiles kept in its type's compact format (integers and fp32 scales, expanded
    in registers at each step) multiply to the same values, bit for bit, as its bf16 tiles and as
    packing the tiles from the blocks at each step: at every row count (one token block and three),
    with n not whole panels, with every edge scale of the 32-weight formats, at any thread count."""
    if not kernels.amx_bf16:
        pytest.skip("no AMX tiles here (CPU flags, build or OS permission)")
    rng = np.random.default_rng(60 + qtype)
    fmt, per_weight = COMPACT[qtype]
    cases = [(_blocks(rng, 101, 512, qtype), (1, 16, 37, 64, 300)), (_blocks(rng, 40, 2048, qtype), (600,))]
    if qtype in QTYPES:
        edge = _edge_blocks(rng, qtype)
        cases.append((edge.repeat(1, 2).reshape(edge.shape[0], -1), (37,)))  # two blocks a row: k = 64
    for blocks, rows in cases:
        n, k = blocks.shape[0], blocks.shape[1] // clib.TYPE_SIZES[qtype] * clib.BLOCK_WEIGHTS[qtype]
        compact, full = kernels.amx_pack(qtype, blocks, n), kernels.amx_pack(qtype, blocks, n, compact=False)
        assert compact.fmt == fmt and full.fmt == clib.AMX_BF16 and compact.data.data_ptr() % 64 == 0
        assert compact.nbytes() == (n + 31) // 32 * 32 * k * per_weight
        for m in rows:
            x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
            y = kernels.amx_tiles_linear(x, compact, n)
            assert _bits(y).equal(_bits(kernels.amx_tiles_linear(x, full, n))), (m, k)
            assert _bits(y).equal(_bits(kernels.linear(x, qtype, blocks, n, amx=True))), (m, k)
            for threads in (1, 3):
                assert _bits(kernels.amx_tiles_linear(x, compact, n, threads=threads)).equal(_bits(y)), (m, threads)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_compact_tiles_of_a_gated_mlp_give_its_silu_and_mul_bit_for_bit(qtype: int, kernels) -> None:
    if not kernels.amx_bf16:
        pytest.skip("no AMX tiles here (CPU flags, build or OS permission)")
    rng = np.random.default_rng(70 + qtype)
    d, k = 96, 512
    gate, up = _blocks(rng, d, k, qtype), _blocks(rng, d, k, qtype)
    compact = kernels.amx_pack(qtype, gate, d), kernels.amx_pack(qtype, up, d)
    full = kernels.amx_pack(qtype, gate, d, compact=False), kernels.amx_pack(qtype, up, d, compact=False)
    for m in (1, 33, 64, 130):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        y = kernels.amx_tiles_linear_silu(x, *compact, d)
        assert _bits(y).equal(_bits(kernels.amx_tiles_linear_silu(x, *full, d))), m
        assert _bits(kernels.amx_tiles_linear_silu(x, *compact, d, threads=3)).equal(_bits(y)), m
    with pytest.raises(ValueError, match="gate and up tiles differ in format"):
        kernels.amx_tiles_linear_silu(x, compact[0], full[1], d)


def test_compact_tiles_reject_a_wrong_size_or_format(kernels) -> None:
    if not kernels.amx_bf16:
        pytest.skip("no AMX tiles here (CPU flags, build or OS permission)")
    rng = np.random.default_rng(80)
    blocks = _blocks(rng, 64, 256, Q4_1)
    tiles = kernels.amx_pack(Q4_1, blocks, 64)
    x = torch.randn(20, 256)
    with pytest.raises(ValueError, match="4-bit tiles are not 65 rows of 256"):
        kernels.amx_tiles_linear(x, tiles, 65)
    with pytest.raises(ValueError, match="unknown tile format 9"):
        kernels.amx_tiles_linear(x, clib.AmxTiles(tiles.data, 9), 64)
    with pytest.raises(ValueError, match="are not 64 rows of 256"):  # Q8_0's format, a Q4_1 weight's bytes
        kernels.amx_tiles_linear(x, clib.AmxTiles(tiles.data, 3), 64)
    dense = torch.randn(64, 256)
    assert kernels.amx_pack(clib.GGML_F32, dense.view(torch.uint8), 64).fmt == clib.AMX_BF16  # dense: bf16 tiles
    assert kernels.amx_tile_format(Q4_1) == 1 and kernels.amx_tile_format(clib.GGML_F32) == clib.AMX_BF16
