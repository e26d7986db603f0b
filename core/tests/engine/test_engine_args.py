"""EngineArgs: CLI flags and kwargs become a validated EngineConfig."""

from __future__ import annotations

import argparse

import pytest
from pagedllm.engine.engine_args import EngineArgs, parse_memory
from pagedllm.errors import ConfigError


def parse(argv: list[str]) -> EngineArgs:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def test_cli_flags_reach_the_engine_config():
    args = parse(
        [
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "64",
            "--block-size",
            "8",
            "--no-enable-prefix-caching",
            "--kv-cache-memory",
            "1GiB",
            "--seed",
            "3",
            "--dtype",
            "float32",
            "--platform",
            "cpu",
            "--num-gpu-blocks-override",
            "40",
        ]
    )
    cfg = args.create_engine_config()
    assert cfg.model.max_model_len == 512 and cfg.model.seed == 3 and cfg.model.dtype == "float32"
    assert cfg.scheduler.max_num_seqs == 8 and cfg.scheduler.max_num_batched_tokens == 64
    assert cfg.cache.block_size == 8 and cfg.cache.enable_prefix_caching is False
    assert cfg.cache.kv_cache_memory == 1024**3 and cfg.cache.num_gpu_blocks_override == 40
    assert cfg.device.platform == "cpu"


def test_prefix_caching_is_on_by_default():
    assert parse([]).create_engine_config().cache.enable_prefix_caching is True


@pytest.mark.parametrize(
    "text,expected",
    [("4GiB", 4 * 1024**3), ("512MiB", 512 * 1024**2), ("2GB", 2 * 10**9), ("1000", 1000), (123, 123)],
)
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


def test_bad_memory_size_is_a_config_error():
    with pytest.raises(ConfigError, match="4 parsecs"):
        parse_memory("4 parsecs")


def test_unknown_kwarg_is_named():
    with pytest.raises(ConfigError, match="max_num_sequences"):
        EngineArgs.from_kwargs(max_num_sequences=3)


def test_invalid_values_are_rejected_with_a_message():
    with pytest.raises(ConfigError, match="block_size"):
        EngineArgs(block_size=0).create_engine_config()
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineArgs(max_num_seqs=0).create_engine_config()


def test_chat_template_may_be_a_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    cfg = EngineArgs(chat_template=str(path)).create_engine_config()
    assert cfg.model.chat_template == "{{ messages[0]['content'] }}"


def test_vllm_parallel_flags_reach_the_parallel_config():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["-tp", "2", "--pipeline-parallel-size", "1", "--distributed-executor-backend", "ray"])
    par = EngineArgs.from_cli_args(ns).create_engine_config().parallel
    assert (par.tensor_parallel_size, par.pipeline_parallel_size, par.executor_backend) == (2, 1, "ray")
    assert EngineArgs(pipeline_parallel_size=2).create_engine_config().parallel.executor_backend == "mp"
    with pytest.raises(SystemExit):
        parser.parse_args(["--distributed-executor-backend", "threads"])


def test_quantized_weights_defaults_to_blocks_and_dense_reaches_the_model_config():
    assert parse([]).create_engine_config().model.quantized_weights == "blocks"
    assert parse(["--quantized-weights", "dense"]).create_engine_config().model.quantized_weights == "dense"
    assert EngineArgs.from_kwargs(quantized_weights="dense").create_engine_config().model.quantized_weights == "dense"
    with pytest.raises(SystemExit):
        parse(["--quantized-weights", "fp32"])
    with pytest.raises(ConfigError, match="quantized_weights must be 'blocks' or 'dense'"):
        EngineArgs(quantized_weights="fp32").create_engine_config()


def test_kv_cache_dtype_flag_reaches_the_cache_config_and_a_bad_one_is_named():
    assert parse([]).create_engine_config().cache.kv_cache_dtype == "auto"
    assert parse(["--kv-cache-dtype", "bfloat16"]).create_engine_config().cache.kv_cache_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown kv_cache_dtype 'fp4'; use auto") as info:
        EngineArgs(kv_cache_dtype="fp4").create_engine_config()
    assert info.value.param == "kv_cache_dtype"
