"""The conformance suite catches bugs planted in the Triton kernels, run through its own planted-plugin harness.

Each broken backend is the CUDA interpreter platform with one real kernel edited (see
triton_planted/bugs.py); the unedited control must pass the same selections.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
CONFORMANCE_TESTS = TESTS_DIR.parents[2] / "conformance" / "tests"
if not (CONFORMANCE_TESTS / "conformance_planted").is_dir():
    pytest.skip("the conformance suite's planted-bug harness is not in this checkout", allow_module_level=True)
pytest.importorskip("triton")
sys.path.insert(0, str(CONFORMANCE_TESTS))

from conformance_planted import PlantedBug, RunResult, build_site, run_conformance  # noqa: E402

OUTPUT = "test_attention_output_matches_reference"
KV = "test_kv_cache_writes_land_in_their_slots"
OPS = "test_op_matches_native_default"
REGISTER = "triton_planted.bugs:register_cuda_ops"


def planted(name: str, cls: str, description: str, keyword: str, must_fail: str, register: str = REGISTER) -> PlantedBug:
    return PlantedBug(name=name, platform_class=f"triton_planted.bugs:{cls}", description=description,
                      keyword=keyword, must_fail=(must_fail,), register=register)


TRITON_BUGS = [
    planted("planted_triton_slot", "SlotOffByOnePlatform", "KV write kernel stores every token one slot too far",
            f"{KV} and (prefill or decode)", KV),
    planted("planted_triton_lastblock", "DroppedLastBlockPlatform", "attention kernel never reads the last KV block",
            f"{OUTPUT} and (decode or long_context)", OUTPUT),
    planted("planted_triton_gqa", "GqaModuloPlatform", "attention kernel maps query head h to KV head h % num_kv_heads",
            f"{OUTPUT} and prefill", OUTPUT),
    planted("planted_triton_softcap", "DroppedSoftCapPlatform", "attention kernel drops the logit soft-cap",
            f"{OUTPUT} and soft_cap", OUTPUT),
    planted("planted_triton_window", "WindowOffByOnePlatform", "attention kernel's sliding window is one token too wide",
            f"{OUTPUT} and sliding_window_small", OUTPUT),
    planted("planted_triton_silu", "SwappedGatePlatform", "silu_and_mul kernel swaps gate and up",
            f"{OPS} and silu", OPS, register="triton_planted.bugs:register_swapped_silu"),
]
SOUND = PlantedBug(name="planted_triton_sound", platform_class="triton_planted.bugs:SoundTritonPlatform",
                   description="the same wrapper around the unedited kernels", keyword=f"{OUTPUT} and (prefill or soft_cap or sliding_window_small)",
                   must_fail=(), register=REGISTER)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, RunResult]:  # type: ignore[no-untyped-def]
    """Every planted run, three at a time: each is mostly a fresh interpreter importing torch."""
    root = tmp_path_factory.mktemp("planted-triton")
    site = build_site(root / "site", [*TRITON_BUGS, SOUND])
    env = {"PAGEDLLM_TRITON_INTERPRET": "1", "PYTHONPATH": str(TESTS_DIR)}  # harness prepends site + conformance/tests
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("PAGEDLLM_PLATFORM", raising=False)
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {
                bug.name: pool.submit(run_conformance, site, bug.name, ["--quick", "-k", bug.keyword],
                                      root / f"{bug.name}.json")
                for bug in [*TRITON_BUGS, SOUND]
            }
            return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("bug", TRITON_BUGS, ids=[b.name for b in TRITON_BUGS])
def test_conformance_catches_planted_triton_bug(runs, bug) -> None:
    run = runs[bug.name]
    assert run.returncode == 1 and run.report is not None, run.explain()
    # A numeric check failed (outcome "failed"), not a crash of the broken kernel (outcome "error").
    caught = [t for t in run.report["tests"] if t["outcome"] == "failed"
              and any(f"::{name}[" in t["nodeid"] for name in bug.must_fail)]
    assert caught, run.explain()


@pytest.mark.slow
def test_unbroken_triton_control_passes_the_same_checks(runs) -> None:
    run = runs[SOUND.name]
    assert run.returncode == 0 and run.report is not None, run.explain()
    assert run.report["platform"]["verified_on"].startswith("verified under Triton interpreter on CPU"), run.explain()
