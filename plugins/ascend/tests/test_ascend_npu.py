"""torch_npu is imported only by the platform, with actionable errors; torch/torch_npu pairing is checked."""

from __future__ import annotations

import sys

import pytest
from pagedllm.plugin import PlatformError
from pagedllm_ascend import npu


def test_torch_npu_import_failure_names_cann(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "torch_npu"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libhccl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(PlatformError, match="libhccl.so.*set_env.sh"):
        npu.import_torch_npu()


@pytest.mark.parametrize(("torch_version", "npu_version", "ok"), [
    ("2.13.0+cpu", "2.13.0", True), ("2.13.0", "2.13.0.post1", True), ("2.13.0", "2.12.0", False)])
def test_torch_npu_release_must_match_torch_major_minor(torch_version, npu_version, ok) -> None:
    assert npu.paired(torch_version, npu_version) is ok


def test_autoload_setting(monkeypatch) -> None:
    monkeypatch.delenv(npu.AUTOLOAD_VAR, raising=False)
    assert npu.autoload_enabled()
    monkeypatch.setenv(npu.AUTOLOAD_VAR, "0")
    assert not npu.autoload_enabled()
