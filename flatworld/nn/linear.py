"""Linear layers whose fp32 CPU products can run through oneDNN.

On a CPU, torch multiplies fp32 matrices with MKL's sgemm, and convolutions with oneDNN. On
some CPUs the two differ by a factor, either way. The same product done as a 1x1 convolution
over a channels-last view of ``x`` (no copy), two threads, forward and backward
(``benchmarks/linear_onednn.py`` measures both on the machine at hand), on two of the 2-core
machines this project runs on, both on 2026-12-03:

- an AMD EPYC (Zen 5) whose torch runs AVX-512 kernels: sgemm about 165 GFLOP/s, oneDNN
  300-380, 1.2-2.3x at the Dreamer agents' shapes;
- an AMD EPYC (Zen 4) that exposes AVX2 only: sgemm faster, oneDNN 0.64x at 1024 x 512 x 1024.

A likely reason is that oneDNN uses AVX-512 on any CPU that has it and MKL's sgemm did not on
that AMD CPU. So by default (``"auto"``) the route is taken on AMD CPUs where torch runs
AVX-512 kernels, and sgemm is kept elsewhere (Intel CPUs were not measured).
``onednn_linear(True)`` or ``(False)`` decides for every CPU, for a process or (as a context
manager) a block. The result is the same fp32 product summed in another order: not
bit-identical to ``F.linear``, and just as deterministic for a given CPU and thread count.

Even when on, the route is taken only where it pays and where torch's convolution does go to
oneDNN: fp32 CPU tensors outside autocast (bf16 products already go to oneDNN), at least
``MIN_ROWS`` rows and ``MIN_WIDTH`` features in and out (a tiny product is faster in sgemm),
more than ``_NATIVE_MAX`` elements in and more than one thread (below either, torch sends a 1x1
convolution of one image to its own im2col path, which is sgemm plus copies).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 64
MIN_WIDTH = 64
_NATIVE_MAX = 20480  # torch's convolution keeps a single image this small out of oneDNN
_mode: bool | str = "auto"


@contextlib.contextmanager
def _restoring(previous: bool | str) -> Iterator[None]:
    global _mode
    try:
        yield
    finally:
        _mode = previous


def onednn_linear(enabled: bool | str) -> contextlib.AbstractContextManager[None]:
    """Turn the oneDNN route on (``True``), off (``False``) or on where it was measured to pay:
    an AMD CPU with AVX-512 (``"auto"``, the default); as a context manager, inside the block."""
    global _mode
    if not (isinstance(enabled, bool) or enabled == "auto"):
        raise TypeError(f"enabled={enabled!r}; accepted: True, False or 'auto'")
    previous, _mode = _mode, enabled
    return _restoring(previous)


def onednn_linear_enabled() -> bool:
    """Whether the route is on for this CPU now (products still pass the size tests)."""
    if isinstance(_mode, bool):
        return _mode
    return _has_avx512()


@functools.cache
def _has_avx512() -> bool:
    """AVX-512 kernels in torch, on an AMD CPU: where the route was measured to pay."""
    return (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and _cpu_vendor() == "AuthenticAMD")  # fmt: skip


def cpu_info(field: str) -> str | None:
    """A field of /proc/cpuinfo (``"vendor_id"``, ``"model name"``); None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_vendor() -> str:
    return cpu_info("vendor_id") or "unknown"


def _routed(x: Tensor, weight: Tensor) -> bool:
    out, width = weight.shape
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and min(width, out) >= MIN_WIDTH and x.numel() >= MIN_ROWS * width
            and x.numel() > _NATIVE_MAX and torch.get_num_threads() > 1
            and onednn_linear_enabled()
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
