"""Greedy generation on the platform under test and on the core's CPU fp32 oracle, and the parity rule between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedllm_conformance.checks import Conformance
from pagedllm_conformance.manifest import dtype_name
from pagedllm_conformance.target import PlatformUnderTest

TOP_K = 5  # the containment rule's k, and how many logprobs each position reports

# Byte-level prompts for the tiny models: a long one crosses blocks and every sliding window.
TINY_PROMPTS = (
    "The quick brown fox",
    "a",
    "Paged attention keeps the KV cache in fixed-size blocks; count them all.",
)
DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):")
DEFAULT_MAX_TOKENS = 10
TINY_MAX_TOKENS = 12


@dataclass(frozen=True, slots=True)
class Generated:
    """One prompt's greedy continuation: token ids and, per position, token id -> (logprob, rank)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[dict[int, tuple[float, int | None]], ...]


def _engine_kwargs(model: str | None, dtype: torch.dtype) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": dtype_name(dtype), "num_gpu_blocks_override": 64, "seed": 0}
    if model is None:
        kw["max_model_len"] = 512  # the default model's 8k context is not needed here
    return kw


def generate(model: str | None, platform: Any, dtype: torch.dtype, prompts: tuple[str, ...], max_tokens: int,
             **engine_kwargs: Any) -> list[Generated]:
    """Greedy generation through the offline LLM API on ``platform`` (a Platform instance)."""
    os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(model, platform=platform, **{**_engine_kwargs(model, dtype), **engine_kwargs})
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP_K, ignore_eos=True)
    try:
        outs = llm.generate(list(prompts), params, use_tqdm=False)
    finally:
        llm.shutdown()  # worker processes of a multi-rank engine stop now
    result = []
    for out in outs:
        completion = out.outputs[0]
        lps = tuple({tid: (lp.logprob, lp.rank) for tid, lp in pos.items()} for pos in (completion.logprobs or []))
        result.append(Generated(tuple(completion.token_ids), lps))
    return result


@contextmanager
def native_ops(target: PlatformUnderTest) -> Iterator[None]:
    """The oracle runs on the core's native ops and model classes; the plugin's come back afterwards."""
    from pagedllm.platforms.discovery import register_plugin
    from pagedllm.plugin_registry import REGISTRY

    REGISTRY.reset()
    try:
        yield
    finally:
        register_plugin(target.selection)


OracleKey = tuple[str | None, tuple[str, ...], int]
_ORACLE_CACHE: dict[OracleKey, list[Generated]] = {}
_BACKGROUND: dict[OracleKey, tuple[subprocess.Popen, Path]] = {}


def start_background_oracle(model: str | None, prompts: tuple[str, ...], max_tokens: int) -> None:
    """Compute an expensive oracle (the default model) in a subprocess while other groups run.

    The oracle involves nothing of the platform under test (reference backend, native ops), so a
    separate interpreter computes exactly what ``oracle_generate`` would, on the otherwise idle core.
    """
    key = (model, prompts, max_tokens)
    if key in _BACKGROUND or key in _ORACLE_CACHE:
        return
    out = Path(tempfile.mkstemp(prefix="pagedllm-conformance-oracle-", suffix=".json")[1])
    request = json.dumps({"model": model, "prompts": list(prompts), "max_tokens": max_tokens, "out": str(out)})
    env = dict(os.environ, OMP_NUM_THREADS="1", PAGEDLLM_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pagedllm_conformance.generation", request], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _BACKGROUND[key] = (proc, out)


def stop_background_oracles() -> None:
    """At the end of a run: end oracles nobody waited for (their test was interrupted or failed early)."""
    for key in list(_BACKGROUND):
        proc, out = _BACKGROUND.pop(key)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        out.unlink(missing_ok=True)


def _collect_background(key: OracleKey) -> list[Generated] | None:
    proc, out = _BACKGROUND.pop(key)
    try:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            warnings.warn(f"background oracle failed (exit {proc.returncode}); computing it in-process:\n{err[-2000:]}",
                          stacklevel=2)
            return None
        data = json.loads(out.read_text())
        return [Generated(tuple(g["token_ids"]), tuple({int(t): (lp, rank) for t, (lp, rank) in pos.items()}
                                                       for pos in g["logprobs"])) for g in data]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    finally:
        out.unlink(missing_ok=True)


def oracle_generate(target: PlatformUnderTest, model: str | None, prompts: tuple[str, ...],
                    max_tokens: int) -> list[Generated]:
    """The CPU fp32 reference: the core's reference attention backend and native ops (cached per run)."""
    key = (model, prompts, max_tokens)
    if key not in _ORACLE_CACHE and key in _BACKGROUND:
        result = _collect_background(key)
        if result is not None:
            _ORACLE_CACHE[key] = result
    if key not in _ORACLE_CACHE:
        with native_ops(target):
            _ORACLE_CACHE[key] = _reference_generate(model, prompts, max_tokens)
    return _ORACLE_CACHE[key]


def _reference_generate(model: str | None, prompts: tuple[str, ...], max_tokens: int) -> list[Generated]:
    from pagedllm.model.testing import ReferencePlatform
    from pagedllm.plugin import OPS

    with OPS.natives():  # the platform under test may have overridden ops in this process
        return generate(model, ReferencePlatform(), torch.float32, prompts, max_tokens)


def _oracle_main(request: str) -> None:
    """Subprocess entry: a fresh interpreter has only native ops registered, as the oracle requires."""
    args = json.loads(request)
    torch.set_num_threads(1)
    result = _reference_generate(args["model"], tuple(args["prompts"]), args["max_tokens"])
    payload = [{"token_ids": list(g.token_ids),
                "logprobs": [{str(t): list(v) for t, v in pos.items()} for pos in g.logprobs]} for g in result]
    Path(args["out"]).write_text(json.dumps(payload))


if __name__ == "__main__":
    _oracle_main(sys.argv[1])


def assert_parity(ut: list[Generated], ref: list[Generated], conformance: Conformance, dtype: torch.dtype,
                  prompts: tuple[str, ...]) -> dict[int, int | None]:
    """Exact greedy tokens, logprobs within tolerance; at the first divergence each side's token must be in the
    other's top-k (a near tie), after which that prompt is not compared further. Returns divergence positions."""
    diverged: dict[int, int | None] = {}
    for i, (u, r) in enumerate(zip(ut, ref, strict=True)):
        conformance.assert_equal_values(len(u.token_ids), len(r.token_ids), what=f"prompt {i}: number of tokens")
        diverged[i] = None
        for pos, (a, b) in enumerate(zip(u.token_ids, r.token_ids, strict=True)):
            ulp, rlp = u.logprobs[pos], r.logprobs[pos]
            common = sorted(set(ulp) & set(rlp))
            for tid in common:
                conformance.assert_error_within(
                    abs(ulp[tid][0] - rlp[tid][0]), abs(rlp[tid][0]), dtype=dtype, group="logprobs",
                    what=f"prompt {i} ({prompts[i]!r}) position {pos}: logprob of token {tid}")
            if a == b:
                continue
            a_rank, b_rank = rlp.get(a, (None, None))[1], ulp.get(b, (None, None))[1]
            if a_rank is None or a_rank > TOP_K or b_rank is None or b_rank > TOP_K:
                raise AssertionError(
                    f"prompt {i} ({prompts[i]!r}) diverges at position {pos}: platform token {a} (rank {a_rank} in the "
                    f"reference), reference token {b} (rank {b_rank} on the platform); both must be in the other's "
                    f"top-{TOP_K}. Tokens so far: {list(u.token_ids[:pos + 1])} vs {list(r.token_ids[:pos + 1])}")
            diverged[i] = pos
            break
    conformance.note(diverged_at={str(k): v for k, v in diverged.items()},
                     tokens_compared=sum(len(r.token_ids) for r in ref))
    return diverged
