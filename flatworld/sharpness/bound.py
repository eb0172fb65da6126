"""The PAC-Bayes generalisation bound of SAM (Foret et al., 2021, "Sharpness-Aware Minimization
for Efficiently Improving Generalization", Theorem 1), evaluated from its terms.

For any rho > 0 and any data distribution D, with probability at least 1 - delta over the
draw of a training set S of n examples,

    L_D(w) <= max_{|e|_2 <= rho} L_S(w + e)
              + sqrt( ( k log(1 + |w|_2^2 / rho^2 (1 + sqrt(log(n) / k))^2)
                        + 4 log(n / delta) + O~(1) ) / (n - 1) )

where k is the number of parameters and |w|_2^2 their squared norm. The theorem assumes
that adding Gaussian noise to the weights does not lower the expected loss,
L_D(w) <= E_{e ~ N(0, rho)}[L_D(w + e)], and (through the PAC-Bayes bound it rests on) a
loss bounded in [0, 1].

What `sam_bound` evaluates, and what it does not:
- the O~(1) term inside the root is not given by the theorem; it is 0 here unless passed as
  `constant`, so the value is the bound's right side up to that term;
- the max over the ball is whatever the caller passes as `perturbed_loss`; the first-order
  ascent point L_S(w + rho g/|g|) that flatworld logs is an estimate of it from below;
- it bounds the expected loss of the model whose weights are w (for a run, the world
  model's loss), not the value-estimation gap of an agent;
- for a loss in [0, 1] it says nothing once the complexity term reaches 1 (`vacuous`), which
  is the usual case for networks with far more parameters than examples (k >> n).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

DELTA = 0.05


@dataclass(frozen=True)
class SamBound:
    """The terms of the bound and its value (`perturbed_loss + complexity`)."""

    perturbed_loss: float  # max_{|e| <= rho} L_S(w + e), or the caller's estimate of it
    k: int  # parameters
    weight_norm_sq: float  # |w|_2^2
    rho: float
    n: int  # training examples (for a run: the transitions in its replay)
    delta: float
    complexity: float  # the square-root term
    value: float

    @property
    def vacuous(self) -> bool:
        """For a loss in [0, 1]: the complexity term alone reaches the loss's range."""
        return self.complexity >= 1.0


def sam_bound(perturbed_loss: float, k: int, weight_norm_sq: float, rho: float, n: int,
              delta: float = DELTA, constant: float = 0.0) -> SamBound:  # fmt: skip
    """Theorem 1 of Foret et al. (2021) evaluated: see the module's docstring for the form and
    its assumptions. `constant` is the theorem's unspecified O~(1) term (0: left out)."""
    checks = (
        ("perturbed_loss", perturbed_loss, math.isfinite(perturbed_loss), "a finite number"),
        ("k", k, isinstance(k, int) and not isinstance(k, bool) and k >= 1, "an int >= 1"),
        ("weight_norm_sq", weight_norm_sq,
         math.isfinite(weight_norm_sq) and weight_norm_sq >= 0, "a finite number >= 0"),
        ("rho", rho, math.isfinite(rho) and rho > 0, "a finite number > 0"),
        ("n", n, isinstance(n, int) and not isinstance(n, bool) and n >= 2, "an int >= 2"),
        ("delta", delta, 0 < delta < 1, "a number in (0, 1)"),
        ("constant", constant, math.isfinite(constant) and constant >= 0,
         "a finite number >= 0"),
    )  # fmt: skip
    for name, value, ok, accepted in checks:
        if not ok:
            raise ValueError(f"{name}={value!r}; accepted: {accepted}")
    spread = (1.0 + math.sqrt(math.log(n) / k)) ** 2
    numerator = (k * math.log1p(weight_norm_sq / rho**2 * spread)
                 + 4.0 * math.log(n / delta) + constant)  # fmt: skip
    complexity = math.sqrt(numerator / (n - 1))
    return SamBound(float(perturbed_loss), k, float(weight_norm_sq), float(rho), n,
                    float(delta), complexity, float(perturbed_loss) + complexity)  # fmt: skip


def weight_terms(params: Iterable[Tensor]) -> tuple[int, float]:
    """(k, |w|_2^2) of a model's parameters, the bound's two terms that come from the weights
    (one host sync)."""
    params = list(params)
    if not params:
        raise ValueError("params is empty; accepted: the model's parameters")
    k = sum(p.numel() for p in params)
    with torch.no_grad():
        norm_sq = torch.stack([p.detach().float().pow(2).sum() for p in params]).sum()
    return k, float(norm_sq)
