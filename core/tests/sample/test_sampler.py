"""Sampler: greedy/random selection, truncation, penalties, seeds and logprobs against HF and plain references."""

from __future__ import annotations

import math

import pytest
import torch
from pagedllm.sample.sampler import (
    Sampler,
    SamplingMetadata,
    _greedy,
    apply_logit_edits,
    compute_prompt_logprobs,
    sampling_weights,
)
from pagedllm.sample.sampling_params import SamplingParams
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

V = 64


def meta_for(params, prompts=None, outputs=None, generators=None, vocab=V):
    n = len(params)
    return SamplingMetadata.from_requests(
        params,
        prompts if prompts is not None else [[1, 2, 3]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        vocab,
        "cpu",
    )


def kept_mask(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    return sampling_weights(logits, meta) > 0


def empirical(logits_row: torch.Tensor, params: SamplingParams, draws: int = 20000) -> torch.Tensor:
    meta = meta_for([params] * draws, vocab=logits_row.shape[0])
    out = Sampler()(logits_row.expand(draws, -1), meta).token_ids
    return torch.bincount(torch.tensor(out), minlength=logits_row.shape[0]).float() / draws


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, V, generator=g) * 2


def test_greedy_rows_take_the_argmax(logits):
    out = Sampler()(logits, meta_for([SamplingParams(temperature=0.0)] * 6))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_mixed_batch_greedy_rows_unaffected_by_random_rows(logits):
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_p=0.5) for i in range(6)]
    out = Sampler()(logits, meta_for(params))
    argmax = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_temperature_sampling_matches_softmax_distribution():
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 3.0, 0.2])
    emp = empirical(row, SamplingParams(temperature=0.7, seed=None))
    expected = TemperatureLogitsWarper(0.7)(None, row[None].clone())[0].softmax(-1)
    assert torch.allclose(emp, expected, atol=0.015)


def test_top_k_keeps_the_k_largest_like_hf(logits):
    for k in (1, 5, 40):
        meta = meta_for([SamplingParams(top_k=k)] * 6)
        hf = TopKLogitsWarper(k)(None, logits.clone()) > -math.inf
        assert torch.equal(kept_mask(logits, meta), hf)


def test_top_k_larger_than_vocab_keeps_everything(logits):
    meta = meta_for([SamplingParams(top_k=V + 10)] * 6)
    assert meta.top_k is None
    assert kept_mask(logits, meta).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.99])
def test_top_p_keeps_smallest_set_reaching_p(logits, p):
    meta = meta_for([SamplingParams(top_p=p, temperature=0.8)] * 6)
    scaled = logits / 0.8
    hf = TopPLogitsWarper(p)(None, scaled.clone()) > -math.inf
    kept = kept_mask(logits, meta)
    assert torch.equal(kept, hf)
    probs = scaled.softmax(-1)
    for r in range(6):
        mass = probs[r][kept[r]].sum()
        smallest_kept = probs[r][kept[r]].min()
        assert mass >= p - 1e-6 and mass - smallest_kept < p  # reaches p; one fewer would not


def test_top_k_then_top_p_renormalises_within_top_k(logits):
    meta = meta_for([SamplingParams(top_k=8, top_p=0.6)] * 6)
    hf_logits = TopKLogitsWarper(8)(None, logits.clone())
    hf = TopPLogitsWarper(0.6)(None, hf_logits) > -math.inf
    assert torch.equal(kept_mask(logits, meta), hf)


def test_rows_with_and_without_top_p_in_one_batch(logits):
    params = [
        SamplingParams(top_p=0.5),
        SamplingParams(),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.9, top_k=50),
        SamplingParams(temperature=0.0, top_p=0.1),
        SamplingParams(min_p=0.3),
    ]
    kept = kept_mask(logits, meta_for(params))
    refs = [
        TopPLogitsWarper(0.5)(None, logits[0:1].clone()),
        logits[1:2],
        TopKLogitsWarper(3)(None, logits[2:3].clone()),
        TopPLogitsWarper(0.9)(None, TopKLogitsWarper(50)(None, logits[3:4].clone())),
        logits[4:5],
        MinPLogitsWarper(0.3)(None, logits[5:6].clone()),
    ]
    for r, ref in enumerate(refs):
        assert torch.equal(kept[r], (ref > -math.inf)[0]), r


@pytest.mark.parametrize("min_p", [0.01, 0.2, 0.9])
def test_min_p_matches_hf_warper(logits, min_p):
    meta = meta_for([SamplingParams(min_p=min_p, temperature=1.3)] * 6)
    hf = MinPLogitsWarper(min_p)(None, logits / 1.3) > -math.inf
    assert torch.equal(kept_mask(logits, meta), hf)


def test_truncated_tokens_are_never_sampled():
    row = torch.tensor([3.0, 2.9, 2.8, 0.0, -0.5, 1.0, 2.0, 2.5])
    for params in (SamplingParams(top_k=3), SamplingParams(top_p=0.4), SamplingParams(min_p=0.5)):
        emp = empirical(row, params, draws=5000)
        allowed = kept_mask(row[None], meta_for([params], vocab=8))[0]
        assert emp[~allowed].sum() == 0
        assert (emp[allowed] > 0).all()


def test_repetition_penalty_matches_hf_processor(logits):
    prompts = [[1, 2, 3, 3], [5], [7, 8], [0], [10, 11], [12]]
    outputs = [[4, 1], [5, 6], [], [63], [10], [12, 13, 14]]
    meta = meta_for([SamplingParams(repetition_penalty=1.7)] * 6, prompts, outputs)
    ours = apply_logit_edits(logits, meta)
    for r in range(6):
        ids = torch.tensor([prompts[r] + outputs[r]])
        hf = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[r : r + 1].clone())
        assert torch.allclose(ours[r], hf[0]), r


def test_frequency_and_presence_penalties_count_output_tokens_only(logits):
    prompts = [[9, 9, 9]] * 6
    outputs = [[1, 1, 1, 2], [], [3], [4, 4], [9], [5]]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)] * 3 + [SamplingParams()] * 3
    ours = apply_logit_edits(logits, meta_for(params, prompts, outputs))
    expected = logits.clone()
    for r in range(3):
        counts = torch.bincount(torch.tensor(outputs[r], dtype=torch.long), minlength=V).float()
        expected[r] -= 0.5 * counts + 0.25 * (counts > 0).float()
    assert torch.allclose(ours, expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.full((1, V), -1.0)
    logits[0, 7] = 2.0
    logits[0, 8] = 1.5
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, meta_for([params], outputs=[[7]])).token_ids == [8]
    assert Sampler()(logits, meta_for([params], outputs=[[]])).token_ids == [7]


def test_logit_bias_is_added_before_selection(logits):
    params = [SamplingParams(temperature=0.0, logit_bias={17: 100.0}), SamplingParams(temperature=0.0)]
    out = Sampler()(logits[:2], meta_for(params))
    assert out.token_ids == [17, logits[1].argmax().item()]
    ours = apply_logit_edits(logits[:2], meta_for(params))
    assert ours[0, 17] == pytest.approx(logits[0, 17].item() + 100.0)
    assert torch.equal(ours[1], logits[1])


def test_min_tokens_masks_eos_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # eos
    logits[0, 5] = 9.0  # stop token id
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5], eos_token_ids=[2])
    picks = [Sampler()(logits, meta_for([params], outputs=[[1] * k])).token_ids[0] for k in range(5)]
    assert picks[:3] != [2] * 3 and all(p not in (2, 5) for p in picks[:3])
    assert picks[3:] == [2, 2]


def test_min_tokens_masked_ids_never_sampled_by_random_rows():
    logits = torch.zeros(4000, 8)
    logits[:, 2] = 5.0
    params = SamplingParams(temperature=1.0, min_tokens=2, eos_token_ids=[2])
    out = Sampler()(logits, meta_for([params] * 4000, outputs=[[1]] * 4000, vocab=8)).token_ids
    assert 2 not in out


def test_min_tokens_leaves_eos_alone_under_ignore_eos():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, eos_token_ids=[2])
    assert Sampler()(logits, meta_for([params])).token_ids == [2]


def _run_seeded(batch_logits: list[torch.Tensor], params: list[SamplingParams], seeded_at: int, steps: int):
    gens = [torch.Generator().manual_seed(1234) if i == seeded_at else None for i in range(len(params))]
    tokens = []
    for step in range(steps):
        out = Sampler()(batch_logits[step], meta_for(params, generators=gens))
        tokens.append(out.token_ids[seeded_at])
    return tokens


def test_seeded_row_reproducible_regardless_of_batch_mates():
    g = torch.Generator().manual_seed(5)
    target = [torch.randn(V, generator=g) for _ in range(10)]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def batch(size, pos, mate_seed):
        mg = torch.Generator().manual_seed(mate_seed)
        steps = []
        for t in target:
            rows = torch.randn(size, V, generator=mg)
            rows[pos] = t
            steps.append(rows)
        mates = [SamplingParams(temperature=0.5 + i, top_k=i + 2) for i in range(size)]
        mates[pos] = seeded
        return steps, mates

    a = _run_seeded(*batch(3, 0, 1), seeded_at=0, steps=10)
    steps, mates = batch(7, 4, 2)
    b = _run_seeded(steps, mates, seeded_at=4, steps=10)
    assert a == b
    assert len(set(a)) > 1  # it really sampled


def test_unseeded_rows_vary_between_calls():
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(temperature=1.0)]
    picks = {Sampler()(logits, meta_for(params, vocab=1000)).token_ids[0] for _ in range(20)}
    assert len(picks) > 1


def test_logprobs_are_raw_and_include_sampled_token_with_rank(logits):
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0, logit_bias={40: 50.0}),
        SamplingParams(temperature=0.9, logprobs=0),
        SamplingParams(),
    ]
    out = Sampler()(logits[:3], meta_for(params, outputs=[[1, 2], [], []]))
    raw = logits[:3].log_softmax(-1)
    lp0 = out.logprobs[0]
    assert out.token_ids[0] == 40  # chosen through the bias, so it is not in the raw top-3
    assert len(lp0) == 4
    order = raw[0].argsort(descending=True).tolist()
    for rank, tok in enumerate(order[:3], start=1):
        assert lp0[tok].rank == rank
        assert lp0[tok].logprob == pytest.approx(raw[0, tok].item(), abs=1e-5)
    assert lp0[40].rank == order.index(40) + 1
    assert lp0[40].logprob == pytest.approx(raw[0, 40].item(), abs=1e-5)
    lp1 = out.logprobs[1]
    assert list(lp1) == [out.token_ids[1]]
    assert lp1[out.token_ids[1]].logprob == pytest.approx(raw[1, out.token_ids[1]].item(), abs=1e-5)
    assert out.logprobs[2] is None


def test_compute_prompt_logprobs_gives_next_token_logprob_and_top_n():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    nxt = [5, 6, 7, 8]
    res = compute_prompt_logprobs(logits, nxt, 2)
    raw = logits.log_softmax(-1)
    for j, pos in enumerate(res):
        assert pos[nxt[j]].logprob == pytest.approx(raw[j, nxt[j]].item(), abs=1e-5)
        assert pos[nxt[j]].rank == int((raw[j] > raw[j, nxt[j]]).sum()) + 1
        top2 = raw[j].topk(2).indices.tolist()
        assert all(t in pos for t in top2) and len(pos) in (2, 3)
    assert compute_prompt_logprobs(logits[:0], [], 2) == []


def test_padded_vocab_columns_are_never_sampled():
    logits = torch.zeros(2, V + 16)
    logits[:, V:] = 100.0
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    out = Sampler()(logits, meta_for(params))
    assert all(t < V for t in out.token_ids)


def test_bad_inputs_raise_clear_errors(logits):
    with pytest.raises(ValueError, match="do not match"):
        Sampler()(logits[:2], meta_for([SamplingParams()] * 3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        meta_for([SamplingParams(logit_bias={V + 1: 1.0})])
    with pytest.raises(ValueError, match="must match"):
        SamplingMetadata.from_requests([SamplingParams()], [[1]], [], [None], V, "cpu")


def test_penalties_on_the_first_step_with_no_output_yet(logits):
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=1.0, repetition_penalty=1.5)] * 6
    ours = apply_logit_edits(logits, meta_for(params, prompts=[[4]] * 6, outputs=[[]] * 6))
    expected = logits.clone()
    expected[:, 4] = torch.where(logits[:, 4] > 0, logits[:, 4] / 1.5, logits[:, 4] * 1.5)
    assert torch.allclose(ours, expected)


def test_identical_rows_in_one_batch_sample_independently():
    # n > 1 siblings share one logits row; each must draw its own token.
    logits = torch.zeros(200, 1000)
    out = Sampler()(logits, meta_for([SamplingParams(temperature=1.0)] * 200, vocab=1000)).token_ids
    assert len(set(out)) > 150


@pytest.mark.parametrize("p", [0.5, 0.95])
def test_top_p_on_a_large_vocabulary_matches_hf_for_peaked_and_flat_rows(p):
    # Peaked rows find the cut among the top candidates; flat rows need the whole row sorted.
    g = torch.Generator().manual_seed(1)
    vocab = 6000
    logits = torch.randn(6, vocab, generator=g)
    logits[0, :50] += 12.0
    logits[1] *= 0.01
    logits[2, :3000] += 2.0
    logits[4] *= 3.0
    params = [
        SamplingParams(top_p=p, temperature=0.9),
        SamplingParams(top_p=p),
        SamplingParams(top_p=p, top_k=40),
        SamplingParams(),
        SamplingParams(top_p=p, min_p=0.001, temperature=0.3),  # many clamped weights, then min_p
        SamplingParams(top_p=p, temperature=0.0),  # greedy: no truncation
    ]
    kept = kept_mask(logits, meta_for(params, vocab=vocab))
    refs = [
        TopPLogitsWarper(p)(None, logits[0:1] / 0.9),
        TopPLogitsWarper(p)(None, logits[1:2].clone()),
        TopPLogitsWarper(p)(None, TopKLogitsWarper(40)(None, logits[2:3].clone())),
        logits[3:4],
        TopPLogitsWarper(p)(
            None, MinPLogitsWarper(0.001)(None, logits[4:5] / 0.3)
        ),  # vLLM: min_p before top-p
        logits[5:6],
    ]
    for r, ref in enumerate(refs):
        assert torch.equal(kept[r], (ref > -math.inf)[0]), r
    assert kept[1].sum() > 1024  # the flat row really needed more than the candidates


def test_sampling_weights_are_the_tempered_softmax_on_kept_tokens(logits):
    params = [SamplingParams(temperature=t, top_k=k) for t, k in [(0.5, 0), (1.0, 10), (2.0, 0)]]
    w = sampling_weights(logits[:3], meta_for(params))
    for r, (t, k) in enumerate([(0.5, 0), (1.0, 10), (2.0, 0)]):
        ref = logits[r] / t
        if k:
            ref = TopKLogitsWarper(k)(None, ref[None])[0]
        assert torch.allclose(w[r] / w[r].sum(), ref.softmax(-1), atol=1e-6)


def _hf_distribution(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = row[None] / params.temperature
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(None, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores[0].softmax(-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=4),  # drawn among torch.topk candidates
        SamplingParams(temperature=1.3, top_k=5, top_p=0.7),
        SamplingParams(temperature=1.0, top_k=6, min_p=0.1),
        SamplingParams(temperature=0.9, top_p=0.8),  # drawn over the whole vocabulary
        SamplingParams(temperature=1.0, min_p=0.05, top_p=0.9),
    ],
)
def test_sampled_distribution_matches_hf_warpers(params):
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 3.0, 0.2, 1.5, -0.5])
    emp = empirical(row, params, draws=20000)
    expected = _hf_distribution(row, params)
    assert torch.allclose(emp, expected, atol=0.015)
    assert emp[expected == 0].sum() == 0


def test_min_tokens_mask_holds_among_top_k_candidates():
    logits = torch.zeros(2000, 8)
    logits[:, 2] = 5.0
    params = SamplingParams(temperature=1.0, top_k=3, min_tokens=2, eos_token_ids=[2])
    out = Sampler()(logits, meta_for([params] * 2000, outputs=[[1]] * 2000, vocab=8)).token_ids
    assert 2 not in out and len(set(out)) > 1


def test_seeded_top_k_row_reproducible_regardless_of_batch_mates():
    g = torch.Generator().manual_seed(9)
    target = [torch.randn(V, generator=g) for _ in range(8)]
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=7)

    def run(size, pos):
        gens = [torch.Generator().manual_seed(7) if i == pos else None for i in range(size)]
        params = [SamplingParams(temperature=1.0, top_k=i + 1) for i in range(size)]
        params[pos] = seeded
        tokens = []
        for t in target:
            rows = torch.randn(size, V, generator=g)
            rows[pos] = t
            tokens.append(Sampler()(rows, meta_for(params, generators=gens)).token_ids[pos])
        return tokens

    a, b = run(2, 1), run(5, 3)
    assert a == b and len(set(a)) > 1


def test_each_row_keeps_its_own_top_k_within_one_batch():
    g = torch.Generator().manual_seed(4)
    row = torch.randn(V, generator=g)
    params = [SamplingParams(temperature=2.0, top_k=1 if i % 2 else 30) for i in range(400)]
    out = Sampler()(row.expand(400, V), meta_for(params)).token_ids
    top30 = set(row.topk(30).indices.tolist())
    assert {out[i] for i in range(1, 400, 2)} == {int(row.argmax())}
    wide = {out[i] for i in range(0, 400, 2)}
    assert wide <= top30 and len(wide) > 10


def test_prompt_logprobs_longer_than_one_chunk_match_log_softmax():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(1100, V, generator=g)
    nxt = torch.randint(0, V, (1100,), generator=g).tolist()
    res = compute_prompt_logprobs(logits, nxt, 1)
    raw = logits.log_softmax(-1)
    assert len(res) == 1100
    for j in (0, 511, 512, 1099):
        assert res[j][nxt[j]].logprob == pytest.approx(raw[j, nxt[j]].item(), abs=1e-5)
        top = int(raw[j].argmax())
        assert res[j][top].rank == 1


def test_greedy_pick_is_argmax_first_maximum_and_nan():
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0],  # tie: the first
            [nan, 1.0, nan, 5.0],  # NaN counts as the maximum, the first NaN
            [-inf, -inf, -inf, -inf],
            [2.0, inf, inf, 0.0],
        ]
    )
    assert _greedy(rows).tolist() == rows.argmax(dim=-1).tolist() == [1, 0, 0, 1]
    big = torch.randn(8, 50_000, generator=torch.Generator().manual_seed(0))
    big[:, 123] = big[:, 40_000] = 99.0
    assert torch.equal(_greedy(big), big.argmax(dim=-1))


def test_a_platforms_argmax_picks_the_greedy_rows_after_the_edits(logits):
    """Sampler(argmax=...) (the model runner passes Platform.greedy_argmax): greedy rows, alone or beside
    random ones, take that function's pick of the edited logits; random rows are untouched by it."""
    seen = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return _greedy(x)

    bias = SamplingParams(temperature=0.0, logit_bias={5: 100.0})
    out = Sampler(spy)(logits, meta_for([bias] * 6))
    assert out.token_ids == [5] * 6 and len(seen) == 1 and torch.equal(seen[0][:, 5], logits[:, 5] + 100.0)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5) for i in range(6)]
    out = Sampler(lambda x: torch.full((x.shape[0],), 7, dtype=torch.int64))(logits, meta_for(params))
    assert [out.token_ids[i] for i in (0, 2, 4)] == [7, 7, 7]
    assert Sampler().argmax is _greedy


def test_the_platform_default_argmax_is_the_samplers():
    from pagedllm.platforms.platform import Platform

    rows = torch.tensor([[1.0, 3.0, 3.0], [float("nan"), 1.0, float("nan")]])
    assert Platform.greedy_argmax(None, rows).tolist() == _greedy(rows).tolist() == [1, 0]  # type: ignore[arg-type]
