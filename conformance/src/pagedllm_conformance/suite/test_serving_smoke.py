"""Serving smoke group: `pagedllm serve --platform NAME` answers a chat and a streamed completion like the offline API."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

MAX_TOKENS = 8
CHAT = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The quick brown fox"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real server in a subprocess (its EngineCore in a process of its own), selected by platform name."""

    def __init__(self, model: str, platform: str, timeout_s: float = 300.0) -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="pagedllm-conformance-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model, "--platform", platform,
               "--port", str(self.port), "--dtype", "float32", "--num-gpu-blocks-override", "64", "--seed", "0",
               "--uvicorn-log-level", "warning"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} during startup:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)  # not listening yet: poll until the deadline
                continue
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server not healthy within {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                print(f"server ignored SIGTERM for 60 s; killing its session\n{self.tail()}")
        # The server's session includes its engine process: never leave one behind.
        with contextlib.suppress(ProcessLookupError):  # the whole session already exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def server(tiny_model, conformance_target) -> Iterator[Server]:
    srv = Server(tiny_model("llama"), conformance_target.name)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def offline(tiny_model, conformance_target) -> Any:
    """The offline API on the same platform and engine settings: what the server must answer."""
    from pagedllm.entrypoints.llm import LLM

    return LLM(tiny_model("llama"), platform=conformance_target.platform, dtype="float32",
               num_gpu_blocks_override=64, seed=0)


def test_server_answers_a_chat_like_the_offline_api(server, offline, conformance) -> None:
    """/v1/models lists the model; a greedy /v1/chat/completions answers with the same text as LLM.chat on the
    platform, with a finish reason and token usage."""
    from pagedllm.sample.sampling_params import SamplingParams

    client = server.client()
    models = [m.id for m in client.models.list().data]
    conformance.assert_equal_values(len(models) >= 1, True, what=f"/v1/models lists a model ({models})")
    resp = client.chat.completions.create(model=models[0], messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    choice = resp.choices[0]
    expected = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    conformance.assert_equal_values(choice.message.content, expected.text, what="chat answer vs LLM.chat")
    conformance.assert_equal_values(choice.finish_reason, expected.finish_reason, what="chat finish reason")
    conformance.assert_equal_values(resp.usage.completion_tokens, len(expected.token_ids), what="completion tokens")
    conformance.note(model=models[0], answer=choice.message.content, finish_reason=choice.finish_reason)


def test_server_streams_a_completion_like_the_offline_api(server, offline, conformance) -> None:
    """A greedy streamed /v1/completions arrives in several chunks whose concatenation is LLM.generate's text on
    the platform, ending with a finish reason."""
    from pagedllm.sample.sampling_params import SamplingParams

    client = server.client()
    model = client.models.list().data[0].id
    pieces, reasons = [], []
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            pieces.append(choice.text or "")
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    conformance.assert_equal_values("".join(pieces), expected.outputs[0].text, what="streamed text vs LLM.generate")
    conformance.assert_equal_values(reasons, [expected.outputs[0].finish_reason], what="finish reasons in the stream")
    conformance.assert_equal_values(len(pieces) > 1, True, what=f"the answer was streamed ({len(pieces)} chunks)")
    conformance.note(model=model, prompt=PROMPT, chunks=len(pieces), text="".join(pieces))
