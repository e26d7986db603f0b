"""`pagedllm-conformance`: run the suite against one platform, chosen through the server's discovery."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
from pagedllm.errors import PlatformError, PluginVersionError
from pagedllm.platforms.discovery import discover_plugins, format_plugin_table, select_platform

from pagedllm_conformance.manifest import ManifestError, load_plugin_manifest

SUITE_DIR = Path(__file__).resolve().parent / "suite"

EXIT_PLATFORM = 3  # the platform could not be selected
EXIT_MANIFEST = 2  # the plugin's conformance.toml is invalid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm-conformance",
        description="Run the pagedllm conformance suite against an installed platform plugin.",
        epilog="Anything after `--` is passed to pytest unchanged (e.g. `-- -x --lf`). "
               "Exit status: 0 pass, 1 fail, 2 invalid manifest, 3 platform not selectable, 4/5 pytest usage/no tests.",
    )
    parser.add_argument("--platform", default=None,
                        help="plugin entry-point name (see --list); default: what `pagedllm serve` would select")
    parser.add_argument("--report", default=None, metavar="OUT.json",
                        help="write the JSON report here and the Markdown report next to it (OUT.md)")
    parser.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                        help="only tests matching this pytest keyword expression (e.g. 'attention and decode')")
    parser.add_argument("--quick", action="store_true", help="reduced grids (minutes instead of tens of minutes)")
    parser.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                        help="only this dtype (float32, float16, bfloat16; repeatable); "
                             "default: float32 and the platform's default dtype, every supported one in a full run")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="one line per test")
    parser.add_argument("--list", action="store_true", help="list installed plugins and exit")
    return parser


def pytest_args(args: argparse.Namespace, name: str, extra: list[str]) -> list[str]:
    argv = [str(SUITE_DIR), "-c", str(SUITE_DIR / "pytest.ini"), "--rootdir", str(SUITE_DIR),
            "--conformance-platform", name]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        argv += ["-p", "pagedllm_conformance.pytest_plugin"]
    if args.quick:
        argv.append("--conformance-quick")
    if args.report:
        argv += ["--conformance-report", str(Path(args.report).resolve())]
    if args.keyword:
        argv += ["-k", args.keyword]
    for dtype in args.dtype or []:
        argv += ["--conformance-dtype", dtype]
    argv += ["-v"] * args.verbose if args.verbose else ["-q"]
    return argv + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.list:
        print(format_plugin_table(discover_plugins()))
        return 0
    # Select and read the manifest once up front, so a bad name or manifest fails in one clear line.
    try:
        selection = select_platform(args.platform)
    except (PlatformError, PluginVersionError) as exc:
        print(f"pagedllm-conformance: {exc}", file=sys.stderr)
        return EXIT_PLATFORM
    try:
        load_plugin_manifest(selection.plugin.module)
    except ManifestError as exc:
        print(f"pagedllm-conformance: invalid manifest: {exc}", file=sys.stderr)
        return EXIT_MANIFEST
    print(f"pagedllm-conformance: testing {selection.plugin.name} "
          f"({selection.plugin.distribution} {selection.plugin.version}): {selection.why}")
    return int(pytest.main(pytest_args(args, selection.plugin.name, extra)))


if __name__ == "__main__":
    raise SystemExit(main())
