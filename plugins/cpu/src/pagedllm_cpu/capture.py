"""Captured decode steps on the CPU: CUDA graphs' idea with the C kernels as the "device".

Why: with the C kernels a one-sequence decode step is ~15 ms of kernels and ~15 ms of Python
(module calls, argument checks, ~300 ctypes calls with their tensor allocations). A captured step
replays the recorded kernel calls, with the same pointers, in one loop.

How: the model runner's ``decode_step_for_capture(n)`` runs one decode forward over persistent
input buffers. While it runs, the C kernel wrappers record every call (clib.start_recording) and
a TorchDispatchMode watches every torch op:
  - views, allocations and constant factories need nothing at replay (their memory is kept); a
    "view" op that had to copy (``reshape`` of a strided tensor) is redone into its output;
  - in-place ops (``add_`` of a bias, ``zero_``) are replayed as they were called;
  - the embedding lookup is replayed as ``index_select(..., out=)`` into the recorded output,
    other ops with an ``out=`` overload (``mm``, ``addmm`` of dense weights) likewise;
  - any other torch op computes something a replay would skip, so the capture is refused and
    that batch size runs eagerly (the log names the op).
A capture is also replayed once against an eager run of the same inputs and kept only if the
outputs are identical. Steps of up to 64 sequences are captured (``CAPTURE_SIZES``); a step of
n sequences replays the smallest captured size >= n with inert padding rows.

When: a size is captured the first time a decode step needs it (``PAGEDLLM_CPU_CAPTURE=lazy``,
the default), so a one-shot ``pagedllm generate`` of one prompt captures one size, not eleven
(each takes one to a few seconds). A lazy capture runs while the KV cache holds live sequences:
it works in the blocks it scrambles and puts their contents back. ``startup`` captures every size
before the engine serves, trading startup time for no pause on a size's first step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagedllm_cpu.attention import CpuAttentionMetadata, KernelPlan
from pagedllm_cpu.kernels import clib

logger = logging.getLogger(__name__)

# Decode batch sizes that get a captured step; a batch of n sequences replays the smallest >= n.
# Fine steps above 8: padded rows cost compute on a CPU. Larger batches run eagerly (the Python
# overhead a replay saves is ~15 ms a step, a few percent there).
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
_FACTORIES = {"empty", "empty_like", "empty_strided", "zeros", "ones", "full", "arange", "scalar_tensor"}
_NO_OPS = {"detach", "alias", "lift_fresh"}


BUDGET_ENV = "PAGEDLLM_CPU_CAPTURE_BUDGET"  # seconds spent capturing in all, default 60
MODE_ENV = "PAGEDLLM_CPU_CAPTURE"  # lazy (default): on a size's first step | startup: all before serving
CAPTURE_MODES = ("lazy", "startup")


def capture_mode() -> str:
    raw = os.environ.get(MODE_ENV, "lazy").strip().lower() or "lazy"
    if raw not in CAPTURE_MODES:
        raise ValueError(f"{MODE_ENV}={raw!r}: expected one of {', '.join(CAPTURE_MODES)}")
    return raw


def capture_budget() -> float:
    raw = os.environ.get(BUDGET_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


class NotCapturable(RuntimeError):
    """The decode step runs a torch op a replay could not repeat; the message names it."""


def _aliases(out: Any, args: tuple) -> bool:
    """Whether a view op's result(s) share memory with its input (reshape may have copied instead)."""
    base = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if base is None:
        return False
    ptr = base.untyped_storage().data_ptr()
    outs = out if isinstance(out, (list, tuple)) else (out,)
    return all(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == ptr for o in outs)


def _out_variant(func: Any) -> Any:
    """The op's ``out=`` overload (``mm.out``, ``gt.Scalar_out``), unless its output shape depends on data."""
    if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
        return None
    packet = func.overloadpacket
    for name in (f"{func._overloadname}_out", "out"):
        if name in packet.overloads():
            return getattr(packet, name)
    return None


class _Watcher(TorchDispatchMode):
    """Classifies every torch op of the captured step; keeps every tensor it produced alive."""

    def __init__(self) -> None:
        super().__init__()
        self.replays: list[tuple[int, Callable[[], Any]]] = []  # (position in the kernel call list, action)
        self.keep: list[Any] = []
        self.refused: list[str] = []
        self.calls: list[Any] = []  # the kernel call list being recorded (set by capture_step)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.keep.append(out)
        name = func.overloadpacket.__name__
        if name in _FACTORIES or name in _NO_OPS:
            return out
        if func.is_view:
            if _aliases(out, args):
                return out
            # reshape & co. copy when no view is possible: that copy must be redone at replay.
            self.replays.append((len(self.calls), lambda: out.copy_(func(*args, **kwargs))))
            return out
        if name == "embedding" and len(args) == 2 and not kwargs:
            weight, ids = args
            target = out.view(-1, weight.shape[1])
            flat_ids = ids.reshape(-1)
            self.keep += [target, flat_ids]
            self.replays.append(
                (len(self.calls), lambda: torch.index_select(weight, 0, flat_ids, out=target))
            )
            return out
        if name.endswith("_") and not name.startswith("_"):  # in place on a recorded tensor
            self.replays.append((len(self.calls), lambda: func(*args, **kwargs)))
            return out
        # Out of place with an out= overload (mm, addmm, linear, mul): write into `out` again.
        out_variant = _out_variant(func)
        if isinstance(out, torch.Tensor) and out_variant is not None:
            self.replays.append((len(self.calls), lambda: out_variant(*args, **kwargs, out=out)))
            return out
        self.refused.append(str(func))
        return out


class CapturedStep:
    """One recorded decode step: kernel calls and torch in-place actions in their original order."""

    def __init__(
        self, calls: list[tuple[str, Any, tuple[Any, ...]]], watcher: _Watcher, output: torch.Tensor
    ) -> None:
        actions: list[tuple[int, Callable[[], Any]]] = sorted(watcher.replays, key=lambda r: r[0])
        self.steps: list[tuple[str | None, Any, tuple[Any, ...]]] = []
        a = 0
        for i, call in enumerate(calls):
            while a < len(actions) and actions[a][0] <= i:
                self.steps.append((None, actions[a][1], ()))
                a += 1
            self.steps.append(call)
        self.steps += [(None, fn, ()) for _, fn in actions[a:]]
        self.keep = watcher.keep
        self.output = output

    def replay(self) -> torch.Tensor:
        for name, fn, args in self.steps:
            rc = fn(*args)
            if name is not None and rc:  # the int-returning kernels: 0 is success
                raise RuntimeError(f"captured decode step: {name} failed with code {rc}")
        return self.output


def _decode_inputs(runner: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, CpuAttentionMetadata]:
    input_ids, positions, metadata = runner.decode_inputs_for_capture(size)
    if not isinstance(metadata, CpuAttentionMetadata):
        raise NotCapturable(f"attention metadata is {type(metadata).__name__}, not the CPU backend's")
    # Attend through the buffers themselves, so a replay sees the step's lengths and tables.
    metadata.kernel_plan = KernelPlan.for_capture(metadata.batch)
    return input_ids, positions, metadata


def capture_step(runner: Any, size: int) -> CapturedStep:
    """Record the runner's decode forward over ``size`` rows of its persistent buffers.

    NotCapturable if the forward runs a torch op a replay could not repeat."""
    inputs = _decode_inputs(runner, size)
    watcher = _Watcher()
    calls = clib.start_recording()
    watcher.calls = calls
    try:
        with watcher:
            output = runner.decode_forward_for_capture(*inputs)
    finally:
        clib.stop_recording()
    if watcher.refused:
        raise NotCapturable(f"torch ops outside the C kernels: {', '.join(sorted(set(watcher.refused)))}")
    watcher.keep.append(inputs)  # the metadata's plan tensors are read by every replay
    return CapturedStep(list(calls), watcher, output)


def eager_step(runner: Any, size: int) -> torch.Tensor:
    """The same forward as capture_step, run eagerly (the reference a capture must reproduce)."""
    return runner.decode_forward_for_capture(*_decode_inputs(runner, size))


class CpuDecodeGraphs:
    """The model runner's ``decode_graphs`` on the CPU: ``padded_size(n)`` and ``replay(n)``.

    ``lazy``: ``padded_size(n)`` captures the size a step of n sequences needs on its first call."""

    def __init__(self, runner: Any, sizes: tuple[int, ...] = CAPTURE_SIZES, lazy: bool = False) -> None:
        self.runner = runner
        max_seqs = runner.config.scheduler.max_num_seqs
        self.sizes = sorted(s for s in sizes if s <= max_seqs)
        self.lazy = lazy
        runner.decode_inputs_for_capture(1)  # allocates the persistent buffers captures and replays use
        self.captured: dict[int, CapturedStep] = {}
        self.refused: dict[int, str] = {}
        self.capture_s = 0.0  # seconds spent capturing so far, against the budget

    def capture(self, budget_s: float | None = None) -> None:
        """Capture each size in turn; once ``budget_s`` seconds are spent, larger sizes stay eager
        (a big model's forward takes seconds, and startup should not take minutes)."""
        for size in self.sizes:
            self.capture_size(size, budget_s)
        if self.captured:
            logger.info("captured CPU decode steps for batch sizes %s", sorted(self.captured))

    @torch.inference_mode()
    def capture_size(self, size: int, budget_s: float | None = None) -> bool:
        """Capture one size unless it was tried before or the budget is spent; whether it is captured."""
        if size in self.captured or size in self.refused:
            return size in self.captured
        budget_s = capture_budget() if budget_s is None else budget_s
        if (self.captured or self.refused) and self.capture_s > budget_s:  # the first is always tried
            self.refused[size] = f"capture time budget of {budget_s:g} s spent ({BUDGET_ENV})"
            return False
        start = time.perf_counter()
        try:
            with self._live_blocks_restored(size):
                self._scramble_inputs(size, seed=size + 1_000_003)
                why = self._capture_and_validate(size)
        finally:
            self.capture_s += time.perf_counter() - start
        if why is not None:
            self.refused[size] = why
            return False
        if self.lazy:
            logger.info(
                "captured the CPU decode step for %d sequences in %.2f s", size, time.perf_counter() - start
            )
        return True

    def _capture_and_validate(self, size: int) -> str | None:
        """Capture ``size`` into self.captured; None, or why it runs eagerly."""
        try:
            captured = capture_step(self.runner, size)
        except NotCapturable as exc:
            logger.info("decode steps of %d sequences run eagerly: %s", size, exc)
            return str(exc)
        # The replay must reproduce an eager run exactly, on inputs other than the captured ones
        # (a computation baked in at capture would still match on those).
        self._scramble_inputs(size, seed=size)
        eager = eager_step(self.runner, size).clone()
        replayed = captured.replay()
        if not torch.equal(torch.nan_to_num(eager), torch.nan_to_num(replayed)):
            logger.warning("decode steps of %d sequences run eagerly: the replay differs from eager", size)
            return "replay differs from the eager step"
        self.captured[size] = captured
        return None

    @contextlib.contextmanager
    def _live_blocks_restored(self, size: int) -> Iterator[None]:
        """Keep the KV blocks a capture of ``size`` writes (``_scramble_inputs``'s) and put them back:
        a lazy capture runs between steps of live sequences."""
        blocks = torch.arange(size) % self.runner.num_blocks
        saved = [kv_cache[:, blocks].clone() for kv_cache in self.runner.kv_caches]  # [2, size, ...] each
        try:
            yield
        finally:
            for kv_cache, kept in zip(self.runner.kv_caches, saved, strict=True):
                kv_cache[:, blocks] = kept

    def _scramble_inputs(self, size: int, seed: int) -> None:
        """Inputs where everything matters: random token ids, each row a two-token sequence in its
        own (zeroed) block of the first ``size``, so attention depends on the query and the step
        writes keys and values (a capture and its validation use different seeds)."""
        runner, buffers = self.runner, self.runner._decode_buffers
        num_blocks, block_size = runner.num_blocks, runner.block_size
        gen = torch.Generator().manual_seed(seed)
        vocab = int(getattr(runner.hf_config, "vocab_size", 2))
        blocks = torch.arange(size) % num_blocks
        for kv_cache in runner.kv_caches:  # [2, num_blocks, ...]
            kv_cache[:, blocks] = 0
        buffers.input_ids[:size].copy_(torch.randint(0, vocab, (size,), generator=gen))
        buffers.positions[:size] = 1
        buffers.seq_lens[:size] = 2
        buffers.block_tables[:size, 0] = blocks.to(buffers.block_tables.dtype)
        buffers.slot_mapping[:size].copy_(blocks * block_size + 1)

    def padded_size(self, num_seqs: int) -> int | None:
        if self.lazy:  # capture the size this step needs, on its first need
            needed = next((size for size in self.sizes if size >= num_seqs), None)
            if needed is not None:
                self.capture_size(needed)
        for size in self.sizes:
            if size >= num_seqs and size in self.captured:
                return size
        return None

    def replay(self, num_seqs: int) -> torch.Tensor:
        size = self.padded_size(num_seqs)
        if size is None:
            raise ValueError(
                f"no captured decode step for {num_seqs} sequences (captured: {sorted(self.captured)})"
            )
        return self.captured[size].replay()[:num_seqs]

    def describe(self) -> str:
        if not self.captured and not self.refused:
            return f"lazy: none needed yet (sizes {self.sizes} are captured on their first decode step)"
        if not self.captured:
            return "not captured: " + "; ".join(f"{n}: {why}" for n, why in self.refused.items())
        text = f"captured for batch sizes {sorted(self.captured)}"
        return text + (f" (eager: {sorted(self.refused)})" if self.refused else "")
