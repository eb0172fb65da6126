"""Measuring helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so
this folder is on the import path)."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

from flatworld.nn.linear import cpu_info


def cpu_name() -> str:
    """The CPU's model name, for the JSON of a speed figure."""
    return cpu_info("model name") or platform.processor() or "unknown"


def minor_faults() -> int:
    """Minor page faults of this process so far: memory the allocator returned to the system
    and touches again. On these virtual machines each one is slow."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device, shapes: Iterable[tuple[int, int, int]],
                      seconds: float = 1.0, rounds: int = 3,
                      dtype: torch.dtype = torch.float32,
                      product: Callable[[torch.Tensor, torch.Tensor], object] | None = None
                      ) -> float:  # fmt: skip
    """Best matmul FLOP/s (fp32 unless ``dtype``) over (m, k, n) shapes: the best of `rounds`
    passes, so a busy moment on a shared machine cannot pass for the peak. ``product(a, w)``
    of a (m, k) and w (n, k) (default ``a @ w.t()``) is the product timed."""
    shapes = list(shapes)
    product = product or (lambda a, w: a @ w.t())
    best = 0.0
    for m, k, n in rounds * shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        for _ in range(2):
            product(a, w)
        reps, t = 0, time.perf_counter()
        sync(device)
        while time.perf_counter() - t < seconds / (rounds * len(shapes)):
            product(a, w)
            reps += 1
        sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def _addmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def _sparse_aware(dense: Callable[..., int], first: int) -> Callable[..., int]:
    """A raw-tensor FLOP formula for a product whose operand ``args[first]`` may be a sparse
    CSR matrix (the Dreamer agents' one-hot backward): 2 * nnz * columns for it, else the
    dense formula on shapes."""

    def count(*args, out_val=None, **kwargs) -> int:
        a, b = args[first], args[first + 1]
        if a.layout == torch.sparse_csr:
            return 2 * a._nnz() * b.shape[-1]
        return dense(*(x.shape if isinstance(x, torch.Tensor) else x for x in args))

    count._get_raw = True  # FlopCounterMode passes such a formula the tensors, not shapes
    return count


# FlopCounterMode counts addmm and baddbmm but not their in-place forms, which the Dreamer
# agents use to accumulate into fresh outputs: count those as their out-of-place twins. And it
# counts a sparse product as dense: count its nonzeros.
_INPLACE = {torch.ops.aten.addmm_: _addmm_inplace_flop,
            torch.ops.aten.baddbmm_: _baddbmm_inplace_flop,
            torch.ops.aten.mm: _sparse_aware(lambda a, b: 2 * a[0] * a[1] * b[1], 0),
            torch.ops.aten.addmm: _sparse_aware(_addmm_inplace_flop, 1)}  # fmt: skip


def flops_of(fn: Callable[[], object]) -> int:
    """Matmul/conv FLOPs of one call (torch's FlopCounterMode, plus in-place addmm_ and
    baddbmm_)."""
    with FlopCounterMode(display=False, custom_mapping=_INPLACE) as counter:
        fn()
    return counter.get_total_flops()
