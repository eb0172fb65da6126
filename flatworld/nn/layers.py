"""Layers shared by agents: NormedLinear MLPs, SimNorm, a batched ensemble, a conv encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _MishFn(torch.autograd.Function):
    """Mish via one sigmoid: tanh(softplus(x)) = n / (2 - n) with n = s(2 - s), s = sigmoid(x).

    Same values as ``F.mish`` (to float rounding) at about 2.5x its CPU speed forward and
    backward; Mish is a quarter of TD-MPC2's update time.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        r = torch.rsub(s, 2).mul_(s)
        r = r.div_(torch.rsub(r, 2))  # tanh(softplus(x)), no cancellation for x << 0
        ctx.save_for_backward(x, s, r)
        return x * r

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        x, s, r = ctx.saved_tensors
        # d/dx [x r] = r + x s (1 - s)^2 (1 + r)^2
        u = torch.rsub(s, 1).mul_(r + 1)
        return u.square_().mul_(s).mul_(x).add_(r).mul_(g)


def mish(x: Tensor) -> Tensor:
    return _MishFn.apply(x)


class Mish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _MishFn.apply(x)


def _trunc_normal_(w: Tensor, std: float = 0.02) -> Tensor:
    # TD-MPC2's init: torch's default cut-off at +-2 (absolute), i.e. ~100 std.
    return nn.init.trunc_normal_(w, std=std)


class SimNorm(nn.Module):
    """Simplicial normalisation: a softmax over consecutive groups of ``dim`` features.

    It bounds the latent state, which keeps multi-step latent rollouts from drifting.
    """

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"SimNorm dim={dim}; accepted: an int >= 1")
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.dim:
            raise ValueError(f"SimNorm: last dim {x.shape[-1]} is not a multiple of {self.dim}")
        return F.softmax(x.unflatten(-1, (-1, self.dim)), dim=-1).flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class NormedLinear(nn.Linear):
    """Linear -> (dropout) -> LayerNorm -> activation (Mish unless given)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dropout: float = 0.0,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        self.ln = nn.LayerNorm(out_features)
        self.act = act if act is not None else Mish()
        self.dropout = nn.Dropout(dropout) if dropout else None
        _trunc_normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.act(self.ln(x))


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    act: nn.Module | None = None,
    dropout: float = 0.0,
) -> nn.Sequential:
    """NormedLinear hidden layers (dropout on the first only), then a plain Linear output.

    With ``act`` the output layer is a NormedLinear ending in ``act`` (e.g. SimNorm).
    """
    dims = [in_dim, *hidden]
    layers: list[nn.Module] = [
        NormedLinear(dims[i], dims[i + 1], dropout=dropout if i == 0 else 0.0)
        for i in range(len(hidden))
    ]
    if act is not None:
        layers.append(NormedLinear(dims[-1], out_dim, act=act))
    else:
        out = nn.Linear(dims[-1], out_dim)
        _trunc_normal_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
    return nn.Sequential(*layers)


class Ensemble(nn.Module):
    """``num`` MLPs of one shape (NormedLinear hidden layers, Linear output) as batched weights.

    Every layer of every member is one ``baddbmm``, so the ensemble costs one kernel per layer
    rather than one per member. Parameters are stored as (num, in, out) tensors; ``forward`` can
    run a subset of the members (``idx``) and can read the weights detached, which gives a
    Q-function that passes gradients to its input only while staying a live view of the weights.
    """

    def __init__(
        self, num: int, in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num < 1:
            raise ValueError(f"Ensemble num={num}; accepted: an int >= 1")
        self.num, self.dropout, self.depth = num, dropout, len(hidden) + 1
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ln_weights = nn.ParameterList()
        self.ln_biases = nn.ParameterList()
        for i in range(self.depth):
            w = _trunc_normal_(torch.empty(num, dims[i], dims[i + 1]))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num, 1, dims[i + 1])))
            if i < self.depth - 1:
                self.ln_weights.append(nn.Parameter(torch.ones(num, 1, dims[i + 1])))
                self.ln_biases.append(nn.Parameter(torch.zeros(num, 1, dims[i + 1])))

    def forward(self, x: Tensor, idx: Tensor | None = None, detach: bool = False) -> Tensor:
        """x: (..., in) shared by all members -> (num or len(idx), ..., out)."""
        lead = x.shape[:-1]
        params = [self.weights, self.biases, self.ln_weights, self.ln_biases]
        w, b, g, beta = ([p.detach() if detach else p for p in ps] for ps in params)
        if idx is not None:
            w, b, g, beta = ([p[idx] for p in ps] for ps in (w, b, g, beta))
        n = w[0].shape[0]
        h = x.reshape(1, -1, x.shape[-1]).expand(n, -1, -1)
        for i in range(self.depth):
            h = torch.baddbmm(b[i], h, w[i])
            if i < self.depth - 1:
                if i == 0 and self.dropout and self.training:
                    h = F.dropout(h, self.dropout, training=True)
                h = F.layer_norm(h, h.shape[-1:])
                h = mish(torch.addcmul(beta[i], h, g[i]))
        return h.reshape(n, *lead, h.shape[-1])

    def extra_repr(self) -> str:
        shapes = [tuple(w.shape[1:]) for w in self.weights]
        return f"num={self.num}, layers={shapes}, dropout={self.dropout}"


class ShiftAug(nn.Module):
    """Random integer shift of up to ``pad`` pixels with replicate padding (DrQ-style)."""

    def __init__(self, pad: int = 3) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        p = self.pad
        x = F.pad(x, (p, p, p, p), mode="replicate")
        dy = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        rows = (torch.arange(h, device=x.device) + dy)[:, :, None]  # (n, h, 1)
        cols = (torch.arange(w, device=x.device) + dx)[:, None, :]  # (n, 1, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def conv_encoder(in_shape: Sequence[int], num_channels: int, out_dim: int, act: nn.Module):
    """Conv net for (C, 64, 64) pixels in [0, 255] (C = 3 x stacked frames) -> (out_dim,)."""
    c, h, w = in_shape
    if (h, w) != (64, 64):
        raise ValueError(f"rgb obs_shape={tuple(in_shape)}; accepted: (C, 64, 64)")
    layers: list[nn.Module] = [
        nn.Conv2d(c, num_channels, 7, stride=2), nn.ReLU(),
        nn.Conv2d(num_channels, num_channels, 5, stride=2), nn.ReLU(),
        nn.Conv2d(num_channels, num_channels, 3, stride=2), nn.ReLU(),
        nn.Conv2d(num_channels, num_channels, 3, stride=1), nn.Flatten(),
    ]  # fmt: skip
    flat = num_channels * 4 * 4
    if flat != out_dim:  # TD-MPC2 ties latent_dim to the conv output; a projection frees it
        layers.append(nn.Linear(flat, out_dim))
    layers.append(act)
    return _PixelNet(nn.Sequential(*layers))


class _PixelNet(nn.Module):
    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = self.net(x.reshape(-1, *x.shape[-3:]) / 255.0 - 0.5)
        return y.reshape(*lead, y.shape[-1])


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
