"""Weights of an HF directory: safetensors files (single or sharded with an index), read lazily tensor by tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from pagedllm.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files, in the order the index lists them."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise ModelLoadError(f"{INDEX_FILE} in {directory} names missing files: {', '.join(missing)}")
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(directory, f) for f in found]
    raise ModelLoadError(
        f"no safetensors weights in {directory} (only .safetensors checkpoints are supported)"
    )


class SafetensorsWeights:
    """Iterates (name, tensor) over all files; ``current_file`` says where the last tensor came from."""

    def __init__(self, directory: str) -> None:
        self.files = safetensors_files(directory)
        self.current_file: str | None = None
        self._counts: list[int] | None = None

    def __len__(self) -> int:
        from safetensors import safe_open

        if self._counts is None:
            self._counts = []
            for path in self.files:
                with safe_open(path, framework="pt") as f:
                    self._counts.append(len(list(f.keys())))
        return sum(self._counts)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        for path in self.files:
            self.current_file = path
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except SafetensorError as e:
                raise ModelLoadError(f"cannot read {path}: {e}") from None
