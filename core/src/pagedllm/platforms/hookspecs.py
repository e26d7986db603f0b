"""pluggy hook specifications for the ``pagedllm`` entry-point group."""

from __future__ import annotations

import pluggy

PROJECT = "pagedllm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PagedLLMHookSpecs:
    @hookspec(firstresult=True)
    def pagedllm_platform(self):  # type: ignore[no-untyped-def]
        """Return a PlatformCandidate: the platform class if this machine has the hardware,
        else None as platform_class with the reason. Must be cheap: no heavy vendor imports."""

    @hookspec
    def pagedllm_register(self, registry):  # type: ignore[no-untyped-def]
        """Register op overrides (registry.override_op), attention backends and model classes.
        Called only on the plugin whose platform was selected."""
