"""The fp32 GEMM on pre-packed weights (kernels/fp32_gemm.c) and how the packed_linear op uses it."""

from __future__ import annotations

import gc
import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pagedllm_cpu import ops as cpu_ops
from pagedllm_cpu.kernels import clib


@pytest.fixture
def kernels() -> clib.CpuKernels:
    built, why = clib.status()
    if built is None:
        pytest.skip(f"CPU kernels unavailable: {why}")
    return built


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """fp32 accuracy: each output within 1e-5 of the sum of |terms| of an fp64 reference."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape and y.is_contiguous()
    assert bool(((y.double() - ref).abs() <= 1e-5 * scale + 1e-30).all())


# m across the 8-row tile and 256-row block edges; n across the 48-wide panel edge; k across the
# 768-long k blocks (1537 = three unequal blocks).
@pytest.mark.parametrize("m", [1, 3, 8, 9, 64, 257])
@pytest.mark.parametrize("n,k", [(1, 1), (47, 7), (49, 96), (100, 1537), (960, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_matches_an_fp64_reference(kernels, m: int, n: int, k: int, with_bias: bool) -> None:
    x, w = _rand(m, k, seed=m), _rand(n, k, seed=n + k)
    bias = _rand(n, seed=1) if with_bias else None
    _check(kernels.gemm(x, kernels.gemm_pack(w), n, bias), x, w, bias)


def test_gemm_of_zero_rows_is_empty(kernels) -> None:
    w = _rand(5, 8, seed=0)
    assert kernels.gemm(torch.empty(0, 8), kernels.gemm_pack(w), 5, None).shape == (0, 5)


def test_strided_rows_and_a_strided_weight(kernels) -> None:
    big_x, big_w = _rand(20, 300, seed=2), _rand(70, 300, seed=3)
    x, w = big_x[::2, 10:110], big_w[::3, 50:150]  # rows farther apart than k, features contiguous
    _check(kernels.gemm(x, kernels.gemm_pack(w), w.shape[0], None), x, w, None)


def test_a_row_is_the_same_alone_in_any_batch_and_with_any_thread_count(kernels) -> None:
    """One accumulator per output, summed over k in order: batch mates and threads change nothing."""
    w, x = _rand(300, 640, seed=4), _rand(300, 640, seed=5)
    panels = kernels.gemm_pack(w)
    batch = kernels.gemm(x, panels, 300, None)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = kernels.gemm(x, panels, 300, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, single_thread)
    for row in (0, 7, 8, 255, 256, 299):
        assert torch.equal(kernels.gemm(x[row : row + 1], panels, 300, None)[0], batch[row])
        assert torch.equal(kernels.gemm(x[row : row + 3], panels, 300, None)[0], batch[row])


def test_mismatched_inputs_are_readable_errors(kernels) -> None:
    w = _rand(10, 16, seed=6)
    panels = kernels.gemm_pack(w)
    with pytest.raises(ValueError, match="panels of 10 x 17"):
        kernels.gemm(_rand(2, 17, seed=7), panels, 10, None)
    with pytest.raises(ValueError, match="bias"):
        kernels.gemm(_rand(2, 16, seed=7), panels, 10, torch.zeros(9))
    with pytest.raises(ValueError, match="fp32"):
        kernels.gemm_pack(w.double())
    with pytest.raises(ValueError, match="non-empty"):
        kernels.gemm_pack(torch.empty(0, 16))


def test_the_op_uses_panels_made_once_per_weight(kernels) -> None:
    w, x, bias = _rand(100, 64, seed=8), _rand(12, 64, seed=9), _rand(100, seed=10)
    y = cpu_ops.packed_linear(x, w, bias, None)
    assert torch.equal(y, kernels.gemm(x, kernels.gemm_pack(w), 100, bias))
    panels = cpu_ops._panels[w][1]
    cpu_ops.packed_linear(x, w, bias, None)
    assert cpu_ops._panels[w][1] is panels  # kept, not packed again


def test_a_weight_changed_in_place_is_packed_again(kernels) -> None:
    w, x = _rand(30, 32, seed=11), _rand(4, 32, seed=12)
    cpu_ops.packed_linear(x, w, None, None)
    with torch.no_grad():
        w.mul_(-2.0)
    _check(cpu_ops.packed_linear(x, w, None, None), x, w, None)


def test_panels_go_with_their_weight(kernels) -> None:
    w = _rand(30, 32, seed=13)
    cpu_ops.packed_linear(_rand(2, 32, seed=14), w, None, None)
    gc.collect()  # earlier tests' models may still be garbage in reference cycles: count without them
    before = len(cpu_ops._panels)
    del w
    gc.collect()
    assert len(cpu_ops._panels) == before - 1


@pytest.mark.parametrize(
    "case",
    ["grad", "bf16", "3d", "weight columns strided", "k mismatch"],
)
def test_the_op_leaves_what_the_kernel_does_not_take_to_torch(kernels, case: str) -> None:
    w, x = _rand(24, 16, seed=15), _rand(3, 16, seed=16)
    if case == "grad":
        x.requires_grad_(True)
    elif case == "bf16":
        w, x = w.bfloat16(), x.bfloat16()
    elif case == "3d":
        x = x.view(3, 1, 16)
    elif case == "weight columns strided":
        w = _rand(24, 32, seed=17)[:, ::2]
    else:
        x = _rand(3, 15, seed=18)
        with pytest.raises(RuntimeError):  # torch's own shape error, not a crash in C
            cpu_ops.packed_linear(x, w, None, None)
        return
    assert torch.equal(cpu_ops.packed_linear(x, w, None, None), F.linear(x, w))


def _cpu_has(*flags: str) -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(flag in words for flag in flags)


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("cc") is None, reason="needs x86-64 and cc"
)
@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_other_instruction_sets_give_bit_identical_products(
    march: str, monkeypatch, tmp_path, kernels
) -> None:
    """x86-64: no vector intrinsics, fmaf; haswell: the AVX2 kernel's 6 x 16 tiles and 16-wide
    panels. Either way every output is summed over k in the same order: the native build's bits."""
    if march == "haswell" and not _cpu_has("avx2", "fma", "f16c"):
        pytest.skip("this CPU cannot run an AVX2 build")
    x, w, bias = _rand(19, 800, seed=19), _rand(53, 800, seed=20), _rand(53, seed=21)
    native = kernels.gemm(x, kernels.gemm_pack(w), 53, bias)
    clib.reset()
    try:
        monkeypatch.setenv(clib.CACHE_ENV, str(tmp_path / "kernel-cache"))
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setattr(
            clib, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in clib.FLAGS)
        )
        other = clib.load()
        assert torch.equal(other.gemm(x, other.gemm_pack(w), 53, bias), native)
        for m in (1, 5, 6, 7, 13):  # every tile height of both kernels, alone: the rows' bits again
            assert torch.equal(other.gemm(x[:m], other.gemm_pack(w), 53, bias), native[:m])
    finally:
        clib.reset()
