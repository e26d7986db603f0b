"""Runs `pagedllm serve` as a real subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(tmp_root: str) -> str:
    from pagedllm.model.testing import make_tiny_model

    return make_tiny_model("llama", os.path.join(tmp_root, "tiny-llama"))


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) child pids, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            kids.append(int(entry))
    return kids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RemoteServer:
    """`pagedllm serve MODEL ARGS` in a subprocess; ``url`` once /health answers 200."""

    def __init__(self, model: str, args: list[str], api_key: str | None = None, startup_timeout_s: float = 300.0,
                 env: dict[str, str] | None = None, log_path: str | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model, "--port", str(self.port),
               "--uvicorn-log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", **(env or {}))
        # With log_path, the server's stdout and stderr go to that file (for tests that read its log).
        self.log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT if self.log else None)
        self._wait_healthy(startup_timeout_s)
        kids = children_of(self.proc.pid)
        assert len(kids) == 1, f"expected one engine process, found {kids}"
        self.engine_pid = kids[0]

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                if status == 200:
                    return
                last = f"/health answered {status}"
            except httpx.HTTPError as exc:  # not listening yet: keep polling, remember why
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy within {timeout_s} s (last: {last})")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if pid_alive(self.engine_pid):  # never leave an engine behind, even when a test failed
            os.kill(self.engine_pid, signal.SIGKILL)
        if self.log is not None:
            self.log.close()
        return self.proc.returncode
