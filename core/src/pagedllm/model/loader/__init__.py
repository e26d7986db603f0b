"""Loading a model (weights into the model graph) and its tokenizer from an HF directory or a GGUF file."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedllm.config import ModelConfig, parse_dtype
from pagedllm.errors import ConfigError, ModelLoadError
from pagedllm.model.loader.heap import return_freed_heap
from pagedllm.model.loader.source import ModelSource, resolve_source
from pagedllm.model.loader.tokenizer import (
    TokenizerInfo,
    effective_max_model_len,
    model_max_len,
    tokenizer_info_from_gguf,
    tokenizer_info_from_hf,
)

# torch and the model graph are imported where a model is built: the API server's process imports
# this package (hub names, the tokenizer) and must not load torch (~200 MiB of RSS).
if TYPE_CHECKING:
    import torch

    from pagedllm.model.loader.gguf_model import GGUFCheckpoint
    from pagedllm.platforms.platform import Platform

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer_info: TokenizerInfo
    hf_config: Any
    dtype: torch.dtype


def _hf_config(path: str) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read config.json in {path}: {e}") from None


def _open(model_config: ModelConfig) -> tuple[ModelSource, Any, GGUFCheckpoint | None]:
    source = resolve_source(model_config.model)
    if source.kind == "gguf":
        from pagedllm.model.loader.gguf_model import GGUFCheckpoint

        ckpt = GGUFCheckpoint(source.path)
        return source, ckpt.hf_config(), ckpt
    return source, _hf_config(source.path), None


def load_tokenizer(model_config: ModelConfig) -> TokenizerInfo:
    """The tokenizer, chat template, EOS ids and context length; reads no weights."""
    source, hf_config, ckpt = _open(model_config)
    if ckpt is not None:
        return tokenizer_info_from_gguf(source, model_config, ckpt, hf_config)
    return tokenizer_info_from_hf(source, model_config, hf_config)


def _resolve_dtype(model_config: ModelConfig, platform: Platform) -> torch.dtype:
    dtype = parse_dtype(model_config.dtype)
    return dtype if dtype is not None else platform.default_dtype()


@contextmanager
def _build_defaults(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside get this device and dtype (restored afterwards)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Loading is elementwise work on sub-100 MB tensors: one intra-op thread per tensor, parallelism
    across tensors instead. OpenMP teams on a busy host spin at every op (measured: 2.6 s vs 25-46 s
    for the default model on a loaded 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_workers() -> int:
    """Threads that dequantize GGUF tensors ahead of the copy into the model."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def _progress(weights: Iterable[tuple[str, torch.Tensor]], total: int | None, desc: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    disable = os.environ.get("PAGEDLLM_NO_PROGRESS") == "1"
    return tqdm(weights, total=total, desc=desc, unit="tensor", disable=disable, leave=False)


def load_model(
    model_config: ModelConfig,
    platform: Platform,
    block_size: int,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    kv_cache_dtype: str = "auto",
) -> LoadedModel:
    """Build the model graph on the platform's device and fill it from the checkpoint.

    Also fills ``model_config.hf_config``, ``architecture``, ``torch_dtype`` and ``max_model_len``
    (the effective one: the user's, bounded by the model's).
    """
    import torch

    from pagedllm.model.layers.parallel_state import TensorParallelGroup, set_tp_group
    from pagedllm.model.layers.pipeline import PipelineStage, set_pp_stage
    from pagedllm.model.models import ModelBuildContext, resolve_model_class

    start = time.perf_counter()
    source, hf_config, ckpt = _open(model_config)
    if ckpt is not None:
        tokenizer_info = tokenizer_info_from_gguf(source, model_config, ckpt, hf_config)
    else:
        tokenizer_info = tokenizer_info_from_hf(source, model_config, hf_config)
    max_model_len = effective_max_model_len(model_config.max_model_len, model_max_len(hf_config))
    architecture, model_cls = resolve_model_class(
        getattr(hf_config, "architectures", None), getattr(hf_config, "model_type", None)
    )
    dtype = _resolve_dtype(model_config, platform)

    tp = TensorParallelGroup(tp_rank, tp_size, platform.communicator() if tp_size > 1 else None)
    set_tp_group(tp)
    pp = PipelineStage(pp_rank, pp_size)
    if pp_size > 1:  # stages are whole tensor-parallel groups: global rank = stage * tp_size + tp_rank
        pp.communicator = platform.communicator()
        pp.prev_rank, pp.next_rank = (pp_rank - 1) * tp_size + tp_rank, (pp_rank + 1) * tp_size + tp_rank
    set_pp_stage(pp)
    build = ModelBuildContext(
        hf_config=hf_config,
        platform=platform,
        block_size=block_size,
        dtype=dtype,
        max_model_len=max_model_len,
        tp=tp,
        pp=pp,
        rope_freq_factors=ckpt.rope_freq_factors() if ckpt is not None else None,
        kv_cache_dtype=parse_dtype(kv_cache_dtype),  # "auto": None, the model's dtype
    )
    device = platform.device()
    try:
        with _build_defaults(device, dtype):
            model = model_cls(build)
    except ConfigError:  # a setting the platform refuses (e.g. --kv-cache-dtype): the user's to change
        raise
    except ValueError as e:  # e.g. an unsupported rope_type or activation in the config
        raise ModelLoadError(f"cannot build {architecture} from {source.path}: {e}") from None
    model.eval()

    kept = None
    if ckpt is not None and model_config.quantized_weights == "blocks":
        from pagedllm.model.loader.packed import keep_blocks

        with torch.no_grad():
            kept = keep_blocks(model, ckpt, dtype)
    if ckpt is not None:
        weights: Any = ckpt.weights(num_workers=_load_workers(), skip=kept.gguf_names if kept else ())
        total: int | None = len(ckpt.tensor_names()) - (len(kept.gguf_names) if kept else 0)
        where = lambda: ckpt.path  # noqa: E731
    else:
        from pagedllm.model.loader.safetensors_weights import SafetensorsWeights

        weights = SafetensorsWeights(source.path)
        total = len(weights)  # reads only the file headers
        where = lambda: weights.current_file  # noqa: E731
    try:
        with torch.no_grad(), _intra_op_threads(1):
            model.load_weights(_progress(weights, total, f"Loading {tokenizer_info.model_name}"))
    except ModelLoadError as e:
        if e.message.startswith("tensor ") and where():
            raise ModelLoadError(f"{e.message} (in {where()})") from None
        raise

    if kept is not None:
        from pagedllm.model.loader.packed import log_kept

        log_kept(kept, model)

    return_freed_heap()
    model_config.hf_config = hf_config
    model_config.architecture = architecture
    model_config.torch_dtype = dtype
    model_config.max_model_len = max_model_len
    logger.info(
        "loaded %s (%s, %s) in %.1fs",
        tokenizer_info.model_name,
        architecture,
        dtype,
        time.perf_counter() - start,
    )
    return LoadedModel(model=model, tokenizer_info=tokenizer_info, hf_config=hf_config, dtype=dtype)


__all__ = ["LoadedModel", "TokenizerInfo", "load_model", "load_tokenizer"]
