"""Deliberately broken backends for the conformance self-test, installed as real plugins in a temporary site.

Each ``PlantedBug`` becomes its own distribution (a ``*.dist-info`` with a ``pagedllm`` entry point)
in a temporary directory that only the subprocess running ``pagedllm-conformance`` sees on its
``sys.path``: discovery finds it exactly as it finds a pip-installed plugin, and the shared
environment is never modified. To add a planted bug (e.g. a broken Triton kernel), append a
``PlantedBug`` to ``PLANTED_BUGS`` (or to a list of your own passed to ``build_site``) whose
``platform_class`` points at a Platform subclass importable from this directory.
"""

from conformance_planted.site import PlantedBug, RunResult, build_site, run_conformance

# name: entry point (and Platform.name); keyword: the -k selection the self-test runs;
# must_fail: test functions of which at least one case must fail, named in the report.
PLANTED_BUGS: list[PlantedBug] = [
    PlantedBug(
        name="planted_slot",
        platform_class="conformance_planted.cpu_bugs:SlotOffByOnePlatform",
        description="slot mapping off by one: every key/value is written one slot too far",
        keyword="attention",
        must_fail=("test_kv_cache_writes_land_in_their_slots", "test_attention_output_matches_reference"),
    ),
    PlantedBug(
        name="planted_lastblock",
        platform_class="conformance_planted.cpu_bugs:IgnoreLastBlockPlatform",
        description="attention kernel that never reads a sequence's last block",
        keyword="attention",
        must_fail=("test_attention_output_matches_reference",),
    ),
    PlantedBug(
        name="planted_gqa",
        platform_class="conformance_planted.cpu_bugs:GqaModuloPlatform",
        description="GQA head mapping h % num_kv_heads instead of h // group",
        keyword="attention",
        must_fail=("test_attention_output_matches_reference",),
    ),
    PlantedBug(
        name="planted_softcap",
        platform_class="conformance_planted.cpu_bugs:DroppedSoftCapPlatform",
        description="logit soft-cap silently dropped",
        keyword="attention",
        must_fail=("test_attention_output_matches_reference",),
    ),
    PlantedBug(
        name="planted_window",
        platform_class="conformance_planted.cpu_bugs:WindowOffByOnePlatform",
        description="sliding window one token too wide (<= instead of <)",
        keyword="attention and window",
        must_fail=("test_attention_output_matches_reference",),
    ),
    PlantedBug(
        name="planted_copy",
        platform_class="conformance_planted.cpu_bugs:CopyFirstLayerOnlyPlatform",
        description="copy_blocks copies the first layer's blocks only",
        keyword="copy_blocks",
        must_fail=("test_copy_blocks_copies_whole_blocks_exactly",),
    ),
    PlantedBug(
        name="planted_residual",
        platform_class="conformance_planted.cpu_bugs:StaleResidualPlatform",
        description="fused_add_rms_norm override returns the old residual instead of x + residual",
        keyword="ops",
        must_fail=("test_op_matches_native_default",),
        register="conformance_planted.cpu_bugs:register_stale_residual",
    ),
    PlantedBug(
        name="planted_eps",
        platform_class="conformance_planted.cpu_bugs:EpsOutsideSqrtPlatform",
        description="rms_norm override adding eps outside the square root: x / (sqrt(mean(x^2)) + eps)",
        keyword="ops",
        must_fail=("test_op_matches_native_default",),
        register="conformance_planted.cpu_bugs:register_eps_outside_sqrt",
    ),
]

# The same wrapper with no bug: proves a failure above comes from the bug, not from the harness.
SOUND_CONTROL = PlantedBug(
    name="planted_sound",
    platform_class="conformance_planted.cpu_bugs:SoundWrappedPlatform",
    description="the wrapper used by every planted bug, with no bug",
    keyword="attention",
    must_fail=(),
)

# A backend that raises SkipTest for head size 80: once undeclared (the run must fail), once with
# the exclusion declared in its manifest (the run passes and the report lists the deviation).
SKIPPY_KEYWORD = "attention and (hs80 or soft_cap)"
SKIPPY_UNDECLARED = PlantedBug(
    name="planted_skippy",
    platform_class="conformance_planted.cpu_bugs:SkippyPlatform",
    description="skips head size 80 without declaring it",
    keyword=SKIPPY_KEYWORD,
    must_fail=("test_attention_output_matches_reference", "test_kv_cache_writes_land_in_their_slots"),
)
SKIPPY_DECLARED = PlantedBug(
    name="planted_skippy_declared",
    platform_class="conformance_planted.cpu_bugs:SkippyDeclaredPlatform",
    description="skips head size 80 and declares it",
    keyword=SKIPPY_KEYWORD,
    must_fail=(),
    manifest="""
        [platform]
        verified_on = "conformance self-test"

        [[exclusions]]
        test = "test_attention.py::*-hs80-*"
        reason = "no kernel for head size 80 yet"
    """,
)

__all__ = [
    "SKIPPY_DECLARED",
    "SKIPPY_UNDECLARED","PLANTED_BUGS", "SOUND_CONTROL", "PlantedBug", "RunResult", "build_site", "run_conformance"]
