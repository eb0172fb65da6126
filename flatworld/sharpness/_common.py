"""Shared plumbing: argument checks, flat vectors over a parameter list, and the guard that
leaves weights and `.grad` exactly as they were found."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]


def check_params(params: Iterable[Tensor]) -> list[Tensor]:
    """Materialise `params` (a list or `module.parameters()`), keeping the trainable ones."""
    if isinstance(params, Tensor):
        raise ValueError("params must be a list of tensors (e.g. list(model.parameters())), "
                         "got a single Tensor")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params is empty: pass the tensors the loss depends on, "
                         "with requires_grad=True")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"params live on several devices {sorted(map(str, devices))}; "
                         "accepted: all on one device")
    return params


def check_rho(rho: float) -> float:
    if not (isinstance(rho, int | float) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho={rho!r}; accepted: a finite number >= 0")
    return float(rho)


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}; accepted: an integer >= {minimum}")
    return value


def scalar_loss(loss_fn: LossFn) -> Tensor:
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar Tensor, got {got}")
    return loss.reshape(())


def flat_grad(loss: Tensor, params: list[Tensor], create_graph: bool = False) -> Tensor:
    """Gradient as one flat vector, via autograd.grad so that no `.grad` is touched.
    Parameters the loss does not reach get a zero gradient."""
    if not loss.requires_grad:
        return torch.zeros(numel(params), dtype=params[0].dtype, device=params[0].device)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return flatten(dense(grads, params))


def dense(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
    """autograd.grad(..., allow_unused=True) gives None for unreached tensors: make them 0."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def numel(params: list[Tensor]) -> int:
    return sum(p.numel() for p in params)


def flatten(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Views of `flat` shaped like `params` (no copy)."""
    pieces = flat.split([p.numel() for p in params])
    return [t.view_as(p) for t, p in zip(pieces, params, strict=True)]


def adaptive_scale(params: list[Tensor], eta: float) -> Tensor:
    """ASAM's T_w as a flat vector: |w| + eta on weight matrices (ndim > 1), 1 elsewhere,
    the same convention as `flatworld.optim.SAM`."""
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta={eta!r}; accepted: a finite number > 0")
    return flatten([p.detach().abs().add(eta) if p.ndim > 1 else torch.ones_like(p)
                    for p in params])


@contextmanager
def preserved(params: list[Tensor]) -> Iterator[list[Tensor]]:
    """Yield a copy of the weights; on exit copy them back in place (bitwise, views stay live)
    and put back the very `.grad` objects that were there (None included)."""
    grads = [p.grad for p in params]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def set_perturbed(params: list[Tensor], saved: list[Tensor], e: Tensor) -> None:
    """w <- w0 + e, in place. Starting from w0 every time keeps rounding from piling up."""
    with torch.no_grad():
        torch._foreach_copy_(params, saved)
        torch._foreach_add_(params, unflatten(e, params))
