"""Defining properties of the related flat-minima methods: LSQ/QT-DoG, Granger pruning, MeCAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatworld.optim import OptimSpec, SamSpec, build
from flatworld.optim.mecam import MeCAM
from flatworld.optim.prune import GrangerPruner
from flatworld.optim.quant import (
    FakeQuant,
    QuantLinear,
    add_to_optimizer,
    lsq_quantize,
    model_bits,
    qrange,
    quantize_,
)


@pytest.mark.parametrize("bits", [3, 7])
def test_fake_quant_values_lie_on_the_grid(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 12)
    fq = FakeQuant(w, bits=bits)
    with torch.no_grad():
        fq.scale.mul_(torch.linspace(0.3, 2.0, 5).reshape(5, 1))  # some channels clip
    k = fq(w) / fq.scale
    lo, hi = qrange(bits)
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert k.round().min() >= lo and k.round().max() <= hi
    assert fq.scale.shape == (5, 1)


def test_fake_quant_straight_through_and_lsq_scale_gradient() -> None:
    torch.manual_seed(1)
    bits, (lo, hi) = 3, qrange(3)
    w = (torch.randn(4, 6) * 2).requires_grad_()
    scale = torch.full((4, 1), 0.4, requires_grad=True)
    v = torch.randn(4, 6)
    (lsq_quantize(w, scale, bits) * v).sum().backward()
    r = w.detach() / 0.4
    inside = (r >= lo) & (r <= hi)
    assert (~inside).any() and inside.any()
    # d out / d w = 1 inside the clip range (up to the rounding of (w / s) * s), 0 outside
    assert torch.allclose(w.grad, v * inside, atol=1e-6)
    assert torch.all(w.grad[~inside] == 0)
    g = 1 / (w.numel() * hi) ** 0.5
    ds = torch.where(inside, r.round() - r, r.clamp(lo, hi)) * v * g
    assert torch.allclose(scale.grad, ds.sum(1, keepdim=True), atol=1e-5)


def test_qrange_rejects_bad_bits() -> None:
    with pytest.raises(ValueError, match="bits"):
        qrange(1)


def test_quantize_switch_adds_scales_to_sam_optimizer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    weights = [model[0].weight, model[2].weight]
    opt = build(OptimSpec(base="sgd", lr=0.1, sam=SamSpec(rho=0.05)), model.parameters())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def step() -> None:
        def closure() -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        opt.step(closure)

    step()
    scales = quantize_(model, bits=7)
    assert len(scales) == 2 and isinstance(model[0], QuantLinear)
    assert model[0].layer.weight is weights[0]  # optimizer state stays attached
    add_to_optimizer(opt, scales)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(s) in ids for s in scales)
    assert all(id(s) in {id(p) for g in opt.base.param_groups for p in g["params"]} for s in scales)
    before = [s.detach().clone() for s in scales]
    step()
    assert all(not torch.equal(b, s) for b, s in zip(before, scales, strict=True))
    bits = model_bits(model)
    assert bits["quantized_bits"] == 7 * (4 * 8 + 8 * 3)
    assert bits["fp32_bits"] == 32 * (8 + 3 + 8 + 3)  # biases and per-channel scales


def test_pruning_mask_zeroes_exactly_zero_gamma_and_stays_zero() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    pruner = GrangerPruner([layer.weight])
    gamma = np.ones(20)
    zero = np.array([0, 3, 7, 8, 19])
    gamma[zero] = 0.0
    assert pruner.prune(gamma) == len(zero)
    flat = layer.weight.detach().flatten()
    assert torch.all(flat[zero] == 0)
    assert torch.all(flat[np.setdiff1d(np.arange(20), zero)] != 0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 5)).pow(2).mean().backward()
        assert torch.all(layer.weight.grad.flatten()[zero] == 0)
        opt.step()
        pruner.apply()
    assert torch.all(layer.weight.detach().flatten()[zero] == 0)
    assert pruner.n_alive == 15
    with pytest.raises(ValueError, match="shape"):
        pruner.prune(np.ones(3))


def test_granger_fit_finds_the_weights_that_cause_the_loss_change() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(8))
    pruner = GrangerPruner([p])
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        pruner.begin()
        d = torch.randn(8, generator=gen) * 0.1
        with torch.no_grad():
            p.add_(d)
        pruner.end(0.0, float(-3 * d[1] ** 2 - 2 * d[5] ** 2))
    gamma = pruner.fit(keep=2)
    assert set(np.flatnonzero(gamma)) == {1, 5}
    assert gamma[1] < 0 and gamma[5] < 0  # their updates lower the loss


def _quadratic_setup():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a_mats = []
    for _ in range(3):
        m = rng.standard_normal((3, 3))
        a_mats.append(m @ m.T + np.eye(3))
    cs = [rng.standard_normal(3) for _ in range(3)]
    w0 = rng.standard_normal(3)
    return a_mats, cs, w0


def test_mecam_terms_match_hand_computation_on_quadratic() -> None:
    a_mats, cs, w0 = _quadratic_setup()
    w = nn.Parameter(torch.tensor(w0))
    fns = [lambda a=a, c=c: 0.5 * (w - torch.tensor(c)) @ torch.tensor(a) @ (w - torch.tensor(c))
           for a, c in zip(a_mats, cs, strict=True)]
    rho, alpha, beta, tau, j = 0.1, 0.05, 0.7, 2.0, 1
    mecam = MeCAM([w], torch.optim.SGD([w], lr=0.1), rho=rho, inner_lr=alpha, beta=beta, tau=tau)
    terms = mecam.compute_grad(fns, meta_test=j)

    def li(i: int, x: np.ndarray) -> float:
        return 0.5 * (x - cs[i]) @ a_mats[i] @ (x - cs[i])

    def gi(i: int, x: np.ndarray) -> np.ndarray:
        return a_mats[i] @ (x - cs[i])

    loss = np.mean([li(i, w0) for i in range(3)])
    g = np.mean([gi(i, w0) for i in range(3)], 0)
    e = rho * g / np.linalg.norm(g)
    g_adv = np.mean([gi(i, w0 + e) for i in range(3)], 0)
    g_tr = np.mean([gi(i, w0) for i in range(3) if i != j], 0)
    w1 = w0 - alpha * g_tr
    lam = np.exp(-loss / tau)
    sam_gap = np.mean([li(i, w0 + e) for i in range(3)]) - loss
    meta_gap = li(j, w1) - li(j, w0)
    grad = (1 - lam) * g + lam * g_adv + lam * beta * (gi(j, w1) - gi(j, w0))
    assert terms.loss == pytest.approx(loss, rel=1e-12)
    assert terms.sam_gap == pytest.approx(sam_gap, rel=1e-10)
    assert terms.meta_gap == pytest.approx(meta_gap, rel=1e-10)
    assert terms.weight == pytest.approx(lam, rel=1e-12)
    assert terms.objective == pytest.approx(loss + lam * (sam_gap + beta * meta_gap), rel=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), grad, rtol=1e-10)
    np.testing.assert_array_equal(w.detach().numpy(), w0)  # weights restored exactly
    mecam.step(fns, meta_test=j)
    np.testing.assert_allclose(w.detach().numpy(), w0 - 0.1 * grad, rtol=1e-10)


def test_mecam_weight_grows_as_loss_falls_and_rejects_bad_input() -> None:
    w = nn.Parameter(torch.zeros(2))
    mecam = MeCAM([w], torch.optim.SGD([w], lr=0.1), tau=0.5)
    assert mecam.weight(2.3) < 0.02 < mecam.weight(0.5) < mecam.weight(0.01) < 1.0
    with pytest.raises(ValueError, match="source domains"):
        mecam.compute_grad([lambda: w.sum()], 0)
    with pytest.raises(ValueError, match="tau"):
        MeCAM([w], torch.optim.SGD([w], lr=0.1), tau=0.0)
