"""A worker process of the multiprocess executor: ``python -m pagedllm.worker.mp_worker``.

The executor writes one pickled ``WorkerArgs`` to its stdin. The process dies with its parent
(PR_SET_PDEATHSIG, and a parent-pid check while idle), so no rank outlives the engine.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys


def main() -> int:
    from pagedllm.engine.core_process import _die_with_parent
    from pagedllm.worker.worker import WorkerArgs, run_worker

    _die_with_parent()
    args: WorkerArgs = pickle.load(sys.stdin.buffer)
    logging.basicConfig(
        level=os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s [rank {args.rank}] %(name)s: %(message)s",
    )
    # The engine decides when ranks stop (a "shutdown" message, or killing them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
    code = run_worker(args)
    # Everything this rank owns is released; skip the interpreter's teardown (seconds of library
    # atexit work here) so the engine's shutdown does not wait on it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from pagedllm.worker.mp_worker import main as _main

    sys.exit(_main())
