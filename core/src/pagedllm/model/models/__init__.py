"""Model classes keyed by the HF ``architectures`` name; plugins may add or override entries."""

from __future__ import annotations

from pagedllm.errors import ModelLoadError
from pagedllm.model.models.base import CausalLM, ModelBuildContext
from pagedllm.model.models.gemma2 import Gemma2ForCausalLM
from pagedllm.model.models.llama import LlamaForCausalLM, MistralForCausalLM
from pagedllm.model.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
}


def supported_architectures() -> list[str]:
    from pagedllm.plugin_registry import REGISTRY

    return sorted(set(MODEL_REGISTRY) | set(REGISTRY.models))


# For configs that name no architectures: transformers model_type -> architecture.
MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


def resolve_model_class(architectures: list[str] | None, model_type: str | None = None) -> tuple[str, type]:
    """The first of the config's architectures we can build; plugin registrations win over built-ins."""
    from pagedllm.plugin_registry import REGISTRY

    if not architectures and model_type in MODEL_TYPE_ARCHITECTURES:
        architectures = [MODEL_TYPE_ARCHITECTURES[model_type]]
    for arch in architectures or []:
        if arch in REGISTRY.models:
            return arch, REGISTRY.models[arch]
        if arch in MODEL_REGISTRY:
            return arch, MODEL_REGISTRY[arch]
    names = ", ".join(architectures or []) or "none given"
    raise ModelLoadError(
        f"unsupported model architecture ({names}); supported: {', '.join(supported_architectures())}"
    )


__all__ = [
    "CausalLM",
    "MODEL_REGISTRY",
    "ModelBuildContext",
    "resolve_model_class",
    "supported_architectures",
]
