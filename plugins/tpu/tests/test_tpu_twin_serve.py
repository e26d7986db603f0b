"""`PAGEDLLM_PLATFORM=tpu pagedllm serve` on the XLA:CPU twin answers the official openai client, streaming included."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla (tox -e xla)"),
    pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs the openai client"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode} during startup"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet (warm-up compiles first)
            pass
        time.sleep(1)
    raise AssertionError(f"server not healthy within {timeout_s} s")


def test_serve_on_tpu_twin_answers_openai_client_with_and_without_streaming(tmp_path) -> None:
    import openai

    from pagedllm.model.testing import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "tiny")
    port = free_port()
    env = dict(os.environ, PAGEDLLM_PLATFORM="tpu", PAGEDLLM_XLA_CPU="1", PJRT_DEVICE="CPU",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model, "--port", str(port),
           "--max-model-len", "128", "--max-num-batched-tokens", "32", "--max-num-seqs", "4",
           "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 600)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=0)
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True,
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length", chunks
        again = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        )
        assert again.choices[0].message.content == text  # greedy: streamed and whole answers agree
    finally:
        proc.terminate()
        proc.wait(timeout=60)
