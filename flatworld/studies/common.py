"""Shared pieces of the studies: atomic report writing, a small MLP, training and evaluation."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatworld import optim


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def save_fig(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plt():
    """pyplot on the Agg backend: studies run headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(xs: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    a = np.asarray(xs, dtype=np.float64) * scale
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.{digits}f} ± {sd:.{digits}f}"


def mlp(d_in: int = 64, hidden: Sequence[int] = (64,), d_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless minibatch indices, reshuffled each epoch from a seeded generator."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def sharpness_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float,
                 lmax_iters: int = 30, worst_steps: int = 0) -> dict[str, float]:
    """First-order (and worst-case) sharpness and lambda_max of the loss on (x, y)."""
    from flatworld import sharpness

    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    out = {"first_order": float(sharpness.first_order(loss_fn, params, rho=rho)),
           "lambda_max": float(sharpness.lambda_max(loss_fn, params, iters=lmax_iters)[0])}
    if worst_steps:
        out["worst_case"] = float(sharpness.worst_case(loss_fn, params, rho=rho,
                                                       steps=worst_steps))
    return out


class Counter:
    """Counts gradient evaluations (closure calls) of a training run."""

    def __init__(self) -> None:
        self.n = 0


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          steps: int, batch_size: int, seed: int, counter: Counter | None = None,
          on_step: Callable[[int], None] | None = None) -> Counter:
    """Minibatch training with `optim.closure_step(opt, closure)`: plain optimizers and SAM."""
    counter = counter or Counter()
    it = batches(len(y), batch_size, torch.Generator().manual_seed(seed))
    for t in range(steps):
        idx = next(it)
        xb, yb = x[idx], y[idx]

        def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            counter.n += 1
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        optim.closure_step(opt, closure)  # a non-finite loss skips the step
        if on_step is not None:
            on_step(t)
    return counter


def worst_case_perturbation(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                            rho: float, steps: int = 20, restarts: int = 2,
                            gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """Approximate argmax_{|e| <= rho} L(w + e) by projected normalized-gradient ascent.

    One start at e = 0 (which passes through the SAM direction) plus `restarts` random starts
    on the sphere; the best end point by loss wins. Weights are restored before returning.
    """
    best_e: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
    best = -float("inf")
    lr = 2.5 * rho / steps
    for r in range(restarts + 1):
        if r == 0:
            e = [torch.zeros_like(p) for p in params]
        else:
            e = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            n = torch.sqrt(sum((t * t).sum() for t in e))
            e = [t * (rho / n) for t in e]
        for _ in range(steps):
            with torch.no_grad():
                torch._foreach_add_(list(params), e)
            loss = loss_fn()
            g = torch.autograd.grad(loss, list(params))
            with torch.no_grad():
                torch._foreach_sub_(list(params), e)
                gn = torch.sqrt(sum((t * t).sum() for t in g)) + 1e-12
                e = [ei + lr * gi / gn for ei, gi in zip(e, g, strict=True)]
                en = torch.sqrt(sum((t * t).sum() for t in e))
                if en > rho:
                    e = [t * (rho / en) for t in e]
        with torch.no_grad():
            torch._foreach_add_(list(params), e)
            val = loss_fn().item()
            torch._foreach_sub_(list(params), e)
        if val > best:
            best, best_e = val, e
    return best_e
