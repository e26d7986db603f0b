"""StructuredOutputManager: compiles constraints off the engine loop, keeps each sequence's matcher,
fills one step's bitmask for every constrained row and advances the matchers with sampled tokens.

It lives in the engine-core process, beside the scheduler: matchers must see every accepted token
in order, and the step's bitmask must be ready before the forward ends.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from pagedllm.core.request import Sequence
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.structured.backend import GrammarBackend, GrammarMatcher, bitmask_width, make_backend
from pagedllm.structured.closing import MARGIN, ClosingVocab, JsonDepth
from pagedllm.structured.params import StructuredOutputsParams
from pagedllm.structured.step import StructuredStep

logger = logging.getLogger(__name__)

_CACHE_SIZE = 512  # compiled grammars kept, least recently used dropped first
_JSON_KINDS = ("json", "json_object")
# Remaining budget (tokens) under which a JSON sample's open brackets are counted (see closing.py).
_WATCH_TOKENS = 64


class StructuredOutputManager:
    def __init__(
        self,
        backend: str,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        max_workers: int = 2,
        max_model_len: int | None = None,
    ) -> None:
        self.backend_name = backend
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_token_ids = list(stop_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._backend: Future[GrammarBackend] | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self.matchers: dict[tuple[str, int], GrammarMatcher] = {}  # (request_id, sample index) -> matcher
        self.max_model_len = max_model_len
        self._closing: Future[ClosingVocab] | None = None
        # JSON samples near their budget: (request_id, index) -> (output tokens lexed, bracket state).
        self._depth: dict[tuple[str, int], tuple[int, JsonDepth]] = {}
        self.num_compiled = 0  # cache misses, for tests and metrics

    # --- compilation (pool threads) -----------------------------------------------------
    def _get_backend(self) -> Future[GrammarBackend]:
        """Building the library's tokenizer view takes ~1 s, so it too happens in the pool, once."""
        with self._lock:
            if self._backend is None:
                self._backend = self._pool.submit(
                    make_backend, self.backend_name, self._tokenizer, self.vocab_size, self._stop_token_ids
                )
            return self._backend

    def backend(self) -> GrammarBackend:
        return self._get_backend().result()

    def _get_closing(self) -> Future[ClosingVocab]:
        """Every token's text, decoded once in the pool, for closing JSON near the budget."""
        with self._lock:
            if self._closing is None:
                self._closing = self._pool.submit(
                    ClosingVocab.build, self._tokenizer, self.vocab_size, self._stop_token_ids
                )
            return self._closing

    def submit(self, params: StructuredOutputsParams) -> Future[Any]:
        """The compiled grammar of ``params``, shared by every request with the same key."""
        if params.kind in _JSON_KINDS:
            self._get_closing()
        key = params.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                return fut
        backend_future = self._get_backend()
        fut = self._pool.submit(lambda: backend_future.result().compile(params))
        with self._lock:
            self._cache[key] = fut
            self.num_compiled += 1
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return fut

    @staticmethod
    def wait_any(futures: list[Future[Any]], timeout: float) -> None:
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    # --- matchers (engine loop) -----------------------------------------------------------
    def attach(self, seqs: list[Sequence], compiled: Any) -> None:
        """A fresh matcher for every sample of a request (n > 1 samples constrain independently)."""
        backend = self.backend()
        for s in seqs:
            self.matchers[(s.request_id, s.index)] = backend.matcher(compiled)

    def release(self, request_id: str, index: int) -> None:
        self.matchers.pop((request_id, index), None)
        self._depth.pop((request_id, index), None)

    def release_request(self, request_id: str) -> None:
        for key in [k for k in self.matchers if k[0] == request_id]:
            del self.matchers[key]
            self._depth.pop(key, None)

    @staticmethod
    def sampling_seqs(out: SchedulerOutput) -> list[Sequence]:
        """The step's sampling rows in the model runner's order: each sampling sequence, then its forks."""
        seqs: list[Sequence] = []
        for item in out.scheduled:
            if item.samples:
                seqs.append(item.seq)
                seqs.extend(out.forks.get(item.seq.seq_id, ()))
        return seqs

    def step_bitmask(self, out: SchedulerOutput) -> StructuredStep | None:
        """One bitmask for the step's constrained rows, filled by one library call; None if none."""
        if not self.matchers:
            return None
        rows: list[int] = []
        matchers: list[GrammarMatcher] = []
        seqs: list[Sequence] = []
        for row, s in enumerate(self.sampling_seqs(out)):
            m = self.matchers.get((s.request_id, s.index))
            if m is not None:
                rows.append(row)
                matchers.append(m)
                seqs.append(s)
        if not rows:
            return None
        bitmask = torch.full((len(rows), bitmask_width(self.vocab_size)), -1, dtype=torch.int32)
        self.backend().fill_bitmask(matchers, bitmask, list(range(len(rows))))
        for i, s in enumerate(seqs):
            depth = self._must_close(s)
            if depth is not None:
                self._get_closing().result().narrow(bitmask[i], depth)
        return StructuredStep(bitmask=bitmask, rows=torch.tensor(rows, dtype=torch.int64))

    def _must_close(self, s: Sequence) -> JsonDepth | None:
        """A JSON sample's bracket state when its remaining budget is down to what closing them takes."""
        so = s.params.structured_outputs
        if so is None or so.kind not in _JSON_KINDS:
            return None
        budget = []
        if s.params.max_tokens is not None:
            budget.append(s.params.max_tokens - s.num_output_tokens)
        if self.max_model_len is not None:
            budget.append(self.max_model_len - s.num_tokens)
        if not budget or min(budget) > _WATCH_TOKENS:
            return None
        closing = self._get_closing().result()
        key = (s.request_id, s.index)
        lexed, depth = self._depth.get(key, (0, JsonDepth()))
        out = s.output_token_ids
        for t in out[lexed:]:
            depth.feed(closing.text(t))
        self._depth[key] = (len(out), depth)
        return depth if min(budget) <= depth.tokens_to_close() + MARGIN else None

    def accept(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advance each constrained row's matcher by its sampled token."""
        if not self.matchers:
            return
        for s in self.sampling_seqs(out):
            m = self.matchers.get((s.request_id, s.index))
            if m is None or s.seq_id not in sampled:
                continue
            token = sampled[s.seq_id]
            if not m.accept_token(token) and not (m.is_terminated() and token in s.params.eos_token_ids):
                # Only reachable when another edit (min_tokens, logit_bias) fought the mask.
                logger.error(
                    "request %s sample %d: the grammar rejected token %d; the rest of this sample is unconstrained",
                    s.request_id, s.index, token,
                )
                self.release(s.request_id, s.index)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
