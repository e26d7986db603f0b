"""Platform contract group: identity, device queries, memory budget, seeding, config rules, lazy imports."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from pagedllm.config import CacheConfig, ModelConfig, parse_dtype
from pagedllm.errors import ConfigError
from pagedllm.plugin import PLUGIN_API_VERSION, AttentionBackend, Communicator, EngineConfig, Platform

from pagedllm_conformance.ops_cases import argmax_edge_rows

# Vendor libraries that detection must never import (DESIGN.md §2: vendor imports are lazy).
VENDOR_MODULES = (
    "triton",
    "torch_xla",
    "torch_npu",
    "torch_neuronx",
    "neuronxcc",
    "intel_extension_for_pytorch",
    "oneccl_bindings_for_pytorch",
    "habana_frameworks",
    "torch_mlu",
    "jax",
    "tensorflow",
    "libtpu",
)


def _config(**cache: object) -> EngineConfig:
    return EngineConfig(cache=CacheConfig(**cache))


def test_identity_fields_are_declared(conformance_target, conformance) -> None:
    """The platform is a pagedllm Platform whose name is the plugin's entry-point name, with a torch device
    type, a distributed backend, an integer priority, a non-empty tuple of floating dtypes and a statement of
    how it was verified; the plugin declares the core's plugin API major version."""
    p, plugin = conformance_target.platform, conformance_target.selection.plugin
    conformance.assert_equal_values(isinstance(p, Platform), True, what="platform is a pagedllm.plugin.Platform")
    conformance.assert_equal_values(p.name, plugin.name, what="platform.name vs its entry-point name")
    torch.device(p.device_type)  # raises for a device type torch does not know
    conformance.assert_equal_values(isinstance(p.dist_backend, str) and bool(p.dist_backend), True,
                                    what=f"dist_backend {p.dist_backend!r} is a non-empty string")
    conformance.assert_equal_values(isinstance(p.priority, int), True, what=f"priority {p.priority!r} is an int")
    dtypes = tuple(p.supported_dtypes)
    conformance.assert_equal_values(bool(dtypes) and all(isinstance(d, torch.dtype) and d.is_floating_point
                                                         for d in dtypes), True,
                                    what=f"supported_dtypes {dtypes} is a non-empty tuple of floating dtypes")
    conformance.assert_equal_values(p.default_dtype() in dtypes, True, what="default_dtype() is supported")
    conformance.assert_equal_values(conformance_target.verified_on not in ("", "unverified"), True,
                                    what="verified_on says how the platform was exercised")
    conformance.assert_equal_values(plugin.api_version is not None and plugin.api_version[0] == PLUGIN_API_VERSION[0],
                                    True, what=f"plugin API {plugin.api_version} vs core {PLUGIN_API_VERSION}")
    conformance.note(name=p.name, device_type=p.device_type, dist_backend=p.dist_backend, priority=p.priority,
                     verified_on=conformance_target.verified_on)


def test_device_queries_are_consistent(conformance_target, conformance) -> None:
    """device_count >= 1; every device has a name, total memory > 0 and 0 < free <= total; device(i) has the
    platform's device type; a tensor round-trips through device 0; set_device and synchronize work."""
    p = conformance_target.platform
    count = p.device_count()
    conformance.assert_equal_values(isinstance(count, int) and count >= 1, True, what=f"device_count() = {count!r}")
    for i in range(min(count, 8)):
        name, total, free = p.device_name(i), p.total_memory(i), p.free_memory(i)
        conformance.assert_equal_values(isinstance(name, str) and bool(name), True, what=f"device_name({i}) = {name!r}")
        conformance.assert_equal_values(isinstance(total, int) and total > 0, True, what=f"total_memory({i}) = {total!r}")
        conformance.assert_equal_values(isinstance(free, int) and 0 < free <= total, True,
                                        what=f"free_memory({i}) = {free!r} within (0, total {total}]")
        conformance.assert_equal_values(p.device(i).type, torch.device(p.device_type).type,
                                        what=f"device({i}).type")
    p.set_device(0)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    y = (x.to(p.device(0)) * 2).to("cpu")
    p.synchronize()
    conformance.assert_exact(y, x * 2, dtype=torch.float32, what="tensor round trip through device 0")
    conformance.note(device_count=count, device_name=p.device_name(0), total_memory=p.total_memory(0))


def test_greedy_argmax_picks_torch_max_indices(conformance_target, conformance) -> None:
    """Platform.greedy_argmax (the sampler's greedy rows) on device logits equals torch.max(x, -1).indices
    on the host: the first maximum, the first NaN, -0.0 tied with +0.0, all -inf, a row of 49152."""
    p = conformance_target.platform
    g = torch.Generator().manual_seed(11)
    for x in (argmax_edge_rows(g), torch.randn(4, 49152, generator=g)):
        got = p.greedy_argmax(x.to(p.device(0))).to("cpu")
        p.synchronize()
        conformance.assert_equal_values(got.tolist(), torch.max(x, -1).indices.tolist(),
                                        what=f"greedy_argmax of {tuple(x.shape)} logits vs torch.max indices")


def test_kv_cache_budget_is_sane(conformance_target, conformance) -> None:
    """With no explicit budget the KV cache may take a positive amount no larger than free memory, growing
    with gpu_memory_utilization; an explicit kv_cache_memory is never exceeded."""
    p = conformance_target.platform
    low = p.kv_cache_budget(_config(gpu_memory_utilization=0.3))
    high = p.kv_cache_budget(_config(gpu_memory_utilization=0.9))
    free, total = p.free_memory(0), p.total_memory(0)
    conformance.assert_equal_values(isinstance(high, int) and 0 < high <= total, True,
                                    what=f"budget at 0.9 utilisation = {high} within (0, total {total}]")
    conformance.assert_equal_values(0 < low <= high, True, what=f"budget at 0.3 ({low}) <= budget at 0.9 ({high})")
    conformance.assert_equal_values(high <= max(free, p.free_memory(0)) * 1.05, True,
                                    what=f"budget {high} fits in free memory {free}")
    explicit = 64 * 2**20
    got = p.kv_cache_budget(_config(kv_cache_memory=explicit))
    conformance.assert_equal_values(0 < got <= explicit, True, what=f"budget with kv_cache_memory={explicit}: {got}")
    conformance.note(budget_at_0_9=high, budget_at_0_3=low, free_memory=free, explicit_budget=got)


def test_seeding_is_reproducible(conformance_target, conformance) -> None:
    """seed_everything(s) makes the device's random stream repeat; another seed changes it; two generators from
    make_generator with one seed draw identical numbers on the platform's device (on the host where the
    platform declares samples_seeded_rows_on_host)."""
    p = conformance_target.platform
    device = p.device(0)

    def draw() -> torch.Tensor:
        return torch.randn(64, device=device).cpu()

    p.seed_everything(1234)
    a = draw()
    p.seed_everything(1234)
    b = draw()
    p.seed_everything(4321)
    c = draw()
    conformance.assert_exact(a, b, dtype=torch.float32, what="draws after seed_everything(1234) twice")
    conformance.assert_equal_values(torch.equal(a, c), False, what="draws under different seeds differ")
    g1, g2 = p.make_generator(7), p.make_generator(7)
    # Generators live where seeded rows are sampled: the device, or the host for platforms without
    # device generators (torch-xla), which declare it.
    on_host = getattr(p, "samples_seeded_rows_on_host", False)
    where = torch.device("cpu") if on_host else device
    conformance.assert_equal_values(torch.device(g1.device).type, where.type, what="make_generator device type")
    conformance.note(seeded_rows_sampled_on="host" if on_host else device.type)
    x = torch.rand(32, generator=g1, device=where).cpu()
    y = torch.rand(32, generator=g2, device=where).cpu()
    conformance.assert_exact(x, y, dtype=torch.float32, what="two generators seeded 7")


def test_check_and_update_config_is_idempotent(conformance_target, conformance) -> None:
    """check_and_update_config resolves dtype 'auto' to a supported dtype, a second call changes nothing, and
    an unsupported dtype is refused with a ConfigError."""
    p = conformance_target.platform
    config = EngineConfig(model=ModelConfig(dtype="auto"))
    p.check_and_update_config(config)
    resolved = parse_dtype(config.model.dtype)
    conformance.assert_equal_values(resolved in p.supported_dtypes, True, what=f"'auto' resolved to {resolved}")
    once = copy.deepcopy(dataclasses.asdict(config))
    p.check_and_update_config(config)
    conformance.assert_equal_values(dataclasses.asdict(config), once, what="config after a second call")
    unsupported = [d for d in (torch.float32, torch.float16, torch.bfloat16) if d not in p.supported_dtypes]
    for dtype in unsupported:
        with pytest.raises(ConfigError):
            p.check_and_update_config(EngineConfig(model=ModelConfig(dtype=dtype)))
    conformance.note(auto_dtype=str(resolved), refused=[str(d) for d in unsupported])


def test_factories_return_the_contract_types(conformance_target, conformance) -> None:
    """attention_backend(spec) returns an AttentionBackend keeping the spec; communicator() returns a
    Communicator that is the identity with one rank; describe() is a JSON-serialisable dict."""
    from pagedllm.plugin import AttentionSpec

    p = conformance_target.platform
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.125, dtype=p.default_dtype(),
                         block_size=16)
    backend = p.attention_backend(spec)
    conformance.assert_equal_values(isinstance(backend, AttentionBackend), True, what="attention_backend type")
    conformance.assert_equal_values(backend.spec, spec, what="backend.spec")
    comm = p.communicator(None)
    conformance.assert_equal_values(isinstance(comm, Communicator), True, what="communicator type")
    x = torch.arange(8, dtype=torch.float32, device=p.device(0))
    conformance.assert_exact(comm.all_reduce(x.clone()).cpu(), x.cpu(), dtype=torch.float32,
                             what="one-rank all_reduce")
    facts = p.describe()
    conformance.assert_equal_values(isinstance(facts, dict), True, what="describe() returns a dict")
    json.dumps(facts, default=str)
    conformance.note(backend=f"{type(backend).__module__}.{type(backend).__qualname__}", describe=facts)


_DETECT = textwrap.dedent(
    """
    import json, sys
    blocked = set(json.loads(sys.argv[2]))
    if blocked:
        import importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ImportError(f"{name} is not installed (blocked by the conformance suite)")
                return None
        sys.meta_path.insert(0, Block())
    import pagedllm.plugin
    from pagedllm.platforms.discovery import discover_plugins
    before = set(sys.modules)
    infos = {p.name: p for p in discover_plugins()}
    info = infos.get(sys.argv[1])
    print(json.dumps({
        "new_modules": sorted(set(sys.modules) - before),
        "found": info is not None,
        "error": info.error if info else None,
        "available": info.available if info else None,
        "reason": info.reason if info else None,
    }))
    """
)


def _spawn_detection(name: str, blocked: tuple[str, ...]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _DETECT, name, json.dumps(list(blocked))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _collect(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("detection subprocess did not finish in 300 s") from None
    if proc.returncode != 0:
        raise AssertionError(f"detection subprocess failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def detection(conformance_target) -> dict[str, dict]:
    """Discovery in two fresh interpreters, run side by side: as installed, and with vendor libraries blocked."""
    procs = {
        "plain": _spawn_detection(conformance_target.name, ()),
        "blocked": _spawn_detection(conformance_target.name, VENDOR_MODULES),
    }
    return {key: _collect(proc) for key, proc in procs.items()}


def test_detection_imports_no_vendor_library(conformance_target, detection, conformance) -> None:
    """Discovering the installed plugins (in a fresh interpreter) imports none of the heavy vendor libraries
    (triton, torch_xla, torch_npu, torch_neuronx, IPEX, ...)."""
    result = detection["plain"]
    conformance.assert_equal_values(result["found"], True, what="plugin found by discovery in a fresh interpreter")
    heavy = sorted({m.split(".")[0] for m in result["new_modules"]} & set(VENDOR_MODULES))
    conformance.assert_equal_values(heavy, [], what="vendor modules imported by detection")
    conformance.note(modules_imported_by_detection=len(result["new_modules"]), checked=list(VENDOR_MODULES))


def test_plugin_imports_without_vendor_libraries(conformance_target, detection, conformance) -> None:
    """With every vendor library made unimportable, the plugin still imports and its detection answers
    (available or declining with a reason) instead of raising."""
    result = detection["blocked"]
    conformance.assert_equal_values(result["found"], True, what="plugin found with vendor libraries blocked")
    conformance.assert_equal_values(result["error"], None, what="plugin load/detection error with vendor libraries blocked")
    conformance.note(available_without_vendor_libraries=result["available"], reason=result["reason"])
