"""Linear layers whose fp32 CPU products run through oneDNN.

On a CPU, torch multiplies fp32 matrices with MKL's sgemm, and convolutions with oneDNN. On
some CPUs the two differ by a factor: on the AMD EPYC (Zen 5) machines this project runs on,
``x @ w.t()`` reaches about 165 GFLOP/s on two threads and the same product done as a 1x1
convolution over a channels-last view of ``x`` (no copy) about 300-380 GFLOP/s, forward and
backward (``benchmarks/linear_onednn.py`` measures both on the machine at hand). The result is
the same fp32 product, summed in another order: not bit-identical to ``F.linear``, and just as
deterministic for a given thread count.

The route is taken only where it pays: fp32 CPU tensors outside autocast (bf16 products
already go to oneDNN), at least ``MIN_ROWS`` rows and ``MIN_WIDTH`` features in and out (a
tiny product is faster in sgemm). ``onednn_linear(False)`` turns it off, for a process or
(as a context manager) a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 64
MIN_WIDTH = 64
_enabled = True


@contextlib.contextmanager
def _restoring(previous: bool) -> Iterator[None]:
    global _enabled
    try:
        yield
    finally:
        _enabled = previous


def onednn_linear(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Turn the oneDNN route on or off; used as a context manager, only inside the block."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r}; accepted: True or False")
    previous, _enabled = _enabled, enabled
    return _restoring(previous)


def _routed(x: Tensor, weight: Tensor) -> bool:
    out, width = weight.shape
    return (_enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and min(width, out) >= MIN_WIDTH and x.numel() >= MIN_ROWS * width
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)  # fmt: skip


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for x (..., in) and weight (out, in)."""
    if not _routed(x, weight):
        return F.linear(x, weight, bias)
    out, width = weight.shape
    lead = x.shape[:-1]
    rows = x.reshape(-1, width)
    # (rows, in) row-major is a (1, in, rows, 1) image in channels-last: the convolution reads
    # it in place and writes (1, out, rows, 1) channels-last, which is (rows, out) row-major.
    image = rows.view(1, rows.shape[0], 1, width).permute(0, 3, 1, 2)
    y = F.conv2d(image, weight.reshape(out, width, 1, 1), bias)
    return y.permute(0, 2, 3, 1).reshape(*lead, out)


def add_linear_(acc: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``acc += x @ weight.t()`` in place, for a fresh 2-D ``acc`` (rows, out) and x (rows,
    in): ``addmm_`` where sgemm multiplies, else the product through :func:`linear`."""
    if _routed(x, weight):
        return acc.add_(linear(x, weight))
    return acc.addmm_(x, weight.t())


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and state dict) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
