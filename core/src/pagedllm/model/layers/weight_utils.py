"""Helpers weight loaders share: shape checks whose errors the model turns into ModelLoadError."""

from __future__ import annotations

import torch


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape a parameter expects; the caller names the tensor."""


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected {tuple(expected)}")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a whole (unsharded) tensor into the parameter, casting to its dtype and device."""
    check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator
