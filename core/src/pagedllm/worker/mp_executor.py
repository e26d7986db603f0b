"""The multiprocess executor: one worker process per rank, one broadcast of each step, the driver's result.

``DistributedExecutor`` holds what every multi-rank executor shares (the Ray executor reuses it):
  - one ZMQ PUB socket: each step's ``StepMessage`` is pickled once and published once, whatever
    the world size (XPUB, so startup waits until every rank has subscribed: nothing is dropped);
  - one PULL socket: the driver rank's ``StepResult``, and any rank's error report;
  - liveness: while it waits, the executor checks every worker several times a second. A rank
    that dies or reports an error fails the engine: the other ranks are killed at once and the
    step raises ``EngineDeadError`` (the server then fails every in-flight request, turns
    ``/health`` 503 and exits non-zero). Nothing waits on a dead rank.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput, StepResult
from pagedllm.errors import EngineDeadError, PagedLLMError
from pagedllm.platforms.platform import Platform
from pagedllm.worker.step_message import StepEncoder
from pagedllm.worker.worker import ReadyInfo, WorkerArgs, platform_class_path

logger = logging.getLogger(__name__)

_POLL_MS = 100  # how often a waiting executor checks that every rank is alive
START_TIMEOUT_S = float(os.environ.get("PAGEDLLM_WORKER_START_TIMEOUT_S", "900"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DistributedExecutor:
    """Broadcast, gather and failure handling; subclasses start the ranks and say whether they live."""

    def __init__(self, config: EngineConfig, platform: Platform) -> None:
        import zmq

        self.config = config
        self.platform = platform
        self.world_size = config.parallel.world_size
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # one subscription message per rank
        self._pub.setsockopt(zmq.SNDHWM, 0)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self.step_address, self.result_address = self._bind(self._pub, self._pull)
        self._encoder = StepEncoder()
        self.dead_reason: str | None = None
        self._closed = False
        self.model_time_s = 0.0
        # Communication the executor itself adds per step (the ranks' collectives are inside model time).
        self.num_steps = 0
        self.broadcast_time_s = 0.0  # pickling + publishing the step
        self.broadcast_bytes = 0
        self.wait_time_s = 0.0  # publish -> driver's result received
        self.comm_time_s = 0.0  # the driver rank's collectives (inside its model time)
        self.pp_wait_time_s = 0.0  # the driver (last stage) waiting for activations: the pipeline bubble
        try:
            self._start_workers()
            self.ready: ReadyInfo = self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        m = config.model
        m.hf_config, m.architecture = self.ready.hf_config, self.ready.architecture
        m.torch_dtype, m.max_model_len = self.ready.torch_dtype, self.ready.max_model_len
        logger.info(
            "%s: %d ranks ready, %d KV blocks each", type(self).__name__, self.world_size, self.ready.num_blocks
        )

    # --- what subclasses provide ------------------------------------------------------------
    def _bind(self, pub: Any, pull: Any) -> tuple[str, str]:
        raise NotImplementedError

    def _start_workers(self) -> None:
        raise NotImplementedError

    def _dead_ranks(self) -> list[tuple[int, str]]:
        """(rank, why) for every rank that is no longer running."""
        raise NotImplementedError

    def _stop_workers(self, graceful: bool) -> None:
        raise NotImplementedError

    # --- the executor interface -------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.ready.num_blocks

    @property
    def tokenizer_info(self) -> Any:
        return self.ready.tokenizer_info

    def execute_model(self, out: SchedulerOutput) -> StepResult:
        self.check_health()
        t0 = time.perf_counter()
        data = pickle.dumps(("step", self._encoder.encode(out)), protocol=pickle.HIGHEST_PROTOCOL)
        self._pub.send(data)
        t1 = time.perf_counter()
        kind, rank, payload = self._receive(what="a step result")
        if kind != "result":
            self._fail(f"rank {rank} sent {kind!r} while a step result was expected")
        result, self.model_time_s, self.comm_time_s, self.pp_wait_time_s = payload
        self.broadcast_time_s += t1 - t0
        self.broadcast_bytes += len(data)
        self.wait_time_s += time.perf_counter() - t1
        self.num_steps += 1
        return result

    def check_health(self) -> None:
        """Raise EngineDeadError if a rank died (also while the engine is idle)."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine's workers are gone: {self.dead_reason}")
        dead = self._dead_ranks()
        if dead:
            self._fail("; ".join(f"rank {r} {why}" for r, why in dead))

    def shutdown(self) -> None:
        """Stop every rank (asking first) and release the sockets; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.dead_reason is None:
            try:
                self._pub.send(pickle.dumps(("shutdown", None)), self._zmq.NOBLOCK)
            except self._zmq.ZMQError:
                pass  # no subscriber left to tell; the ranks are stopped below either way
        try:
            self._stop_workers(graceful=self.dead_reason is None)
        finally:
            self._pub.close(linger=0)
            self._pull.close(linger=0)
            self._ctx.term()

    # --- internals ------------------------------------------------------------------------------
    def _fail(self, reason: str, cause: BaseException | None = None) -> None:
        self.dead_reason = reason
        logger.error("engine failed: %s; stopping every rank", reason)
        self._stop_workers(graceful=False)
        if isinstance(cause, PagedLLMError) and not isinstance(cause, EngineDeadError):
            raise cause
        raise EngineDeadError(f"the engine's workers are gone: {reason}") from cause

    def _receive(self, what: str, timeout_s: float | None = None) -> tuple[str, int, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._pull.poll(_POLL_MS):
                kind, rank, payload = pickle.loads(self._pull.recv())
                if kind == "error":
                    exc, text = payload
                    dead = self._dead_ranks_after_error()
                    if dead:  # a collective failing because a peer died: name the dead rank first
                        last = text.strip().splitlines()[-1] if text.strip() else ""
                        self._fail(f"{dead}; rank {rank} then failed: {last}")
                    self._fail(f"rank {rank} raised:\n{text}", exc)
                return kind, rank, payload
            self.check_health()
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"no {what} after {timeout_s:.0f}s")

    def _dead_ranks_after_error(self, grace_s: float = 0.5) -> str:
        """Ranks found dead within a short grace period (a peer's death reaches the others first)."""
        deadline = time.monotonic() + grace_s
        while True:
            # Exit code 1 is a rank that reported its own error and left; not a death.
            dead = [(r, why) for r, why in self._dead_ranks() if why != "exited with code 1"]
            if dead or time.monotonic() > deadline:
                return "; ".join(f"rank {r} {why}" for r, why in dead)
            time.sleep(0.02)

    def _wait_ready(self) -> ReadyInfo:
        deadline = time.monotonic() + START_TIMEOUT_S
        subscribed = 0
        ready: dict[int, ReadyInfo] = {}
        while subscribed < self.world_size or len(ready) < self.world_size:
            while self._pub.poll(0):
                if self._pub.recv()[:1] == b"\x01":
                    subscribed += 1
            if len(ready) < self.world_size:
                kind, rank, payload = self._receive("worker startup", max(1.0, deadline - time.monotonic()))
                if kind != "ready":
                    self._fail(f"rank {rank} sent {kind!r} during startup")
                ready[rank] = payload
            elif time.monotonic() > deadline:
                self._fail(f"only {subscribed} of {self.world_size} ranks subscribed to the step broadcast")
            else:
                self._pub.poll(_POLL_MS)
        self.rank_info = [ready[r] for r in range(self.world_size)]
        return next(info for info in self.rank_info if info.is_driver)


class MultiprocExecutor(DistributedExecutor):
    """Ranks as child processes on this machine (``python -m pagedllm.worker.mp_worker``)."""

    def _bind(self, pub: Any, pull: Any) -> tuple[str, str]:
        self._ipc_dir = tempfile.mkdtemp(prefix="pagedllm-mp-")
        step, result = f"ipc://{self._ipc_dir}/step", f"ipc://{self._ipc_dir}/result"
        pub.bind(step)
        pull.bind(result)
        return step, result

    def _start_workers(self) -> None:
        init = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _kill_all, self.procs, self._ipc_dir)
        for rank in range(self.world_size):
            args = WorkerArgs(
                config=self.config,
                rank=rank,
                world_size=self.world_size,
                local_rank=rank,
                dist_init_method=init,
                step_address=self.step_address,
                result_address=self.result_address,
                parent_pid=os.getpid(),
                platform_class=platform_class_path(self.platform),
            )
            proc = subprocess.Popen([sys.executable, "-m", "pagedllm.worker.mp_worker"], stdin=subprocess.PIPE)
            self.procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
            proc.stdin.close()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _dead_ranks(self) -> list[tuple[int, str]]:
        return [(r, f"exited with code {p.returncode}") for r, p in enumerate(self.procs) if p.poll() is not None]

    def _stop_workers(self, graceful: bool) -> None:
        procs = getattr(self, "procs", [])
        if graceful:
            deadline = time.monotonic() + 10.0
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("rank pid %d did not stop when asked; killing it", p.pid)
        _kill_all(procs, getattr(self, "_ipc_dir", None))


def _kill_all(procs: list[subprocess.Popen], ipc_dir: str | None) -> None:
    """SIGKILL whatever rank still runs and reap it (also at interpreter exit, via weakref.finalize)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            logger.error("rank pid %d survived SIGKILL for 10s", p.pid)
    if ipc_dir is not None:
        shutil.rmtree(ipc_dir, ignore_errors=True)
