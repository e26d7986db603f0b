"""Sampler: turns one step's logits into one token per row, batched over every request's sampling params."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.outputs import Logprob, PositionLogprobs
from pagedllm.sample.sampling_params import SamplingParams

# Top-p first looks for its cut among this many largest weights per row (exact whenever they hold p).
_TOP_P_CANDIDATES = 1024
_PROMPT_LOGPROBS_CHUNK = 512


@dataclass(slots=True)
class SamplingMetadata:
    """One step's per-row sampling parameters as tensors; each optional part is None when no row needs it.

    Logit edits (bias, min_tokens mask, penalties) are sparse: flat indices ``row * vocab_size + token``
    into the [N, V] logits, so their cost follows the number of distinct tokens, not N x V.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    greedy_mask: torch.Tensor | None  # [N] bool; None when all rows share one mode
    temperature: torch.Tensor | None  # [N, 1] float32, 1.0 on greedy rows; None when all greedy
    top_k: torch.Tensor | None  # [N, 1] int64, vocab_size where disabled; None when no random row uses it
    max_top_k: int
    top_p_rows: torch.Tensor | None  # [R] int64 rows with top_p < 1
    top_p: torch.Tensor | None  # [R, 1] float32, their top_p
    top_k_rows_cover_top_p: bool  # every top-p row also has top-k: its cut is among the top-k values
    top_k_covers_random_rows: bool  # every random row has top-k: sample among torch.topk's candidates
    min_p_log: torch.Tensor | None  # [N, 1] log(min_p), -inf where disabled
    bias_index: torch.Tensor | None  # [B] flat indices, logit_bias
    bias_values: torch.Tensor | None  # [B]
    mask_index: torch.Tensor | None  # [K] flat indices set to -inf (EOS / stop ids before min_tokens)
    rep_index: (
        torch.Tensor | None
    )  # [E] flat indices of distinct prompt+output tokens of rows with rep. penalty
    rep_penalty: torch.Tensor | None  # [E]
    freq_index: torch.Tensor | None  # [F] flat indices of distinct output tokens of rows with freq/presence
    freq_values: torch.Tensor | None  # [F] -(frequency * count + presence)
    # Seeded rows draw their uniform from their own generator, so batch mates cannot change their tokens.
    generators: dict[int, torch.Generator]
    num_logprobs: list[int | None]
    logprob_rows: list[int]  # rows with params.logprobs set

    @property
    def needs_processing(self) -> bool:
        """Whether any edit changes the logits before greedy/random selection."""
        return any(t is not None for t in (self.bias_index, self.mask_index, self.rep_index, self.freq_index))

    @classmethod
    def from_requests(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == n):
            raise ValueError(
                f"SamplingMetadata.from_requests: got {n} params, {len(prompt_token_ids)} prompts, "
                f"{len(output_token_ids)} outputs and {len(generators)} generators; they must match"
            )

        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=device)

        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        temperature = greedy_mask = None
        if not all_greedy:
            temperature = tensor(
                [[1.0 if g else p.temperature] for p, g in zip(params, greedy, strict=True)], torch.float32
            )
            if any(greedy):
                greedy_mask = tensor(greedy, torch.bool)

        # Truncation only concerns random rows; greedy rows ignore it.
        random_params = [(i, p) for i, (p, g) in enumerate(zip(params, greedy, strict=True)) if not g]
        top_k = None
        max_top_k = 0
        ks = [vocab_size] * n
        for i, p in random_params:
            if 0 < p.top_k < vocab_size:
                ks[i] = p.top_k
                max_top_k = max(max_top_k, p.top_k)
        if max_top_k:
            top_k = tensor([[k] for k in ks], torch.int64)
        p_rows = [i for i, p in random_params if p.top_p < 1.0]
        top_p_rows = top_p = None
        top_k_rows_cover_top_p = bool(p_rows) and all(ks[i] < vocab_size for i in p_rows)
        top_k_covers_random_rows = bool(random_params) and all(ks[i] < vocab_size for i, _ in random_params)
        if p_rows:
            top_p_rows = tensor(p_rows, torch.int64)
            top_p = tensor([[params[i].top_p] for i in p_rows], torch.float32)
        min_p_log = None
        if any(p.min_p > 0 for _, p in random_params):
            logs = [-math.inf] * n
            for i, p in random_params:
                if p.min_p > 0:
                    logs[i] = math.log(p.min_p)
            min_p_log = tensor([[v] for v in logs], torch.float32)

        edits = _sparse_edits(params, output_token_ids, vocab_size)
        penalties = _penalties(params, prompt_token_ids, output_token_ids, vocab_size)
        to_device = {
            k: None if v is None else torch.from_numpy(v).to(device)
            for k, v in {**edits, **penalties}.items()
        }
        seeded = {
            i: g for i, (g, gr) in enumerate(zip(generators, greedy, strict=True)) if g is not None and not gr
        }
        num_logprobs = [p.logprobs for p in params]
        return cls(
            num_rows=n,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            greedy_mask=greedy_mask,
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p_rows=top_p_rows,
            top_p=top_p,
            top_k_rows_cover_top_p=top_k_rows_cover_top_p,
            top_k_covers_random_rows=top_k_covers_random_rows,
            min_p_log=min_p_log,
            **to_device,
            generators=seeded,
            num_logprobs=num_logprobs,
            logprob_rows=[i for i, k in enumerate(num_logprobs) if k is not None],
        )


def _sparse_edits(
    params: list[SamplingParams], output_token_ids: list[list[int]], vocab_size: int
) -> dict[str, np.ndarray | None]:
    """logit_bias additions and the min_tokens -inf mask, as flat ``row * vocab_size + token`` indices."""
    bias_idx: list[int] = []
    bias_val: list[float] = []
    mask_idx: list[int] = []
    for i, p in enumerate(params):
        base = i * vocab_size
        if p.logit_bias:
            for tok, b in p.logit_bias.items():
                bias_idx.append(base + _check_token(tok, vocab_size, "logit_bias"))
                bias_val.append(float(b))
        if p.min_tokens and len(output_token_ids[i]) < p.min_tokens:
            # As vLLM: EOS is suppressed only when it would stop the sequence (not under ignore_eos).
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(p.eos_token_ids)
            mask_idx.extend(base + _check_token(t, vocab_size, "stop_token_ids") for t in sorted(stops))
    return {
        "bias_index": np.array(bias_idx, dtype=np.int64) if bias_idx else None,
        "bias_values": np.array(bias_val, dtype=np.float32) if bias_idx else None,
        "mask_index": np.array(mask_idx, dtype=np.int64) if mask_idx else None,
    }


def _penalties(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    vocab_size: int,
) -> dict[str, np.ndarray | None]:
    """Distinct (row, token) pairs the penalties touch, found for all rows at once with numpy."""
    out: dict[str, np.ndarray | None] = dict.fromkeys(
        ("rep_index", "rep_penalty", "freq_index", "freq_values")
    )
    freq_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if freq_rows:
        keys, counts = _unique(_flat_keys([output_token_ids[i] for i in freq_rows], freq_rows, vocab_size))
        row = keys // vocab_size
        freq = np.array([p.frequency_penalty for p in params])
        presence = np.array([p.presence_penalty for p in params])
        out["freq_index"] = keys
        out["freq_values"] = (-(freq[row] * counts + presence[row])).astype(np.float32)
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        lists = [prompt_token_ids[i] for i in rep_rows] + [output_token_ids[i] for i in rep_rows]
        keys, _ = _unique(_flat_keys(lists, rep_rows + rep_rows, vocab_size))
        penalty = np.array([p.repetition_penalty for p in params], dtype=np.float32)
        out["rep_index"] = keys
        out["rep_penalty"] = penalty[keys // vocab_size]
    return out


def _flat_keys(token_lists: list[list[int]], rows: list[int], vocab_size: int) -> np.ndarray:
    """``row * vocab_size + token`` for every token of every list, as one int64 array."""
    lengths = [len(t) for t in token_lists]
    tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=sum(lengths))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"token ids must be in [0, {vocab_size}), got {int(tokens.min())}..{int(tokens.max())}"
        )
    return np.repeat(np.asarray(rows, dtype=np.int64) * vocab_size, lengths) + tokens


def _unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their counts, by sorting (numpy's hash-based unique is far slower here)."""
    if keys.size == 0:
        return keys, keys
    keys = np.sort(keys)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.diff(np.append(starts, keys.size))


def _check_token(tok: int, vocab_size: int, what: str) -> int:
    if not 0 <= tok < vocab_size:
        raise ValueError(f"{what} id {tok} is outside the vocabulary (size {vocab_size})")
    return tok


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row: the first maximum, a NaN counting as the maximum, exactly as
    ``argmax``; ``max(...).indices`` measured ~1.6x faster than ``argmax`` on CPU (64 x 49152)."""
    return torch.max(logits, dim=-1).indices


GreedyArgmax = Callable[[torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    # Per row when params.logprobs is set: the top-N raw logprobs plus the sampled token, with ranks.
    logprobs: list[PositionLogprobs | None]


class Sampler:
    """Applies logit edits, penalties and truncation, then draws one token per row.

    Order (as vLLM): logit_bias, min_tokens mask, repetition penalty, frequency/presence penalties,
    then greedy rows take the argmax; random rows apply temperature, min_p, top_k, top_p and draw by
    inverse CDF with one uniform per row (from the row's own generator when it is seeded). Logprobs
    are the raw ones: log_softmax of the model's logits, before any of this.
    """

    def __init__(self, argmax: GreedyArgmax | None = None) -> None:
        # Greedy rows' argmax: _greedy's semantics exactly (a platform's kernel, Platform.greedy_argmax).
        self.argmax = argmax or _greedy

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # logits: [N, V'] with V' >= vocab_size (padded vocabularies are cut to the real one)
        if logits.dim() != 2 or logits.shape[0] != meta.num_rows or logits.shape[1] < meta.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {meta.num_rows} rows x vocab {meta.vocab_size}"
            )
        logits = logits[:, : meta.vocab_size]
        if logits.dtype != torch.float32:
            logits = logits.float()
        processed = apply_logit_edits(logits, meta) if meta.needs_processing else logits
        if meta.all_greedy:
            sampled = self.argmax(processed)
        else:
            sampled = _sample_random(processed, meta)
            if meta.greedy_mask is not None:
                sampled = torch.where(meta.greedy_mask, self.argmax(processed), sampled)
        token_ids: list[int] = sampled.tolist()

        logprobs: list[PositionLogprobs | None] = [None] * meta.num_rows
        if meta.logprob_rows:
            # Raw logprobs: nothing above writes into ``logits``.
            rows = meta.logprob_rows
            raw = (
                logits
                if len(rows) == meta.num_rows
                else logits.index_select(0, torch.tensor(rows, device=logits.device))
            )  # [R, V]
            nums = [meta.num_logprobs[i] for i in rows]
            for i, lp in zip(rows, _gather_logprobs(raw, [token_ids[i] for i in rows], nums), strict=True):
                logprobs[i] = lp
        return SamplerOutput(token_ids, logprobs)


def apply_logit_edits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logit_bias, min_tokens mask and penalties on a copy of ``logits`` (sparse flat-index updates)."""
    out = logits.clone(memory_format=torch.contiguous_format)  # [N, V]
    flat = out.view(-1)
    if meta.bias_index is not None:
        flat.index_add_(0, meta.bias_index, meta.bias_values)
    if meta.mask_index is not None:
        flat.index_fill_(0, meta.mask_index, -math.inf)
    if meta.rep_index is not None:
        # HF semantics: a seen token's positive logit is divided by the penalty, a negative one multiplied.
        seen = flat.index_select(0, meta.rep_index)
        flat.index_copy_(
            0, meta.rep_index, torch.where(seen > 0, seen / meta.rep_penalty, seen * meta.rep_penalty)
        )
    if meta.freq_index is not None:
        flat.index_add_(0, meta.freq_index, meta.freq_values)
    return out


def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """One token per row from its sampling weights, by inverse CDF with one uniform per row. -> [N] int64"""
    if meta.top_k_covers_random_rows:
        # Every random row keeps at most max_top_k tokens: draw among torch.topk's candidates only,
        # never touching the whole vocabulary again.
        values, indices = logits.topk(meta.max_top_k, dim=-1)  # [N, K] descending
        choice = _draw(_candidate_weights(values, meta), meta)
        return indices.gather(1, choice.unsqueeze(1)).squeeze(1)
    return _draw(sampling_weights(logits, meta), meta)


def _draw(weights: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[N, W] non-negative weights -> [N] column drawn in proportion to them; zero weights are never drawn."""
    device = weights.device
    cdf = weights.cumsum_(dim=-1)
    u = torch.rand(meta.num_rows, 1, device=device)
    for i, gen in meta.generators.items():
        # The generator's own device decides where its draw happens (engines may keep CPU generators).
        u[i] = torch.rand(1, generator=gen, device=gen.device).to(device)
    # The first column whose cumulative weight exceeds u * total.
    target = u * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=weights.shape[1] - 1).squeeze(1)


def _candidate_weights(values: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[N, K] weights of each row's top-K logits (descending) after top-k, min_p and top-p.

    The same rules as ``sampling_weights`` restricted to the candidates, except that a token tied
    with the k-th logit but ranked past it by torch.topk is left out.
    """
    inv_temp = 1.0 / meta.temperature
    w = (values - values[:, :1]).mul_(inv_temp).clamp_(min=-80.0).exp_()  # [N, K]
    position = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    drop = (position >= meta.top_k) | (values == -math.inf)  # past the row's k, or suppressed (min_tokens)
    if meta.min_p_log is not None:
        drop |= values < values[:, :1] + meta.min_p_log / inv_temp
    w.masked_fill_(drop, 0.0)
    if meta.top_p_rows is not None:
        rows = meta.top_p_rows
        sub = w.index_select(0, rows)
        cut = _top_p_cut(sub, meta.top_p * sub.sum(dim=-1, keepdim=True))  # sub is already descending
        w.index_copy_(0, rows, sub.masked_fill_(sub < cut, 0.0))
    return w


def sampling_weights(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[N, V] what random rows draw from: softmax(logits / T) up to a per-row factor, 0 where truncated.

    min_p and top-k each keep the tokens whose logit reaches a per-row threshold, so they compose as
    the larger threshold, found in logit space (temperature does not change the order) and applied
    in one pass; top-p then measures mass over what they kept (vLLM's and HF's order). Greedy rows
    get plain softmax weights. Nothing is written into ``logits``.
    """
    row_max = logits.amax(dim=-1, keepdim=True)  # [N, 1]
    inv_temp = 1.0 / (meta.temperature if meta.temperature is not None else torch.ones_like(row_max))
    # exp of huge negative numbers takes a slow path on CPU; clamping keeps those weights ~1e-35
    # and the masks below make every truncated or suppressed token exactly 0.
    probs = (logits - row_max).mul_(inv_temp).clamp_(min=-80.0).exp_()  # [N, V], row max is 1
    threshold = None  # [N, 1] smallest logit kept
    if meta.min_p_log is not None:
        # p < min_p * p_max  <=>  (logit - max) / T < log(min_p)
        threshold = row_max + meta.min_p_log / inv_temp
    top_vals = None
    if meta.top_k is not None:
        # Ties with the k-th value are kept, as HF's TopKLogitsWarper does.
        top_vals = logits.topk(meta.max_top_k, dim=-1).values  # [N, max_k], descending
        kth = top_vals.gather(1, meta.top_k.clamp(max=meta.max_top_k) - 1)
        kth.masked_fill_(meta.top_k >= meta.vocab_size, -math.inf)
        threshold = kth if threshold is None else torch.maximum(threshold, kth)
    if threshold is not None:
        probs.masked_fill_(logits < threshold, 0.0)
    if meta.mask_index is not None:
        probs.view(-1).index_fill_(0, meta.mask_index, 0.0)
    if meta.top_p_rows is not None:
        _apply_top_p(probs, logits, row_max, inv_temp, threshold, top_vals, meta)
    return probs


def _apply_top_p(
    probs: torch.Tensor,
    logits: torch.Tensor,
    row_max: torch.Tensor,
    inv_temp: torch.Tensor,
    threshold: torch.Tensor | None,
    top_vals: torch.Tensor | None,
    meta: SamplingMetadata,
) -> None:
    """Zeroes, in place, each top-p row's tokens outside the smallest set holding a fraction p of its weight.

    The cut is searched among the largest logits, turned into weights exactly as ``probs`` holds
    them: the top-k values when every top-p row has top-k, else (on CPU) the top candidates by
    partition, with a full sort only for rows whose candidates hold less than p.
    """
    rows = meta.top_p_rows
    every_row = rows.shape[0] == meta.num_rows  # then rows is arange(N): skip the gathers

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or every_row else t.index_select(0, rows)

    sub = pick(probs)  # [R, V]
    need = meta.top_p * sub.sum(dim=-1, keepdim=True)  # [R, 1]
    r_max, r_inv_temp, r_threshold = pick(row_max), pick(inv_temp), pick(threshold)

    def weights(desc_logits: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Descending logits of rows (all, or ``idx`` among them) -> their weights as in ``probs``."""
        m, t, thr = (
            (r_max, r_inv_temp, r_threshold)
            if idx is None
            else (r_max[idx], r_inv_temp[idx], None if r_threshold is None else r_threshold[idx])
        )
        w = (desc_logits - m).mul_(t).clamp_(min=-80.0).exp_()
        return w if thr is None else w.masked_fill_(desc_logits < thr, 0.0)

    if top_vals is not None and meta.top_k_rows_cover_top_p:
        desc = weights(pick(top_vals))  # [R, max_k]; top-k already zeroed the rest
        cut = _top_p_cut(desc, need)
    else:
        sub_logits = pick(logits)
        desc = weights(_largest_descending(sub_logits, _TOP_P_CANDIDATES))  # [R, W]
        cut = _top_p_cut(desc, need)
        if desc.shape[1] < sub.shape[1]:
            # The candidates do not hold p of the weight (a flat row): sort that row in full.
            short = (desc.sum(dim=-1, keepdim=True) < need).squeeze(1).nonzero().squeeze(1)
            if short.numel():
                full = weights(_largest_descending(sub_logits.index_select(0, short), None), short)
                cut[short] = _top_p_cut(full, need[short])
    # The smallest prefix reaching p (what HF's "remove where ascending cumsum <= 1 - p" keeps); ties kept.
    sub.masked_fill_(sub < cut, 0.0)
    if not every_row:
        probs.index_copy_(0, rows, sub)


def _top_p_cut(desc: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """[R, 1] the weight of the last token needed for the cumulative weight of ``desc`` to reach ``need``."""
    cum = desc.cumsum(dim=-1)
    last = torch.searchsorted(cum, need, right=False).clamp_(max=desc.shape[1] - 1)
    return desc.gather(1, last)


def _largest_descending(x: torch.Tensor, k: int | None) -> torch.Tensor:
    """The ``k`` largest values of each row (all when None), sorted descending.

    On CPU numpy's partition and values-only sort are far faster than torch.sort, which also
    computes indices; accelerators sort whole rows quickly, so they always do.
    """
    if x.device.type != "cpu":
        return x.sort(dim=-1, descending=True).values
    a = x.detach().numpy()
    if k is not None and a.shape[1] > 2 * k:
        a = np.partition(a, a.shape[1] - k, axis=-1)[:, -k:]
    return torch.from_numpy(np.ascontiguousarray(np.sort(a, axis=-1)[:, ::-1]))


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: list[int], num: int
) -> list[PositionLogprobs]:
    """Logprobs of each prompt position's next token plus the top-``num``: logits[j] predicts next_token_ids[j]."""
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(
            f"prompt logits {tuple(logits.shape)} do not match {len(next_token_ids)} next tokens"
        )
    out: list[PositionLogprobs] = []
    # Chunks bound the [chunk, V] temporaries for long prompts.
    for start in range(0, len(next_token_ids), _PROMPT_LOGPROBS_CHUNK):
        ids = next_token_ids[start : start + _PROMPT_LOGPROBS_CHUNK]
        out += _gather_logprobs(logits[start : start + len(ids)].float(), ids, [num] * len(ids))
    return out


def _gather_logprobs(logits: torch.Tensor, token_ids: list[int], nums: list[int]) -> list[PositionLogprobs]:
    """logits: [R, V] raw; per row the top-nums[r] logprobs plus token_ids[r]'s with its rank (1 = most likely)."""
    # torch's fused log_softmax is cheaper on CPU than logsumexp and a subtraction.
    logprobs = logits.log_softmax(dim=-1)  # [R, V]
    tok = torch.tensor(token_ids, dtype=torch.int64, device=logits.device).unsqueeze(1)
    tok_lp = logprobs.gather(1, tok)  # [R, 1]
    # At least the top-1, so that a sampled token among the top entries gets its rank for free.
    top = logprobs.topk(max(max(nums), 1), dim=-1)
    top_ids, top_vals, lps = top.indices.tolist(), top.values.tolist(), tok_lp.squeeze(1).tolist()
    ranks = [ids.index(t) + 1 if t in ids else 0 for ids, t in zip(top_ids, token_ids, strict=True)]
    outside = [r for r, rank in enumerate(ranks) if rank == 0]
    if outside:
        # rank = 1 + how many tokens are strictly more likely, counted only for these rows.
        index = torch.tensor(outside, device=logits.device)
        counted = (logprobs.index_select(0, index) > tok_lp.index_select(0, index)).sum(dim=-1) + 1
        for r, rank in zip(outside, counted.tolist(), strict=True):
            ranks[r] = rank
    out = []
    for r, tok_id in enumerate(token_ids):
        n = nums[r]
        pos: PositionLogprobs = {
            t: Logprob(v, j + 1) for j, (t, v) in enumerate(zip(top_ids[r][:n], top_vals[r][:n], strict=True))
        }
        if tok_id not in pos:
            pos[tok_id] = Logprob(lps[r], ranks[r])
        out.append(pos)
    return out
