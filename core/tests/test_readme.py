"""The README's first commands work for a new user: the curl example asks for sensible sampling, the
packages are not shown as if they were on PyPI, and the CPU build of torch is one command away."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_chat_curl_example_sets_temperature_and_max_tokens():
    bodies = re.findall(r"curl http://127\.0\.0\.1:8000/v1/chat/completions .*?-d '(\{.*?\})'", README, re.S)
    assert bodies, "the README has no chat curl example"
    for body in bodies:
        request = json.loads(body)
        assert request["temperature"] <= 0.5 and 0 < request["max_tokens"] <= 512, request


def test_no_pip_install_from_pypi_of_unpublished_packages():
    for line in README.splitlines():
        if "--find-links" not in line:
            assert not re.search(r"pip install '?(pagedllm|pagedllm-\w+)(\s|$|`|'|\[)", line), line
    assert "pip wheel" in README


def test_cpu_build_of_torch_is_documented():
    assert "--index-url https://download.pytorch.org/whl/cpu" in README
