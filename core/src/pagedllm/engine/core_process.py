"""The EngineCore process: a busy loop that owns the EngineCore and talks to the frontend over ZMQ.

Run as ``python -m pagedllm.engine.core_process``; the frontend (``core_client``) writes one pickled
``CoreProcessArgs`` to its stdin, binds two ipc sockets and waits for the ``ready`` message.

Messages are pickled tuples ``(kind, payload)``:
  frontend -> core: ("add", EngineCoreRequest), ("abort", [request_id]), ("stats", None), ("shutdown", None)
  core -> frontend: ("ready", EngineReadyInfo), ("startup_error", (type_name, message)),
                    ("outputs", StepBatch), ("stats", EngineCoreStats), ("fatal", traceback_text)
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.types import EngineCoreOutput, EngineCoreRequest, EngineCoreStats

logger = logging.getLogger("pagedllm.engine.core_process")

DEFAULT_CORE_FACTORY = "pagedllm.engine.engine_core:EngineCore"
# While idle the loop blocks on its input for this long, then checks that its parent is alive.
_IDLE_POLL_MS = 200


@dataclass(slots=True)
class CoreProcessArgs:
    """What the frontend hands the core process on stdin."""

    config: Any  # EngineConfig
    input_address: str  # the core PULLs requests from here
    output_address: str  # and PUSHes outputs here
    parent_pid: int
    core_factory: str = DEFAULT_CORE_FACTORY  # "module:callable", called with the EngineConfig


@dataclass(slots=True)
class EngineReadyInfo:
    """What the frontend needs once the model is loaded and the KV cache sized."""

    config: Any  # EngineConfig after platform and loader updates
    tokenizer_info: Any  # TokenizerInfo, or None when it could not be pickled
    num_blocks: int
    block_size: int
    max_model_len: int
    platform_name: str
    platform_why: str
    pid: int


@dataclass(slots=True)
class StepBatch:
    """One step's outputs, the stats after it, and when the step started (wall clock)."""

    outputs: list[EngineCoreOutput]
    stats: EngineCoreStats
    step_start: float
    step_end: float
    aborted: list[str] = field(default_factory=list)


def load_factory(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"core factory must look like 'module:callable', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no orphan engine survives a crash."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError as exc:  # no libc by that name: the parent-pid poll below still covers us
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)


def _platform_facts(core: Any) -> tuple[str, str]:
    try:
        from pagedllm.platforms.discovery import current_selection

        sel = current_selection(getattr(core.config.device, "platform", None))
        return sel.platform.name, sel.why
    except Exception as exc:  # a fake core in tests has no platform; say so instead of failing
        return "unknown", f"platform selection not available: {type(exc).__name__}: {exc}"


def _frontend_config(config: Any) -> Any:
    """``config`` as the frontend gets it: the model's dtype by name (``dtype`` "float32", ``torch_dtype``
    None) and no ``hf_config`` (transformers' config classes import torch; the frontend reads neither),
    so unpickling it needs no torch: the API server's process never loads torch (~200 MiB of RSS)."""
    model = getattr(config, "model", None)
    if model is None or not hasattr(model, "torch_dtype"):
        return config
    from pagedllm.config import dtype_name

    frontend = copy.copy(config)
    frontend.model = copy.copy(model)
    frontend.model.dtype = dtype_name(model.torch_dtype or model.dtype) or "auto"
    frontend.model.torch_dtype = None
    frontend.model.hf_config = None
    return frontend


def _ready_info(core: Any) -> EngineReadyInfo:
    config = _frontend_config(core.config)
    stats = core.stats()
    tok = core.tokenizer_info
    try:
        pickle.dumps(tok)
    except Exception as exc:
        logger.warning("tokenizer info cannot be pickled (%s); the frontend will load it itself", exc)
        tok = None
    num_blocks = config.cache.num_blocks or stats.num_blocks
    max_model_len = getattr(core.tokenizer_info, "max_model_len", None) or config.model.max_model_len
    name, why = _platform_facts(core)
    return EngineReadyInfo(
        config=config,
        tokenizer_info=tok,
        num_blocks=int(num_blocks or 0),
        block_size=int(config.cache.block_size),
        max_model_len=int(max_model_len or 0),
        platform_name=name,
        platform_why=why,
        pid=os.getpid(),
    )


class EngineCoreProc:
    """Owns the EngineCore and the two sockets; ``run()`` is the busy loop."""

    def __init__(self, args: CoreProcessArgs, core: Any, zmq_ctx: Any) -> None:
        import zmq

        self.args = args
        self.core = core
        self._zmq = zmq
        self.input = zmq_ctx.socket(zmq.PULL)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(args.input_address)
        self.output = zmq_ctx.socket(zmq.PUSH)
        self.output.setsockopt(zmq.LINGER, 2000)
        self.output.setsockopt(zmq.SNDHWM, 0)
        self.output.connect(args.output_address)
        self._stats_dirty = False

    def send(self, kind: str, payload: Any) -> None:
        self.output.send(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))

    def _parent_alive(self) -> bool:
        return os.getppid() == self.args.parent_pid

    def _handle(self, kind: str, payload: Any) -> bool:
        """Apply one frontend message; returns False on shutdown."""
        if kind == "add":
            req: EngineCoreRequest = payload
            try:
                self.core.add_request(req)
            except Exception as exc:
                # Admission validated it, so this is an engine bug; fail the request, not the engine.
                logger.exception("add_request failed for %s", req.request_id)
                self.send_outputs(
                    [
                        EngineCoreOutput(
                            request_id=req.request_id,
                            index=i,
                            new_token_ids=[],
                            finish_reason="error",
                            error=f"{type(exc).__name__}: {exc}",
                        )
                        for i in range(max(1, req.sampling_params.n))
                    ],
                    time.time(),
                )
        elif kind == "abort":
            self.core.abort_requests(list(payload))
        elif kind == "stats":
            self.send("stats", self.core.stats())
            return True
        elif kind == "shutdown":
            return False
        else:
            logger.error("unknown message kind %r ignored", kind)
        self._stats_dirty = True
        return True

    def send_outputs(self, outputs: list[EngineCoreOutput], step_start: float) -> None:
        batch = StepBatch(outputs=outputs, stats=self.core.stats(), step_start=step_start, step_end=time.time())
        self.send("outputs", batch)
        self._stats_dirty = False

    def _drain_input(self, block_ms: int) -> bool:
        """Handle every queued message (waiting up to block_ms for the first); False on shutdown."""
        zmq = self._zmq
        kv_events = getattr(self.core, "kv_events", None)
        if kv_events is not None:
            # Subscribers' snapshot requests are answered here too, so an idle engine still resyncs them.
            kv_events.answer_snapshots()
            if block_ms > 0:
                poller = zmq.Poller()
                poller.register(self.input, zmq.POLLIN)
                poller.register(kv_events.snapshot_socket, zmq.POLLIN)
                ready = dict(poller.poll(block_ms))
                kv_events.answer_snapshots()
                if self.input not in ready:
                    return True
        elif block_ms > 0 and not self.input.poll(block_ms):
            return True
        while True:
            try:
                raw = self.input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            kind, payload = pickle.loads(raw)
            if not self._handle(kind, payload):
                return False

    def run(self) -> None:
        while True:
            busy = self.core.has_unfinished_requests()
            if not self._drain_input(0 if busy else _IDLE_POLL_MS):
                return
            if self.core.has_unfinished_requests():
                start = time.time()
                outputs = self.core.step()
                self.send_outputs(outputs, start)
            elif self._stats_dirty:
                # Aborts while idle free blocks: tell the frontend so its gauges return to zero.
                self.send("stats", self.core.stats())
                self._stats_dirty = False
            elif not self._parent_alive():
                logger.error("frontend process %d is gone; engine core exiting", self.args.parent_pid)
                return
            elif hasattr(self.core, "check_health"):
                self.core.check_health()  # a worker that died while idle fails the engine now

    def close(self) -> None:
        self.input.close(linger=0)
        self.output.close()


def _shutdown_core(core: Any) -> None:
    """Stop the core's workers, if it has any (the multiprocess and Ray executors do)."""
    if hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception:
            logger.exception("engine core shutdown failed")


def main() -> int:
    _die_with_parent()
    logging.basicConfig(
        level=os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s",
    )
    # The frontend owns SIGINT/SIGTERM handling; it tells us to stop with a "shutdown" message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args: CoreProcessArgs = pickle.load(sys.stdin.buffer)
    import zmq

    ctx = zmq.Context()
    proc: EngineCoreProc | None = None
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(args.output_address)
    try:
        core = load_factory(args.core_factory)(args.config)
    except Exception as exc:
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        out.send(pickle.dumps(("startup_error", (type(exc).__name__, str(exc)))))
        out.close()
        ctx.term()
        return 1
    out.close()
    try:
        proc = EngineCoreProc(args, core, ctx)
        proc.send("ready", _ready_info(core))
        proc.run()
    except Exception:
        text = traceback.format_exc()
        logger.error("engine core died:\n%s", text)
        if proc is not None:
            proc.send("fatal", text)
            proc.close()
        _shutdown_core(core)
        ctx.term()
        return 1
    _shutdown_core(core)
    proc.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so pickled records name
    # pagedllm.engine.core_process and the frontend can unpickle them.
    from pagedllm.engine.core_process import main as _main

    code = _main()
    # Sockets are closed and nothing is left to flush: skip the interpreter's teardown of torch,
    # which takes a second or more on a busy host and would hold up the server's exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
