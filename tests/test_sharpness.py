from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatworld import sharpness as S

RHO = 0.1
EIGS = [-3.0, -1.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0]


class Quadratic:
    """L(w) = 1/2 w^T A w + b^T w over two parameter tensors (a 2x3 matrix and a 3-vector),
    in float64 so that closed forms hold to ~1e-12."""

    def __init__(self, eigs: list[float] = EIGS, seed: int = 0, diagonal: bool = False):
        g = torch.Generator().manual_seed(seed)
        d = len(eigs)
        assert d == 9
        q = torch.eye(d, dtype=torch.float64)
        if not diagonal:
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.A = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.W = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()
        self.v = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
        self.params = [self.W, self.v]

    def w(self) -> torch.Tensor:
        return torch.cat([self.W.reshape(-1), self.v])

    def loss_at(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ self.A @ w + self.b @ w

    def __call__(self) -> torch.Tensor:
        return self.loss_at(self.w())

    def grad(self) -> torch.Tensor:
        return self.A @ self.w().detach() + self.b

    def increase(self, e: torch.Tensor) -> float:
        w = self.w().detach()
        return (self.loss_at(w + e) - self.loss_at(w)).item()


def test_first_order_matches_closed_form():
    q = Quadratic()
    g = q.grad()
    assert S.first_order(q, q.params, rho=RHO) == pytest.approx(
        q.increase(RHO * g / g.norm()), rel=1e-10, abs=1e-12)


def test_adaptive_matches_hand_computation():
    q, eta = Quadratic(), 0.01
    g = q.grad()
    # T = |w| + eta on the matrix only, 1 on the vector
    t = torch.cat([q.W.detach().abs().reshape(-1) + eta, torch.ones(3, dtype=torch.float64)])
    e = RHO * t**2 * g / (t * g).norm()
    assert S.first_order(q, q.params, rho=RHO, adaptive=True, eta=eta) == pytest.approx(
        q.increase(e), rel=1e-10, abs=1e-12)
    assert S.first_order(q, q.params, rho=RHO, adaptive=True) != pytest.approx(
        S.first_order(q, q.params, rho=RHO), rel=1e-3)


def test_zero_gradient_gives_zero_without_nan():
    q = Quadratic()
    flat = lambda: (q.W * 0).sum() + q.v.detach().sum()  # noqa: E731
    assert S.first_order(flat, q.params) == 0.0
    assert S.worst_case(flat, q.params, steps=2) == 0.0
    assert S.lambda_max(flat, q.params, iters=3) == (0.0, True)


def test_hvp_equals_A_v():
    q = Quadratic()
    vec = [torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    hv = S.hvp(q, q.params, vec)
    expected = q.A @ torch.cat([vec[0].reshape(-1), vec[1]])
    assert [h.shape for h in hv] == [p.shape for p in q.params]
    torch.testing.assert_close(torch.cat([hv[0].reshape(-1), hv[1]]), expected)


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("eigs", [EIGS, [-8.0, -1.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0]])
def test_lambda_max_matches_eigvalsh(method, eigs):
    # the second spectrum has its largest-magnitude eigenvalue negative: power iteration
    # alone would return -8, lambda_max must still be the largest algebraic one
    q = Quadratic(eigs)
    expected = np.linalg.eigvalsh(q.A.numpy())[-1]
    value, converged = S.lambda_max(q, q.params, iters=500, tol=1e-10, method=method)
    assert converged
    assert value == pytest.approx(expected, rel=1e-6)


def test_lanczos_converges_in_at_most_dim_products():
    q = Quadratic()
    res = S.lambda_max(q, q.params, iters=9, tol=1e-8, method="lanczos")
    assert res.converged and res.value == pytest.approx(5.0, rel=1e-8)


def test_trace_hutchinson():
    q = Quadratic()
    mean, stderr = S.hessian_trace(q, q.params, samples=400, seed=1)
    assert stderr > 0
    assert abs(mean - sum(EIGS)) < 4 * stderr
    # for a diagonal Hessian z^T H z = tr(H) for every Rademacher z
    d = Quadratic(diagonal=True)
    mean, stderr = S.hessian_trace(d, d.params, samples=5)
    assert mean == pytest.approx(sum(EIGS), rel=1e-12) and stderr == pytest.approx(0, abs=1e-12)
    assert math.isnan(S.hessian_trace(d, d.params, samples=1).stderr)


def test_seeded_results_are_deterministic():
    q = Quadratic()
    assert S.hessian_trace(q, q.params, 20, seed=3) == S.hessian_trace(q, q.params, 20, seed=3)
    assert S.hessian_trace(q, q.params, 20, seed=3) != S.hessian_trace(q, q.params, 20, seed=4)
    for method in ("power", "lanczos"):
        a = S.lambda_max(q, q.params, iters=5, method=method, seed=7)
        assert a == S.lambda_max(q, q.params, iters=5, method=method, seed=7)


def test_worst_case_between_first_order_and_bound():
    q = Quadratic()
    g = q.grad()
    fo = S.first_order(q, q.params, rho=RHO)
    wc = S.worst_case(q, q.params, rho=RHO, steps=30)
    # max over |e| <= rho of g.e + e^T A e / 2 is at most rho |g| + rho^2 lambda_max / 2
    assert fo < wc <= RHO * g.norm().item() + 0.5 * RHO**2 * max(EIGS) + 1e-12
    lin_start = q.increase(RHO * g.sign())
    wc_inf = S.worst_case(q, q.params, rho=RHO, norm="linf", steps=30)
    assert lin_start <= wc_inf <= RHO * g.abs().sum().item() + 0.5 * 9 * RHO**2 * max(EIGS)


def _mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Mish(), nn.Linear(16, 2))
    unused = nn.Parameter(torch.randn(3))  # not reached by the loss
    x, y = torch.randn(24, 4), torch.randn(24, 2)
    return model, unused, x, y


def test_weights_and_grads_untouched_by_every_function():
    model, unused, x, y = _mlp_problem()
    params = [*model.parameters(), unused]
    nn.functional.mse_loss(model(x), y).backward()
    model[1].weight.grad = None  # a mix of real grads and None
    before = [(p.data_ptr(), p.detach().clone(), p.grad) for p in params]
    grad_values = [None if g is None else g.clone() for _, _, g in before]

    def loss_fn():
        return nn.functional.mse_loss(model(x), y)

    calls = [
        lambda: S.first_order(loss_fn, params),
        lambda: S.first_order(loss_fn, params, adaptive=True),
        lambda: S.m_sharpness(lambda c: nn.functional.mse_loss(model(c[0]), c[1]), params,
                              (x, y), m=8),
        lambda: S.worst_case(loss_fn, params, steps=3),
        lambda: S.worst_case(loss_fn, params, norm="linf", adaptive=True, steps=3),
        lambda: S.hvp(loss_fn, params, [torch.ones_like(p) for p in params]),
        lambda: S.lambda_max(loss_fn, params, iters=5, method="power"),
        lambda: S.lambda_max(loss_fn, params, iters=5, method="lanczos"),
        lambda: S.hessian_trace(loss_fn, params, samples=3),
    ]
    for call in calls:
        call()
        for p, (ptr, w, g), gv in zip(params, before, grad_values, strict=True):
            assert p.data_ptr() == ptr and torch.equal(p, w)
            assert p.grad is g
            assert (gv is None) or torch.equal(p.grad, gv)


def test_mlp_worst_case_at_least_first_order():
    model, _, x, y = _mlp_problem(1)

    def loss_fn():
        return nn.functional.mse_loss(model(x), y)

    params = list(model.parameters())
    for adaptive in (False, True):
        fo = S.first_order(loss_fn, params, rho=0.05, adaptive=adaptive)
        wc = S.worst_case(loss_fn, params, rho=0.05, adaptive=adaptive, steps=10)
        assert fo > 0 and wc >= fo


def test_m_sharpness_with_m_equal_batch_is_first_order():
    model, _, x, y = _mlp_problem(2)
    params = list(model.parameters())
    fo = S.first_order(lambda: nn.functional.mse_loss(model(x), y), params)
    ms = S.m_sharpness(lambda c: nn.functional.mse_loss(model(c[0]), c[1]), params, (x, y), 24)
    assert ms == fo
    # a plain tensor batch: the chunk handed over is a tensor
    per_sample = S.m_sharpness(lambda c: model(c).square().mean(), params, x, m=1)
    loop = np.mean([S.first_order(lambda i=i: model(x[i:i + 1]).square().mean(), params)
                    for i in range(24)])
    assert per_sample == pytest.approx(loop, rel=1e-6)


def test_parameters_generator_and_frozen_params_are_accepted():
    model, _, x, y = _mlp_problem(3)
    model[0].bias.requires_grad_(False)
    fo = S.first_order(lambda: nn.functional.mse_loss(model(x), y), model.parameters())
    assert fo > 0


def test_clear_errors():
    q = Quadratic()
    with pytest.raises(ValueError, match="rho"):
        S.first_order(q, q.params, rho=-0.1)
    with pytest.raises(ValueError, match="rho"):
        S.worst_case(q, q.params, rho=float("nan"))
    with pytest.raises(ValueError, match="params is empty"):
        S.first_order(q, [])
    with pytest.raises(ValueError, match="norm='l1'"):
        S.worst_case(q, q.params, norm="l1")
    with pytest.raises(ValueError, match="method='arnoldi'"):
        S.lambda_max(q, q.params, method="arnoldi")
    with pytest.raises(ValueError, match="iters=0"):
        S.lambda_max(q, q.params, iters=0)
    with pytest.raises(ValueError, match="samples=0"):
        S.hessian_trace(q, q.params, samples=0)
    with pytest.raises(ValueError, match="eta"):
        S.first_order(q, q.params, adaptive=True, eta=0.0)
    with pytest.raises(ValueError, match="scalar"):
        S.first_order(lambda: q.w(), q.params)
    with pytest.raises(ValueError, match="vec shapes"):
        S.hvp(q, q.params, [torch.ones(3)])
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="m=4 does not divide the batch size 10"):
        S.m_sharpness(lambda c: c.sum(), q.params, x, m=4)
    with pytest.raises(ValueError, match="m=0"):
        S.m_sharpness(lambda c: c.sum(), q.params, x, m=0)


def test_works_when_called_under_no_grad():
    # agents call diagnostics under torch.no_grad(); the measures switch grad on themselves
    q = Quadratic()
    expected = S.first_order(q, q.params)
    with torch.no_grad():
        assert S.first_order(q, q.params) == expected
        assert S.lambda_max(q, q.params, iters=50, tol=1e-10).value == pytest.approx(5.0)


def test_finite_difference_hvp_tracks_exact_and_restores_weights():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    exact = S.lambda_max(loss_fn, params, iters=60, tol=0.0, method="power", seed=0)
    approx = S.lambda_max(loss_fn, params, iters=60, tol=0.0, method="power", seed=0,
                                  hvp="fd")
    assert abs(approx.value - exact.value) <= 0.02 * abs(exact.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    with pytest.raises(ValueError, match="hvp='bogus'"):
        S.lambda_max(loss_fn, params, hvp="bogus")
    with pytest.raises(ValueError, match="fd_eps=0"):
        S.hessian_trace(loss_fn, params, hvp="fd", fd_eps=0)
