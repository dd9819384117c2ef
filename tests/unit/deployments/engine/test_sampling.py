"""Sampling: greedy is the argmax; sampled tokens follow softmax(logits / T) under top-k and top-p,
exactly, on every path (candidates, tail, full sort); seeds reproduce a row in any batch; vLLM's
repetition penalty and min_tokens; a row with bad logits fails alone."""

from __future__ import annotations

import math

import pytest
import torch

from deployments.contracts import SamplingParams
from deployments.engine import sampling
from deployments.engine.sampling import RowSampler, sample_tokens

VOCAB = 6
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
END = frozenset({5})


def row(prompt=(), **params) -> RowSampler:
    return RowSampler.for_request(SamplingParams(**params), list(prompt), END)


def frequencies(params: dict, draws: int = 10000, candidates: int | None = None, monkeypatch=None) -> torch.Tensor:
    if candidates is not None:
        monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    rows = [row(**params) for _ in range(500)]
    counts = torch.zeros(VOCAB)
    for _ in range(draws // len(rows)):
        tokens, failures = sample_tokens(LOGITS.expand(len(rows), VOCAB), rows)
        assert not failures
        counts += torch.bincount(torch.tensor(tokens), minlength=VOCAB)
    return counts / counts.sum()


def expected(temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    probs = torch.softmax(LOGITS / temperature, dim=0)
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    order = probs.argsort(descending=True)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[token] = True
        mass += float(probs[token])
    probs = probs * keep
    return probs / probs.sum()


def close(observed: torch.Tensor, wanted: torch.Tensor, draws: int = 10000) -> bool:
    """Within 5 standard errors on every token (a loose, never-flaky bound for 10k draws)."""
    bound = 5 * torch.sqrt(wanted * (1 - wanted) / draws) + 1e-3
    return bool(((observed - wanted).abs() <= bound).all())


def test_greedy_is_the_argmax_and_takes_no_draw():
    tokens, failures = sample_tokens(torch.stack([LOGITS, LOGITS.flip(0)]), [row(temperature=0), row(temperature=0)])
    assert tokens == [0, 5] and not failures


@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.5}, {"temperature": 2.0},
                                    {"temperature": 1.0, "top_k": 2}, {"temperature": 1.0, "top_p": 0.6},
                                    {"temperature": 0.7, "top_k": 4, "top_p": 0.9}])
@pytest.mark.parametrize("candidates", [256, 3, 1], ids=["all-candidates", "tail-and-full-sort", "one-candidate"])
def test_draws_follow_the_restricted_softmax_on_every_path(params, candidates, monkeypatch):
    observed = frequencies(params, candidates=candidates, monkeypatch=monkeypatch)
    wanted = expected(params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0))
    assert close(observed, wanted), (observed, wanted)


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    def run(batch_size: int) -> list[int]:
        seeded = row(temperature=1.0, seed=1234)
        others = [row(temperature=1.0) for _ in range(batch_size)]
        drawn = []
        for _ in range(50):
            tokens, _ = sample_tokens(LOGITS.expand(batch_size + 1, VOCAB), [*others[: batch_size // 2], seeded,
                                                                           *others[batch_size // 2:]])
            drawn.append(tokens[batch_size // 2])
        return drawn

    assert run(0) == run(7) == run(3)
    assert len(set(run(0))) > 1


def test_a_tiny_temperature_is_greedy_and_never_nan():
    tokens, failures = sample_tokens(LOGITS.expand(4, VOCAB), [row(temperature=1e-6) for _ in range(4)])
    assert tokens == [0, 0, 0, 0] and not failures


def test_repetition_penalty_follows_vllm():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1, -5.0, -9.0]])
    plain, _ = sample_tokens(logits, [row(temperature=0)])
    penalised, _ = sample_tokens(logits, [row(prompt=[0], temperature=0, repetition_penalty=1.2)])
    assert plain == [0] and penalised == [1]  # 2.0 / 1.2 < 1.9
    negative, _ = sample_tokens(torch.tensor([[-1.0, -1.1, -9, -9, -9, -9.0]]),
                                [row(prompt=[0], temperature=0, repetition_penalty=1.2)])
    assert negative == [1]  # -1.0 * 1.2 < -1.1


def test_min_tokens_holds_back_the_end_tokens():
    ends_first = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])  # token 5 ends the row
    sampler = row(temperature=0, min_tokens=2)
    for _ in range(2):
        tokens, _ = sample_tokens(ends_first, [sampler])
        assert tokens != [5]
        sampler.record(tokens[0])
    assert sample_tokens(ends_first, [sampler])[0] == [5]


def test_stop_token_ids_and_ignore_eos_decide_the_end_tokens():
    assert row(stop_token_ids=(3,)).end_ids == {3, 5}
    assert row(ignore_eos=True).end_ids == frozenset()
    assert row(ignore_eos=True, stop_token_ids=(3,)).end_ids == {3}


def test_a_row_with_non_finite_logits_fails_alone():
    logits = torch.stack([LOGITS, torch.full((VOCAB,), math.nan), LOGITS])
    tokens, failures = sample_tokens(logits, [row(temperature=0), row(temperature=1.0), row(temperature=1.0)])
    assert tokens[0] == 0 and tokens[1] is None and tokens[2] is not None
    assert [failure.index for failure in failures] == [1]
