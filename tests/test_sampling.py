"""Sampling filters against an exact reference: temperature first, then top-k, min-p (relative
to the top probability) and top-p on the tempered distribution; the repetition penalty
divides a seen token's positive logit and multiplies its negative one."""

import math

import pytest
import torch

from mamba2_cli.generation.sampling import SamplingParams, apply_repetition_penalty, filtered_probs, sample

# Out of order on purpose, so that a kept set is not a prefix of the indices.
LOGITS = [0.0, 2.0, -3.0, 1.0, 1.5, -1.0]


def reference(logits, temperature, top_k=0, top_p=1.0, min_p=0.0) -> dict[float, float]:
    """{logit: probability} of the tokens kept, renormalized; float64 throughout."""
    z = {l: l / temperature for l in logits}
    ranked = sorted(logits, reverse=True)
    kept = ranked[:top_k] if top_k else ranked
    top = max(z[l] for l in kept)
    p = {l: math.exp(z[l] - top) for l in kept}
    total = sum(p.values())
    p = {l: v / total for l, v in p.items()}
    if min_p:
        p = {l: v for l, v in p.items() if v >= min_p * max(p.values())}
    if top_p < 1.0:
        mass, nucleus = 0.0, {}
        for l in sorted(p, reverse=True):
            if mass < top_p:
                nucleus[l] = p[l]
            mass += p[l]
        p = nucleus
    total = sum(p.values())
    return {l: v / total for l, v in p.items()}


def distribution(params: SamplingParams, logits=LOGITS) -> dict[float, float]:
    probs = filtered_probs(torch.tensor([logits], dtype=torch.float32), params)[0].double()
    probs = probs / probs.sum()
    return {l: probs[i].item() for i, l in enumerate(logits) if probs[i] > 0}


def assert_matches(got: dict, want: dict):
    assert set(got) == set(want)
    for l in want:
        assert got[l] == pytest.approx(want[l], rel=1e-5), l


@pytest.mark.parametrize("temperature, kept", [(0.5, {2.0, 1.5}), (1.0, {2.0, 1.5, 1.0}),
                                                (2.0, {2.0, 1.5, 1.0, 0.0})])
def test_min_p_is_relative_to_the_top_probability_at_the_temperature(temperature, kept):
    # At T = 2 the top token has 0.33 of the mass: min-p 0.3 keeps what has 0.098 or more.
    # Relative to the total mass it would keep only the top token; before the temperature,
    # the tokens T = 1 keeps.
    want = reference(LOGITS, temperature, min_p=0.3)
    assert set(want) == kept
    assert_matches(distribution(SamplingParams(temperature=temperature, min_p=0.3)), want)


@pytest.mark.parametrize("temperature, kept", [(0.5, {2.0}), (1.0, {2.0, 1.5}), (2.0, {2.0, 1.5, 1.0}),
                                                (3.0, {2.0, 1.5, 1.0})])
def test_top_p_takes_the_nucleus_of_the_tempered_distribution(temperature, kept):
    want = reference(LOGITS, temperature, top_p=0.6)
    assert set(want) == kept
    assert_matches(distribution(SamplingParams(temperature=temperature, top_p=0.6)), want)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_top_k_keeps_the_k_best_with_tempered_probabilities(temperature):
    want = reference(LOGITS, temperature, top_k=3)
    assert set(want) == {2.0, 1.5, 1.0}
    assert_matches(distribution(SamplingParams(temperature=temperature, top_k=3)), want)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_without_filters_the_distribution_is_the_tempered_softmax(temperature):
    assert_matches(distribution(SamplingParams(temperature=temperature)), reference(LOGITS, temperature))


def test_sampling_draws_from_the_filtered_distribution():
    """The exponential race over filtered_probs: frequencies of 40,000 seeded draws."""
    n = 40000
    want = reference(LOGITS, 2.0, min_p=0.3)
    logits = torch.tensor([LOGITS]).expand(n, len(LOGITS)).contiguous()
    picks = sample(logits, SamplingParams(temperature=2.0, min_p=0.3), generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(picks, minlength=len(LOGITS)).double() / n
    got = {l: counts[i].item() for i, l in enumerate(LOGITS) if counts[i] > 0}
    assert set(got) == set(want)
    for l in want:
        assert abs(got[l] - want[l]) < 0.01, (l, got[l], want[l])


def test_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones():
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0, -0.5, 1.0]])
    seen = torch.tensor([[True, True, True, False, True, False]])
    want = torch.tensor([[2.0 / 1.6, -2.0 * 1.6, 0.0, 3.0, -0.5 * 1.6, 1.0]])
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.6), want)
    # A penalty below 1 favours seen tokens the same way round.
    want = torch.tensor([[2.0 / 0.5, -2.0 * 0.5, 0.0, 3.0, -0.5 * 0.5, 1.0]])
    assert torch.allclose(apply_repetition_penalty(logits, seen, 0.5), want)


def test_a_seen_token_with_a_negative_logit_falls_below_an_unseen_one():
    # -1.0 seen becomes -1.5 under penalty 1.5: below the unseen -1.2 (dividing would give -0.67).
    logits = torch.tensor([[-1.0, -1.2, -4.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingParams(repetition_penalty=1.5), seen).item() == 1
    n = 20000
    g = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=0.8, repetition_penalty=1.5)
    picks = sample(logits.expand(n, 3).contiguous(), params, seen.expand(n, 3), generator=g)
    want = reference([-1.5, -1.2, -4.0], 0.8)
    counts = torch.bincount(picks, minlength=3).double() / n
    assert abs(counts[0].item() - want[-1.5]) < 0.01 and abs(counts[1].item() - want[-1.2]) < 0.01
