"""LSQ fake quantization of weights, as used by QT-DoG for domain generalization.

LSQ (Esser et al. 2020): w_q = s * round(clamp(w / s, -Q_N, Q_P)) with Q_N = 2^(b-1),
Q_P = 2^(b-1) - 1, a learnable step size s per output channel, a straight-through estimator
for the rounding (d w_q / d w = 1 inside the clip range, 0 outside), and s's gradient
multiplied by g = 1 / sqrt(numel(w) * Q_P) so that it learns at the pace of the weights.

QT-DoG (Javed et al. 2024) trains normally for a warm-up, then switches weight quantization on
(7 bits by default) and keeps training; the quantization noise acts as an implicit regulariser
towards flatter minima. The public code forgets to give the new step sizes to the optimizer;
here `quantize_` returns them and `add_to_optimizer` adds them as their own param group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def qrange(bits: int) -> tuple[int, int]:
    """(-Q_N, Q_P) of a signed b-bit grid."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r}; accepted: an integer in 2..16")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _scale_grad(x: Tensor, g: float) -> Tensor:
    # forward value x, backward gradient g * dL/dx
    return (x - x * g).detach() + x * g


def _round_ste(x: Tensor) -> Tensor:
    return (x.round() - x).detach() + x


def lsq_quantize(w: Tensor, scale: Tensor, bits: int, grad_scale: float | None = None) -> Tensor:
    """Fake-quantized w on the grid scale * {-Q_N, ..., Q_P}, differentiable in w and scale."""
    lo, hi = qrange(bits)
    g = grad_scale if grad_scale is not None else 1.0 / (w.numel() * hi) ** 0.5
    s = _scale_grad(scale, g)
    return _round_ste(torch.clamp(w / s, lo, hi)) * s


class FakeQuant(nn.Module):
    """Per-output-channel LSQ quantizer of one weight tensor (dim 0 = output channels)."""

    def __init__(self, weight: Tensor, bits: int = 7, per_channel: bool = True) -> None:
        super().__init__()
        _, hi = qrange(bits)
        self.bits = bits
        with torch.no_grad():
            a = weight.abs()
            mean_abs = a.flatten(1).mean(1) if per_channel else a.mean().reshape(1)
            # LSQ's init 2<|w|>/sqrt(Q_P); floored so a dead channel does not divide by zero
            s = (2 * mean_abs / hi**0.5).clamp_min(1e-8)
        shape = (-1,) + (1,) * (weight.ndim - 1) if per_channel else (1,) * weight.ndim
        self.scale = nn.Parameter(s.reshape(shape).to(weight.dtype))

    def forward(self, w: Tensor) -> Tensor:
        return lsq_quantize(w, self.scale, self.bits)


class QuantLinear(nn.Module):
    """Wraps an nn.Linear: same weight and bias Parameters, quantized weight in the forward."""

    def __init__(self, layer: nn.Linear, bits: int = 7) -> None:
        super().__init__()
        self.layer, self.quant = layer, FakeQuant(layer.weight, bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quant(self.layer.weight), self.layer.bias)


class QuantConv2d(nn.Module):
    def __init__(self, layer: nn.Conv2d, bits: int = 7) -> None:
        super().__init__()
        self.layer, self.quant = layer, FakeQuant(layer.weight, bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer._conv_forward(x, self.quant(self.layer.weight), self.layer.bias)


def quantize_(model: nn.Module, bits: int = 7) -> list[nn.Parameter]:
    """Swap every Linear/Conv2d in `model` for its quantized wrapper, in place.

    The wrappers keep the original weight Parameters (so optimizer state stays attached);
    returns the new step-size Parameters, which the caller must give to its optimizer.
    Already-quantized layers are left alone.
    """
    qrange(bits)
    scales: list[nn.Parameter] = []
    for name, child in list(model.named_children()):
        if isinstance(child, QuantLinear | QuantConv2d):
            continue
        if isinstance(child, nn.Linear):
            q: nn.Module = QuantLinear(child, bits)
        elif isinstance(child, nn.Conv2d):
            q = QuantConv2d(child, bits)
        else:
            scales += quantize_(child, bits)
            continue
        setattr(model, name, q)
        scales.append(q.quant.scale)
    return scales


def add_to_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                     **group: float) -> None:
    """Add `params` (e.g. LSQ step sizes) as a new param group; weight decay 0 by default.

    Works for a plain torch optimizer and for flatworld's SAM (which forwards to its base).
    """
    params = list(params)
    if params:
        optimizer.add_param_group({"params": params, "weight_decay": 0.0, **group})


def model_bits(model: nn.Module) -> dict[str, int]:
    """Storage of the deployed model: quantized weights at b bits, everything else fp32."""
    quantized, q_bits, other = set(), 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear | QuantConv2d):
            quantized.add(id(m.layer.weight))
            q_bits += m.layer.weight.numel() * m.quant.bits
    for p in model.parameters():
        if id(p) not in quantized:
            other += p.numel() * 32
    return {"quantized_bits": q_bits, "fp32_bits": other, "total_bits": q_bits + other}
