from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from flatworld.nn import (
    Ensemble,
    RunningScale,
    ShiftAug,
    SimNorm,
    TwoHot,
    mish,
    mlp,
    soft_cross_entropy,
    symexp,
    symlog,
)
from flatworld.nn import math as fmath


def test_simnorm_groups_are_distributions():
    x = torch.randn(5, 3, 64) * 10
    y = SimNorm(8)(x)
    groups = y.unflatten(-1, (-1, 8))
    assert (groups >= 0).all()
    torch.testing.assert_close(groups.sum(-1), torch.ones(5, 3, 8))
    with pytest.raises(ValueError, match="multiple of 8"):
        SimNorm(8)(torch.randn(2, 12))


def test_symlog_inverts():
    x = torch.tensor([-1e4, -3.5, -1.0, 0.0, 1e-3, 2.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x)
    torch.testing.assert_close(symlog(torch.tensor([math.e - 1])), torch.tensor([1.0]))


def test_two_hot_exact_on_and_between_bins():
    th = TwoHot(101, -10.0, 10.0)
    on_bins = symexp(torch.linspace(-10, 10, 101, dtype=torch.float64)).unsqueeze(-1)
    between = symexp(torch.linspace(-9.9, 9.9, 99, dtype=torch.float64)).unsqueeze(-1)
    for x in (on_bins, between, torch.tensor([[0.0], [0.37], [-12.5]], dtype=torch.float64)):
        p = th.encode(x)
        torch.testing.assert_close(p.sum(-1), torch.ones(len(x), dtype=torch.float64))
        assert ((p > 0).sum(-1) <= 2).all()
        torch.testing.assert_close(th.decode_probs(p), x, rtol=1e-9, atol=1e-9)
    # A value on a bin puts all its mass there; beyond the range it is clamped to the edge.
    assert th.encode(torch.tensor([[0.0]])).max() == 1.0
    far = th.encode(torch.tensor([[1e9]]))
    assert far[0, -1] == 1.0
    # Logits are decoded through a softmax; log-probabilities round-trip.
    x = torch.tensor([[3.0], [-250.0]])
    torch.testing.assert_close(th.decode(th.encode(x).clamp_min(1e-30).log()), x, rtol=1e-5, atol=0)


def test_two_hot_rejects_bad_bins():
    with pytest.raises(ValueError, match="num_bins=1"):
        TwoHot(1)
    with pytest.raises(ValueError, match="vmin"):
        TwoHot(11, 1.0, -1.0)


def test_soft_cross_entropy_matches_hard_ce_on_one_hot():
    logits = torch.randn(6, 11)
    target = torch.randint(0, 11, (6,))
    ce = soft_cross_entropy(logits, F.one_hot(target, 11).float()).squeeze(-1)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target, reduction="none"))


def test_fast_mish_matches_torch():
    x = torch.cat([torch.randn(1000) * 5, torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])])
    x64 = x.double().requires_grad_()
    ref = F.mish(x64)
    g = torch.randn_like(x64)
    (ref_grad,) = torch.autograd.grad(ref, x64, g)
    xf = x.clone().requires_grad_()
    y = mish(xf)
    (grad,) = torch.autograd.grad(y, xf, g.float())
    torch.testing.assert_close(y.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-5, rtol=1e-4)
    xg = (torch.randn(20, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(mish, (xg,))


def _member_forward(ens: Ensemble, k: int, x: torch.Tensor) -> torch.Tensor:
    h = x
    for i in range(ens.depth):
        h = h @ ens.weights[i][k] + ens.biases[i][k, 0]
        if i < ens.depth - 1:
            h = F.layer_norm(h, h.shape[-1:], ens.ln_weights[i][k, 0], ens.ln_biases[i][k, 0])
            h = F.mish(h)
    return h


def test_ensemble_equals_per_member_mlps():
    torch.manual_seed(0)
    ens = Ensemble(4, 7, [16, 16], 5, dropout=0.5).eval()
    with torch.no_grad():
        for ps in (ens.ln_weights, ens.ln_biases, ens.biases):
            for p in ps:
                p.normal_()
    x = torch.randn(3, 2, 7)
    out = ens(x)
    assert out.shape == (4, 3, 2, 5)
    for k in range(4):
        torch.testing.assert_close(out[k], _member_forward(ens, k, x), atol=1e-5, rtol=1e-5)
    idx = torch.tensor([3, 1])
    torch.testing.assert_close(ens(x, idx=idx), out[idx])
    # Dropout acts in training mode only (first hidden layer).
    ens.train()
    assert not torch.allclose(ens(x), out)


def test_ensemble_detach_passes_gradient_to_input_only():
    ens = Ensemble(3, 4, [8], 2)
    with torch.no_grad():
        ens.weights[-1].normal_()
    x = torch.randn(5, 4, requires_grad=True)
    ens(x, detach=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ens.parameters())


def test_mlp_layout():
    net = mlp(6, [32, 32], 16, act=SimNorm(8), dropout=0.1)
    assert net[0].dropout is not None and net[1].dropout is None
    y = net(torch.randn(4, 6))
    torch.testing.assert_close(y.unflatten(-1, (2, 8)).sum(-1), torch.ones(4, 2))
    plain = mlp(6, [32], 3)
    assert isinstance(plain[-1], torch.nn.Linear) and plain(torch.randn(2, 6)).shape == (2, 3)


def test_squashed_gaussian_logprob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(10, 3), torch.randn(10, 3) * 0.3
    eps = torch.randn(10, 3)
    lp = fmath.gaussian_logprob(eps, log_std)
    normal = torch.distributions.Normal(mean, log_std.exp())
    u = mean + eps * log_std.exp()
    torch.testing.assert_close(lp, normal.log_prob(u).sum(-1, keepdim=True))
    _, a, lp_sq = fmath.squash(mean, u, lp)
    ref = lp - torch.log(1 - torch.tanh(u) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(a, torch.tanh(u))
    torch.testing.assert_close(lp_sq, ref, atol=1e-4, rtol=1e-4)
    ls = fmath.log_std(torch.tensor([-1e3, 0.0, 1e3]), -10.0, 2.0)
    torch.testing.assert_close(ls, torch.tensor([-10.0, -4.0, 2.0]))


def test_running_scale_tracks_percentile_range_with_floor():
    s = RunningScale(tau=1.0)
    s.update(torch.linspace(0, 100, 101).unsqueeze(-1))
    torch.testing.assert_close(s.value, torch.tensor([90.0]))
    s.update(torch.zeros(10, 1))
    torch.testing.assert_close(s.value, torch.tensor([1.0]))
    slow = RunningScale(tau=0.5)
    slow.update(torch.linspace(0, 100, 101))
    torch.testing.assert_close(slow.value, torch.tensor([45.5]))
    torch.testing.assert_close(slow(torch.tensor([91.0])), torch.tensor([2.0]))


def test_shift_aug_is_an_integer_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 10, 10)
    y = ShiftAug(pad=2)(x)
    assert y.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    for n in range(6):
        crops = [padded[n, :, i : i + 10, j : j + 10] for i in range(5) for j in range(5)]
        assert any(torch.equal(y[n], c) for c in crops)
    torch.testing.assert_close(ShiftAug(pad=0)(x), x)


# ---- flatworld.nn.linear: fp32 CPU products through oneDNN ---------------------------------
def _count_convs(monkeypatch) -> list[int]:
    """Counts the convolutions run from here on: the oneDNN route is one per product."""
    calls = [0]
    conv2d = F.conv2d

    def counted(*args, **kwargs):
        calls[0] += 1
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counted)
    return calls


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


@pytest.fixture
def two_threads():
    """The route needs more than one thread (torch keeps a single-threaded 1x1 convolution
    of one image out of oneDNN)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_onednn
@pytest.mark.parametrize("lead", [(256,), (4, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_with_its_gradients(lead, bias, monkeypatch, two_threads):
    from flatworld.nn.linear import Linear, onednn_linear

    torch.manual_seed(0)
    layer = Linear(96, 80, bias=bias)
    x = torch.randn(*lead, 96, requires_grad=True)
    g = torch.randn(*lead, 80)

    def run():
        out = layer(x)
        return out, torch.autograd.grad(out, [x, *layer.parameters()], g)

    convs = _count_convs(monkeypatch)
    with onednn_linear(True):
        out_a, grads_a = run()
        assert convs[0] == 1  # routed
        again, grads_again = run()  # deterministic: bit for bit the first call
    with onednn_linear(False):
        out_b, grads_b = run()
    assert convs[0] == 2  # not routed
    assert out_a.shape == (*lead, 80) and out_a.is_contiguous()
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(out_b, F.linear(x, layer.weight, layer.bias))
    for a, b in zip(grads_a, grads_b, strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        # The weight's gradient sums 256 products per entry, in oneDNN's order: on a Zen 4
        # with AVX-512 that differed from sgemm's by up to 3e-5 relative, beyond float32's
        # default tolerance; a wrong product would differ by order 1.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, out_a)
    assert all(torch.equal(a, b) for a, b in zip(grads_again, grads_a, strict=True))


@needs_onednn
def test_onednn_linear_leaves_small_bf16_single_thread_and_disabled_products_to_sgemm(
        monkeypatch, two_threads):  # fmt: skip
    from flatworld.nn.linear import MIN_ROWS, add_linear_, linear, onednn_linear

    torch.manual_seed(0)
    w = torch.randn(96, 96)
    big = torch.randn(256, 96)
    convs = _count_convs(monkeypatch)
    with onednn_linear(True):
        linear(torch.randn(MIN_ROWS - 1, 96), w)  # too few rows
        linear(torch.randn(256, 8), torch.randn(96, 8))  # too narrow
        linear(torch.randn(128, 96), w)  # 12,288 elements: torch's own convolution path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(big, w)  # autocast: its own bf16 route
        torch.set_num_threads(1)
        linear(big, w)  # one thread: torch's own convolution path
        torch.set_num_threads(2)
        with onednn_linear(False):
            linear(big, w)
        assert convs[0] == 0
        linear(big, w)  # restored after the block
        assert convs[0] == 1
        acc = torch.randn(256, 96)
        expected = acc + big @ w.t()
        torch.testing.assert_close(add_linear_(acc, big, w), expected)
        assert convs[0] == 2
    with pytest.raises(TypeError, match="enabled='yes'; accepted: True, False or 'auto'"):
        onednn_linear("yes")


@needs_onednn
@pytest.mark.parametrize("capability, vendor, routed", [
    ("AVX512", "AuthenticAMD", True), ("AVX2", "AuthenticAMD", False),
    ("AVX512", "GenuineIntel", False)])  # fmt: skip
def test_onednn_linear_auto_routes_only_on_amd_with_avx512(capability, vendor, routed,
                                                          monkeypatch, two_threads):
    # the module (the attribute flatworld.nn.linear is the function of the same name)
    linear_module = importlib.import_module("flatworld.nn.linear")
    linear_module._has_avx512.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(linear_module, "_cpu_vendor", lambda: vendor)
    try:
        convs = _count_convs(monkeypatch)
        with linear_module.onednn_linear("auto"):
            assert linear_module.onednn_linear_enabled() is routed
            linear_module.linear(torch.randn(256, 96), torch.randn(96, 96))
        assert convs[0] == int(routed)
    finally:
        linear_module._has_avx512.cache_clear()


def test_onednn_linear_keeps_nn_linear_state_dict():
    from flatworld.nn.linear import Linear

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 64)
    ours = Linear(64, 64)
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(200, 64)
    torch.testing.assert_close(ours(x), plain(x))
