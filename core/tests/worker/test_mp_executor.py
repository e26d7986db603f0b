"""The multiprocess executor: tensor parallel 2 (gloo, a process per rank) gives world size 1's tokens; a dead rank fails the engine."""

from __future__ import annotations

import os
import signal
import time

import pytest
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.errors import ConfigError, EngineDeadError, ModelLoadError
from pagedllm.model.testing import make_tiny_model
from pagedllm.sample.sampling_params import SamplingParams
from pagedllm.worker.executor import UniProcExecutor
from pagedllm.worker.mp_executor import MultiprocExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tp-{arch}"), seed=1)
        return made[arch]

    return get


def make_core(model: str | None, tp: int, pp: int = 1, **kw) -> EngineCore:
    kw.setdefault("dtype", "float32")
    args = EngineArgs(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    return EngineCore(args.create_engine_config())


def mixed_requests(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """32 requests: shared prefixes (prefix cache hits), long prompts (chunked), n=2 forks, a seed, logprobs."""
    shared = [(5 + 3 * j) % vocab for j in range(40)]
    reqs = []
    for i in range(32):
        own = [(11 + 7 * i + 13 * j) % vocab for j in range(3 + (i * 5) % 29)]
        prompt = (shared[: 16 + (i % 3) * 8] + own) if i % 2 == 0 else own
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        if i == 3:
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, n=2)
        elif i == 5:
            params = SamplingParams(temperature=0.8, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True, n=2)
        elif i == 7:
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=1)
        reqs.append((prompt, params))
    return reqs


def run(core: EngineCore, reqs: list[tuple[list[int], SamplingParams]]) -> dict[tuple[str, int], list[int]]:
    proc = InputProcessor(core.config, core.tokenizer_info, core.num_blocks)
    for i, (prompt, params) in enumerate(reqs):
        core.add_request(proc.process(f"r{i}", prompt, params))
    out: dict[tuple[str, int], list[int]] = {}
    prompt_lps: dict[str, int] = {}
    while core.has_unfinished_requests():
        for o in core.step():
            assert o.error is None, o.error
            out.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
            if o.prompt_logprobs is not None:
                prompt_lps[o.request_id] = len(o.prompt_logprobs)
    assert prompt_lps == {"r7": len(reqs[7][0])}
    return out


@pytest.fixture(scope="module")
def tp2_llama(tiny_dirs):
    """One TP 2 engine for the default suite's two tests (a startup is two processes loading a model)."""
    core = make_core(tiny_dirs("llama"), 2, **MIXED)
    yield core
    core.shutdown()


MIXED = dict(num_gpu_blocks_override=48, max_num_batched_tokens=64, max_num_seqs=16)


def test_tensor_parallel_2_mixed_batch_matches_world_size_1(tiny_dirs, tp2_llama) -> None:
    reqs = mixed_requests(256)
    single = make_core(tiny_dirs("llama"), 1, **MIXED)
    assert isinstance(single.executor, UniProcExecutor)
    expected = run(single, reqs)
    core = tp2_llama
    assert isinstance(core.executor, MultiprocExecutor)
    assert core.num_blocks == 48
    got = run(core, reqs)
    stats = core.stats()
    assert len(got) == 34 and all(len(t) == NEW_TOKENS for t in got.values())
    assert got == expected
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_killing_a_rank_mid_generation_fails_the_engine_quickly_and_leaves_no_process(tp2_llama) -> None:
    core = tp2_llama
    procs = core.executor.procs
    proc = InputProcessor(core.config, core.tokenizer_info, core.num_blocks)
    for i in range(4):
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        core.add_request(proc.process(f"k{i}", [1 + i, 2, 3], params))
    for _ in range(3):
        core.step()
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="rank 1 exited with code -9"):
        for _ in range(1000):
            core.step()
    assert time.monotonic() - t0 < 10
    assert all(p.poll() is not None for p in procs)  # rank 0 was killed and reaped too
    assert _worker_children() == []
    with pytest.raises(EngineDeadError):
        core.check_health()


def test_pipeline_parallel_2_mixed_batch_matches_world_size_1_with_microbatches_in_flight(tiny_dirs) -> None:
    reqs = mixed_requests(256)
    expected = run(make_core(tiny_dirs("llama"), 1, **MIXED), reqs)
    core = make_core(tiny_dirs("llama"), 1, pp=2, **MIXED)
    try:
        assert isinstance(core.executor, MultiprocExecutor)
        assert [i.is_driver for i in core.executor.rank_info] == [False, True]  # the last stage samples
        # Each stage holds its half of the layers and a KV cache for those only.
        assert [i.kv_cache_bytes for i in core.executor.rank_info] == [core.executor.rank_info[1].kv_cache_bytes] * 2
        got = run(core, reqs)
        stats = core.stats()
    finally:
        core.shutdown()
    assert got == expected
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_microbatches_split_a_step_by_tokens_and_keep_every_sequence_once() -> None:
    from pagedllm.core.request import Sequence
    from pagedllm.core.scheduler import ScheduledSequence, SchedulerOutput
    from pagedllm.worker.worker import split_microbatches

    seqs = [Sequence(f"r{i}", 0, [1] * 40, 40, SamplingParams(), 0.0) for i in range(5)]
    lens = [30, 1, 1, 10, 20]
    out = SchedulerOutput(
        scheduled=[ScheduledSequence(s, n, 0, True) for s, n in zip(seqs, lens, strict=True)],
        copy_pairs=[(1, 2)],
        num_scheduled_tokens=sum(lens),
        block_tables=[[i] for i in range(5)],
    )
    parts = split_microbatches(out, 2)
    assert [[it.num_new_tokens for it in p.scheduled] for p in parts] == [[30, 1], [1, 10, 20]]
    assert [p.copy_pairs for p in parts] == [[(1, 2)], []]
    assert [p.block_tables for p in parts] == [[[0], [1]], [[2], [3], [4]]]
    assert [p.num_scheduled_tokens for p in parts] == [31, 31]


def _worker_children() -> list[int]:
    """Pids of this process's children that run a pagedllm worker."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"pagedllm.worker.mp_worker" in cmd:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_a_rank_that_cannot_load_the_model_fails_startup_with_its_error_and_no_process(tmp_path) -> None:
    model = make_tiny_model("llama", tmp_path / "odd", seed=1, intermediate_size=129)  # not splittable in 2
    with pytest.raises(ModelLoadError, match="not divisible by the tensor-parallel size 2"):
        make_core(model, 2)
    assert _worker_children() == []


def test_parallel_flags_are_validated() -> None:
    with pytest.raises(ConfigError, match="together are not supported"):
        make_core(None, 2, pp=2)
    with pytest.raises(ConfigError, match="'uni' runs one rank"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="uni").create_engine_config()
    with pytest.raises(ConfigError, match="unknown"):
        EngineArgs(distributed_executor_backend="threads").create_engine_config()
    config = EngineArgs(tensor_parallel_size=2, pipeline_parallel_size=2).create_engine_config()
    assert config.parallel.world_size == 4 and config.parallel.executor_backend == "mp"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2", "mistral"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_ranks_match_world_size_1_for_each_architecture(tiny_dirs, arch, tp, pp) -> None:
    model = tiny_dirs(arch)
    reqs = mixed_requests(256)
    expected = run(make_core(model, 1, **MIXED), reqs)
    core = make_core(model, tp, pp, **MIXED)
    try:
        got = run(core, reqs)
    finally:
        core.shutdown()
    assert got == expected


@pytest.mark.slow
def test_two_ranks_match_world_size_1_for_the_default_model() -> None:
    # SmolLM2-135M: TP 2 splits 9 heads over 3 KV heads 6 + 3 by whole KV groups; PP 2 its 30 layers 15 + 15.
    kw = dict(MIXED, enforce_eager=True, max_model_len=512)
    reqs = mixed_requests(49152)
    expected = run(make_core(None, 1, **kw), reqs)
    for tp, pp in ((2, 1), (1, 2)):
        core = make_core(None, tp, pp, **kw)
        try:
            assert run(core, reqs) == expected, (tp, pp)
            stats = core.stats()
        finally:
            core.shutdown()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
