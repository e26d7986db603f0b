"""The ops registry: one table of named ops, torch-native by default, overridable by a plugin."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from pagedllm.ops import native


class OpsRegistry:
    """Name -> implementation. Models call ``OPS.rms_norm(...)``; a plugin calls ``override``."""

    def __init__(self) -> None:
        self._defaults: dict[str, Callable[..., Any]] = dict(native.NATIVE_OPS)
        self._impls: dict[str, Callable[..., Any]] = dict(self._defaults)
        self._owners: dict[str, str] = {name: "native" for name in self._defaults}
        self.generation = 0  # bumped by reset(), so the platform's registration can tell it was undone

    def names(self) -> list[str]:
        return sorted(self._impls)

    def default(self, name: str) -> Callable[..., Any]:
        return self._defaults[name]

    def owner(self, name: str) -> str:
        return self._owners[name]

    def overrides(self) -> dict[str, str]:
        """Ops that are not native, with who registered them."""
        return {n: o for n, o in self._owners.items() if o != "native"}

    def override(self, name: str, fn: Callable[..., Any], owner: str = "plugin") -> None:
        if name not in self._defaults:
            raise KeyError(f"unknown op {name!r}; known ops: {', '.join(self.names())}")
        self._impls[name] = fn
        self._owners[name] = owner

    def reset(self) -> None:
        self._impls = dict(self._defaults)
        self._owners = {name: "native" for name in self._defaults}
        self.generation += 1

    @contextmanager
    def natives(self) -> Iterator[None]:
        """Run with the native ops only (an oracle must not use the implementation under test)."""
        impls, owners = self._impls, self._owners
        self.reset()
        try:
            yield
        finally:
            self._impls, self._owners = impls, owners

    def __getattr__(self, name: str) -> Callable[..., Any]:
        impls = self.__dict__.get("_impls", {})
        if name in impls:
            return impls[name]
        raise AttributeError(f"no op named {name!r}")


OPS = OpsRegistry()


def op(name: str) -> Callable[..., Any]:
    """The current implementation of a named op."""
    return getattr(OPS, name)
