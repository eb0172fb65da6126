"""Sharpness as a loss increase under a weight perturbation of radius rho.

All three measures share one ascent direction: for the L2 ball it is the first-order
maximiser e = rho T^2 g / |T g| (T = 1 unless adaptive), for the L-infinity box
e = rho T sign(g). `worst_case` starts from that point and climbs from there, so it can
never report less than `first_order`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from flatworld.sharpness._common import (
    LossFn,
    adaptive_scale,
    check_params,
    check_positive_int,
    check_rho,
    flat_grad,
    preserved,
    scalar_loss,
    set_perturbed,
)

NORMS = ("l2", "linf")
_TINY = 1e-12


def _step(g_scaled: Tensor, radius: float, norm: str) -> Tensor:
    """The point of the ball (in T-scaled coordinates) that maximises <g_scaled, u>."""
    if norm == "l2":
        return g_scaled * (radius / (g_scaled.norm() + _TINY))
    return g_scaled.sign() * radius


def _project(u: Tensor, rho: float, norm: str) -> Tensor:
    if norm == "l2":
        return u * (rho / u.norm().clamp_min(rho))
    return u.clamp(-rho, rho)


def first_order(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.01,
) -> float:
    """L(w + e) - L(w) with SAM's ascent step e = rho g/|g| (adaptive: rho T^2 g/|T g|,
    T = |w| + eta on weight matrices). `loss_fn()` computes the loss on a fixed batch and
    must not call backward; weights and `.grad` are left exactly as found."""
    loss, perturbed = first_order_losses(loss_fn, params, rho, adaptive, eta)
    return (perturbed - loss).item()


def first_order_losses(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """(L(w), L(w + e)) as 0-dim tensors at `first_order`'s ascent point: the two losses whose
    difference is the sharpness, and the second the SAM bound's estimate of
    max_{|e| <= rho} L(w + e)."""
    params, rho = check_params(params), check_rho(rho)
    scale = adaptive_scale(params, eta) if adaptive else None
    with preserved(params) as saved:
        with torch.enable_grad():
            loss = scalar_loss(loss_fn)
            g = flat_grad(loss, params)
        t = 1.0 if scale is None else scale
        e = t * _step(t * g, rho, "l2")
        set_perturbed(params, saved, e)
        with torch.no_grad():
            perturbed = scalar_loss(loss_fn)
    return loss.detach(), perturbed.detach()


def m_sharpness(
    loss_fn_on_chunk: Callable[[Tensor | tuple[Tensor, ...]], Tensor],
    params: Iterable[Tensor],
    batch: Tensor | tuple[Tensor, ...] | list[Tensor],
    m: int,
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.01,
) -> float:
    """Mean over chunks of `m` samples of each chunk's own `first_order` sharpness (each chunk
    gets its own ascent step, as in m-SAM). `batch` is a tensor or a tuple of tensors split
    along dim 0, and `loss_fn_on_chunk(chunk)` receives a piece of the same kind.
    m must divide the batch size: a ragged last chunk would be measured at a different m."""
    params = check_params(params)
    m = check_positive_int("m", m)
    tensors = (batch,) if isinstance(batch, Tensor) else tuple(batch)
    if not tensors or not all(isinstance(t, Tensor) and t.ndim >= 1 for t in tensors):
        raise ValueError("batch must be a Tensor or a tuple of Tensors with a batch dimension")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on dim 0 sizes {sorted(sizes)}")
    n = sizes.pop()
    if n % m:
        raise ValueError(f"m={m} does not divide the batch size {n}; accepted: a divisor of {n}")
    pieces = list(zip(*(t.split(m) for t in tensors), strict=True))
    total = 0.0
    for piece in pieces:
        chunk = piece[0] if isinstance(batch, Tensor) else piece
        total += first_order(lambda c=chunk: loss_fn_on_chunk(c), params, rho, adaptive, eta)
    return total / len(pieces)


def worst_case(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    rho: float = 0.05,
    norm: str = "l2",
    adaptive: bool = False,
    steps: int = 20,
    lr: float | None = None,
    eta: float = 0.01,
) -> float:
    """max L(w + e) - L(w) over the ball |T^-1 e| <= rho (L2 or L-infinity), found by projected
    gradient ascent from the first-order point: `steps` steps of length `lr` (default
    2.5 rho / steps) along the normalised (L2) or sign (L-infinity) gradient. Returns the best
    value met, so for norm="l2" it is >= `first_order` with the same arguments."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; accepted: {' | '.join(NORMS)}")
    params, rho = check_params(params), check_rho(rho)
    steps = check_positive_int("steps", steps, minimum=0)
    if lr is not None and not (isinstance(lr, int | float) and 0 < lr < float("inf")):
        raise ValueError(f"lr={lr!r}; accepted: None (2.5 rho / steps) or a finite number > 0")
    lr = 2.5 * rho / max(steps, 1) if lr is None else float(lr)
    scale = adaptive_scale(params, eta) if adaptive else None
    t = 1.0 if scale is None else scale
    with preserved(params) as saved:
        with torch.enable_grad():
            loss = scalar_loss(loss_fn)
            base, g = loss.detach(), flat_grad(loss, params)
        u = _step(t * g, rho, norm)  # position in T-scaled coordinates: e = T u
        best = None
        for i in range(steps + 1):
            set_perturbed(params, saved, t * u)
            with torch.set_grad_enabled(i < steps):
                loss = scalar_loss(loss_fn)
                best = loss.detach() if best is None else torch.maximum(best, loss.detach())
                if i == steps:
                    break
                g = flat_grad(loss, params)
            u = _project(u + _step(t * g, lr, norm), rho, norm)
    return (best - base).item()
