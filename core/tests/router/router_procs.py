"""`pagedllm serve` replicas with KV events and a `pagedllm router` in front of them, as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
from openai_server import RemoteServer, children_of, free_port, pid_alive


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


class Replica(RemoteServer):
    """A replica publishing KV events on free loopback ports (``spec`` is its router --replica value).

    ``port``/``events`` pin the ports, so a replica can come back where a router expects it.
    """

    def __init__(self, model: str, args: list[str], port: int | None = None,
                 events: tuple[int, int] | None = None, startup_timeout_s: float = 300.0):
        self.events_port, self.snapshot_port = events or distinct_free_ports(2)
        cfg = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{self.events_port}",
               "snapshot_endpoint": f"tcp://127.0.0.1:{self.snapshot_port}"}
        self.api_key = None
        self.port = port or next(p for p in iter(free_port, None) if p not in (self.events_port, self.snapshot_port))
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model, "--port", str(self.port),
               "--uvicorn-log-level", "warning", *args, "--kv-events-config", json.dumps(cfg)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, env=env)
        self._wait_healthy(startup_timeout_s)
        (self.engine_pid,) = children_of(self.proc.pid)

    @property
    def spec(self) -> str:
        return (f"{self.url},events=tcp://127.0.0.1:{self.events_port},"
                f"snapshot=tcp://127.0.0.1:{self.snapshot_port}")

    def kill(self) -> None:
        """The machine dies: server and engine get SIGKILL, nothing drains."""
        for pid in (self.engine_pid, self.proc.pid):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


class Router:
    def __init__(self, replicas: list[str], policy: str = "kv_aware", model: str | None = None,
                 health_interval: float = 0.5, extra: list[str] | None = None, timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "router", "--port", str(self.port),
               "--policy", policy, "--health-interval", str(health_interval), *(extra or [])]
        if model is not None:
            cmd += ["--model", model]
        for r in replicas:
            cmd += ["--replica", r]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("router not healthy in time")
            time.sleep(0.2)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/router/status", timeout=10).json()

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
