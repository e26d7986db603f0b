"""One rank of a multi-device engine: its device, its process group, its ModelRunner and the step loop.

The loop is transport-neutral in the sense that it talks ZMQ to addresses it is given: ipc://
sockets when the multiprocess executor launched it on the same machine, tcp:// ones when a Ray
actor runs it on another. Messages (pickled tuples):
  executor -> all ranks (one PUB): ("step", StepMessage), ("shutdown", None)
  ranks -> executor (PUSH): ("ready", rank, ReadyInfo), ("result", rank, (StepResult, model_time_s)),
                           ("error", rank, (exception or None, traceback text))
Only the driver (rank 0) sends results; any rank that fails reports, then exits.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("pagedllm.worker")

# While waiting for the next step a rank wakes this often to check that the engine is still there.
_IDLE_POLL_MS = 500
# gloo/NCCL give up on a collective whose peer never shows up after this long.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("PAGEDLLM_DIST_TIMEOUT_S", "600"))


@dataclass(slots=True)
class WorkerArgs:
    config: Any  # EngineConfig, after the engine process applied the platform's rules
    rank: int
    world_size: int
    local_rank: int  # device index on this machine
    dist_init_method: str  # "tcp://host:port" of the rendezvous
    step_address: str  # the executor's PUB socket
    result_address: str  # the executor's PULL socket
    parent_pid: int | None  # exit when this process is gone (None: do not watch, e.g. under Ray)
    platform_class: str  # "module:QualName" of the engine's Platform, built afresh in each rank


@dataclass(slots=True)
class ReadyInfo:
    """What the driver rank tells the executor once the model is loaded and the cache sized."""

    num_blocks: int
    tokenizer_info: Any
    hf_config: Any
    architecture: str | None
    torch_dtype: Any
    max_model_len: int | None
    pid: int
    is_driver: bool
    peak_rss_bytes: int  # this rank's peak resident memory once loaded and the KV cache allocated
    weight_bytes: int  # this rank's share of the weights
    kv_cache_bytes: int  # this rank's share of the KV cache


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def split_microbatches(out: Any, m: int) -> list[Any]:
    """The step's sequences in up to ``m`` runs of about equal token counts (copy-on-write goes first)."""
    from pagedllm.core.scheduler import SchedulerOutput

    items, tables = out.scheduled, out.block_tables
    target = out.num_scheduled_tokens / max(1, m)
    parts: list[Any] = []
    start, tokens = 0, 0
    for i, item in enumerate(items):
        tokens += item.num_new_tokens
        if tokens >= target * (len(parts) + 1) or i == len(items) - 1:
            chunk = items[start : i + 1]
            parts.append(
                SchedulerOutput(
                    scheduled=chunk,
                    copy_pairs=out.copy_pairs if not parts else [],
                    num_scheduled_tokens=sum(it.num_new_tokens for it in chunk),
                    block_tables=tables[start : i + 1],
                    forks=out.forks,
                )
            )
            start = i + 1
    return parts


def platform_class_path(platform: Any) -> str:
    cls = type(platform)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_platform(path: str) -> Any:
    """A fresh instance of the engine's platform class (platforms build with no arguments)."""
    import importlib

    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj()


class Worker:
    """Everything one rank holds; built by ``run_worker`` in its own process."""

    def __init__(self, args: WorkerArgs) -> None:
        import torch.distributed as dist

        from pagedllm.worker.model_runner import ModelRunner
        from pagedllm.worker.step_message import StepDecoder

        self.args = args
        config = args.config
        platform = load_platform(args.platform_class)
        platform.check_and_update_config(config)  # e.g. the CPU splits its threads among ranks
        platform.set_device(args.local_rank)
        platform.seed_everything(config.model.seed)
        if args.world_size > 1 and not config.device.enforce_eager:
            # A captured step is one process's replay list; collectives between ranks are not in it.
            logger.info("rank %d: decode steps run eagerly with %d ranks", args.rank, args.world_size)
            config.device.enforce_eager = True
        dist.init_process_group(
            platform.dist_backend,
            init_method=args.dist_init_method,
            rank=args.rank,
            world_size=args.world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        self.platform = platform
        tp = config.parallel.tensor_parallel_size
        self.pp_size = config.parallel.pipeline_parallel_size
        self.runner = ModelRunner(
            config, platform, tp_rank=args.rank % tp, tp_size=tp, pp_rank=args.rank // tp, pp_size=self.pp_size
        )
        from pagedllm.model.layers.pipeline import get_pp_stage

        self.pp = get_pp_stage()
        # Micro-batches per step in flight through the stages (the bubble is (p - 1) / (m + p - 1) of a step).
        self.num_microbatches = int(os.environ.get("PAGEDLLM_PP_MICROBATCHES", str(max(2, self.pp_size))))
        self.decoder = StepDecoder(platform.make_generator)
        self.comm = _TimedCommunicator.install(platform)

    @property
    def comm_time_s(self) -> float:
        return self.comm.time_s if self.comm is not None else 0.0

    def ready_info(self) -> ReadyInfo:
        from pagedllm.model.loader.packed import resident_weight_bytes

        m = self.args.config.model
        return ReadyInfo(
            num_blocks=self.runner.num_blocks,
            tokenizer_info=self.runner.tokenizer_info,
            hf_config=m.hf_config,
            architecture=m.architecture,
            torch_dtype=m.torch_dtype,
            max_model_len=m.max_model_len,
            pid=os.getpid(),
            is_driver=self.runner.is_driver,
            peak_rss_bytes=_peak_rss_bytes(),
            weight_bytes=resident_weight_bytes(self.runner.model),
            kv_cache_bytes=sum(c.numel() * c.element_size() for c in self.runner.kv_caches),
        )

    def execute(self, msg: Any) -> Any:
        out = self.decoder.decode(msg)
        if self.pp_size == 1:
            return self.runner.execute_model(out)
        # Pipeline: every stage splits the step the same way; a stage sends a micro-batch on and starts
        # the next while the following stage computes the first.
        result = None
        for part in split_microbatches(out, self.num_microbatches):
            r = self.runner.execute_model(part)
            if result is None:
                result = r
            else:
                result.sampled.update(r.sampled)
                result.logprobs.update(r.logprobs)
                result.prompt_logprobs.update(r.prompt_logprobs)
        self.pp.wait_sends()
        return result


class _TimedCommunicator:
    """Wraps the tensor-parallel group's communicator to add up the time its collectives take."""

    def __init__(self, inner: Any, platform: Any) -> None:
        self.inner = inner
        self.platform = platform
        self.time_s = 0.0

    @classmethod
    def install(cls, platform: Any) -> _TimedCommunicator | None:
        from pagedllm.model.layers.parallel_state import get_tp_group

        group = get_tp_group()
        if group.communicator is None:
            return None
        group.communicator = timed = cls(group.communicator, platform)
        return timed

    def _timed(self, name: str) -> Any:
        fn = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.platform.synchronize()
            self.time_s += time.perf_counter() - t0
            return out

        return call

    def __getattr__(self, name: str) -> Any:
        if name in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv"):
            return self._timed(name)
        return getattr(self.inner, name)


def _send(sock: Any, *msg: Any) -> None:
    sock.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _error_payload(exc: BaseException) -> tuple[Any, str]:
    text = traceback.format_exc()
    try:
        pickle.dumps(exc)
    except Exception:
        return None, text
    return exc, text


def run_worker(args: WorkerArgs) -> int:
    """Connect, load, then run steps until shutdown; returns the process exit code."""
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(args.step_address)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(args.result_address)
    rank = args.rank
    code = 0
    try:
        worker = Worker(args)
        _send(push, "ready", rank, worker.ready_info())
        while True:
            if not sub.poll(_IDLE_POLL_MS):
                if args.parent_pid is not None and os.getppid() != args.parent_pid:
                    logger.error("rank %d: engine process %d is gone; exiting", rank, args.parent_pid)
                    code = 1
                    break
                continue
            kind, payload = pickle.loads(sub.recv())
            if kind == "shutdown":
                break
            if kind != "step":
                raise RuntimeError(f"unknown message kind {kind!r}")
            result = worker.execute(payload)
            if worker.runner.is_driver:
                _send(push, "result", rank, (result, worker.runner.model_time_s, worker.comm_time_s, worker.pp.recv_wait_s))
    except Exception as exc:
        logger.error("rank %d failed:\n%s", rank, traceback.format_exc())
        _send(push, "error", rank, _error_payload(exc))
        code = 1
    finally:
        sub.close()
        push.close()
        ctx.term()
        try:
            import torch.distributed as dist

            if code == 0 and dist.is_initialized():
                dist.destroy_process_group()
        except Exception as exc:  # tearing down a group whose peer already left is best effort
            logger.debug("rank %d: destroy_process_group: %s", rank, exc)
    return code
