"""--kv-cache-dtype: the model's layers ask their attention backend for that cache type, and a backend
that keeps only the model's dtype refuses it by name at load, before any memory is allocated."""

from __future__ import annotations

import pytest
import torch
from pagedllm.config import ModelConfig
from pagedllm.errors import ConfigError
from pagedllm.model.loader import load_model
from pagedllm.model.testing import ReferencePlatform, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny"))


def test_auto_keeps_the_model_dtype(tiny: str) -> None:
    loaded = load_model(ModelConfig(model=tiny, dtype="float32"), ReferencePlatform(), 4)
    spec = next(iter(loaded.model.attention_layers())).spec
    assert spec.kv_cache_dtype is None and spec.cache_dtype == torch.float32


def test_a_cache_dtype_the_backend_does_not_keep_is_refused_by_name(tiny: str) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype bfloat16: the reference attention backend keeps a float32") as info:
        load_model(ModelConfig(model=tiny, dtype="float32"), ReferencePlatform(), 4, kv_cache_dtype="bfloat16")
    assert info.value.param == "kv_cache_dtype"


def test_naming_the_model_dtype_is_the_same_as_auto(tiny: str) -> None:
    loaded = load_model(ModelConfig(model=tiny, dtype="float32"), ReferencePlatform(), 4, kv_cache_dtype="float32")
    assert next(iter(loaded.model.attention_layers())).spec.cache_dtype == torch.float32
