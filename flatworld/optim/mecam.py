"""MeCAM: meta curvature-aware minimization for domain generalization.

MeCAM's equations are not public; this is one concrete reading of its published description
("minimise the training loss, the SAM surrogate gap and a meta-learning surrogate gap, with the
curvature terms mattering little far from a minimum"). The formulas chosen here:

Source domains i = 1..n, each with a loss L_i(w) on its minibatch; L(w) = mean_i L_i(w).
Each step draws one source domain j as meta-test; L_tr = mean_{i != j} L_i, L_te = L_j.

    e       = rho * g / |g|,  g = grad L(w)                      (SAM's ascent direction)
    w'      = w - alpha * grad L_tr(w)                            (one inner SGD step, MLDG-style)
    G_sam   = L(w + e) - L(w)                                     (SAM surrogate gap)
    G_meta  = L_te(w') - L_te(w)                                  (meta-learning surrogate gap)
    lambda  = exp(-L(w) / tau)        (treated as a constant)     (~0 at high loss, -> 1 at 0)
    J(w)    = L(w) + lambda * (G_sam + beta * G_meta)

Gradient, first order as in SAM and first-order MAML (e and w' are held fixed, so the
Hessian-vector products of the exact gradient are dropped):

    grad J = (1 - lambda) grad L(w) + lambda grad L(w + e)
             + lambda * beta * (grad L_te(w') - grad L_te(w))

Cost per step: every domain's gradient at w (together one full pass), one full pass at w + e,
one meta-test pass at w': about 2 + 1/n times ERM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MeCAMTerms:
    loss: float  # L(w)
    sam_gap: float  # L(w + e) - L(w)
    meta_gap: float  # L_te(w') - L_te(w)
    weight: float  # lambda
    objective: float  # L + lambda * (sam_gap + beta * meta_gap)


def _norm(ts: Sequence[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))


class MeCAM:
    """Sets the MeCAM gradient on `params` and steps `base` with it.

    Args:
        params: the parameters `base` optimizes (all of them need a gradient).
        base: any torch optimizer over `params`.
        rho: SAM radius. inner_lr: alpha of the inner step. beta: weight of the meta gap.
        tau: loss scale of the curvature weight lambda = exp(-L / tau).
    """

    def __init__(self, params: Sequence[Tensor], base: torch.optim.Optimizer, rho: float = 0.05,
                 inner_lr: float = 0.1, beta: float = 1.0, tau: float = 0.5) -> None:
        for name, v in (("rho", rho), ("inner_lr", inner_lr), ("beta", beta)):
            if v < 0:
                raise ValueError(f"{name}={v}; accepted: >= 0")
        if tau <= 0:
            raise ValueError(f"tau={tau}; accepted: > 0")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MeCAM got no trainable parameters")
        self.base, self.rho, self.inner_lr, self.beta, self.tau = base, rho, inner_lr, beta, tau

    def weight(self, loss: float) -> float:
        return math.exp(-loss / self.tau)

    def _grad(self, fn: Callable[[], Tensor]) -> tuple[float, tuple[Tensor, ...]]:
        loss = fn()
        return loss.item(), torch.autograd.grad(loss, self.params)

    def compute_grad(self, domain_losses: Sequence[Callable[[], Tensor]],
                     meta_test: int) -> MeCAMTerms:
        """Write grad J into `.grad` of every param (weights are left unchanged)."""
        n = len(domain_losses)
        if n < 2:
            raise ValueError(f"MeCAM needs >= 2 source domains, got {n}")
        if not 0 <= meta_test < n:
            raise ValueError(f"meta_test={meta_test}; accepted: 0..{n - 1}")
        per = [self._grad(fn) for fn in domain_losses]
        loss = sum(v for v, _ in per) / n
        g = [sum(gs[k] for _, gs in per) / n for k in range(len(self.params))]
        g_tr = [sum(gs[k] for i, (_, gs) in enumerate(per) if i != meta_test) / (n - 1)
                for k in range(len(self.params))]
        l_te, g_te = per[meta_test]
        saved = [p.detach().clone() for p in self.params]
        scale = self.rho / (_norm(g) + 1e-12)
        with torch.no_grad():
            torch._foreach_add_(self.params, [t * scale for t in g])

        def mean_loss() -> Tensor:
            return sum(fn() for fn in domain_losses) / n

        l_adv, g_adv = self._grad(mean_loss)
        with torch.no_grad():
            torch._foreach_copy_(self.params, saved)
            torch._foreach_add_(self.params, g_tr, alpha=-self.inner_lr)
        l_te2, g_te2 = self._grad(domain_losses[meta_test])
        with torch.no_grad():
            torch._foreach_copy_(self.params, saved)
        lam = self.weight(loss)
        for k, p in enumerate(self.params):
            gk = (1 - lam) * g[k] + lam * g_adv[k] + lam * self.beta * (g_te2[k] - g_te[k])
            p.grad = gk if p.grad is None else p.grad + gk
        sam_gap, meta_gap = l_adv - loss, l_te2 - l_te
        return MeCAMTerms(loss, sam_gap, meta_gap, lam,
                          loss + lam * (sam_gap + self.beta * meta_gap))

    def step(self, domain_losses: Sequence[Callable[[], Tensor]], meta_test: int) -> MeCAMTerms:
        self.base.zero_grad(set_to_none=True)
        terms = self.compute_grad(domain_losses, meta_test)
        self.base.step()
        return terms
