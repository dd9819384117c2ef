"""Picking each row's next token from one step's logits, every row with its own settings.

Greedy rows take the argmax. Sampled rows draw from softmax(logits / T), restricted by `top_k`
and `top_p`, exactly, but cheaply: over a vocabulary of 49k a full sort of 64 rows costs 150 ms
and full-width noise 20-100 ms on 2 CPU cores, against ~15 ms for this:
  - the `CANDIDATES` most likely tokens of each row (`topk`) and their true probabilities (against
    the full `logsumexp`), so the mass they cover is known;
  - a row whose `top_k`/`top_p` set lies inside the candidates (almost always) samples among them
    with the Gumbel-max trick, argmax(log p + g), g = -log(-log(u)): no softmax of the full row;
  - an unrestricted row samples among the candidates with the probability they cover, else from
    the rest (a full-width draw, rare); a restricted set wider than the candidates falls back to a
    full sort for that row. Either way the draw is from the exact distribution.
A seeded row draws its uniforms from its own generator, so its tokens are the same whatever else
shares the batch; unseeded rows draw theirs in one call. Before that, per row: the repetition
penalty (vLLM's and transformers' rule: a seen token's positive logit is divided by it, a
negative one multiplied) and `min_tokens` (end tokens masked until then). Temperatures in range
never make a NaN: nothing here divides by a sum that can vanish.

A row whose logits are not finite fails alone (`RowFailure`); the others get their tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from deployments.contracts import SamplingParams

__all__ = ["RowFailure", "RowSampler", "sample_tokens"]

_NEG_INF = float("-inf")
CANDIDATES = 256


class RowFailure(Exception):
    """One row cannot go on; the scheduler ends that row with `error` and keeps the others."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


@dataclass
class RowSampler:
    """A running row's sampling state: its settings, its generator, the tokens it has seen."""

    params: SamplingParams
    end_ids: frozenset[int]
    """Tokens that end the row: the model's eos (unless `ignore_eos`) and `stop_token_ids`."""
    seen: set[int] = field(default_factory=set)
    generated: int = 0
    generator: torch.Generator | None = None
    """The row's own, when it has a seed; unseeded rows share the engine's."""

    @classmethod
    def for_request(cls, params: SamplingParams, prompt_ids: list[int], eos_ids: frozenset[int]) -> "RowSampler":
        ends = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        generator = None
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        return cls(params, ends, seen, 0, generator)

    def record(self, token: int) -> None:
        self.generated += 1
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)

    @property
    def holds_back_ends(self) -> bool:
        return bool(self.params.min_tokens and self.generated < self.params.min_tokens and self.end_ids)


_SHARED = torch.Generator().manual_seed(random.getrandbits(63))


def sample_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[list[int | None], list[RowFailure]]:
    """One token per row of `logits` [rows, vocab] (None for a row that failed, with its failure)."""
    logits = logits.float()
    failures: list[RowFailure] = []
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    for index, ok in enumerate(finite):
        if not ok:
            failures.append(RowFailure(index, FloatingPointError("the model produced non-finite logits for this row")))
    failed = {failure.index for failure in failures}
    adjusted = [i for i, row in enumerate(rows) if i not in failed and _needs_adjusting(row)]
    if adjusted:
        logits = logits.clone()
        for index in adjusted:
            try:
                _adjust(logits[index], rows[index])
            except Exception as error:  # one row's failure is that row's alone
                failures.append(RowFailure(index, error))
                failed.add(index)
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if i not in failed and row.params.temperature > 0]
    if sampled:
        try:
            for index, token in zip(sampled, _sample(logits[sampled], [rows[i] for i in sampled])):
                tokens[index] = token
        except Exception as error:  # a batch-wide failure of sampling: those rows fail, greedy ones go on
            for index in sampled:
                failures.append(RowFailure(index, error))
                failed.add(index)
    for index in failed:
        tokens[index] = None
    return tokens, failures


def _needs_adjusting(row: RowSampler) -> bool:
    return (row.params.repetition_penalty != 1.0 and bool(row.seen)) or row.holds_back_ends


def _adjust(logits: torch.Tensor, row: RowSampler) -> None:
    """In place, on one row's logits: the repetition penalty, then `min_tokens`."""
    params = row.params
    if params.repetition_penalty != 1.0 and row.seen:
        seen = torch.tensor(sorted(row.seen), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if row.holds_back_ends:
        logits[torch.tensor(sorted(row.end_ids), dtype=torch.long)] = _NEG_INF


def _sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Tokens for rows of [rows, vocab] logits, each at its temperature, top-k and top-p."""
    temperatures = torch.tensor([row.params.temperature for row in rows], dtype=logits.dtype).unsqueeze(1)
    scaled = logits / temperatures
    count, vocab = scaled.shape
    width = min(CANDIDATES, vocab)
    values, indices = torch.topk(scaled, width, dim=-1)  # [rows, width], most likely first
    log_probs = values - torch.logsumexp(scaled, dim=-1, keepdim=True)
    probs = log_probs.exp()
    covered = probs.sum(dim=-1).tolist()
    top_k = [row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows]
    top_p = [row.params.top_p for row in rows]
    keep = torch.arange(width).unsqueeze(0) < torch.tensor(top_k).clamp(max=width).unsqueeze(1)
    keep &= (probs.cumsum(dim=-1) - probs) < torch.tensor(top_p, dtype=probs.dtype).unsqueeze(1)  # the first stays
    uniforms = _uniforms(rows, width + 1)  # [rows, width + 1]: one to choose head or tail, then noise
    noise = -torch.log(-torch.log(uniforms[:, 1:].clamp(min=1e-20, max=1.0 - 1e-7)))
    picks = (log_probs.masked_fill(~keep, _NEG_INF) + noise).argmax(dim=-1)
    tokens = indices.gather(1, picks.unsqueeze(1)).squeeze(1).tolist()
    head = uniforms[:, 0].tolist()
    for index, row in enumerate(rows):
        restricted = top_k[index] < vocab or top_p[index] < 1.0
        if restricted and not (top_k[index] <= width or covered[index] >= top_p[index]):
            tokens[index] = _sample_full(scaled[index], row, top_k[index], top_p[index])
        elif not restricted and head[index] >= covered[index]:
            tokens[index] = _sample_tail(scaled[index], indices[index], row)
    return tokens


def _uniforms(rows: list[RowSampler], width: int) -> torch.Tensor:
    uniforms = torch.empty((len(rows), width))
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        uniforms[unseeded] = torch.rand((len(unseeded), width), generator=_SHARED)
    for index, row in enumerate(rows):
        if row.generator is not None:
            uniforms[index] = torch.rand(width, generator=row.generator)
    return uniforms


def _gumbel_argmax(scores: torch.Tensor, row: RowSampler) -> int:
    generator = row.generator or _SHARED
    uniform = torch.rand(scores.shape, generator=generator).clamp_(min=1e-20, max=1.0 - 1e-7)
    return int((scores - torch.log(-torch.log(uniform))).argmax())


def _sample_tail(scaled: torch.Tensor, candidates: torch.Tensor, row: RowSampler) -> int:
    """A token outside the candidates, in proportion to its probability (a full-width draw)."""
    return _gumbel_argmax(scaled.index_fill(0, candidates, _NEG_INF), row)


def _sample_full(scaled: torch.Tensor, row: RowSampler, top_k: int, top_p: float) -> int:
    """The exact restricted draw over the whole row, for a top-k/top-p set wider than the candidates."""
    ordered, order = scaled.sort(descending=True)
    probs = torch.softmax(ordered, dim=-1)
    outside = (torch.arange(ordered.numel()) >= top_k) | ((probs.cumsum(0) - probs) >= top_p)
    return int(order[_gumbel_argmax(ordered.masked_fill(outside, _NEG_INF), row)])
