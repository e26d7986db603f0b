"""OutputProcessor: stop strings, stop tokens, n > 1, logprobs, errors and the cumulative-output contract."""

from __future__ import annotations

import itertools
import random

import pytest
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.types import EngineCoreOutput, EngineCoreRequest
from pagedllm.outputs import Logprob
from pagedllm.sample.sampling_params import SamplingParams
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A tiny GPT-2 style byte-level BPE built in memory, like the default model's tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(
        ["Hello world, this is a test. Stop here. STOP there! The end is near; the END."] * 5, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", unk_token="<|endoftext|>")


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def make(tok, request_id="r", prompt="Q:", **params) -> tuple[OutputProcessor, EngineCoreRequest]:
    proc = OutputProcessor(tok)
    req = EngineCoreRequest(
        request_id, ids(tok, prompt), SamplingParams(**params), arrival_time=100.0, prompt=prompt
    )
    proc.add_request(req)
    return proc, req


def feed(proc, request_id, token_ids, index=0, finish_reason=None, stop_reason=None, chunk=1):
    """Feeds token_ids one chunk per step; returns every RequestOutput and every abort id seen."""
    outputs, aborts = [], []
    for i in range(0, len(token_ids), chunk):
        last = i + chunk >= len(token_ids)
        out = EngineCoreOutput(
            request_id,
            index,
            token_ids[i : i + chunk],
            finish_reason=finish_reason if last else None,
            stop_reason=stop_reason if last else None,
        )
        res, ab = proc.process_outputs([out])
        outputs += res
        aborts += ab
    return outputs, aborts


def test_stop_string_spanning_two_tokens_truncates(tok):
    proc, _ = make(tok, stop=["OP th"], max_tokens=50)
    toks = ids(tok, " Stop here. STOP there!")
    assert all("OP th" not in tok.decode([t]) for t in toks)  # only two tokens together hold it
    outputs, aborts = feed(proc, "r", toks)
    final = outputs[-1]
    assert final.finished
    assert final.outputs[0].text == " Stop here. ST"
    assert final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].stop_reason == "OP th"
    assert final.outputs[0].token_ids == toks[:5]  # tokens up to the one completing the stop string
    assert aborts == ["r"]
    assert not proc.has_request("r")


def test_include_stop_str_in_output_keeps_stop_string(tok):
    proc, _ = make(tok, stop=["STOP"], include_stop_str_in_output=True)
    outputs, _ = feed(proc, "r", ids(tok, " Stop here. STOP there!"), chunk=3)
    assert outputs[-1].outputs[0].text.startswith(" Stop here. STOP")
    assert not outputs[-1].outputs[0].text.endswith("there!")


def test_earliest_stop_string_wins(tok):
    proc, _ = make(tok, stop=["END", "the"])
    outputs, _ = feed(proc, "r", ids(tok, " The end is near; the END."), chunk=100)
    assert outputs[-1].outputs[0].text == " The end is near; "
    assert outputs[-1].outputs[0].stop_reason == "the"


def test_streamed_text_only_grows_even_when_stop_string_completes_later(tok):
    proc, _ = make(tok, stop=["the END"])
    outputs, _ = feed(proc, "r", ids(tok, " The end is near; the END. café"))
    texts = [o.outputs[0].text for o in outputs]
    for earlier, later in itertools.pairwise(texts):
        assert later.startswith(earlier)
    assert texts[-1] == " The end is near; "


def test_eos_token_in_token_ids_not_in_text(tok):
    proc, _ = make(tok, skip_special_tokens=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    toks = ids(tok, " Hello world") + [eos]
    outputs, aborts = feed(proc, "r", toks, finish_reason="stop", stop_reason=None)
    final = outputs[-1].outputs[0]
    assert final.token_ids == toks
    assert final.text == " Hello world"
    assert (final.finish_reason, final.stop_reason) == ("stop", None)
    assert aborts == []  # the core finished it itself


def test_stop_token_text_kept_with_include_stop_str_in_output(tok):
    proc, _ = make(tok, skip_special_tokens=False, include_stop_str_in_output=True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    outputs, _ = feed(proc, "r", ids(tok, " Hi") + [eos], finish_reason="stop", stop_reason=eos)
    assert outputs[-1].outputs[0].text == " Hi<|im_end|>"
    assert outputs[-1].outputs[0].stop_reason == eos


def test_length_finish_keeps_all_text(tok):
    proc, _ = make(tok, max_tokens=3)
    toks = ids(tok, " Hello world")[:3]
    outputs, _ = feed(proc, "r", toks, finish_reason="length")
    assert outputs[-1].outputs[0].text == tok.decode(toks)
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert outputs[-1].finished


def test_min_tokens_delays_stop_string_detection(tok):
    toks = ids(tok, " STOP now STOP later")
    first_stop_tokens = len(ids(tok, " STOP"))
    proc, _ = make(tok, stop=["STOP"], min_tokens=first_stop_tokens + 1)
    outputs, _ = feed(proc, "r", toks)
    assert outputs[-1].outputs[0].text == " STOP now "


def test_n_samples_aggregate_and_finish_when_all_finished(tok):
    proc, _ = make(tok, n=2, temperature=1.0)
    a, b = ids(tok, " Hello"), ids(tok, " world, this")
    res, _ = proc.process_outputs(
        [EngineCoreOutput("r", 0, a, finish_reason="length"), EngineCoreOutput("r", 1, b[:1])]
    )
    assert len(res) == 1 and not res[0].finished
    assert [o.index for o in res[0].outputs] == [0, 1]
    assert res[0].outputs[0].text == " Hello" and res[0].outputs[0].finish_reason == "length"
    res, _ = proc.process_outputs([EngineCoreOutput("r", 1, b[1:], finish_reason="length")])
    assert res[0].finished
    assert res[0].outputs[1].text == " world, this"


def test_n_sample_stopped_by_string_aborts_request_only_when_all_finished(tok):
    proc, _ = make(tok, n=2, temperature=1.0, stop=["STOP"])
    res, aborts = proc.process_outputs(
        [EngineCoreOutput("r", 0, ids(tok, " a STOP")), EngineCoreOutput("r", 1, ids(tok, " b"))]
    )
    assert res[0].outputs[0].finish_reason == "stop" and not res[0].finished and aborts == []
    # The core keeps running sample 0 until the request is aborted; those tokens are ignored.
    res, aborts = proc.process_outputs(
        [
            EngineCoreOutput("r", 0, ids(tok, " more")),
            EngineCoreOutput("r", 1, ids(tok, " c"), finish_reason="length"),
        ]
    )
    assert res[0].finished and aborts == ["r"]
    assert res[0].outputs[0].text == " a "
    assert res[0].outputs[1].text == " b c"


def test_logprobs_get_decoded_tokens_and_cumulative_logprob(tok):
    proc, _ = make(tok, logprobs=1)
    toks = ids(tok, " Hello")
    lps = [{t: Logprob(-0.5, 1), 7: Logprob(-2.0, 2)} for t in toks]
    res, _ = proc.process_outputs([EngineCoreOutput("r", 0, toks, new_logprobs=lps)])
    out = res[0].outputs[0]
    assert out.cumulative_logprob == pytest.approx(-0.5 * len(toks))
    assert len(out.logprobs) == len(toks)
    assert out.logprobs[0][toks[0]].decoded_token == tok.decode([toks[0]])
    assert out.logprobs[0][7].decoded_token == tok.decode([7])


def test_no_logprobs_means_no_cumulative_logprob(tok):
    proc, _ = make(tok)
    res, _ = proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " Hi"))])
    assert res[0].outputs[0].logprobs is None and res[0].outputs[0].cumulative_logprob is None


def test_prompt_logprobs_kept_from_first_output(tok):
    proc, req = make(tok, prompt_logprobs=0)
    prompt_lps = [None] + [{t: Logprob(-1.0, 3)} for t in req.prompt_token_ids[1:]]
    res, _ = proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " a"), prompt_logprobs=prompt_lps)])
    res2, _ = proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " b"))])
    assert res2[0].prompt_logprobs[0] is None
    assert len(res2[0].prompt_logprobs) == len(req.prompt_token_ids)
    t = req.prompt_token_ids[1]
    assert res2[0].prompt_logprobs[1][t].decoded_token == tok.decode([t])


def test_error_output_finishes_request_with_message(tok):
    proc, _ = make(tok, n=2, temperature=1.0)
    res, aborts = proc.process_outputs([EngineCoreOutput("r", 0, [], finish_reason="error", error="boom")])
    assert res[0].finished and res[0].error == "boom"
    assert [o.finish_reason for o in res[0].outputs] == ["error", "error"]
    assert aborts == ["r"]
    assert not proc.has_request("r")


def test_abort_request_returns_final_output_with_abort(tok):
    proc, _ = make(tok)
    proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " Hello"))])
    final = proc.abort_request("r")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.outputs[0].text == " Hello"
    assert proc.abort_request("r") is None


def test_metrics_first_and_last_token_time(tok):
    proc, _ = make(tok)
    (r1,), _ = proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " a"))])
    (r2,), _ = proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " b"), finish_reason="length")])
    assert r2.metrics.arrival_time == 100.0
    assert r2.metrics.first_token_time == r1.metrics.first_token_time
    assert r2.metrics.last_token_time >= r1.metrics.last_token_time
    assert r2.metrics.finished_time is not None and r1.metrics.finished_time is None


def test_outputs_for_unknown_requests_and_indexes_are_ignored(tok):
    proc, _ = make(tok)
    res, aborts = proc.process_outputs([EngineCoreOutput("nope", 0, [1]), EngineCoreOutput("r", 5, [1])])
    assert res == [] and aborts == []


def test_duplicate_request_id_rejected(tok):
    proc, req = make(tok)
    with pytest.raises(ValueError, match="already in use"):
        proc.add_request(req)


def test_detokenize_false_gives_token_ids_only(tok):
    proc, _ = make(tok, detokenize=False, stop=["x"])
    toks = ids(tok, " xxx")
    res, _ = proc.process_outputs([EngineCoreOutput("r", 0, toks, finish_reason="length")])
    assert res[0].outputs[0].text == "" and res[0].outputs[0].token_ids == toks


def test_returned_outputs_are_snapshots(tok):
    proc, _ = make(tok)
    (r1,), _ = proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " a"))])
    n1 = len(r1.outputs[0].token_ids)
    proc.process_outputs([EngineCoreOutput("r", 0, ids(tok, " b"))])
    assert len(r1.outputs[0].token_ids) == n1


@pytest.mark.parametrize("seed", range(6))
def test_streams_of_random_chunks_end_with_text_cut_at_first_stop_string(tok, seed):
    rng = random.Random(seed)
    text = " Hello world, STOP here. The end is near; the END. Stop there! " * 2
    toks = ids(tok, text)
    full = tok.decode(toks)
    stop = rng.choice(["STOP", "end is", "e. T", "d, S", "zzz"])
    proc, _ = make(tok, stop=[stop], max_tokens=500)
    texts, pos, final = [], 0, None
    while pos < len(toks) and final is None:
        step = rng.randint(1, 4)
        last = pos + step >= len(toks)
        out = EngineCoreOutput("r", 0, toks[pos : pos + step], finish_reason="length" if last else None)
        pos += step
        (res,), _ = proc.process_outputs([out])
        texts.append(res.outputs[0].text)
        final = res if res.finished else None
    assert final is not None
    expected = full[: full.find(stop)] if stop in full else full
    assert final.outputs[0].text == expected
    assert final.outputs[0].finish_reason == ("stop" if stop in full else "length")
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
