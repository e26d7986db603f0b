"""Hugging Face repo ids resolve through huggingface_hub's cache, laid out here in its own format
(refs/, snapshots/<commit>/ links into blobs/), with offline mode on: nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.errors import ConfigError, ModelLoadError
from pagedllm.model.loader.hub import resolve_hub_model, split_hub_name

COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str,
                     ref: str | None = "main") -> Path:
    """Write ``files`` as huggingface_hub stores a downloaded snapshot; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from pagedllm.model.testing import make_tiny_model

    return Path(make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dir) -> Path:
    cache = tmp_path / "hub"
    files = {p.name: p for p in tiny_dir.iterdir()}
    add_to_hub_cache(cache, "org/tiny", files, COMMIT_MAIN)
    add_to_hub_cache(cache, "org/tiny", {**files, "README.md": b"v2"}, COMMIT_V2, ref="v2")
    ggufs = {"tiny-Q4_0.gguf": b"q4", "tiny-Q8_0.gguf": b"q8", "sub/tiny-Q4_K_M.gguf": b"q4km",
             "mmproj-tiny-Q8_0.gguf": b"proj", "README.md": b"readme"}
    add_to_hub_cache(cache, "org/tiny-GGUF", ggufs, COMMIT_MAIN)
    add_to_hub_cache(cache, "org/one-GGUF", {"one.Q5_K_S.gguf": b"q5"}, COMMIT_MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_names_are_told_from_local_paths(tmp_path, monkeypatch):
    assert split_hub_name("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert split_hub_name("bartowski/Llama-3.2-1B-GGUF:Q4_K_M") == ("bartowski/Llama-3.2-1B-GGUF", "Q4_K_M")
    for local in ("./org/name", "/abs/path", "~/x/y", "model.gguf", "a/b/c"):
        assert split_hub_name(local) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert split_hub_name("org/name") is None  # an existing local directory wins


def test_repo_id_resolves_to_its_cached_snapshot_and_revision_picks_another(hub_cache):
    main = resolve_hub_model("org/tiny")
    assert Path(main) == hub_cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    assert (Path(main) / "config.json").is_file()
    v2 = resolve_hub_model("org/tiny", revision="v2")
    assert Path(v2).name == COMMIT_V2 and (Path(v2) / "README.md").read_bytes() == b"v2"
    assert Path(resolve_hub_model("org/tiny", revision=COMMIT_V2)).name == COMMIT_V2


def test_gguf_in_a_repo_is_picked_by_quant_or_file_name(hub_cache):
    snap = hub_cache / "models--org--tiny-GGUF" / "snapshots" / COMMIT_MAIN
    assert resolve_hub_model("org/tiny-GGUF:Q8_0") == str(snap / "tiny-Q8_0.gguf")  # not the mmproj file
    assert resolve_hub_model("org/tiny-GGUF:q4_k_m") == str(snap / "sub" / "tiny-Q4_K_M.gguf")
    assert resolve_hub_model("org/tiny-GGUF:tiny-Q4_0.gguf") == str(snap / "tiny-Q4_0.gguf")
    assert resolve_hub_model("org/one-GGUF").endswith("one.Q5_K_S.gguf")  # the only GGUF: no quant needed
    with pytest.raises(ModelLoadError, match="no GGUF file matching 'Q6_K'"):
        resolve_hub_model("org/tiny-GGUF:Q6_K")
    with pytest.raises(ModelLoadError, match=r"org/tiny-GGUF:QUANT"):
        resolve_hub_model("org/tiny-GGUF")


def test_missing_repo_is_a_one_line_error_naming_offline_mode(hub_cache):
    with pytest.raises(ModelLoadError) as e:
        resolve_hub_model("org/missing")
    assert "\n" not in str(e.value) and "org/missing" in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
    with pytest.raises(ModelLoadError, match="revision nope"):
        resolve_hub_model("org/tiny", revision="nope")


def test_engine_args_serve_a_hub_model_under_its_repo_id(hub_cache):
    config = EngineArgs(model="org/tiny").create_engine_config()
    assert config.model.model == str(hub_cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN)
    assert config.model.served_model_name == "org/tiny"
    assert EngineArgs(model="org/tiny", served_model_name="x").create_engine_config().model.served_model_name == "x"
    with pytest.raises(ConfigError, match="--revision"):
        EngineArgs(model=str(hub_cache), revision="v2").create_engine_config()


def test_pagedllm_serve_org_name_serves_the_cached_model_and_a_missing_repo_fails_in_one_line(tmp_path, tiny_dir):
    sys.path.insert(0, str(Path(__file__).parents[2] / "entrypoints" / "openai"))
    from openai_server import RemoteServer

    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "org/tiny", {p.name: p for p in tiny_dir.iterdir()}, COMMIT_MAIN)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    missing = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "org/missing"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0
    errors = [line for line in missing.stderr.splitlines() if "org/missing" in line]
    assert len(errors) == 1 and "HF_HUB_OFFLINE=1" in errors[0] and "Traceback" not in missing.stderr

    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(cache)  # RemoteServer passes its environment on
    try:
        srv = RemoteServer("org/tiny", ["--dtype", "float32", "--num-gpu-blocks-override", "64"])
    finally:
        if old is None:
            os.environ.pop("HF_HUB_CACHE")
        else:
            os.environ["HF_HUB_CACHE"] = old
    try:
        assert [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]] == ["org/tiny"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "org/tiny", "prompt": "hi", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert srv.stop() == 0
