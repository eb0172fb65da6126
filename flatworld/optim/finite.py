"""Optimizer steps that a non-finite loss or gradient cannot reach.

A NaN or inf in a loss (a corrupt observation, an overflow) would otherwise reach the weights
and the optimizer's moments through one step, and every later step with them. Here the step
is skipped instead: weights and optimizer state stay as they were, bit for bit. With a fused
Adam/AdamW the kernel itself skips (its ``found_inf`` input, the one torch's GradScaler uses),
so nothing is read back to the host; any other optimizer costs one host read per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def global_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all of ``tensors`` together."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def nonfinite(*values: Tensor) -> Tensor:
    """A bool tensor: whether any of ``values`` (losses, gradient norms) holds a NaN or inf."""
    if not values:
        raise ValueError("nonfinite() needs at least one tensor")
    device = values[0].device
    return torch.stack([~torch.isfinite(v.detach()).all().to(device) for v in values]).any()


def step_unless(optimizer: torch.optim.Optimizer, bad: Tensor) -> Tensor | bool:
    """``optimizer.step()`` unless ``bad``; returns whether it stepped (a tensor for a fused
    torch optimizer, which decides on the device; else a bool)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()  # read by the fused kernel: skip if 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return ~bad
    if bool(bad):
        return False
    optimizer.step()
    return True


def step_if_finite(optimizer: torch.optim.Optimizer, *values: Tensor) -> Tensor | bool:
    """``optimizer.step()`` unless a loss or gradient norm in ``values`` is not finite."""
    return step_unless(optimizer, nonfinite(*values))


def closure_step(optimizer: torch.optim.Optimizer, closure: Callable[[], Tensor]) -> Tensor:
    """``optimizer.step(closure)``, skipping a step whose loss or gradient is not finite. An
    optimizer that checks its passes itself (``skips_nonfinite``: SAM) takes the closure as it
    is; any other runs it once, then steps unless the loss or the gradient's norm is not
    finite. Returns the loss (detached)."""
    if getattr(optimizer, "skips_nonfinite", False):
        return optimizer.step(closure)
    with torch.enable_grad():
        loss = closure()
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    step_if_finite(optimizer, loss, global_norm(grads))
    return loss.detach()
