"""A deterministic stand-in EngineCore for process-model tests: token t+1 follows t, one per step.

Used only where the real engine would make a test slow or could not fail on purpose (a crash).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.types import EngineCoreOutput, EngineCoreRequest, EngineCoreStats

CRASH_TOKEN = 250  # a prompt starting with this (in-vocabulary) token makes the engine process die mid-step
BLOCKS = 10


@dataclass(slots=True)
class FakeTokenizerInfo:
    """The TokenizerInfo fields the frontend reads, with the byte-level test tokenizer."""

    tokenizer: Any = None
    chat_template: str | None = None
    eos_token_ids: list[int] = field(default_factory=lambda: [256])
    bos_token_id: int | None = None
    max_model_len: int = 128
    vocab_size: int = 259
    generation_defaults: dict = field(default_factory=dict)
    model_name: str = "fake"


class FakeEngineCore:
    def __init__(self, config) -> None:
        self.config = config
        self.config.cache.num_blocks = BLOCKS
        from pagedllm.model.testing import tiny_tokenizer

        tok = tiny_tokenizer()
        self.tokenizer_info = FakeTokenizerInfo(tokenizer=tok, chat_template=tok.chat_template)
        self.running: dict[str, tuple[EngineCoreRequest, list[int]]] = {}
        self.generated = 0
        self.crash_next = False

    def add_request(self, req: EngineCoreRequest) -> None:
        if req.prompt_token_ids[0] == CRASH_TOKEN:
            self.crash_next = True
        self.running[req.request_id] = (req, [])

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.running.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[EngineCoreOutput]:
        if self.crash_next:
            os._exit(3)
        time.sleep(0.01)  # ~100 tokens/s: long requests are still running when a test acts on them
        outs = []
        for rid, (req, toks) in list(self.running.items()):
            last = toks[-1] if toks else req.prompt_token_ids[-1]
            toks.append((last + 1) % 100)
            self.generated += 1
            done = len(toks) >= (req.sampling_params.max_tokens or 16)
            outs.append(EngineCoreOutput(request_id=rid, index=0, new_token_ids=[toks[-1]],
                                         finish_reason="length" if done else None))
            if done:
                del self.running[rid]
        return outs

    def stats(self) -> EngineCoreStats:
        return EngineCoreStats(num_running=len(self.running), kv_cache_usage=min(1.0, len(self.running) / BLOCKS),
                               num_blocks=BLOCKS, generation_tokens=self.generated)
