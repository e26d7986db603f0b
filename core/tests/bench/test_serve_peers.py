"""`pagedllm bench serve` against llama.cpp's llama-server: its /tokenize dialect, and never an empty prompt.

The fake server below is a stand-in for llama-server, written from its sources (tools/server): /tokenize
reads ``content`` and answers ``{"tokens": []}`` to a body without it (vLLM's ``prompt``), /detokenize
answers ``content``, and /v1/completions refuses an empty prompt with 400. The slow test at the end runs
the real llama-server when a build of it is found (benchmarks/peers/build_llama_cpp.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pagedllm.bench import serve as bench


def _fake_tokenize(text: str) -> list[int]:
    return [1000 + len(word) for word in text.split()]


class FakeLlamaServer(BaseHTTPRequestHandler):
    """llama-server's HTTP shapes (a test stand-in, not llama.cpp)."""

    completions: list[dict] = []
    tokenize_bodies: list[dict] = []
    dialect = "llama.cpp"  # "llama.cpp", or "broken": /tokenize always answers no tokens

    def log_message(self, *args) -> None:  # keep pytest's output clean
        return

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake.gguf", "object": "model"}]})
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/tokenize":
            type(self).tokenize_bodies.append(body)
            ok = "content" in body and self.dialect == "llama.cpp"
            self._json(200, {"tokens": _fake_tokenize(body["content"]) if ok else []})
        elif self.path == "/detokenize":
            self._json(200, {"content": " ".join("w" * (t - 1000) for t in body.get("tokens", []))})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            type(self).completions.append(body)
            prompt = body.get("prompt") if self.path == "/v1/completions" else body["messages"][-1]["content"]
            if not prompt:
                self._json(400, {"error": {"code": 400, "message": "prompt must not be empty",
                                           "type": "invalid_request_error"}})
                return
            n_prompt = len(prompt) if isinstance(prompt, list) else len(_fake_tokenize(prompt))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chat = self.path.endswith("chat/completions")
            for i in range(body["max_tokens"]):
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            usage = {"prompt_tokens": n_prompt, "completion_tokens": body["max_tokens"]}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})


@pytest.fixture
def fake_llama_server():
    FakeLlamaServer.completions, FakeLlamaServer.tokenize_bodies = [], []
    FakeLlamaServer.dialect = "llama.cpp"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeLlamaServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def _args(url: str, *extra: str) -> argparse.Namespace:
    return bench.add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--base-url", url, "--num-prompts", "4", "--input-len", "10", "--output-len", "3", *extra])


def test_completions_against_llama_server_send_exactly_input_len_token_ids(fake_llama_server, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(_args(fake_llama_server, "--result-json", str(out))) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 4 * 10 and summary["total_output_tokens"] == 4 * 3
    prompts = [c["prompt"] for c in FakeLlamaServer.completions]
    assert all(isinstance(p, list) and len(p) == 10 for p in prompts)
    assert any("content" in b for b in FakeLlamaServer.tokenize_bodies)


def test_chat_against_llama_server_sends_the_detokenized_text(fake_llama_server):
    assert bench.main(_args(fake_llama_server, "--endpoint", "chat")) == 0
    contents = [c["messages"][-1]["content"] for c in FakeLlamaServer.completions]
    assert len(contents) == 4 and all(len(c.split()) == 10 for c in contents)


def test_a_tokenize_that_yields_no_tokens_leaves_text_prompts_never_empty_ones(fake_llama_server):
    FakeLlamaServer.dialect = "broken"
    # Neither dialect yields tokens: the prompts stay text (never emptied), of about --input-len words.
    assert bench.main(_args(fake_llama_server)) == 0
    assert all(isinstance(c["prompt"], str) and len(c["prompt"].split()) == 18 for c in FakeLlamaServer.completions)


def test_tokens_vanishing_after_detection_fail_loudly(fake_llama_server, monkeypatch):
    async def detected(*_):
        return "llama.cpp"

    FakeLlamaServer.dialect = "broken"
    monkeypatch.setattr(bench, "_tokenize_dialect", detected)
    with pytest.raises(SystemExit, match="refusing to send an empty prompt"):
        bench.main(_args(fake_llama_server))
    assert FakeLlamaServer.completions == []


def _llama_server_binary() -> str | None:
    found = shutil.which("llama-server")
    cache = os.environ.get("PAGEDLLM_PEERS_DIR", os.path.expanduser("~/.cache/pagedllm/peers"))
    built = os.path.join(cache, "build", "bin", "llama-server")
    return found or (built if os.access(built, os.X_OK) else None)


@pytest.mark.slow
def test_bench_serve_runs_unchanged_against_a_real_llama_server(tmp_path):
    binary = _llama_server_binary()
    if binary is None:
        pytest.skip("no llama-server: build it with benchmarks/peers/build_llama_cpp.sh (PAGEDLLM_PEERS_DIR)")
    from pagedllm.model.loader.source import default_gguf_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", default_gguf_path(), "--host", "127.0.0.1", "--port", str(port),
                             "-t", "2", "--parallel", "2", "-c", "1024", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        last = "no answer yet"
        while True:
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
                if status == 200:
                    break
                last = f"/health answered {status}"
            except httpx.HTTPError as exc:  # not listening yet
                last = f"{type(exc).__name__}: {exc}"
            assert proc.poll() is None and time.monotonic() < deadline, f"llama-server did not start (last: {last})"
            time.sleep(0.5)
        out = tmp_path / "r.json"
        args = _args(url, "--max-concurrency", "2", "--result-json", str(out))
        assert bench.main(args) == 0
        summary = json.loads(out.read_text())["summary"]
        assert summary["completed"] == 4 and summary["failed"] == 0, summary["errors"]
        assert summary["total_input_tokens"] == 4 * 10 and summary["total_output_tokens"] == 4 * 3
    finally:
        proc.terminate()
        proc.wait(30)
