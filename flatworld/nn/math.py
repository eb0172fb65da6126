"""Small numerical helpers: symlog, two-hot discrete regression, squashed Gaussians."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.expm1(torch.abs(x))


class TwoHot:
    """Scalars as a soft two-hot distribution over ``num_bins`` evenly spaced bins in symlog space.

    Rewards and values of very different scales share one head: the loss is a cross-entropy
    whose gradient does not grow with the scale of the target.
    """

    def __init__(self, num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins={num_bins}; accepted: an int >= 2")
        if not vmin < vmax:
            raise ValueError(f"vmin={vmin}, vmax={vmax}; accepted: vmin < vmax")
        self.num_bins, self.vmin, self.vmax = num_bins, vmin, vmax
        self.bin_size = (vmax - vmin) / (num_bins - 1)
        self._bins: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def bins(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._bins:
            self._bins[key] = torch.linspace(
                self.vmin, self.vmax, self.num_bins, device=like.device, dtype=like.dtype
            )
        return self._bins[key]

    def encode(self, x: Tensor) -> Tensor:
        """(..., 1) scalars -> (..., num_bins) probabilities, mass split between two bins."""
        pos = (symlog(x).clamp(self.vmin, self.vmax) - self.vmin) / self.bin_size
        # A triangle kernel of width one bin: exactly the two neighbouring bins get 1 - offset and
        # offset, no scatter needed, and a value on a bin gets all of the mass.
        idx = torch.arange(self.num_bins, device=x.device, dtype=x.dtype)
        return (1 - (pos - idx).abs()).clamp_min(0)

    def decode_probs(self, probs: Tensor) -> Tensor:
        return symexp((probs * self.bins(probs)).sum(-1, keepdim=True))

    def decode(self, logits: Tensor) -> Tensor:
        """(..., num_bins) logits -> (..., 1) scalars."""
        return self.decode_probs(F.softmax(logits, dim=-1))

    def cross_entropy(self, logits: Tensor, target_probs: Tensor) -> Tensor:
        """Soft cross-entropy (..., 1) against probabilities from :meth:`encode`."""
        return soft_cross_entropy(logits, target_probs)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1, keepdim=True)


def log_std(x: Tensor, low: float, high: float) -> Tensor:
    """Squash an unbounded output into [low, high] smoothly (tanh), as TD-MPC2 does."""
    return low + 0.5 * (high - low) * (torch.tanh(x) + 1)


def gaussian_logprob(eps: Tensor, log_std: Tensor) -> Tensor:
    return (-0.5 * eps.pow(2) - log_std - _HALF_LOG_2PI).sum(-1, keepdim=True)


def squash(mean: Tensor, sample: Tensor, log_prob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """tanh-squash a Gaussian sample and correct its log-probability by the Jacobian."""
    mean, sample = torch.tanh(mean), torch.tanh(sample)
    log_prob = log_prob - torch.log(F.relu(1 - sample.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return mean, sample, log_prob


class RunningScale:
    """Running (Polyak) estimate of the 5-95 percentile range of a batch of values, floored at 1.

    The policy loss is divided by it so that one entropy coefficient fits tasks whose values
    differ by orders of magnitude.
    """

    def __init__(self, tau: float = 0.01, device: torch.device | str = "cpu") -> None:
        self.tau = tau
        self.value = torch.ones(1, device=device)
        self._q = torch.tensor([0.05, 0.95], device=device)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """One Polyak step toward the batch's range; none where it is not finite (a NaN would
        otherwise stay in the scale for good)."""
        lo, hi = torch.quantile(x.detach().flatten().float(), self._q)
        new = self.value.lerp((hi - lo).clamp_min(1.0).reshape(1), self.tau)
        self.value.copy_(torch.where(torch.isfinite(new), new, self.value))

    def __call__(self, x: Tensor) -> Tensor:
        return x / self.value


def rng_state(device: torch.device) -> torch.Tensor:
    """The random stream an agent's kernels draw from on `device` (to replay it)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
