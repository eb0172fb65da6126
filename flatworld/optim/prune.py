"""Granger-causal pruning: keep the weights whose updates help predict the loss change.

During SGD, record for every step t the squared update of every prunable weight,
x_{t,k} = (theta_{t+1,k} - theta_{t,k})^2, and the loss change dL_t = L(theta_{t+1}) - L(theta_t).
Fit dL_t ~ sum_k gamma_k x_{t,k} with an L1 penalty (Lasso, no intercept, columns scaled to unit
RMS so that the penalty does not just favour weights that move a lot); a weight whose gamma is
exactly zero does not Granger-cause the loss change and is pruned (masked to zero). Repeat:
train, record, fit, prune.

The penalty is chosen per round from the Lasso path: the largest alpha whose fit keeps at least
`keep` of the still-alive weights, so a round prunes at most `alive - keep` of them; where no
alpha on the path (down to 1e-6 of the largest) keeps that many, the smallest alpha is used and
the round prunes more.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn


class GrangerPruner:
    """Records (squared update, loss change) pairs and prunes by the Lasso's zero set.

    Use: `begin()` before an optimizer step, `end(loss_before, loss_after)` after it, and
    `apply()` after every step once something is pruned (it re-zeroes masked weights, which
    momentum or weight decay could otherwise move).
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("GrangerPruner needs at least one parameter to prune")
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        self._snap: list[Tensor] = []
        self._x: list[np.ndarray] = []
        self._dl: list[float] = []
        for p, m in zip(self.params, self.masks, strict=True):
            p.register_hook(lambda g, m=m: g * m)  # pruned weights get no gradient either

    @property
    def n_total(self) -> int:
        return sum(m.numel() for m in self.masks)

    @property
    def n_alive(self) -> int:
        return int(sum(m.sum().item() for m in self.masks))

    def _flat_mask(self) -> np.ndarray:
        return torch.cat([m.flatten() for m in self.masks]).numpy()

    def begin(self) -> None:
        self._snap = [p.detach().clone() for p in self.params]

    def end(self, loss_before: float, loss_after: float) -> None:
        if not self._snap:
            raise RuntimeError("GrangerPruner.end() called without begin()")
        with torch.no_grad():
            d = torch.cat([(p - s).flatten() for p, s in zip(self.params, self._snap, strict=True)])
        self._x.append((d.double() ** 2).numpy())
        self._dl.append(float(loss_after) - float(loss_before))
        self._snap = []

    @property
    def n_records(self) -> int:
        return len(self._dl)

    def fit(self, keep: int | None = None, alpha: float | None = None) -> np.ndarray:
        """gamma for every prunable weight (0 for pruned ones); clears the records.

        Give `alpha` for a fixed L1 penalty, or `keep` to take the largest alpha on the Lasso
        path that leaves at least `keep` alive weights with gamma != 0.
        """
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import Lasso, lasso_path

        if (keep is None) == (alpha is None):
            raise ValueError("fit() takes exactly one of keep= and alpha=")
        if len(self._dl) < 2:
            raise ValueError(f"fit() needs at least 2 recorded steps, has {len(self._dl)}")
        alive = self._flat_mask()
        x = np.stack(self._x)[:, alive]
        y = np.asarray(self._dl)
        self._x, self._dl = [], []
        rms = np.sqrt((x * x).mean(0))
        xs = x / np.where(rms > 0, rms, 1.0)
        ys = y / (np.abs(y).max() + 1e-30)
        if alpha is not None:
            coef = Lasso(alpha=alpha, fit_intercept=False, max_iter=5000).fit(xs, ys).coef_
        else:
            if not 0 <= keep <= alive.sum():
                raise ValueError(f"keep={keep}; accepted: 0..{int(alive.sum())} (alive weights)")
            a_max = np.abs(xs.T @ ys).max() / len(ys)
            grid = np.geomspace(a_max, a_max * 1e-6, 40)
            with warnings.catch_warnings():
                # capped iterations at the smallest alphas: fine for reading off the zero set
                warnings.simplefilter("ignore", ConvergenceWarning)
                alphas, coefs, _ = lasso_path(xs, ys, alphas=grid, max_iter=300, tol=1e-3)
            nnz = (coefs != 0).sum(0)
            i = int(np.argmax(nnz >= keep)) if (nnz >= keep).any() else len(alphas) - 1
            coef = coefs[:, i]
        gamma = np.zeros(len(alive))
        gamma[alive] = coef * (np.abs(y).max() + 1e-30) / np.where(rms > 0, rms, 1.0)
        return gamma

    def prune(self, gamma: np.ndarray) -> int:
        """Mask (and zero) exactly the alive weights with gamma == 0; returns how many."""
        gamma = np.asarray(gamma)
        if gamma.shape != (self.n_total,):
            raise ValueError(f"gamma has shape {gamma.shape}; accepted: ({self.n_total},)")
        before = self.n_alive
        keep = torch.from_numpy(gamma != 0)
        i = 0
        for m in self.masks:
            n = m.numel()
            m &= keep[i : i + n].reshape(m.shape)
            i += n
        self.apply()
        return before - self.n_alive

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in zip(self.params, self.masks, strict=True):
            p.mul_(m)
