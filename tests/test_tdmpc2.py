from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from flatworld import optim
from flatworld.agents import AGENTS
from flatworld.agents.tdmpc2 import TDMPC2Agent, TDMPC2Config, discount_for

OBS, ACT, H, B = 10, 3, 3, 16
SAM = optim.SamSpec(rho=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> TDMPC2Config:
    base = dict(model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=5, batch_size=B,
                num_samples=32, num_elites=8, num_pi_trajs=4, iterations=2)  # fmt: skip
    return TDMPC2Config(**{**base, **kw})


def make_agent(seed: int = 0, obs_shape=(OBS,), action_dim=ACT, **kw) -> TDMPC2Agent:
    torch.manual_seed(seed)
    return AGENTS["tdmpc2"].make(tiny(**kw), obs_shape=obs_shape, action_dim=action_dim,
                                 episode_length=500, device="cpu")  # fmt: skip


def synthetic_batch(seed: int = 1, obs_shape=(OBS,), terminated: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(H + 1, B, *obs_shape, generator=g)
    action = torch.rand(H, B, ACT, generator=g) * 2 - 1
    reward = obs[:-1].flatten(2)[..., :1].tanh() + action[..., :1]  # a learnable function of (s, a)
    term = (torch.rand(H, B, 1, generator=g) < 0.2).float() if terminated else torch.zeros(H, B, 1)
    return {"obs": obs, "action": action, "reward": reward, "terminated": term}


def params(agent: TDMPC2Agent, module: torch.nn.Module | None = None) -> list[torch.Tensor]:
    return [p.detach().clone() for p in (module or agent.model).parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---- config --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(model_size=3), "model_size"),
        (dict(obs="depth"), "obs"),
        (dict(sam_scope="heads"), "sam_scope"),
        (dict(num_elites=64, num_samples=32), "num_elites"),
        (dict(latent_dim=20), "latent_dim"),
        (dict(num_q=1), "num_q"),
        (dict(horizon=0), "horizon"),
        (dict(rho=0.0), "rho"),
        (dict(wm_optim=optim.OptimSpec(sam=optim.SamSpec(m=4))), "wm_optim.sam.m"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        tiny(**kw).validate()


def test_config_sizes_and_discount():
    assert TDMPC2Config(model_size=1).dims() == dict(
        enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2)  # fmt: skip
    assert TDMPC2Config(model_size=5).dims()["num_q"] == 5
    cfg = TDMPC2Config()
    assert discount_for(cfg, 500) == pytest.approx(0.99)
    assert discount_for(cfg, 10) == 0.95 and discount_for(cfg, 10_000) == 0.995
    d = dataclasses.asdict(tiny(wm_optim=optim.OptimSpec(sam=SAM)))
    d["wm_optim"]["betas"] = list(d["wm_optim"]["betas"])
    assert TDMPC2Config.from_dict(d) == tiny(wm_optim=optim.OptimSpec(sam=SAM))


# ---- planning ------------------------------------------------------------------------------
@pytest.mark.parametrize("action_dim", [ACT, 21])
def test_planner_actions_in_bounds_and_warm_started(action_dim):
    agent = make_agent(action_dim=action_dim)
    assert agent.planner.iterations == 2 + 2 * (action_dim >= 20)
    obs = np.random.default_rng(0).normal(size=OBS).astype(np.float32) * 5
    for t, eval_mode in enumerate([False, False, True, True]):
        a = agent.act(obs, t0=t == 0, eval_mode=eval_mode)
        assert a.shape == (action_dim,) and a.dtype == np.float32
        assert np.all(np.abs(a) <= 1.0)
    prev = agent.planner.prev_mean.clone()
    assert prev.abs().sum() > 0 and (prev.abs() <= 1).all()
    agent.cfg.mpc = False
    assert np.all(np.abs(agent.act(obs, eval_mode=False)) <= 1.0)


def test_plan_action_mean_returns_the_plan_mean_in_eval():
    agent = make_agent(plan_action="mean")
    obs = np.zeros(OBS, np.float32)
    a = agent.act(obs, t0=True, eval_mode=True)
    np.testing.assert_allclose(a, agent.planner.prev_mean[0].clamp(-1, 1).numpy())


def test_elite_draw_follows_the_score():
    from flatworld.agents.tdmpc2.planner import select_action

    score = torch.tensor([0.5, 0.3, 0.15, 0.05])
    elites = torch.arange(4.0).view(1, 4, 1).expand(2, 4, 1) / 10  # elite e acts e / 10
    mean, std = torch.zeros(2, 1), torch.ones(2, 1)
    torch.manual_seed(0)
    picks = torch.tensor([float(select_action("elite", mean, std, elites, score, True)) * 10
                          for _ in range(4000)]).round().long()  # fmt: skip
    freq = torch.bincount(picks, minlength=4).float() / 4000
    assert torch.allclose(freq, score, atol=0.03), freq


# ---- learning ------------------------------------------------------------------------------
def test_updates_lower_world_model_loss():
    agent = make_agent()
    batch = synthetic_batch()
    before = agent.diagnostics(batch)["wm_loss"]
    for _ in range(200):
        m = agent.update(batch)
    assert all(np.isfinite(float(v)) for v in m.values())
    after = agent.diagnostics(batch)["wm_loss"]
    assert after < 0.5 * before, (before, after)


def test_no_grad_left_and_views_stay_live():
    agent = make_agent(wm_optim=optim.OptimSpec(sam=SAM))
    batch = synthetic_batch()
    agent.update(batch)
    model = agent.model
    assert all(p.grad is None for p in model.parameters())
    # The policy's Q view is the live storage, not a copy.
    for p in model.qs.parameters():
        assert p.detach().data_ptr() == p.data_ptr()
    old_target = params(agent, model.target_qs)
    agent.update(batch)
    live = params(agent, model.qs)
    for t_old, t_new, w in zip(old_target, params(agent, model.target_qs), live, strict=True):
        torch.testing.assert_close(t_new, t_old + agent.cfg.tau * (w - t_old))
    # A change of the live weights shows in the policy's (detached) Q immediately.
    z, a = torch.rand(4, 16), torch.rand(4, ACT)
    q0 = model.q_logits(z, a, detach=True)
    with torch.no_grad():
        model.qs.biases[-1].add_(1.0)
    torch.testing.assert_close(model.q_logits(z, a, detach=True), q0 + 1.0)


def test_sam_changes_world_model_step_not_policy_path(monkeypatch):
    batch = synthetic_batch()
    seen: dict[str, tuple] = {}
    agents = {}
    for name, sam in (("adam", None), ("sam", SAM)):
        agent = make_agent(wm_optim=optim.OptimSpec(sam=sam))
        orig = agent.update_pi

        def spy(zs, name=name, orig=orig, agent=agent):
            seen[name] = (zs.clone(), params(agent, agent.model))
            return orig(zs)

        monkeypatch.setattr(agent, "update_pi", spy)
        torch.manual_seed(123)
        m = agent.update(batch)
        assert m["sam_passes"] == (2.0 if sam else 1.0)
        agents[name] = agent
        seen[name + "_rng"] = torch.get_rng_state()
    # Same weights before the update, so the policy gets the same latent rollout ...
    torch.testing.assert_close(seen["adam"][0], seen["sam"][0])
    # ... while the world-model steps differ.
    assert not same(seen["adam"][1], seen["sam"][1])
    assert type(agents["adam"].wm_optim) is not type(agents["sam"].wm_optim)
    # Both SAM passes replay one dropout stream: the rest of training sees the same randomness.
    assert torch.equal(seen["adam_rng"], seen["sam_rng"])
    # Given the same world model, the policy step is the same code with the same result.
    a, b = make_agent(), make_agent(wm_optim=optim.OptimSpec(sam=SAM))
    b.model.load_state_dict(a.model.state_dict())
    zs = seen["sam"][0]
    for agent in (a, b):
        agent.model.train()
        torch.manual_seed(7)
        agent.update_pi(zs)
    assert same(params(a, a.model.pi_net), params(b, b.model.pi_net))


@pytest.mark.parametrize("scope", ["all", "encoder_dynamics"])
def test_sam_with_zero_radius_is_adam_bit_for_bit(scope):
    """rho = 0: SAM's second pass sees the same weights and dropout masks as the first, so
    every update (world model, policy, target) equals Adam's; anything else SAM did would
    show here."""
    batch = synthetic_batch()
    runs = []
    for sam in (None, optim.SamSpec(rho=0.0)):
        agent = make_agent(wm_optim=optim.OptimSpec(sam=sam), sam_scope=scope)
        torch.manual_seed(5)
        losses = [agent.update(batch)["pi_loss"] for _ in range(3)]
        runs.append((losses, agent.model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


@pytest.mark.parametrize("clip, ascent_steps", [(20.0, 1), (1e-3, 1), (20.0, 2)])
def test_encoder_dynamics_scope_heads_take_plain_first_pass_step(clip, ascent_steps):
    batch = synthetic_batch()
    runs = {}
    ed, sam_spec = "encoder_dynamics", optim.SamSpec(rho=0.1, ascent_steps=ascent_steps)
    for name, sam, scope in (("plain", None, "all"), ("plain_ed", None, ed),
                             ("sam_all", sam_spec, "all"), ("sam_ed", sam_spec, ed)):  # fmt: skip
        agent = make_agent(wm_optim=optim.OptimSpec(sam=sam), sam_scope=scope,
                           grad_clip_norm=clip)  # fmt: skip
        torch.manual_seed(5)
        agent.update(batch)
        m = agent.model
        runs[name] = (params(agent, m.encoder) + params(agent, m.dynamics),
                      [p.detach().clone() for p in m.head_parameters()],
                      m.state_dict())  # fmt: skip
        assert all(p.grad is None for p in m.parameters())
    # SAM off: both scopes give the same update.
    assert all(torch.equal(runs["plain"][2][k], v) for k, v in runs["plain_ed"][2].items())
    # encoder_dynamics: the heads' update is the plain Adam step with the first-pass gradient,
    # and the encoder/dynamics get a SAM step.
    assert same(runs["sam_ed"][1], runs["plain"][1])
    assert not same(runs["sam_ed"][0], runs["plain"][0])
    assert not same(runs["sam_all"][1], runs["plain"][1])


def test_gradient_reuse_reaches_encoder_dynamics_scope():
    """EveryK reuse: the plain step adds the last SAM correction to exactly the parameters
    SAM perturbed; with encoder_dynamics scope the heads are not among them."""
    batch = synthetic_batch()
    runs = {}
    for reuse in (True, False):
        spec = optim.SamSpec(rho=0.1, when="every", every=2, reuse_grad=reuse)
        agent = make_agent(wm_optim=optim.OptimSpec(sam=spec), sam_scope="encoder_dynamics")
        torch.manual_seed(5)
        passes = [agent.update(batch)["sam_passes"] for _ in range(2)]
        assert passes == [2.0, 1.0]
        m = agent.model
        runs[reuse] = (params(agent, m.encoder) + params(agent, m.dynamics),
                       [p.detach().clone() for p in m.head_parameters()])  # fmt: skip
    assert not same(runs[True][0], runs[False][0])
    assert same(runs[True][1], runs[False][1])


def test_episodic_and_rgb_variants_update():
    agent = make_agent(episodic=True)
    m = agent.update(synthetic_batch(terminated=True))
    assert "termination_loss" in m and np.isfinite(float(m["termination_loss"]))
    assert np.abs(agent.act(np.zeros(OBS, np.float32), t0=True, eval_mode=False)).max() <= 1
    rgb = make_agent(obs="rgb", obs_shape=(9, 64, 64), batch_size=4)
    batch = synthetic_batch(obs_shape=(9, 64, 64))
    batch = {k: v[:, :4] for k, v in batch.items()}
    batch["obs"] = (batch["obs"].abs() * 60).clamp(0, 255)
    assert np.isfinite(float(rgb.update(batch)["wm_loss"]))
    assert rgb.act(batch["obs"][0, 0].numpy(), t0=True, eval_mode=True).shape == (ACT,)


# ---- diagnostics and checkpoints -----------------------------------------------------------
def test_diagnostics_measure_only():
    agent = make_agent(wm_optim=optim.OptimSpec(sam=SAM))
    batch = synthetic_batch()
    agent.update(batch)
    before = params(agent)
    opt_state = io.BytesIO()
    torch.save(agent.wm_optim.state_dict(), opt_state)
    rng = torch.get_rng_state()
    d = agent.diagnostics(batch, lambda_max=True)
    assert set(d) == {"wm_loss", "wm_sharpness", "model_error", "wm_lambda_max", "bound_loss",
                      "bound_perturbed_loss", "bound_k", "bound_w_norm_sq", "bound_rho"}
    # the bound's model terms: every world-model parameter, and the radius asked for
    assert d["bound_k"] == sum(p.numel() for p in agent._wm_params) and d["bound_rho"] == 0.05
    assert d["wm_sharpness"] == d["bound_perturbed_loss"] - d["bound_loss"]
    assert agent.diagnostics(batch, rho=0.2)["bound_rho"] == 0.2
    assert all(np.isfinite(v) for v in d.values()) and d["model_error"] >= 0
    assert same(before, params(agent))
    assert all(p.grad is None for p in agent.model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert opt_state.getvalue() == (torch.save(agent.wm_optim.state_dict(), b := io.BytesIO())
                                    or b.getvalue())  # fmt: skip
    assert agent.diagnostics(batch)["wm_loss"] == d["wm_loss"]  # deterministic measurement
    assert np.isfinite(agent.value(np.zeros(OBS, np.float32)))


@pytest.mark.parametrize("sam", [None, SAM])
def test_state_dict_round_trip(sam):
    batch = synthetic_batch()
    a = make_agent(wm_optim=optim.OptimSpec(sam=sam))
    for _ in range(3):
        a.update(batch)
    a.act(np.ones(OBS, np.float32), t0=True, eval_mode=False)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_agent(seed=99, wm_optim=optim.OptimSpec(sam=sam))
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.updates == 3 and torch.equal(a.planner.prev_mean, b.planner.prev_mean)
    assert torch.equal(a.scale.value, b.scale.value)
    out = []
    for agent in (a, b):
        torch.manual_seed(11)
        out.append((agent.update(batch), agent.act(np.ones(OBS, np.float32), False, True),
                    params(agent)))  # fmt: skip
    assert out[0][0] == out[1][0]
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert same(out[0][2], out[1][2])
