"""Discovery and selection of platforms from installed plugins (pluggy over entry points)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from pagedllm.errors import PlatformError, PluginVersionError
from pagedllm.platforms.hookspecs import PROJECT, PagedLLMHookSpecs
from pagedllm.platforms.platform import Platform, PlatformCandidate, env_platform_override
from pagedllm.plugin_version import PLUGIN_API_VERSION

ENTRY_POINT_GROUP = "pagedllm"


@dataclass(slots=True)
class PluginInfo:
    """One installed plugin, as discovery saw it."""

    name: str
    distribution: str
    version: str
    api_version: tuple[int, int] | None = None
    candidate: PlatformCandidate | None = None
    error: str | None = None  # load, version or detection failure, verbatim
    module: ModuleType | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.error is None and self.candidate is not None and self.candidate.available

    @property
    def reason(self) -> str:
        if self.error is not None:
            return self.error
        if self.candidate is None:
            return "plugin returned no candidate"
        return self.candidate.reason or ("available" if self.candidate.available else "declined")

    @property
    def priority(self) -> int:
        return self.candidate.priority if self.candidate else 0


@dataclass(slots=True)
class Selection:
    platform: Platform
    plugin: PluginInfo
    why: str
    plugins: list[PluginInfo]


def _check_api_version(module: ModuleType, ep_name: str) -> tuple[int, int]:
    declared = getattr(module, "PLUGIN_API_VERSION", None)
    if declared is None:
        raise PluginVersionError(
            f"plugin {ep_name!r} does not declare PLUGIN_API_VERSION; pagedllm's plugin API is "
            f"{PLUGIN_API_VERSION[0]}.{PLUGIN_API_VERSION[1]}"
        )
    major, minor = int(declared[0]), int(declared[1])
    if major != PLUGIN_API_VERSION[0]:
        raise PluginVersionError(
            f"plugin {ep_name!r} was written for plugin API {major}.{minor}, but this pagedllm "
            f"provides plugin API {PLUGIN_API_VERSION[0]}.{PLUGIN_API_VERSION[1]}; install a "
            f"version of the plugin built for API {PLUGIN_API_VERSION[0]}.x"
        )
    return major, minor


def discover_plugins() -> list[PluginInfo]:
    """Load every ``pagedllm`` entry point and ask it, cheaply, whether its hardware is here."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PagedLLMHookSpecs)
    infos: list[PluginInfo] = []
    seen: set[str] = set()
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
        )
        infos.append(info)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin is reported, never silently skipped
            info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
            continue
        info.module = module
        try:
            info.api_version = _check_api_version(module, ep.name)
            pm.register(module, name=ep.name)
        except (PluginVersionError, ValueError) as exc:
            info.error = str(exc)
            continue
        except pluggy.PluginValidationError as exc:
            info.error = f"invalid hook implementation: {exc}"
            continue
        try:
            others = [p for p in pm.get_plugins() if p is not module]
            caller = pm.subset_hook_caller("pagedllm_platform", remove_plugins=others)
            candidate = caller()
        except Exception as exc:
            info.error = f"detection raised {type(exc).__name__}: {exc}"
            continue
        if not isinstance(candidate, PlatformCandidate):
            info.error = f"pagedllm_platform() returned {type(candidate).__name__}, not a PlatformCandidate"
            continue
        info.candidate = candidate
    return infos


def _load_class(qualname: str) -> type[Platform]:
    module_name, _, attr = qualname.replace(":", ".").rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PlatformError(f"{qualname} is not a pagedllm.plugin.Platform subclass")
    return cls


def format_plugin_table(plugins: list[PluginInfo], selected: str | None = None) -> str:
    rows = [("plugin", "distribution", "version", "available", "priority", "reason", "selected")]
    for p in plugins:
        rows.append(
            (
                p.name,
                p.distribution,
                p.version,
                "yes" if p.available else "no",
                str(p.priority) if p.candidate else "-",
                p.reason.replace("\n", " ")[:160],
                "*" if p.name == selected else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def select_platform(name: str | None = None, plugins: list[PluginInfo] | None = None) -> Selection:
    """``name`` (or PAGEDLLM_PLATFORM) wins; else the available candidate of highest priority."""
    plugins = discover_plugins() if plugins is None else plugins
    requested = name or env_platform_override()
    if not plugins:
        raise PlatformError(
            "no pagedllm platform plugin is installed; install one, e.g. `pip install pagedllm-cpu`"
        )
    table = format_plugin_table(plugins)
    if requested is not None:
        match = [p for p in plugins if p.name == requested]
        if not match:
            raise PlatformError(
                f"platform {requested!r} was requested but no such plugin is installed.\n{table}"
            )
        chosen = match[0]
        if not chosen.available:
            raise PlatformError(
                f"platform {requested!r} was requested but is not usable here: {chosen.reason}\n{table}"
            )
        how = "--platform" if name else "PAGEDLLM_PLATFORM"
        why = f"{requested} requested by {how}"
    else:
        available = [p for p in plugins if p.available]
        if not available:
            raise PlatformError(f"no installed platform is available on this machine:\n{table}")
        top = max(p.priority for p in available)
        best = [p for p in available if p.priority == top]
        if len(best) > 1:
            names = ", ".join(p.name for p in best)
            raise PlatformError(
                f"platforms {names} are all available with priority {top}; choose one with "
                f"--platform or PAGEDLLM_PLATFORM\n{table}"
            )
        chosen = best[0]
        others = [p.name for p in available if p is not chosen]
        why = f"{chosen.name} has the highest priority ({top}) among available platforms"
        why += f" (also available: {', '.join(others)})" if others else ""
    assert chosen.candidate is not None and chosen.candidate.platform_class is not None
    try:
        platform = _load_class(chosen.candidate.platform_class)()
    except PlatformError:
        raise
    except Exception as exc:
        raise PlatformError(
            f"platform {chosen.name} could not be created: {type(exc).__name__}: {exc}\n"
            + traceback.format_exc(limit=3)
        ) from exc
    return Selection(platform=platform, plugin=chosen, why=why, plugins=plugins)


_CURRENT: Selection | None = None
_REGISTERED_GENERATION: int | None = None  # OPS.generation right after the current plugin registered


def set_current_platform(selection: Selection) -> None:
    global _CURRENT, _REGISTERED_GENERATION
    _CURRENT = selection
    _REGISTERED_GENERATION = None  # the caller registered (or chose not to); keep its ops as they are


def current_selection(name: str | None = None) -> Selection:
    """The process-wide selected platform, selecting (and registering its plugin) on first use.

    If the ops registry was reset since the plugin registered (a test, an embedding application),
    the plugin registers again, so a new engine never runs silently on the native ops.
    """
    global _CURRENT, _REGISTERED_GENERATION
    from pagedllm.ops.registry import OPS

    if _CURRENT is None or (name is not None and _CURRENT.plugin.name != name):
        selection = select_platform(name)
        register_plugin(selection)
        _CURRENT = selection
        _REGISTERED_GENERATION = OPS.generation
    elif _REGISTERED_GENERATION is not None and OPS.generation != _REGISTERED_GENERATION:
        register_plugin(_CURRENT)
        _REGISTERED_GENERATION = OPS.generation
    return _CURRENT


def current_platform(name: str | None = None) -> Platform:
    return current_selection(name).platform


def register_plugin(selection: Selection) -> Any:
    """Run the selected plugin's ``pagedllm_register`` hook against the core's registry."""
    from pagedllm.plugin_registry import REGISTRY

    REGISTRY.reset()
    module = selection.plugin.module
    hook = getattr(module, "pagedllm_register", None)
    if hook is not None:
        hook(registry=REGISTRY)
    return REGISTRY
