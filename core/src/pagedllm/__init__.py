"""pagedllm: an LLM inference and serving engine with a device-neutral core and plugin backends."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import pagedllm.plugin` stays cheap for a plugin's detection code.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pagedllm.sample.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
