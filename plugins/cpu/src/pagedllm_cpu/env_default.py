"""A switch's value when the user left its environment variable unset, chosen per engine.

The CPU platform picks some defaults from the engine's configuration (``--dtype auto`` turns on the
faster arithmetic that keeps greedy parity, an explicit ``--dtype float32`` keeps fp32 everywhere;
CpuPlatform.check_and_update_config). The choice is written into the environment so the engine's
worker processes, started later, inherit it; a value the user set is never touched.
"""

from __future__ import annotations

import os


class EnvDefault:
    def __init__(self, name: str) -> None:
        self.name = name
        self._ours: str | None = None  # the value put in the environment, while it is still there

    def apply(self, value: str | None) -> None:
        """Set the variable to ``value`` (None: unset it) unless the user set it."""
        current = os.environ.get(self.name)
        if current is not None and current != self._ours:  # the user's
            self._ours = None
            return
        if value is not None:
            os.environ[self.name] = self._ours = value
        elif current is not None:
            del os.environ[self.name]
            self._ours = None
