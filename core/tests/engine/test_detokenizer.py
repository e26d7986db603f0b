"""IncrementalDetokenizer: deltas concatenate to the full decode, never split a character, cost O(1) per token.

Tokenizers are tiny ones built in memory (no files, no network).
"""

from __future__ import annotations

import json
import random

import pytest
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Hello world, this is a test of the tokenizer. The quick brown fox jumps over the lazy dog.",
    "Stop here. STOP there! The end is near; the END. café naïve",
    "世界你好 こんにちは 🎉 emoji 😀 test",
] * 5


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE, like the default model's tokenizer (CJK and emoji split across tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>"
    )


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama/sentencepiece style: "▁" for spaces, BPE with byte fallback (<0xXX> pieces) for unknown chars."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # Trained on ASCII only, so CJK and emoji go through byte fallback.
    tok.train_from_iterator([line.encode("ascii", "ignore").decode() for line in CORPUS], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


TEXTS = [
    " Hello 世界 🎉 world",
    " naïve café — 😀😀 こんにちは!",
    " The quick brown fox 🦊 jumps 跳 over",
    " 👩‍👩‍👧 family, 🇯🇵 flag",
]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return byte_level_bpe() if request.param == "byte_level" else sentencepiece_like()


def in_context_text(tok, prompt_ids, output_ids, skip_special_tokens=True):
    """What the output decodes to after the prompt: the reference the deltas must add up to."""
    full = tok.decode(prompt_ids + output_ids, skip_special_tokens=skip_special_tokens)
    return full[len(tok.decode(prompt_ids, skip_special_tokens=skip_special_tokens)) :]


def stream(tok, prompt_ids, output_ids, chunk=1, **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids, **kw)
    deltas = [detok.add_tokens(output_ids[i : i + chunk]) for i in range(0, len(output_ids), chunk)]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    out = tokenizer.encode(text, add_special_tokens=False)
    detok, deltas = stream(tokenizer, prompt, out)
    assert "".join(deltas) == in_context_text(tokenizer, prompt, out) == detok.text
    assert "".join(deltas).strip() == text.strip()


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_char_never_split(tokenizer, text):
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    out = tokenizer.encode(text, add_special_tokens=False)
    assert len(out) > len(text.split())  # some characters really span several tokens
    _, deltas = stream(tokenizer, prompt, out)
    assert all("\ufffd" not in d for d in deltas)


def test_first_output_token_keeps_its_leading_space_in_context():
    tok = sentencepiece_like()
    prompt = tok.encode("Hello", add_special_tokens=False)
    word = next(t for t in tok.get_vocab() if t.startswith("▁") and len(t) > 3 and t[1:].isalpha())
    out = tok.convert_tokens_to_ids([word])
    assert tok.decode(out) == word[1:]  # decoded alone, sentencepiece drops the leading space
    _, deltas = stream(tok, prompt, out)
    assert "".join(deltas) == " " + word[1:] == in_context_text(tok, prompt, out)


def test_chunks_of_tokens_give_the_same_text(tokenizer):
    prompt = tokenizer.encode("Q", add_special_tokens=False)
    out = tokenizer.encode("".join(TEXTS), add_special_tokens=False)
    one = "".join(stream(tokenizer, prompt, out, chunk=1)[1])
    three = "".join(stream(tokenizer, prompt, out, chunk=3)[1])
    assert one == three == in_context_text(tokenizer, prompt, out)


def test_special_tokens_skipped_or_kept():
    tok = byte_level_bpe()
    prompt = tok.encode("Hi", add_special_tokens=False)
    out = tok.encode(" a<|im_start|>b c", add_special_tokens=False)
    skipped = "".join(stream(tok, prompt, out)[1])
    kept = "".join(stream(tok, prompt, out, skip_special_tokens=False)[1])
    assert skipped == " ab c"
    assert kept == " a<|im_start|>b c"


def test_decode_window_stays_bounded_for_long_outputs():
    tok = byte_level_bpe()
    lengths = []

    class Counting:
        backend_tokenizer = None

        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return tok.decode(ids, skip_special_tokens=kw.get("skip_special_tokens", False))

    rng = random.Random(0)
    words = tok.encode("".join(TEXTS), add_special_tokens=False)
    out = [rng.choice(words) for _ in range(3000)]
    detok = IncrementalDetokenizer(Counting(), [1, 2, 3])
    for t in out:
        detok.add_tokens([t])
    detok.flush()
    assert max(lengths) <= 16  # decode cost per token does not grow with the output
    assert detok.text == in_context_text(tok, [1, 2, 3], out)


def test_invalid_bytes_are_emitted_as_replacement_not_held_forever():
    tok = byte_level_bpe()
    # Lone UTF-8 continuation bytes (0x80..0xBF as byte-level chars) never form a character.
    lone = [tok.convert_tokens_to_ids(c) for c in "ĢģĤĥĦħĨĩĪī"]
    assert None not in lone and tok.unk_token_id not in lone
    detok = IncrementalDetokenizer(tok, tok.encode("x", add_special_tokens=False))
    text = "".join(detok.add_tokens([t]) for t in lone * 2)
    assert "\ufffd" in text  # released without waiting for the end
    assert text + detok.flush() == tok.decode(lone * 2)


def test_flush_emits_a_character_cut_by_the_end_of_generation():
    tok = byte_level_bpe()
    out = tok.encode(" 🎉", add_special_tokens=False)
    assert len(out) > 1
    detok = IncrementalDetokenizer(tok, tok.encode("x", add_special_tokens=False))
    partial = detok.add_tokens(out[:-1])
    assert "\ufffd" not in partial  # held back while the emoji is incomplete
    assert detok.flush().endswith("\ufffd")
    assert detok.text == in_context_text(tok, tok.encode("x", add_special_tokens=False), out[:-1])


@pytest.fixture(scope="module")
def default_model_tokenizer():
    from pagedllm.config import ModelConfig
    from pagedllm.model.loader import load_tokenizer

    return load_tokenizer(ModelConfig()).tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_default_model_tokenizer_streams_exact_text(default_model_tokenizer, skip_special_tokens):
    tok = default_model_tokenizer
    prompt = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    text = "".join(TEXTS) + " Ελληνικά العربية हिन्दी 𝔘𝔫𝔦𝔠𝔬𝔡𝔢<|im_end|>"
    out = tok.encode(text, add_special_tokens=False)
    _, deltas = stream(tok, prompt, out, skip_special_tokens=skip_special_tokens)
    assert all("\ufffd" not in d for d in deltas)
    joined = "".join(deltas)
    assert joined == tok.decode(out, skip_special_tokens=skip_special_tokens)
    assert joined.endswith("<|im_end|>") != skip_special_tokens
