"""The app's rough edges a new user meets: error shapes, the too-long prompt's param, one model's card,
the access log, `pagedllm --version`, and how fast an idle server stops. The engine is the stand-in
core (it starts in seconds); the server is real uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai_server import RemoteServer, free_port, pid_alive, tiny_model_dir
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.api_server import serve_engine
from pagedllm.entrypoints.openai.serving_common import ServerSettings

API_KEY = "k"
NAMES = ["fake", "org/fake-model"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _ThreadServer:
    """serve_engine with the stand-in core, on its own event loop in a thread."""

    def __init__(self, access_log: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> None:
            engine = await AsyncLLM.from_config(EngineConfig(), core_factory="openai_fake_core:FakeEngineCore",
                                                log_interval_s=0, startup_timeout_s=120)
            settings = ServerSettings(served_model_names=list(NAMES), api_key=API_KEY)
            self.task = asyncio.create_task(serve_engine(engine, settings, "127.0.0.1", self.port,
                                                         log_level="info", access_log=access_log))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        # uvicorn configured its loggers when it started (and logs access lines only if the access
        # logger then has a handler); listen to the access log from here on
        access = logging.getLogger("uvicorn.access")
        self.access_logger_enabled = access.hasHandlers()
        self.records = _Records()
        if self.access_logger_enabled:
            access.addHandler(self.records)

    def post(self, path: str, body: dict | None = None, headers: dict | None = None, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})},
                          timeout=30, **kw)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)

    def stop(self) -> None:
        logging.getLogger("uvicorn.access").removeHandler(self.records)
        assert self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        deadline = time.monotonic() + 30
        while not self.task.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    srv = _ThreadServer(access_log=True)
    assert srv.access_logger_enabled
    yield srv
    srv.stop()


def test_too_long_completion_prompt_names_prompt_and_chat_names_messages(server):
    r = server.post("/v1/completions", {"prompt": [1] * 200, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt" and r.json()["error"]["code"] == "context_length_exceeded"
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_every_error_code_is_a_string_or_null(server):
    responses = [
        server.post("/v1/completions", {"prompt": [1] * 200}),  # context length
        server.post("/v1/completions", {"prompt": "x", "temperature": -1}),  # out of range
        server.post("/v1/completions", {}),  # validation
        server.post("/v1/completions", {"model": "nope", "prompt": "x"}),  # unknown model
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=30),  # no API key
        server.post("/v1/completions", content=b"x" * (9 * 1024 * 1024)),  # too large
        server.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"}),
        server.get("/no/such/route"),
        server.get("/v1/completions"),  # method not allowed
        server.get("/v1/models/nope"),
    ]
    for r in responses:
        assert 400 <= r.status_code < 500, r.text
        err = r.json()["error"]
        assert err["code"] is None or isinstance(err["code"], str), (r.status_code, err)
        assert isinstance(err["message"], str) and isinstance(err["type"], str)


def test_get_one_model_returns_its_card_and_unknown_is_404(server):
    for name in NAMES:  # a served name may contain a slash, as hub names do
        r = server.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json()["id"] == name and r.json()["object"] == "model"
    r = server.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/v1/models/fake", timeout=30).status_code == 401


def test_access_log_records_each_request_line_by_default(server):
    server.get("/v1/models")
    server.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 2})
    deadline = time.monotonic() + 5
    while len(server.records.lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.records.lines
    assert any('"GET /v1/models HTTP/1.1" 200' in line for line in lines), lines
    assert any('"POST /v1/completions HTTP/1.1" 200' in line for line in lines), lines


def test_access_log_can_be_turned_off():
    import argparse

    from pagedllm.entrypoints.openai.cli_serve import add_serve_args

    args = add_serve_args(argparse.ArgumentParser()).parse_args(["--disable-uvicorn-access-log"])
    assert args.disable_uvicorn_access_log is True
    srv = _ThreadServer(access_log=False)
    try:
        assert srv.get("/v1/models").status_code == 200
        assert not srv.access_logger_enabled  # uvicorn writes an access line only through a handler
    finally:
        srv.stop()


def test_pagedllm_version_prints_the_version():
    import pagedllm

    out = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"pagedllm {pagedllm.__version__}"


def test_idle_server_exits_promptly_on_sigterm(tmp_path):
    """`pagedllm serve`, idle with a keep-alive connection open, stops on SIGTERM with exit code 0 and
    no engine left behind, without the seconds of torch teardown in both processes it used to wait for
    (5 s here before; about half a second now)."""
    srv = RemoteServer(tiny_model_dir(str(tmp_path)), ["--dtype", "float32", "--num-gpu-blocks-override", "64"])
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:  # keeps its connection open
            assert client.get("/v1/models").status_code == 200
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            code = srv.proc.wait(60)
            elapsed = time.monotonic() - t0
    finally:
        srv.stop()
    assert code == 0
    deadline = time.monotonic() + 5
    while pid_alive(srv.engine_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(srv.engine_pid)
    assert elapsed < 2.5, f"an idle server took {elapsed:.1f} s to exit on SIGTERM"
