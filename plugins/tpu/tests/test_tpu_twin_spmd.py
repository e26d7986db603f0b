"""Tensor parallel 2 through SPMD sharding annotations on two XLA:CPU devices: the greedy tokens of tensor parallel 1.

SPMD is process-wide and the device count is fixed when torch-xla's runtime starts, so the
tensor-parallel run is a subprocess with ``CPU_NUM_DEVICES=2``; the reference runs in this one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla (tox -e xla)")

# qwen2: QKV bias and an untied LM head; a vocabulary of 259 and 4 heads split over 2 devices.
ENGINE = dict(dtype="float32", max_num_seqs=8, max_model_len=128, max_num_batched_tokens=32)
# Mixed lengths: the 45-token prompt is prefilled in chunks of 32 tokens beside decoding rows.
PROMPTS = [[5, 17, 42, 99, 3], [7, 8] * 20 + [9, 10, 11, 12, 13], [11, 12, 13], [200], [31, 41, 59, 26, 53, 58, 97]]
MAX_TOKENS = 24

RUN = r"""
import json, sys
import torch_xla.distributed.spmd as xs
from pagedllm.entrypoints.llm import LLM
from pagedllm.kernels.xla import spmd
from pagedllm.kernels.xla.compile_watch import compile_count
from pagedllm.sample.sampling_params import SamplingParams

path, engine, prompts, max_tokens = json.loads(sys.argv[1])
llm = LLM(path, platform="tpu", tensor_parallel_size=2, **engine)
runner = llm.llm_engine.engine_core.executor.runner
ready = compile_count()
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
qkv = runner.model.model.layers[0].self_attn.qkv_proj.weight
print("RESULT " + json.dumps({
    "tokens": tokens,
    "compiled_after_warm_up": compile_count() - ready,
    "executor": type(llm.llm_engine.engine_core.executor).__name__,
    "describe": runner.platform.describe()["tensor parallel"],
    "qkv_sharding": spmd.sharding_of(qkv),
    "qkv_shards": [list(s.data.shape) for s in xs.wrap_if_sharded(qkv).local_shards],
    "kv_cache_sharding": spmd.sharding_of(runner.kv_caches[0]),
}))
"""


def test_tensor_parallel_2_through_spmd_gives_the_greedy_tokens_of_tensor_parallel_1(xla_twin: None, tmp_path) -> None:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.model.testing import make_tiny_model
    from pagedllm.sample.sampling_params import SamplingParams

    path = make_tiny_model("qwen2", tmp_path / "tiny")
    llm = LLM(path, platform="tpu", **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    # XLA's dump of the partitioned programs shows the collectives GSPMD inserted.
    dump = tmp_path / "hlo"
    env = dict(os.environ, PAGEDLLM_XLA_CPU="1", PJRT_DEVICE="CPU", CPU_NUM_DEVICES="2",
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    args = json.dumps([path, ENGINE, PROMPTS, MAX_TOKENS])
    proc = subprocess.run([sys.executable, "-c", RUN, args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    print(f"tp 2 (SPMD, 2 XLA:CPU devices): {got['describe']}; qkv {got['qkv_sharding']} shards {got['qkv_shards']}; "
          f"KV cache {got['kv_cache_sharding']}; {got['compiled_after_warm_up']} graphs compiled after warm-up")
    # the most all-reduces in one compiled program: at least one per row-parallel layer (o_proj, down_proj)
    all_reduces = max(f.read_text().count("all-reduce(") for f in dump.glob("*after_optimizations.txt"))
    print(f"partitioned graphs: up to {all_reduces} all-reduces in one")
    assert all_reduces >= 2 * 2
    assert got["executor"] == "UniProcExecutor"  # one process: the partitioner, not ranks, splits the work
    # qkv_proj [q 64 + k 32 + v 32, hidden 64] split by output rows over the two devices
    assert got["qkv_sharding"].startswith("{devices=[2,1]") and got["qkv_shards"] == [[64, 64], [64, 64]]
    assert got["kv_cache_sharding"].startswith("{devices=[1,1,2,1]")  # by KV head, still after serving
    assert got["compiled_after_warm_up"] == 0
    assert got["tokens"] == expected


def test_tensor_parallel_refuses_a_process_per_rank_executor(xla_twin: None, tmp_path) -> None:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.errors import ConfigError

    with pytest.raises(ConfigError, match="SPMD in one process"):
        LLM(str(tmp_path), platform="tpu", tensor_parallel_size=2, distributed_executor_backend="mp", **ENGINE)
