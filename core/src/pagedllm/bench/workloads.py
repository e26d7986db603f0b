"""Serving-benchmark workloads that reuse prefixes: shared system prompts and multi-turn conversations.

A workload is a list of sessions; a session's turns run one after another, each prompt holding the
session's system prompt and every earlier turn (user text and the model's answer), as a chat client
would send them. ``shared-prefix``: one turn per session, the system prompt one of ``num_prefixes`` (each used equally often).
``multi-turn``: ``num_turns`` turns per session, each conversation with its own opening.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORKLOADS = ("random", "shared-prefix", "multi-turn")


@dataclass(slots=True)
class Session:
    system: str
    turns: list[str]


def _words(rng: random.Random, vocab: tuple[str, ...], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_sessions(workload: str, rng: random.Random, vocab: tuple[str, ...], num_sessions: int,
                  num_prefixes: int, prefix_len: int, input_len: int, num_turns: int) -> list[Session]:
    """Lengths are in words (about one token each for BPE vocabularies)."""
    if workload == "shared-prefix":
        # Uniform popularity: every system prompt gets the same share of the traffic, in shuffled order.
        prefixes = [_words(rng, vocab, prefix_len) for _ in range(num_prefixes)]
        order = (prefixes * -(-num_sessions // num_prefixes))[:num_sessions]
        rng.shuffle(order)
        return [Session(system, [_words(rng, vocab, input_len)]) for system in order]
    if workload == "multi-turn":
        return [Session(_words(rng, vocab, prefix_len), [_words(rng, vocab, input_len) for _ in range(num_turns)])
                for _ in range(num_sessions)]
    raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")


def render(session: Session, answers: list[str], turn: int, endpoint: str) -> str | list[dict]:
    """The prompt of turn ``turn`` given the answers to the turns before it."""
    if endpoint == "chat":
        messages = [{"role": "system", "content": session.system}]
        for i in range(turn):
            messages += [{"role": "user", "content": session.turns[i]}, {"role": "assistant", "content": answers[i]}]
        return messages + [{"role": "user", "content": session.turns[turn]}]
    parts = [session.system]
    for i in range(turn):
        parts += [f"User: {session.turns[i]}", f"Assistant:{answers[i]}"]
    return "\n".join(parts + [f"User: {session.turns[turn]}", "Assistant:"])
