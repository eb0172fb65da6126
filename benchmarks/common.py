"""Measuring helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so
this folder is on the import path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device, shapes: Iterable[tuple[int, int, int]],
                      seconds: float = 1.0, rounds: int = 3) -> float:  # fmt: skip
    """Best fp32 matmul FLOP/s over (m, k, n) shapes: the best of `rounds` passes, so a busy
    moment on a shared machine cannot pass for the peak."""
    shapes = list(shapes)
    best = 0.0
    for m, k, n in rounds * shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        for _ in range(2):
            a @ b
        reps, t = 0, time.perf_counter()
        sync(device)
        while time.perf_counter() - t < seconds / (rounds * len(shapes)):
            a @ b
            reps += 1
        sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def flops_of(fn: Callable[[], object]) -> int:
    """Matmul/conv FLOPs of one call (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
