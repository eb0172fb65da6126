"""The SAM generalisation bound (Foret et al. 2021, Theorem 1): its value from its terms by
hand, its monotonicity, and the weight terms of a model."""

from __future__ import annotations

import math

import pytest
import torch

from flatworld.sharpness import sam_bound, weight_terms


def test_the_bound_equals_a_hand_computation():
    # k = 100 parameters, |w|^2 = 50, rho = 0.05, n = 10,000 examples, delta = 0.05
    b = sam_bound(perturbed_loss=0.3, k=100, weight_norm_sq=50.0, rho=0.05, n=10_000)
    log_n = math.log(10_000)  # 9.2103
    spread = (1 + math.sqrt(log_n / 100)) ** 2  # (1 + 0.30349)^2 = 1.69907
    ratio = 50.0 / 0.05**2  # 20,000
    k_term = 100 * math.log(1 + ratio * spread)  # 100 * log(33,982.5) = 1043.36
    delta_term = 4 * math.log(10_000 / 0.05)  # 4 * 12.2061 = 48.82
    by_hand = math.sqrt((k_term + delta_term) / 9_999)
    assert b.complexity == pytest.approx(by_hand, rel=1e-12)
    assert b.complexity == pytest.approx(0.33050, abs=1e-5)  # the numbers in the comments
    assert b.value == pytest.approx(0.3 + by_hand, rel=1e-12)
    assert (b.k, b.n, b.rho, b.delta, b.perturbed_loss) == (100, 10_000, 0.05, 0.05, 0.3)
    assert not b.vacuous
    with_constant = sam_bound(0.3, 100, 50.0, 0.05, 10_000, constant=10.0)
    assert with_constant.complexity == pytest.approx(
        math.sqrt((k_term + delta_term + 10.0) / 9_999), rel=1e-12)


def test_the_bound_tightens_with_n_and_loosens_with_the_weight_norm():
    by_n = [sam_bound(0.1, 5_000, 200.0, 0.05, n).complexity
            for n in (100, 1_000, 10_000, 100_000, 1_000_000)]  # fmt: skip
    assert all(a > b for a, b in zip(by_n, by_n[1:], strict=False)), by_n
    by_w = [sam_bound(0.1, 5_000, w, 0.05, 100_000).complexity
            for w in (0.0, 1.0, 10.0, 100.0, 1_000.0)]  # fmt: skip
    assert all(a < b for a, b in zip(by_w, by_w[1:], strict=False)), by_w
    # a world model's size against a replay's: k >> n, the bound says nothing
    assert sam_bound(0.1, 5_000_000, 1e4, 0.05, 100_000).vacuous


@pytest.mark.parametrize("kwargs, words", [
    ({"k": 0}, "k=0; accepted: an int >= 1"),
    ({"n": 1}, "n=1; accepted: an int >= 2"),
    ({"rho": 0.0}, "rho=0.0; accepted: a finite number > 0"),
    ({"weight_norm_sq": -1.0}, "weight_norm_sq=-1.0"),
    ({"delta": 1.0}, "delta=1.0; accepted: a number in (0, 1)"),
    ({"perturbed_loss": float("nan")}, "perturbed_loss=nan"),
])  # fmt: skip
def test_bad_terms_are_refused_by_name(kwargs, words):
    terms = {"perturbed_loss": 0.1, "k": 10, "weight_norm_sq": 1.0, "rho": 0.05, "n": 100,
             **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sam_bound(**terms)


def test_weight_terms_of_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    k, norm_sq = weight_terms(model.parameters())
    assert k == 3 * 2 + 2 + 2 * 1 + 1
    assert norm_sq == pytest.approx(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))
