"""Frontend side of the EngineCore process: starts it, sends requests and aborts, receives outputs."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq
import zmq.asyncio

from pagedllm.engine.core_process import DEFAULT_CORE_FACTORY, CoreProcessArgs, EngineReadyInfo
from pagedllm.engine.types import EngineCoreRequest
from pagedllm.errors import EngineDeadError, PagedLLMError

logger = logging.getLogger("pagedllm.engine.core_client")

# How often the receiver checks that the engine process is still alive while no output arrives.
_LIVENESS_POLL_MS = 100
# How long a send waits for the engine process to be connected before calling it dead.
_SEND_WAIT_MS = 2000


class EngineStartupError(PagedLLMError, RuntimeError):
    """The engine process could not load the model or size its cache."""

    error_type = "engine_startup_error"


class EngineCoreClient:
    """Owns the EngineCore child process and the ZMQ sockets to it.

    Sending is synchronous (a PUSH socket never blocks with an unbounded queue) so that aborts can
    be issued from ``finally`` blocks and cancellation paths; receiving is asyncio.
    """

    def __init__(self, config: Any, core_factory: str = DEFAULT_CORE_FACTORY, env: dict | None = None) -> None:
        self.config = config
        self.core_factory = core_factory
        self._extra_env = env or {}
        self._tmpdir = tempfile.mkdtemp(prefix="pagedllm-core-")
        self.input_address = f"ipc://{self._tmpdir}/input.sock"
        self.output_address = f"ipc://{self._tmpdir}/output.sock"
        self._sync_ctx = zmq.Context()
        self._async_ctx = zmq.asyncio.Context()
        self._input = self._sync_ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(self.input_address)
        self._output = self._async_ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(self.output_address)
        self.proc: subprocess.Popen | None = None
        self.ready_info: EngineReadyInfo | None = None
        self.dead_reason: str | None = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------
    def _spawn(self) -> None:
        env = dict(os.environ)
        # The child must import what we import (tests pass factories from their own modules).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update(self._extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.engine.core_process"],
            stdin=subprocess.PIPE,
            env=env,
            close_fds=True,
            # Its own session: a terminal's Ctrl-C or a SIGTERM sent to our process group must not
            # kill the engine under in-flight requests; we drain first and then stop it ourselves.
            # It still dies with us (PR_SET_PDEATHSIG in the child).
            start_new_session=True,
        )
        args = CoreProcessArgs(
            config=self.config,
            input_address=self.input_address,
            output_address=self.output_address,
            parent_pid=os.getpid(),
            core_factory=self.core_factory,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
        self.proc.stdin.close()

    async def start(self, timeout_s: float = 900.0) -> EngineReadyInfo:
        """Spawn the engine process and wait until it has loaded the model."""
        try:
            return await self._start(timeout_s)
        except BaseException:
            self.shutdown()
            raise

    async def _start(self, timeout_s: float) -> EngineReadyInfo:
        self._spawn()
        deadline = time.monotonic() + timeout_s
        while True:
            if await self._output.poll(_LIVENESS_POLL_MS):
                kind, payload = pickle.loads(await self._output.recv())
                if kind == "ready":
                    self.ready_info = payload
                    return payload
                if kind == "startup_error":
                    type_name, message = payload
                    raise EngineStartupError(f"engine failed to start: {type_name}: {message}")
                logger.warning("unexpected %r message before ready ignored", kind)
            elif self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise EngineStartupError(f"engine process exited with code {code} while starting")
            if time.monotonic() > deadline:
                raise EngineStartupError(f"engine did not become ready within {timeout_s:.0f} s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.dead_reason is None

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Ask the engine to stop, then terminate and kill it if it does not; idempotent."""
        if self._closed:
            return
        self._closed = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                self._input.send(pickle.dumps(("shutdown", None)), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                logger.debug("could not send shutdown: %s", exc)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # --- messages ----------------------------------------------------------------------------
    def _send(self, kind: str, payload: Any) -> None:
        if self._closed:
            raise EngineDeadError("engine is shut down")
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            # The queue is unbounded, so this only fails when no engine is connected.
            self._input.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self._send_when_connected(data)

    def _send_when_connected(self, data: bytes) -> None:
        """A PUSH socket with no peer would block the event loop (the whole server) forever: the
        engine is gone, or (just after startup) its connection is still being set up."""
        if self.proc is not None and self.proc.poll() is not None:
            self.dead_reason = self.dead_reason or f"engine process exited with code {self.proc.returncode}"
            raise EngineDeadError(f"engine died ({self.dead_reason})")
        if not self._input.poll(_SEND_WAIT_MS, zmq.POLLOUT):
            raise EngineDeadError(f"engine process accepted no message within {_SEND_WAIT_MS} ms")
        self._input.send(data, zmq.NOBLOCK)

    def add_request(self, req: EngineCoreRequest) -> None:
        self._send("add", req)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self._closed:
            self._send("abort", list(request_ids))

    def request_stats(self) -> None:
        self._send("stats", None)

    async def get_output(self) -> tuple[str, Any]:
        """The next message from the engine; raises EngineDeadError once the process is gone."""
        while True:
            if self._closed:
                raise EngineDeadError("engine is shut down")
            if await self._output.poll(_LIVENESS_POLL_MS):
                kind, payload = pickle.loads(await self._output.recv())
                if kind == "fatal":
                    self.dead_reason = f"engine core raised:\n{payload}"
                    raise EngineDeadError("engine core failed; see the server log")
                return kind, payload
            if self.proc is not None and self.proc.poll() is not None:
                self.dead_reason = f"engine process exited with code {self.proc.returncode}"
                raise EngineDeadError(f"engine died ({self.dead_reason})")
