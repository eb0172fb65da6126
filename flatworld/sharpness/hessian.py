"""Curvature of the loss: Hessian-vector products, the top eigenvalue and the trace.

Hessian-vector products use double backward on a gradient graph built once per call:
`g = grad(L, w, create_graph=True)` and then `H v = grad(g, w, v, retain_graph=True)` for
every v. This works for any `loss_fn` closure, and on CPU it was the fastest of the options
measured by `benchmarks/hessian.py` (torch.func's forward-over-reverse jvp(grad) with
`functional_call` costs 1.7-1.8x as much per product there, needs a module plus a purely
functional loss, and fails on `F.mse_loss` under torch 2.13). Matrix products dominate either
way, so one product costs about what PyHessian's does; the savings come from the algorithm
(Lanczos needs far fewer products than power iteration for the same accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from flatworld.sharpness._common import (
    LossFn,
    check_params,
    check_positive_int,
    dense,
    flat_grad,
    flatten,
    numel,
    preserved,
    scalar_loss,
    unflatten,
)

METHODS = ("power", "lanczos")


class Eigen(NamedTuple):
    value: float
    converged: bool


class Trace(NamedTuple):
    mean: float
    stderr: float


class _Hessian:
    """v -> H v on flat vectors, reusing one gradient graph for every product."""

    def __init__(self, loss_fn: LossFn, params: list[Tensor]):
        self.params, self.n = params, numel(params)
        self.dtype, self.device = params[0].dtype, params[0].device
        with torch.enable_grad():
            self.grad = flat_grad(scalar_loss(loss_fn), params, create_graph=True)

    def __call__(self, v: Tensor) -> Tensor:
        if not self.grad.requires_grad:  # the gradient does not depend on w: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self.grad, self.params, v, retain_graph=True, allow_unused=True)
        return flatten(dense(hv, self.params))

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


class _FiniteDifferenceHessian(_Hessian):
    """v -> (g(w + s v) - g(w)) / s with |s v| = eps: one first-order backward per product.

    Double backward through LayerNorm and Mish costs about two first-order passes, so this
    halves the cost of a product, at a bias of order eps times the third derivative (about
    0.5% per product at eps=1e-3 on the benchmark MLP; eigenvalues and traces average it
    further). The weights are moved in place and restored bit for bit.
    """

    def __init__(self, loss_fn: LossFn, params: list[Tensor], eps: float):
        if not eps > 0:
            raise ValueError(f"fd_eps={eps}; accepted: fd_eps > 0")
        self.params, self.n, self.eps, self.loss_fn = params, numel(params), eps, loss_fn
        self.dtype, self.device = params[0].dtype, params[0].device
        self.saved = [p.detach().clone() for p in params]
        self.g0 = self._grad()

    def _grad(self) -> Tensor:
        with torch.enable_grad():
            return flat_grad(scalar_loss(self.loss_fn), self.params).detach()

    def __call__(self, v: Tensor) -> Tensor:
        step = self.eps / max(float(torch.linalg.vector_norm(v)), 1e-30)
        with torch.no_grad():
            torch._foreach_add_(self.params, unflatten(v, self.params), alpha=step)
        try:
            g = self._grad()
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.saved)
        return g.sub_(self.g0).div_(step)


HVP_METHODS = ("exact", "fd")


def _operator(loss_fn: LossFn, params: list[Tensor], hvp: str, fd_eps: float) -> _Hessian:
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp={hvp!r}; accepted: {' | '.join(HVP_METHODS)}")
    if hvp == "fd":
        return _FiniteDifferenceHessian(loss_fn, params, fd_eps)
    return _Hessian(loss_fn, params)


def hvp(loss_fn: LossFn, params: Iterable[Tensor], vec: list[Tensor]) -> list[Tensor]:
    """Hessian of `loss_fn()` w.r.t. `params` times `vec` (tensors shaped like params)."""
    params = check_params(params)
    vec = list(vec)
    if [v.shape for v in vec] != [p.shape for p in params]:
        raise ValueError(f"vec shapes {[tuple(v.shape) for v in vec]} do not match params "
                         f"shapes {[tuple(p.shape) for p in params]}")
    with preserved(params):
        op = _Hessian(loss_fn, params)
        v = flatten([v.to(op.dtype) for v in vec]).to(op.device)
        return [h.detach().clone() for h in unflatten(op(v), params)]


def _check_tol(tol: float) -> float:
    if not (isinstance(tol, int | float) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol={tol!r}; accepted: a finite number >= 0 (0 runs all iterations)")
    return float(tol)


def _power(op: _Hessian, v: Tensor, iters: int, tol: float, shift: float = 0.0) -> Eigen:
    """Dominant eigenvalue of H - shift I. Stops when the Rayleigh quotient changes by less
    than tol relative to itself between two iterations (PyHessian's rule)."""
    v = v / v.norm()
    value = None
    for _ in range(iters):
        hv = op(v)
        if shift:
            hv.sub_(v, alpha=shift)
        new = torch.dot(hv, v).item()
        if value is not None and abs(new - value) <= tol * (abs(value) + 1e-12):
            return Eigen(new, True)
        value, norm = new, hv.norm()
        if norm.item() == 0.0:  # v lies in the null space
            return Eigen(0.0, True)
        v = hv.div_(norm)
    return Eigen(float(value), False)


def _lanczos(
    op: _Hessian, v: Tensor, iters: int, tol: float, history: list[float] | None = None
) -> Eigen:
    """Largest Ritz value of a Lanczos run without full reorthogonalisation (three vectors of
    memory, which matters at millions of parameters). Losing orthogonality only makes converged Ritz
    values repeat, it never pushes them above lambda_max. Stops when the residual bound
    |beta_k s_k| <= tol |theta|, which bounds the error of theta. `history`, when given,
    receives the estimate after every product (benchmarks/hessian.py reads it)."""
    q, q_prev, beta = v / v.norm(), v, 0.0  # q_prev is unused until beta > 0
    alphas: list[float] = []
    betas: list[float] = []
    theta = 0.0
    for k in range(iters):
        w = op(q)  # a fresh tensor: updated in place below, one pass over memory per step
        alpha = torch.dot(w, q).item()
        w.add_(q, alpha=-alpha)
        if beta:
            w.add_(q_prev, alpha=-beta)
        w.add_(q, alpha=-torch.dot(w, q).item())  # one cheap local reorthogonalisation
        alphas.append(alpha)
        beta_next = w.norm().item()
        ritz, vecs = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        theta, s_last = float(ritz[-1]), float(vecs[-1, -1])
        if history is not None:
            history.append(theta)
        if beta_next * abs(s_last) <= tol * abs(theta) or beta_next <= 1e-12 * max(
            abs(theta), 1e-30
        ):  # second clause: an invariant subspace, theta is exact
            return Eigen(theta, True)
        if k + 1 < iters:
            q_prev, q, beta = q, w.div_(beta_next), beta_next
            betas.append(beta_next)
    return Eigen(theta, False)


def lambda_max(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    iters: int = 100,
    tol: float = 1e-4,
    method: str = "lanczos",
    seed: int = 0,
    hvp: str = "exact",
    fd_eps: float = 1e-3,
) -> Eigen:
    """Largest (algebraic) eigenvalue of the Hessian of `loss_fn()` w.r.t. `params`, with at
    most `iters` Hessian-vector products per run. Returns (value, converged).

    lanczos (default): converges in far fewer products than power iteration.
    power: finds the eigenvalue of largest magnitude; when that one is negative a second run
    on H - value I recovers the largest algebraic one (so up to 2 * iters products).
    hvp="fd": finite-difference products, about twice as fast, approximate (see
    _FiniteDifferenceHessian); "exact" (default) uses double backward."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; accepted: {' | '.join(METHODS)}")
    params = check_params(params)
    iters, tol = check_positive_int("iters", iters), _check_tol(tol)
    with preserved(params):
        op = _operator(loss_fn, params, hvp, fd_eps)
        gen = op.generator(seed)
        v = torch.randn(op.n, generator=gen, dtype=op.dtype, device=op.device)
        if method == "lanczos":
            return _lanczos(op, v, iters, tol)
        first = _power(op, v, iters, tol)
        if first.value >= 0:
            return first
        w = torch.randn(op.n, generator=gen, dtype=op.dtype, device=op.device)
        shifted = _power(op, w, iters, tol, shift=first.value)
        return Eigen(shifted.value + first.value, first.converged and shifted.converged)


def hessian_trace(
    loss_fn: LossFn, params: Iterable[Tensor], samples: int = 100, seed: int = 0,
    hvp: str = "exact", fd_eps: float = 1e-3,
) -> Trace:
    """Hutchinson's estimate of tr(H) = E[z^T H z] with Rademacher z: (mean, standard error
    of the mean). stderr is nan for a single sample."""
    params = check_params(params)
    samples = check_positive_int("samples", samples)
    with preserved(params):
        op = _operator(loss_fn, params, hvp, fd_eps)
        gen = op.generator(seed)
        quads = []
        for _ in range(samples):  # no host sync inside the loop
            z = torch.randint(0, 2, (op.n,), generator=gen, device=op.device).to(op.dtype)
            z = z.mul_(2).sub_(1)
            quads.append(torch.dot(op(z), z))
        quads = torch.stack(quads).double().cpu()
    stderr = quads.std().item() / math.sqrt(samples) if samples > 1 else float("nan")
    return Trace(quads.mean().item(), stderr)
