"""Benchmark workloads: shared-prefix sessions share their system prompts; multi-turn prompts extend each other."""

from __future__ import annotations

import random

import pytest
from pagedllm.bench.workloads import make_sessions, render

VOCAB = ("alpha", "beta", "gamma", "delta", "epsilon")


def test_shared_prefix_sessions_draw_from_few_system_prompts():
    sessions = make_sessions("shared-prefix", random.Random(0), VOCAB, 40, 4, 50, 8, 3)
    assert len(sessions) == 40 and all(len(s.turns) == 1 for s in sessions)
    assert len({s.system for s in sessions}) == 4
    assert all(len(s.system.split()) == 50 and len(s.turns[0].split()) == 8 for s in sessions)


def test_each_multi_turn_prompt_starts_with_the_previous_prompt_and_answer():
    (s,) = make_sessions("multi-turn", random.Random(0), VOCAB, 1, 0, 20, 5, 3)
    answers = [" one two", " three"]
    prompts = [render(s, answers[:t], t, "completions") for t in range(3)]
    for t in range(1, 3):
        assert prompts[t].startswith(prompts[t - 1] + answers[t - 1])
    chat = render(s, answers, 2, "chat")
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert chat[2]["content"] == answers[0]


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(ValueError, match="shared-prefix"):
        make_sessions("zipf", random.Random(0), VOCAB, 1, 1, 1, 1, 1)
