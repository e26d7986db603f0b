"""StructuredOutputManager: one compilation per schema, off the calling thread; matchers per sample."""

from __future__ import annotations

import pytest

from pagedllm.model.testing import tiny_tokenizer
from pagedllm.structured.manager import StructuredOutputManager
from pagedllm.structured.params import StructuredOutputsParams


@pytest.fixture(scope="module")
def manager():
    tok = tiny_tokenizer()
    m = StructuredOutputManager("xgrammar", tok, len(tok), [tok.convert_tokens_to_ids("<|im_end|>")])
    yield m
    m.shutdown()


def test_equal_constraints_compile_once_and_share_the_result(manager):
    before = manager.num_compiled
    a = manager.submit(StructuredOutputsParams(regex="[0-9]+"))
    b = manager.submit(StructuredOutputsParams(regex="[0-9]+", origin="guided_regex"))
    assert a is b
    a.result(timeout=60)
    manager.submit(StructuredOutputsParams(regex="[a-z]+")).result(timeout=60)
    assert manager.num_compiled == before + 2


def test_a_failed_compilation_is_not_cached(manager):
    bad = StructuredOutputsParams(regex="(")
    first = manager.submit(bad)
    with pytest.raises(Exception, match="cannot compile"):
        first.result(timeout=60)
    assert manager.submit(bad) is not first  # tried again, not served from the cache
