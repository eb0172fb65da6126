"""SAM against closed forms on quadratics and small linear models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatworld import optim
from flatworld.optim import SAM, EveryK, LatePhase, OptimSpec, RhoSchedule, SamSpec


@pytest.fixture(autouse=True)
def float64():
    """Closed forms compare at float64; restore the default so other test files see float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def quadratic(seed: int = 0, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g)
    a = q @ q.T + torch.eye(n)
    b = torch.randn(n, generator=g)
    w = nn.Parameter(torch.randn(n, generator=g))
    return a, b, w


def quad_loss(a, b, w):
    return 0.5 * w @ a @ w + b @ w


def quad_grad(a, b, w):
    return a @ w + b


def linear_model(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(16, 3)
    y = torch.randn(16, 2)
    return model, x, y


def mse_closure(model, x, y, counter=None):
    def closure(batch=None):
        xb, yb = (x, y) if batch is None else batch
        loss = ((model(xb) - yb) ** 2).mean()
        loss.backward()
        if counter is not None:
            counter.append(1)
        return loss

    return closure


def test_perturbation_is_rho_g_over_norm_g():
    a, b, w = quadratic()
    w0 = w.detach().clone()
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.3)
    quad_loss(a, b, w).backward()
    g = quad_grad(a, b, w0)
    sam.ascent_step()
    torch.testing.assert_close(w.detach(), w0 + 0.3 * g / g.norm())
    assert w.grad is None  # the ascent leaves the next backward a clean slate


def test_sam_step_is_base_step_at_perturbed_gradient():
    a, b, w = quadratic(1)
    w0 = w.detach().clone()
    sam = SAM(torch.optim.SGD([w], lr=0.05), rho=0.2)

    def closure():
        loss = quad_loss(a, b, w)
        loss.backward()
        return loss

    loss = sam.step(closure)
    g = quad_grad(a, b, w0)
    g_sam = quad_grad(a, b, w0 + 0.2 * g / g.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.05 * g_sam)
    torch.testing.assert_close(loss, quad_loss(a, b, w0))


def test_asam_formula_on_weights_not_biases():
    model, x, y = linear_model()
    w0 = [p.detach().clone() for p in model.parameters()]
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, adaptive=True, eta=0.01)
    mse_closure(model, x, y)()
    grads = [p.grad.clone() for p in model.parameters()]
    scales = [p.abs() + 0.01 if p.ndim > 1 else torch.ones_like(p) for p in w0]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads, strict=True)))
    sam.ascent_step()
    for p, p0, t, g in zip(model.parameters(), w0, scales, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 + 0.5 * t * t * g / norm)
    bias = list(model.parameters())[1]
    assert not torch.equal(scales[1], w0[1].abs() + 0.01) and bias.ndim == 1


def test_one_ascent_step_equals_sam_and_n_steps_stay_in_ball():
    runs = {}
    for n in (1, 3):
        model, x, y = linear_model(2)
        sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, ascent_steps=n)
        sam.step(mse_closure(model, x, y))
        runs[n] = [p.detach().clone() for p in model.parameters()]
    model, x, y = linear_model(2)
    ref = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    mse_closure(model, x, y)()
    g = [p.grad for p in model.parameters()]
    gn = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(model.parameters(), g, strict=True):
            p.add_(0.1 * t / gn)
    ref.zero_grad()
    mse_closure(model, x, y)()
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), w0, strict=True):
            p.copy_(p0)
    ref.step()
    for got, want in zip(runs[1], model.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach())
    assert any(not torch.allclose(u, v) for u, v in zip(runs[1], runs[3], strict=True))


def test_multi_step_projection_by_hand():
    a, b, w = quadratic(3)
    w0 = w.detach().clone()
    rho, n = 0.4, 2
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=rho, ascent_steps=n)
    z = torch.zeros_like(w0)
    for _ in range(n):
        g = quad_grad(a, b, w0 + z)
        z = z + (rho / n) * g / g.norm()
        z = z * min(1.0, rho / z.norm().item())
    g_final = quad_grad(a, b, w0 + z)

    def closure():
        loss = quad_loss(a, b, w)
        loss.backward()
        return loss

    sam.step(closure)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g_final)
    assert z.norm() <= rho + 1e-12


def test_m_equal_batch_is_sam_and_smaller_m_differs():
    results = {}
    for m in (None, 16, 4):
        model, x, y = linear_model(4)
        sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, m=m)
        closure = mse_closure(model, x, y)
        loss = sam.step(closure, batch=(x, y)) if m else sam.step(closure)
        results[m] = ([p.detach().clone() for p in model.parameters()], loss)
    for u, v in zip(results[None][0], results[16][0], strict=True):
        torch.testing.assert_close(u, v)
    torch.testing.assert_close(results[None][1], results[16][1])
    assert any(not torch.allclose(u, v) for u, v in zip(results[None][0], results[4][0],
                                                         strict=True))


def test_m_sharpness_averages_independent_chunk_gradients():
    model, x, y = linear_model(5)
    ref_model = copy.deepcopy(model)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2, m=8)
    sam.step(mse_closure(model, x, y), batch=(x, y))
    total = [torch.zeros_like(p) for p in ref_model.parameters()]
    for xc, yc in zip(x.split(8), y.split(8), strict=True):
        chunk_model = copy.deepcopy(ref_model)
        one = SAM(torch.optim.SGD(chunk_model.parameters(), lr=1.0), rho=0.2)
        mse_closure(chunk_model, xc, yc)()
        one.ascent_step()
        mse_closure(chunk_model, xc, yc)()
        for t, p in zip(total, chunk_model.parameters(), strict=True):
            t.add_(p.grad, alpha=0.5)
    for p, p0, t in zip(model.parameters(), ref_model.parameters(), total, strict=True):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * t)


def test_sam_off_is_the_base_optimizer_bit_for_bit():
    model, x, y = linear_model(6)
    twin = copy.deepcopy(model)
    built = optim.build(OptimSpec(base="adam", lr=1e-2), model.parameters())
    assert type(built) is torch.optim.Adam
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    for _ in range(5):
        for opt, mod in ((built, model), (plain, twin)):
            opt.zero_grad()
            opt.step(mse_closure(mod, x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_identically():
    spec = OptimSpec(base="adam", lr=1e-2, sam=SamSpec(rho=0.05, when="every", every=2,
                                                         reuse_grad=True))
    model, x, y = linear_model(7)
    opt = optim.build(spec, model.parameters())
    for _ in range(3):
        opt.zero_grad()
        opt.step(mse_closure(model, x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.zero_grad()
        opt.step(mse_closure(model, x, y))
    model2, _, _ = linear_model(99)
    model2.load_state_dict(saved_model)
    opt2 = optim.build(spec, model2.parameters())
    opt2.load_state_dict(saved_opt)
    assert opt2.steps_taken == 3 and opt2.param_groups is opt2.base.param_groups
    for _ in range(3):
        opt2.zero_grad()
        opt2.step(mse_closure(model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="not a SAM state_dict"):
        opt2.load_state_dict({"state": {}})


def test_lr_scheduler_drives_the_base_lr():
    model, x, y = linear_model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=1.0), rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    for _ in range(3):
        sam.zero_grad()
        sam.step(mse_closure(model, x, y))
        sched.step()
    assert sam.base.param_groups[0]["lr"] == pytest.approx(0.125)


@pytest.mark.parametrize("bad_pass", [0, 1])
def test_non_finite_step_is_skipped_and_weights_restored(bad_pass):
    model, x, y = linear_model(8)
    before = [p.detach().clone() for p in model.parameters()]
    sam = SAM(torch.optim.Adam(model.parameters(), lr=0.1), rho=0.05)
    calls = []

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        if len(calls) == bad_pass:
            loss = loss * float("nan")
        calls.append(1)
        loss.backward()
        return loss

    assert not sam.step(closure).isfinite() or bad_pass == 1
    assert sam.skipped_steps == 1 and sam.steps_taken == 0
    assert sam.base.state == {} or all(len(s) == 0 for s in sam.base.state.values())
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0) and p.grad is None
    sam.step(mse_closure(model, x, y))
    assert sam.steps_taken == 1


def test_grad_scaler_path_matches_unscaled_and_backs_off_on_overflow():
    results = []
    for use_scaler in (False, True):
        model, x, y = linear_model(9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) \
            if use_scaler else None
        sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, grad_scaler=scaler)

        def closure(model=model, scaler=scaler, x=x, y=y):
            loss = ((model(x) - y) ** 2).mean()
            (scaler.scale(loss) if scaler else loss).backward()
            return loss

        for _ in range(2):
            sam.zero_grad()
            sam.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
        if scaler is not None:
            assert scaler.get_scale() == 2.0**11  # grew after growth_interval good steps
            before = [p.detach().clone() for p in model.parameters()]

            def overflow(model=model, scaler=scaler, x=x, y=y):
                loss = ((model(x) - y) ** 2).mean() * 1e300
                scaler.scale(loss).backward()
                return loss

            sam.step(overflow)
            assert sam.skipped_steps == 1 and scaler.get_scale() == 2.0**10
            for p, p0 in zip(model.parameters(), before, strict=True):
                assert torch.equal(p, p0)
    for u, v in zip(*results, strict=True):
        torch.testing.assert_close(u, v)


def test_bf16_autocast_without_scaler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).float()
    x, y = torch.randn(32, 8, dtype=torch.float32), torch.randn(32, 1, dtype=torch.float32)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ((model(x).float() - y) ** 2).mean()
        loss.backward()
        return loss

    sam.step(closure)
    assert sam.steps_taken == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), before, strict=True))


def test_clipping_acts_on_the_sam_gradient():
    a, b, w = quadratic(10)
    w0 = w.detach().clone()
    sam = SAM(torch.optim.SGD([w], lr=1.0), rho=0.1, clip_grad_norm=1e-3)

    def closure():
        loss = quad_loss(a, b, w)
        loss.backward()
        return loss

    sam.step(closure)
    g = quad_grad(a, b, w0)
    g_sam = quad_grad(a, b, w0 + 0.1 * g / g.norm())
    torch.testing.assert_close(w.detach(), w0 - 1e-3 * g_sam / g_sam.norm())


def test_late_phase_plain_before_start_sam_after():
    model, x, y = linear_model(11)
    twin = copy.deepcopy(model)
    calls: list[int] = []
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, schedule=LatePhase(3))
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    per_step = []
    for step in range(5):
        n0 = len(calls)
        sam.zero_grad()
        sam.step(mse_closure(model, x, y, calls))
        per_step.append(len(calls) - n0)
        plain.zero_grad()
        plain.step(mse_closure(twin, x, y))
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(),
                                                     strict=True))
        assert same == (step < 3)
    assert per_step == [1, 1, 1, 2, 2]
    built = optim.build(OptimSpec(base="sgd", lr=0.1, sam=SamSpec(when="late",
                                                                   start_fraction=0.8)),
                        model.parameters(), total_steps=100)
    assert built.schedule == LatePhase(80)


def test_every_k_with_gradient_reuse():
    model, x, y = linear_model(12)
    calls: list[int] = []
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05,
              schedule=EveryK(3, reuse_grad=True))
    pattern = []
    for _ in range(6):
        n0 = len(calls)
        sam.zero_grad()
        sam.step(mse_closure(model, x, y, calls))
        pattern.append(len(calls) - n0)
    assert pattern == [2, 1, 1, 2, 1, 1]
    # A reuse step adds the stored correction g_sam - g to its own gradient.
    sam.zero_grad()
    sam.step(mse_closure(model, x, y))  # step 6 is SAM; step 7 reuses
    n = len(list(model.parameters()))
    corr = [sam._correction[i].clone() for i in range(n)]
    before = [p.detach().clone() for p in model.parameters()]
    probe = copy.deepcopy(model)
    mse_closure(probe, x, y)()
    sam.zero_grad()
    sam.step(mse_closure(model, x, y))
    for p, p0, q, c in zip(model.parameters(), before, probe.parameters(), corr, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * (q.grad + c))


def test_rho_schedules():
    lin = RhoSchedule("linear", rho=0.1, rho_end=0.0, total_steps=10)
    assert lin.at(0, 1.0) == 0.1 and lin.at(5, 1.0) == pytest.approx(0.05)
    assert lin.at(20, 1.0) == 0.0
    prop = RhoSchedule("lr", rho=0.1, lr0=0.01)
    assert prop.at(3, 0.005) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="rho schedule kind"):
        RhoSchedule("cosine")


def test_running_stats_updated_by_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, bn_module=model)
    sam.step(mse_closure(model, x, y))
    twin(x)  # one forward at w: what the running stats should have seen
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


def test_no_sync_wraps_every_pass_but_the_last():
    model, x, y = linear_model(13)
    log = []

    class NoSync:
        def __enter__(self):
            log.append("enter")

        def __exit__(self, *exc):
            log.append("exit")

    def closure():
        log.append("pass")
        return mse_closure(model, x, y)()

    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, ascent_steps=2,
              no_sync=NoSync)
    sam.step(closure)
    assert log == ["enter", "pass", "exit", "enter", "pass", "exit", "pass"]


def test_clear_errors_for_bad_arguments():
    model, x, y = linear_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho=-0.1"):
        SAM(base, rho=-0.1)
    with pytest.raises(ValueError, match="closure"):
        SAM(base).step()
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.build(OptimSpec(), [])
    with pytest.raises(ValueError, match="ascent_steps=0"):
        SAM(base, ascent_steps=0)
    with pytest.raises(ValueError, match="needs step\\(closure, batch"):
        SAM(base, m=4).step(mse_closure(model, x, y))
    with pytest.raises(TypeError, match="torch optimizer"):
        SAM(model.parameters())
    with pytest.raises(ValueError, match="optim.base='rmsprop'"):
        OptimSpec(base="rmsprop")
    with pytest.raises(ValueError, match="sam.when='sometimes'"):
        SamSpec(when="sometimes")
    with pytest.raises(ValueError, match="needs total_steps"):
        optim.build(OptimSpec(sam=SamSpec(when="late")), model.parameters())
    with pytest.raises(RuntimeError, match="without ascent_step"):
        SAM(base).descent_step()
