"""The attention grid: scenarios (multi-step batches) × layer shapes, run against the core's reference backend."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from pagedllm.plugin import AttentionBatch, AttentionSpec, Platform, ReferenceAttentionBackend

from pagedllm_conformance.checks import CheckRecord, Conformance
from pagedllm_conformance.manifest import dtype_name


@dataclass(frozen=True, slots=True)
class Shape:
    block_size: int
    head_size: int
    num_heads: int
    num_kv_heads: int

    @property
    def label(self) -> str:
        group = self.num_heads // self.num_kv_heads
        kind = "mha" if group == 1 else ("mqa" if self.num_kv_heads == 1 else f"gqa{group}")
        return f"bs{self.block_size}-hs{self.head_size}-{kind}-h{self.num_heads}kv{self.num_kv_heads}"


@dataclass(frozen=True, slots=True)
class Scenario:
    """A sequence of steps; ``steps[s][i]`` is how many new tokens sequence i brings to step s.

    0 is an empty slot: a sequence in the batch with no query tokens (not started yet, or
    not scheduled this step). Each step may end with padding tokens whose slot is -1.
    """

    name: str
    description: str
    steps: tuple[tuple[int, ...], ...]
    pad_tokens: tuple[int, ...] = ()
    sliding_window: int | None = None
    soft_cap: float | None = None
    query_gain: float = 1.0  # larger queries make soft-capping matter
    stale: str = "garbage"  # what never-written cache slots hold: "garbage" (finite) or "nan"
    heavy: bool = False  # thousands of tokens: the full grid runs it on the head-size-64 shapes only


def _long_lens(bs: int) -> tuple[int, ...]:
    # Around 512 tokens, on and off block boundaries.
    return tuple(500 + 7 * i + (bs if i % 3 == 0 else 0) for i in range(9))


def scenarios(bs: int) -> list[Scenario]:
    """Every scenario for block size ``bs``; lengths are chosen relative to the block size."""
    return [
        Scenario("prefill", "pure prefill: a one-token prompt, one shorter than a block, two crossing block boundaries",
                 ((1, 3, bs + 1, 2 * bs + 5),)),
        Scenario("decode", "prefill, then three pure-decode steps; sequences cross into new blocks while decoding",
                 ((bs - 1, bs, 2 * bs + 1), (1, 1, 1), (1, 1, 1), (1, 1, 1))),
        Scenario("mixed", "mixed batches: a decode, a chunked-prefill continuation and a new prompt in one step",
                 ((bs + 2, 5, 0), (1, 7, bs + 3), (1, 1, 1))),
        Scenario("chunked_prefill", "prompts prefilled in chunks not aligned to blocks, attending to their cached context",
                 ((bs - 3, 2 * bs), (bs + 5, 3), (7, 1))),
        Scenario("block_boundary", "lengths exactly at block boundaries (k*bs, k*bs±1) in prefill, decode and chunks",
                 ((bs, 2 * bs, bs - 1), (1, 1, 1), (bs, bs - 1, 1))),
        Scenario("empty_slots", "batches with empty slots (no query tokens) and trailing padding tokens with slot -1",
                 ((5, 4, bs + 2, 0), (1, 0, 1, 0)), pad_tokens=(3, 2)),
        Scenario("sliding_window", "sliding window wider than a block (window = bs + 3) over long prompts and decodes",
                 ((2 * bs + 3, 6), (1, 9), (1, 1)), sliding_window=bs + 3),
        Scenario("sliding_window_small", "sliding window of 4 tokens, smaller than a block",
                 ((bs + 6, 3), (1, 5), (1, 1)), sliding_window=4),
        Scenario("soft_cap", "logit soft-cap 2.0 with large queries so capping changes the scores",
                 ((bs + 5, 3), (1, 6), (1, 1)), soft_cap=2.0, query_gain=3.0),
        Scenario("window_and_cap", "sliding window and soft-cap together (Gemma-2 style layers)",
                 ((2 * bs + 1, 4), (1, bs), (1, 1)), sliding_window=bs + 1, soft_cap=2.0, query_gain=3.0),
        Scenario("long_context", "a long prompt over many blocks, then decodes (split or partitioned kernels)",
                 ((6 * bs + 5, 9), (1, 1), (1, 1))),
        Scenario("long_batch", "nine prompts of 500-560 tokens decoded together: partitioned or chunked decode kernels "
                 "(vLLM splits keys at 512 tokens)", (_long_lens(bs), (1,) * 9, (1,) * 9), heavy=True),
        Scenario("stale_nan", "never-written cache slots hold NaN: a kernel must not read past a sequence's end",
                 ((bs + 2, 5, 0), (1, 7, bs + 3), (1, 1, 1)), stale="nan"),
    ]


SCENARIO_NAMES = [s.name for s in scenarios(16)]
HEAVY_SCENARIOS = {s.name for s in scenarios(16) if s.heavy}

FULL_SHAPES = [
    Shape(bs, hs, h, kv)
    for bs in (8, 16, 32)
    for hs in (32, 64, 80, 128)
    for h, kv in ((4, 4), (8, 2), (6, 2), (4, 1))
]
# The quick grid runs every scenario on a GQA shape (where head-mapping bugs show) and one other.
QUICK_ANCHOR = Shape(16, 64, 8, 2)
QUICK_OTHERS = [Shape(8, 32, 4, 1), Shape(32, 128, 4, 4), Shape(16, 80, 6, 2)]


@dataclass(frozen=True, slots=True)
class AttentionCase:
    scenario_name: str
    shape: Shape
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.scenario_name}-{self.shape.label}-{dtype_name(self.dtype)}"

    @property
    def scenario(self) -> Scenario:
        return next(s for s in scenarios(self.shape.block_size) if s.name == self.scenario_name)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def attention_grid(dtypes: list[torch.dtype], quick: bool) -> list[AttentionCase]:
    """The first dtype (fp32 where supported) gets every shape in a full run and two shapes per scenario
    in a quick one; other dtypes get the two quick shapes (full) or the GQA anchor only (quick)."""
    cases = []
    for d_i, dtype in enumerate(dtypes):
        for s_i, name in enumerate(SCENARIO_NAMES):
            quick_shapes = [QUICK_ANCHOR, QUICK_OTHERS[s_i % len(QUICK_OTHERS)]]
            if d_i == 0:
                shapes = quick_shapes if quick else FULL_SHAPES
                if not quick and name in HEAVY_SCENARIOS:
                    shapes = [s for s in FULL_SHAPES if s.head_size == 64]
            else:
                shapes = [QUICK_ANCHOR] if quick else quick_shapes
            cases += [AttentionCase(name, shape, dtype) for shape in shapes]
    return cases


@dataclass(frozen=True, slots=True)
class CopyCase:
    pattern: str  # "scattered", "fork" or "empty"
    shape: Shape
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.pattern}-{self.shape.label}-{dtype_name(self.dtype)}"


def copy_grid(dtypes: list[torch.dtype], quick: bool) -> list[CopyCase]:
    shapes = [QUICK_ANCHOR] + (QUICK_OTHERS[:1] if quick else QUICK_OTHERS)
    return [CopyCase(p, s, d) for d in dtypes for s in shapes for p in ("scattered", "fork", "empty")]


def make_spec(shape: Shape, dtype: torch.dtype, scenario: Scenario | None = None) -> AttentionSpec:
    return AttentionSpec(
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_size=shape.head_size,
        scale=shape.head_size**-0.5,
        dtype=dtype,
        block_size=shape.block_size,
        sliding_window=scenario.sliding_window if scenario else None,
        logit_soft_cap=scenario.soft_cap if scenario else None,
    )


def _allocate_tables(final_lens: list[int], bs: int, gen: torch.Generator) -> tuple[list[list[int]], int]:
    """Random, non-contiguous block tables; block 0 is in use, the cache's last block never is."""
    needed = [math.ceil(n / bs) for n in final_lens]
    num_blocks = sum(needed) + 3
    usable = torch.randperm(num_blocks - 1, generator=gen).tolist()  # the last block stays free
    if 0 not in usable[: sum(needed)] and sum(needed) > 0:
        usable.remove(0)
        usable.insert(sum(needed) // 2, 0)
    tables, pos = [], 0
    for n in needed:
        tables.append(usable[pos : pos + n])
        pos += n
    return tables, num_blocks


def _fill_stale(cache: torch.Tensor, stale: str, gen: torch.Generator) -> bool:
    """Fill the whole cache before any write, so reads of never-written slots show. False if not floating."""
    if not cache.dtype.is_floating_point:
        return False
    if stale == "nan":
        cache.fill_(float("nan"))
    else:
        noise = torch.empty(cache.shape, dtype=torch.float32).uniform_(-4.0, 4.0, generator=gen)
        cache.copy_(noise.to(cache.dtype))
    return True


CHECK_KINDS = ("output", "kv")


def run_attention_case(case: AttentionCase, platform: Platform, checks: dict[str, Conformance]) -> dict[str, str | None]:
    """Run every step on the platform's backend and on the reference, checking outputs and KV writes.

    Both kinds of check run in one pass (``checks["output"]``, ``checks["kv"]``); once one kind
    fails it stops checking but the other goes on to the last step. Returns each kind's failure
    message (None when it passed). A backend that raises fails both kinds with the same error.
    """
    failures: dict[str, str | None] = {kind: None for kind in CHECK_KINDS}

    def guarded(kind: str, check: Any) -> None:
        if failures[kind] is None:
            try:
                check()
            except AssertionError as exc:
                failures[kind] = str(exc)

    scenario, shape, dtype = case.scenario, case.shape, case.dtype
    bs = shape.block_size
    gen = torch.Generator().manual_seed(case.seed)
    device = platform.device()
    spec = make_spec(shape, dtype, scenario)
    backend = platform.attention_backend(spec)
    reference = ReferenceAttentionBackend(replace(spec, dtype=torch.float32))

    num_seqs = len(scenario.steps[0])
    final_lens = [sum(step[i] for step in scenario.steps) for i in range(num_seqs)]
    tables, num_blocks = _allocate_tables(final_lens, bs, gen)
    cache = backend.allocate_kv_cache(num_blocks, device)
    expected_shape = tuple(backend.kv_cache_shape(num_blocks, bs, shape.num_kv_heads, shape.head_size))
    guarded("kv", lambda: checks["kv"].assert_equal_values(tuple(cache.shape), expected_shape,
                                                           what="allocate_kv_cache shape vs kv_cache_shape"))
    filled = _fill_stale(cache, scenario.stale, gen)
    ref_cache = reference.allocate_kv_cache(num_blocks, "cpu")
    all_slots = torch.arange(num_blocks * bs, dtype=torch.int64)
    exp_k, exp_v = (t.detach().to("cpu").clone() for t in backend.read_kv(cache, all_slots.to(device)))
    facts = dict(
        scenario=scenario.name, description=scenario.description, block_size=bs, head_size=shape.head_size,
        num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, dtype=dtype_name(dtype),
        sliding_window=scenario.sliding_window, soft_cap=scenario.soft_cap, steps=[list(s) for s in scenario.steps],
        num_blocks=num_blocks, block_tables=tables, stale_fill=scenario.stale if filled else "none (cache not floating)",
        backend=f"{type(backend).__module__}.{type(backend).__qualname__}",
    )
    for check in checks.values():
        check.note(**facts)

    done = [0] * num_seqs
    history: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_seqs)]  # per-token (k, v)
    for s_i, step in enumerate(scenario.steps):
        seq_lens = [done[i] + step[i] for i in range(num_seqs)]
        step_tables = [tables[i][: math.ceil(seq_lens[i] / bs)] for i in range(num_seqs)]
        real = sum(step)
        pad = scenario.pad_tokens[s_i] if s_i < len(scenario.pad_tokens) else 0
        total = real + pad
        q = torch.randn(total, shape.num_heads, shape.head_size, generator=gen) * scenario.query_gain
        k = torch.randn(total, shape.num_kv_heads, shape.head_size, generator=gen)
        v = torch.randn(total, shape.num_kv_heads, shape.head_size, generator=gen)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # what both backends see, rounded alike

        batch = AttentionBatch.build(list(step), seq_lens, step_tables, bs, device=device, pad_tokens_to=total)
        ref_batch = AttentionBatch.build(list(step), seq_lens, step_tables, bs, device="cpu", pad_tokens_to=total)
        metadata = backend.build_metadata(batch)
        out = backend.forward(q.to(device), k.to(device), v.to(device), cache, metadata)
        platform.synchronize()
        ref_out = reference.forward(q.float(), k.float(), v.float(), ref_cache, reference.build_metadata(ref_batch))
        where = f"{case.id} step {s_i} (new tokens {list(step)}, seq_lens {seq_lens})"

        written = batch.slot_mapping[:real].to("cpu")
        exp_k[written], exp_v[written] = k[:real], v[:real]
        dense = _dense_attention(spec, q, k, v, step, seq_lens, history)
        guarded("output", partial(_check_oracle, checks["output"], ref_out[:real], dense, where))
        guarded("output", partial(_check_output, checks["output"], out, ref_out, tuple(q.shape), real, dtype, where))
        guarded("kv", partial(_check_kv, checks["kv"], backend, cache, all_slots.to(device), exp_k, exp_v, written,
                              dtype, where))
        done = seq_lens
    return failures


def _dense_attention(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: tuple[int, ...],
                     seq_lens: list[int], history: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Textbook attention in fp64 over each sequence's keys kept in order here, never through a paged cache:
    an independent check of the oracle itself. Appends this step's keys and values to ``history``."""
    outs, start = [], 0
    group = spec.num_heads // spec.num_kv_heads
    for i, q_len in enumerate(step):
        history[i].extend((k[t], v[t]) for t in range(start, start + q_len))
        if q_len == 0:
            continue
        keys = torch.stack([kv[0] for kv in history[i]]).double().repeat_interleave(group, dim=1)  # [L, H, D]
        values = torch.stack([kv[1] for kv in history[i]]).double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + q_len].double(), keys) * spec.scale
        if spec.logit_soft_cap is not None:
            scores = spec.logit_soft_cap * torch.tanh(scores / spec.logit_soft_cap)
        q_pos = torch.arange(seq_lens[i] - q_len, seq_lens[i]).unsqueeze(1)
        k_pos = torch.arange(seq_lens[i]).unsqueeze(0)
        visible = k_pos <= q_pos
        if spec.sliding_window is not None:
            visible &= (q_pos - k_pos) < spec.sliding_window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, values))
        start += q_len
    return torch.cat(outs) if outs else torch.zeros(0, spec.num_heads, spec.head_size, dtype=torch.float64)


def _check_oracle(c: Conformance, ref_out: torch.Tensor, dense: torch.Tensor, where: str) -> None:
    # fp32 reference vs fp64 textbook: a bug in the core's oracle fails every platform, loudly. Its error
    # is not the platform's, so it goes to a scratch record, not the test's row.
    scratch = Conformance(c.manifest, CheckRecord())
    try:
        scratch.assert_close(ref_out, dense, dtype=torch.float32, group="attention", what=f"{where}: oracle self-check")
    except AssertionError as exc:
        raise AssertionError(f"the core's reference backend disagrees with textbook attention: {exc}") from None


def _check_output(c: Conformance, out: torch.Tensor, ref_out: torch.Tensor, q_shape: tuple[int, ...], real: int,
                  dtype: torch.dtype, where: str) -> None:
    c.assert_equal_values(tuple(out.shape), q_shape, what=f"{where}: output shape")
    c.assert_equal_values(out.dtype, dtype, what=f"{where}: output dtype")
    c.assert_close(out[:real], ref_out[:real], dtype=dtype, group="attention", what=f"{where}: attention output vs reference")


def _check_kv(c: Conformance, backend: Any, cache: torch.Tensor, slots: torch.Tensor, exp_k: torch.Tensor,
              exp_v: torch.Tensor, written: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    got_k, got_v = backend.read_kv(cache, slots)
    _assert_slots(c, got_k, exp_k, written, dtype, f"{where}: keys")
    _assert_slots(c, got_v, exp_v, written, dtype, f"{where}: values")


def _assert_slots(conformance: Conformance, got: torch.Tensor, expected: torch.Tensor, written: torch.Tensor,
                  dtype: torch.dtype, what: str) -> None:
    """Every slot holds exactly what was written to it, and every other slot is untouched."""
    got = got.detach().to("cpu")
    mask = torch.zeros(expected.shape[0], dtype=torch.bool)
    mask[written] = True
    conformance.assert_close(got[mask], expected[mask], dtype=dtype, group="kv_cache",
                            what=f"{what} in the written slots")
    untouched = (~mask).nonzero().flatten()
    try:
        conformance.assert_exact(got[untouched], expected[untouched], dtype=dtype,
                                 what=f"{what} in slots this step must not touch")
    except AssertionError as exc:
        bad = [int(s) for s in untouched if not _slot_equal(got[s], expected[s])][:8]
        raise AssertionError(f"{exc}; modified slots (first 8): {bad}") from None


def _slot_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def run_copy_case(case: CopyCase, platform: Platform, conformance: Conformance) -> None:
    """copy_blocks on two layers: destination blocks equal their sources exactly, nothing else moves."""
    shape, bs = case.shape, case.shape.block_size
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    device = platform.device()
    backend = platform.attention_backend(make_spec(shape, case.dtype))
    num_blocks = 12
    caches = [backend.allocate_kv_cache(num_blocks, device) for _ in range(2)]
    for cache in caches:
        _fill_stale(cache, "garbage", gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    if case.pattern == "scattered":
        pairs = [(perm[0], perm[5]), (perm[1], perm[9]), (perm[2], perm[3])]
    elif case.pattern == "fork":
        pairs = [(perm[0], perm[4]), (perm[0], perm[7])]  # one source shared by two new sequences
    else:
        pairs = []
    src_to_dst = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).to(device)
    all_slots = torch.arange(num_blocks * bs, dtype=torch.int64, device=device)
    before = [tuple(t.detach().to("cpu").clone() for t in backend.read_kv(c, all_slots)) for c in caches]
    backend.copy_blocks(caches, src_to_dst)
    platform.synchronize()
    conformance.note(pattern=case.pattern, pairs=pairs, num_blocks=num_blocks, block_size=bs,
                     dtype=dtype_name(case.dtype), layers=len(caches))
    for layer, cache in enumerate(caches):
        got_k, got_v = (t.detach().to("cpu") for t in backend.read_kv(cache, all_slots))
        exp_k, exp_v = (t.clone() for t in before[layer])
        for src, dst in pairs:
            exp_k[dst * bs : (dst + 1) * bs] = before[layer][0][src * bs : (src + 1) * bs]
            exp_v[dst * bs : (dst + 1) * bs] = before[layer][1][src * bs : (src + 1) * bs]
        for name, got, exp in (("keys", got_k, exp_k), ("values", got_v, exp_v)):
            conformance.assert_exact(got, exp, dtype=case.dtype, what=f"layer {layer} {name} after copy_blocks({pairs})")
