"""Dreamer's networks: dense layers with LayerNorm and SiLU, a CNN encoder/decoder for 64x64
pixels, MLPs for vector observations, and the MLP heads (reward, continue, actor, critic).

Weights start from DreamerV3's initialiser: a truncated normal scaled by the mean of fan-in and
fan-out. Output layers take an ``out_scale``; 0 starts the layer at zero (reward and critic).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatworld.nn import symlog
from flatworld.nn.linear import Linear, add_linear_, linear

LN_EPS = 1e-3  # DreamerV3's LayerNorm epsilon
_TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated at +-2


def init_(layer: nn.Linear | nn.Conv2d | nn.ConvTranspose2d, scale: float = 1.0,
          fan: float | None = None) -> None:  # fmt: skip
    """Truncated-normal init with variance scale / fan_avg; ``fan`` overrides fan_avg."""
    with torch.no_grad():
        if scale == 0.0:
            layer.weight.zero_()
        else:
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
            if isinstance(layer, nn.ConvTranspose2d):  # torch stores (in, out, k, k)
                fan_in, fan_out = fan_out, fan_in
            std = math.sqrt(scale / (fan if fan is not None else (fan_in + fan_out) / 2))
            std /= _TRUNC_STD
            nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
        if layer.bias is not None:
            layer.bias.zero_()


def compute_precision(device: torch.device, precision: str) -> torch.autocast:
    """The context that forward passes run in: bf16 autocast for ``precision="bf16"`` (see
    ``config.PRECISIONS``), a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Dense(nn.Sequential):
    """Linear (no bias: the norm has one) -> LayerNorm -> SiLU."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        layer = Linear(in_dim, out_dim, bias=False)
        init_(layer)
        super().__init__(layer, nn.LayerNorm(out_dim, eps=LN_EPS), nn.SiLU())


def mlp(in_dim: int, units: int, layers: int, out_dim: int | None = None,
        out_scale: float = 1.0) -> nn.Sequential:  # fmt: skip
    """``layers`` Dense layers of ``units``, then (if ``out_dim``) a Linear output layer."""
    dims = [in_dim] + [units] * layers
    mods: list[nn.Module] = [Dense(dims[i], dims[i + 1]) for i in range(layers)]
    if out_dim is not None:
        out = Linear(dims[-1], out_dim)
        init_(out, out_scale)
        mods.append(out)
    return nn.Sequential(*mods)


# ---- one-hot inputs -------------------------------------------------------------------------
# Every feature [h, z] that a head, the actor or the critic reads ends in z: S one-hot groups of C
# classes (S*C = 1024 at every model size), exactly 0/1 in value (straight-through samples).
# z @ W.t() is then a sum of S rows of W.t(): an embedding_bag does it with C times fewer FLOPs.
# In imagination that is two thirds of every first layer (feat = 512 + 1024 at size S).
def onehot_index(onehot: Tensor, groups: int) -> Tensor:
    """(..., groups): the flat column of the 1 in each one-hot group of ``onehot``."""
    width = onehot.shape[-1]
    classes = width // groups
    offsets = torch.arange(0, width, classes, device=onehot.device)
    return onehot.detach().unflatten(-1, (groups, classes)).argmax(-1) + offsets


class _OneHotRows(torch.autograd.Function):
    """onehot @ rows for ``onehot`` (N, S*C) of S exactly one-hot groups whose columns are
    ``index`` (N, S), and ``rows`` (S*C, out). Forward sums rows (embedding_bag); backward is
    the dense product for the input (straight-through samples) and, on a CPU, a sparse one for
    the rows."""

    @staticmethod
    def forward(ctx: Any, onehot: Tensor, index: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(onehot, index, rows)
        return F.embedding_bag(index, rows, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        onehot, index, rows = ctx.saved_tensors
        g_in = linear(grad, rows) if ctx.needs_input_grad[0] else None
        g_rows = None
        if ctx.needs_input_grad[2]:
            if grad.device.type == "cpu":
                g_rows = _onehot_transposed(index, rows.shape[0]) @ grad.float()
                g_rows = g_rows.to(rows.dtype)
            else:  # a GPU multiplies the dense one-hot fast
                g_rows = onehot.t() @ grad
        return g_in, None, g_rows


def _onehot_transposed(index: Tensor, width: int) -> Tensor:
    """The transpose (width, N) of the one-hot matrix whose rows have their 1s at ``index``
    (N, S), as a sparse CSR matrix: the rows' gradient onehot.t() @ grad as a sparse product
    costs N * S * out multiply-adds instead of the dense N * width * out (C times fewer; on
    this CPU about 2.5x less time at N = 15,360, S = C = 32, out = 512). A stable sort keeps
    each row's columns in order, so the sums, and the runs, are deterministic."""
    flat = index.reshape(-1)
    groups = index.shape[-1]
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(width + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.bincount(flat, minlength=width).cumsum(0)
    ones = torch.ones(flat.shape[0], device=index.device)
    with warnings.catch_warnings():  # torch warns, once, that sparse CSR tensors are beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, order // groups, ones, (width, index.shape[0]),
                                       check_invariants=False)  # fmt: skip


def onehot_rows(onehot: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``onehot @ rows`` (N, out) for ``onehot`` (N, S * C) whose every group of C is one-hot
    (exactly 0/1) at the columns ``index`` (N, S) (see :func:`onehot_index`), and ``rows``
    (S * C, out): a layer kept in that layout needs no transpose per call. 2-D only: callers
    add into the product in place, and an in-place op on a view of it would make autograd
    copy the whole gradient."""
    return _OneHotRows.apply(onehot, index, rows)


def onehot_matmul(onehot: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``onehot @ weight.t()``, as :func:`onehot_rows`, for a Linear's ``weight`` (out, S * C)."""
    return onehot_rows(onehot, index, weight.t().contiguous())


@dataclass(frozen=True)
class OneHotFeat:
    """A feature [dense, onehot] kept in its two parts, with the columns ``index`` of the
    one-hot part's 1s, so that an MLP's first layer sums weight rows for that part."""

    dense: Tensor
    onehot: Tensor
    index: Tensor

    def __getitem__(self, i: Any) -> OneHotFeat:
        return OneHotFeat(self.dense[i], self.onehot[i], self.index[i])

    def detach(self) -> OneHotFeat:
        return OneHotFeat(self.dense.detach(), self.onehot.detach(), self.index)


def feed(net: nn.Sequential | nn.Linear, x: Tensor | OneHotFeat,
         tail: Tensor | None = None) -> Tensor:  # fmt: skip
    """``net([x, tail])`` for an :func:`mlp`, a Linear or a Sequential that starts with one,
    reading a :class:`OneHotFeat` without concatenating it; ``tail`` (optional) holds dense
    columns that follow the feature (AC-CPC's actions)."""
    if isinstance(x, Tensor):
        return net(x if tail is None else torch.cat([x, tail], -1)).float()
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    first = layers[0]
    first_linear = first[0] if isinstance(first, Dense) else first
    d, w = x.dense.shape[-1], first_linear.weight
    end = d + x.onehot.shape[-1]
    lead = x.dense.shape[:-1]
    h = onehot_matmul(x.onehot.reshape(-1, x.onehot.shape[-1]),
                      x.index.reshape(-1, x.index.shape[-1]), w[:, d:end])  # fmt: skip
    for part, cols in ((x.dense, w[:, :d]), (tail, w[:, end:])):
        if part is None or part.shape[-1] == 0:
            continue
        part = part.reshape(-1, part.shape[-1])
        if torch.is_autocast_enabled(h.device.type):  # autocast casts out-of-place ops only
            h = torch.addmm(h, part, cols.t())
        else:  # in place, into the fresh sum: an out-of-place sum would first copy it
            add_linear_(h, part, cols)
    if first_linear.bias is not None:
        h.add_(first_linear.bias)
    h = h.view(*lead, h.shape[-1])
    rest = list(first)[1:] if isinstance(first, Dense) else []
    for layer in rest + layers[1:]:
        h = layer(h)
    return h.float()  # losses and distributions in fp32 (a no-op unless under autocast)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (a free permute in channels_last)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def preprocess(obs: Tensor, pixels: bool) -> Tensor:
    """Network input and decoder target: pixels in [0, 255] -> [-0.5, 0.5]; vectors -> symlog."""
    return obs / 255.0 - 0.5 if pixels else symlog(obs)


class ConvEncoder(nn.Module):
    """(..., C, 64, 64) preprocessed pixels -> (..., out_dim): stride-2 4x4 convs halve the
    resolution down to 4x4 while the channels double from ``depth``."""

    def __init__(self, obs_shape: Sequence[int], depth: int) -> None:
        super().__init__()
        c, h, w = obs_shape
        if (h, w) != (64, 64):
            raise ValueError(f"pixel obs_shape={tuple(obs_shape)}; accepted: (C, 64, 64)")
        layers: list[nn.Module] = []
        for i in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
            out = depth * 2**i
            conv = nn.Conv2d(c, out, 4, stride=2, padding=1, bias=False)
            init_(conv)
            layers += [conv, ChannelNorm(out, eps=LN_EPS), nn.SiLU()]
            c = out
        self.net = nn.Sequential(*layers)
        self.out_dim = c * 4 * 4

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:]).contiguous(memory_format=torch.channels_last)
        return self.net(x).float().flatten(1).reshape(*lead, self.out_dim)


class ConvDecoder(nn.Module):
    """(..., feat) -> (..., C, 64, 64): a Linear to 4x4 maps, then stride-2 transposed convs."""

    def __init__(self, feat_dim: int, obs_shape: Sequence[int], depth: int) -> None:
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.top = depth * 8
        self.proj = Linear(feat_dim, self.top * 16)
        init_(self.proj)
        layers: list[nn.Module] = []
        c = self.top
        for i in range(3):  # 4 -> 8 -> 16 -> 32, then a last layer to 64 without norm
            out = depth * 2 ** (2 - i)
            conv = nn.ConvTranspose2d(c, out, 4, stride=2, padding=1, bias=False)
            init_(conv)
            layers += [conv, ChannelNorm(out, eps=LN_EPS), nn.SiLU()]
            c = out
        last = nn.ConvTranspose2d(c, self.obs_shape[0], 4, stride=2, padding=1)
        init_(last)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, feat: Tensor | OneHotFeat) -> Tensor:
        lead = (feat if isinstance(feat, Tensor) else feat.dense).shape[:-1]
        x = feed(self.proj, feat).reshape(-1, self.top, 4, 4)
        x = self.net(x.contiguous(memory_format=torch.channels_last)).float()
        return x.reshape(*lead, *self.obs_shape)


class MLPEncoder(nn.Module):
    """(..., obs_dim) symlogged vectors -> (..., units)."""

    def __init__(self, obs_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.net = mlp(obs_dim, units, layers)
        self.out_dim = units

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """(..., feat) -> (..., obs_dim) in symlog space."""

    def __init__(self, feat_dim: int, obs_dim: int, units: int, layers: int) -> None:
        super().__init__()
        self.net = mlp(feat_dim, units, layers, obs_dim)

    def forward(self, feat: Tensor | OneHotFeat) -> Tensor:
        return feed(self.net, feat)


def recon_loss(pred: Tensor, target: Tensor, obs_ndim: int) -> Tensor:
    """Squared error summed over an observation's dims: (..., *obs) -> (...)."""
    return F.mse_loss(pred, target, reduction="none").flatten(-obs_ndim).sum(-1)
