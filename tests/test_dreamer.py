from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from flatworld import optim
from flatworld.agents.dreamer import (
    RSSM,
    DreamerAgent,
    DreamerConfig,
    ReturnNorm,
    kl_terms,
    lambda_returns,
    make,
)
from flatworld.agents.dreamer import agent as agent_module
from flatworld.agents.dreamer.networks import MLPDecoder, OneHotFeat, feed, mlp, onehot_index
from flatworld.agents.dreamer.world_model import WorldModel
from flatworld.nn import TwoHot, symexp, symlog

T, B, OBS, ACT = 8, 4, 6, 3
SAM = optim.SamSpec(rho=0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> DreamerConfig:
    base = dict(model_size="XS", deter=16, units=16, layers=1, cnn_depth=2, stoch=4, classes=4,
                batch_size=B, seq_len=T, imag_horizon=3, vector_mlp="size")  # fmt: skip
    return DreamerConfig(**{**base, **kw})


def make_agent(seed: int = 0, discrete: bool = True, obs_shape=(OBS,), sam=None, lr=1e-3,
               **kw) -> DreamerAgent:  # fmt: skip
    torch.manual_seed(seed)
    cfg = tiny(wm_optim=optim.OptimSpec(lr=lr, eps=1e-8, sam=sam), **kw)
    return make(cfg, obs_shape=obs_shape, action_dim=ACT, episode_length=100, discrete=discrete)


def synthetic_batch(seed: int = 1, discrete: bool = True, obs_shape=(OBS,),
                    terminated: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Sequences of a learnable system: obs_t = 0.8 obs_{t-1} + action effect; an episode
    starts inside the batch at (t=3, b=1)."""
    g = torch.Generator().manual_seed(seed)
    if discrete:
        idx = torch.randint(0, ACT, (T, B), generator=g)
        action = torch.nn.functional.one_hot(idx, ACT).float()
    else:
        action = torch.rand(T, B, ACT, generator=g) * 2 - 1
    is_first = torch.zeros(T, B, 1)
    is_first[0] = 1.0
    is_first[3, 1] = 1.0
    action = action * (1 - is_first)
    x = torch.randn(B, *obs_shape, generator=g)
    obs = []
    for t in range(T):
        fresh = torch.randn(B, *obs_shape, generator=g)
        x = torch.where(is_first[t].reshape(B, *[1] * len(obs_shape)) > 0, fresh, 0.8 * x)
        if len(obs_shape) == 1:
            x = x.clone()
            x[:, :ACT] += action[t]
        obs.append(x)
    obs_t = torch.stack(obs)
    if len(obs_shape) == 3:
        obs_t = (obs_t.abs() * 60).clamp(0, 255)
    reward = obs_t.flatten(2)[..., :1].tanh()
    term = torch.zeros(T, B, 1)
    if terminated:
        term[2, 1] = 1.0  # the step before the new episode at (3, 1)
    return {"obs": obs_t, "action": action, "reward": reward, "terminated": term,
            "is_first": is_first}  # fmt: skip


def all_params(agent: DreamerAgent) -> list[torch.Tensor]:
    return ([p.detach().clone() for p in agent.world_model.parameters()]
            + [v.detach().clone() for v in agent.ac.state_dict().values()])  # fmt: skip


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def spy(monkeypatch, obj, name: str, record):
    orig = getattr(obj, name)

    def wrapped(*args, **kwargs):
        out = orig(*args, **kwargs)
        record(args, kwargs, out)
        return out

    monkeypatch.setattr(obj, name, wrapped)


# ---- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(model_size="XL"), "model_size"),
    (dict(sequence_model="gru"), "sequence_model"),
    (dict(classes=1), "classes"),
    (dict(seq_len=1), "seq_len"),
    (dict(lam=1.5), "lam"),
    (dict(retnorm_low=0.9, retnorm_high=0.5), "retnorm_high"),
    (dict(episodic="yes"), "episodic"),
])  # fmt: skip
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        DreamerConfig(**kw).validate()


def test_the_suite_sets_the_train_ratio_and_a_flag_overrides_it():
    """DreamerV3 v1: 512 on DMC, 1024 on Atari-100k; suites it never ran keep 1024."""
    cfg = DreamerConfig()
    assert cfg.train_ratio is None
    assert cfg.for_env("dmc/walker-walk").train_ratio == 512
    assert cfg.for_env("atari/Pong").train_ratio == 1024
    assert cfg.for_env("gym/CartPole-v1").train_ratio == 1024
    assert DreamerConfig(train_ratio=32).for_env("dmc/walker-walk").train_ratio == 32
    with pytest.raises(ValueError, match="train_ratio"):
        DreamerConfig(train_ratio=0).validate()


def test_vector_observations_pass_through_the_published_5_x_1024_mlp():
    """DreamerV3 v1 as it ran: 5 layers of 1024 units for vector inputs at every size; the
    size's own MLP stays an option (vector_mlp='size')."""
    def widths(cfg):
        wm = WorldModel(cfg, (7,), ACT)
        enc = [m.out_features for m in wm.encoder.modules() if isinstance(m, torch.nn.Linear)]
        dec = [m.out_features for m in wm.decoder.modules() if isinstance(m, torch.nn.Linear)]
        return enc, dec

    enc, dec = widths(DreamerConfig(model_size="XS"))
    assert enc == [1024] * 5 and dec == [1024] * 5 + [7]
    enc, dec = widths(DreamerConfig(model_size="XS", vector_mlp="size"))
    assert enc == [256] and dec == [256, 7]


def test_config_defaults_and_from_dict():
    cfg = DreamerConfig().validate()
    assert cfg.dims() == dict(deter=512, units=512, layers=2, cnn_depth=32)
    assert (cfg.stoch, cfg.classes, cfg.num_bins, cfg.batch_size, cfg.seq_len) == (
        32, 32, 255, 16, 64)
    assert cfg.resolved_train_ratio() / (cfg.batch_size * cfg.seq_len) == 1.0
    assert cfg.wm_optim.lr == 1e-4 and cfg.wm_optim.sam is None
    cfg = DreamerConfig.from_dict({"model_size": "M", "wm_optim": {"lr": 3e-4,
                                   "betas": [0.9, 0.99], "sam": {"rho": 0.1}}})  # fmt: skip
    assert cfg.dims()["deter"] == 1024 and cfg.wm_optim.sam.rho == 0.1
    assert cfg.wm_optim.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="bogus"):
        DreamerConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="sam.m"):
        DreamerConfig(wm_optim=optim.OptimSpec(sam=optim.SamSpec(m=4))).validate()


def test_agent_exposes_the_loop_contract():
    agent = make_agent()
    assert (agent.batch_size, agent.seq_len, agent.horizon) == (B, T, T - 1)
    assert agent.train_ratio == 1024 and agent.discount == 0.997 and agent.discrete


# ---- sequence model ------------------------------------------------------------------------
def test_rssm_shapes_and_reset_at_is_first():
    torch.manual_seed(0)
    E, D, S, C = 5, 16, 4, 3
    rssm = RSSM(E, ACT, deter=D, units=8, stoch=S, classes=C)
    embed, action = torch.randn(T, B, E), torch.randn(T, B, ACT)
    is_first = torch.zeros(T, B, 1)
    is_first[0] = is_first[4, 2] = 1.0
    post, prior, feat = rssm.observe(embed, action, is_first)
    assert post["deter"].shape == (T, B, D) and post["stoch"].shape == (T, B, S * C)
    assert post["logits"].shape == prior["logits"].shape == (T, B, S, C)
    assert feat.shape == (T, B, rssm.feat_dim) and rssm.feat_dim == D + S * C
    assert torch.equal(post["stoch"].reshape(T, B, S, C).sum(-1), torch.ones(T, B, S))
    assert torch.allclose(post["logits"].exp().sum(-1), torch.ones(T, B, S))
    assert post["logits"].exp().min() >= 0.01 / C - 1e-7  # the uniform mixture
    # At (4, 2) the state was reset: the same posterior as a sequence starting there.
    fresh, _, _ = rssm.observe(embed[4:, 2:3], action[4:, 2:3] * 0, torch.ones(T - 4, 1, 1))
    torch.testing.assert_close(post["deter"][4, 2], fresh["deter"][0, 0])
    torch.testing.assert_close(post["logits"][4, 2], fresh["logits"][0, 0])
    # Where no reset happened the history matters.
    assert not torch.allclose(post["deter"][4, 1], fresh["deter"][0, 0])
    # The action at a first step is ignored.
    action2 = action.clone()
    action2[4, 2] += 5.0
    torch.manual_seed(1)
    a, _, _ = rssm.observe(embed, action, is_first)
    torch.manual_seed(1)
    b, _, _ = rssm.observe(embed, action2, is_first)
    assert torch.equal(a["deter"], b["deter"])
    # Imagination and acting steps.
    start = rssm.imagine_start(post)
    nxt = rssm.imagine_step(start, torch.randn(T * B, ACT))
    assert nxt["deter"].shape == (T * B, D) and nxt["stoch"].shape == (T * B, S * C)
    # States carry the columns of their latents' 1s, so that no reader needs an argmax.
    for state in (post, start, nxt):
        assert torch.equal(state["index"], onehot_index(state["stoch"], S))
    init = rssm.initial(3)
    assert init["deter"].shape == (3, D)
    step = rssm.obs_step(init, torch.zeros(3, ACT), torch.randn(3, E), sample=False)
    assert torch.equal(step["stoch"].reshape(3, S, C).sum(-1), torch.ones(3, S))


@pytest.mark.parametrize("layers", [0, 2])
@pytest.mark.parametrize("sizes", [(7, 5, 4, 3, 8), (40, 64, 8, 8, 64)])
def test_one_hot_features_feed_an_mlp_like_the_concatenation(layers, sizes):
    """A head reading [dense, one-hot] in parts (rows summed for the one-hot part, their
    gradient a sparse product on a CPU) gives the dense layer's output and gradients: for the
    weights, and for straight-through inputs. The larger sizes take flatworld.nn.linear's
    oneDNN route for the dense products."""
    torch.manual_seed(0)
    n, d, s, c, units = sizes
    net = mlp(d + s * c, units, layers, 6 if units < 64 else 64)
    if layers == 0:
        torch.nn.init.normal_(net[0].bias)  # a bias that a missing term would show
    dense = torch.randn(n, 2, d, requires_grad=True)
    logits = torch.randn(n, 2, s, c, requires_grad=True)
    probs = logits.softmax(-1)
    hard = torch.nn.functional.one_hot(torch.randint(0, c, (n, 2, s)), c).float()
    onehot = (hard + probs - probs.detach()).flatten(-2)  # straight-through, as sampled
    feat = OneHotFeat(dense, onehot, onehot_index(onehot, s))
    assert torch.equal(feat.index[..., 1], hard[..., 1, :].argmax(-1) + c)
    out_parts = feed(net, feat)
    out_full = net(torch.cat([dense, onehot], -1))
    torch.testing.assert_close(out_parts, out_full)
    g = torch.randn_like(out_full)
    grads_parts = torch.autograd.grad(out_parts, [dense, logits, *net.parameters()], g,
                                      retain_graph=True)
    grads_full = torch.autograd.grad(out_full, [dense, logits, *net.parameters()], g)
    for a, b in zip(grads_parts, grads_full, strict=True):
        torch.testing.assert_close(a, b)
    assert grads_parts[1].abs().sum() > 0
    # Slices keep the parts together.
    torch.testing.assert_close(feed(net, feat[1:]), out_full[1:])


def test_one_hot_features_feed_a_linear_and_a_decoder_of_the_latent_alone():
    """The decoders read a OneHotFeat too: a bare Linear (with bias) and, for the transformer,
    a feature with no dense part (the latent alone)."""
    torch.manual_seed(0)
    n, d, s, c = 6, 5, 4, 3
    hard = torch.nn.functional.one_hot(torch.randint(0, c, (n, s)), c).float().flatten(-2)
    for width in (d, 0):
        lin = torch.nn.Linear(width + s * c, 7)
        dense = torch.randn(n, width)
        feat = OneHotFeat(dense, hard, onehot_index(hard, s))
        torch.testing.assert_close(feed(lin, feat), lin(torch.cat([dense, hard], -1)))
        dec = MLPDecoder(width + s * c, 3, 8, 1)
        torch.testing.assert_close(dec(feat), dec(torch.cat([dense, hard], -1)))


def test_kl_balancing_and_free_bits_by_hand():
    torch.manual_seed(0)
    post = torch.log_softmax(torch.randn(2, 2, 3) * 2, -1).requires_grad_()  # (N, S, C)
    prior = torch.log_softmax(torch.randn(2, 2, 3) * 2, -1).requires_grad_()
    expected = []
    for n in range(2):
        total = 0.0
        for s in range(2):
            p = post[n, s].detach().exp().tolist()
            q = prior[n, s].detach().exp().tolist()
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        expected.append(total)
    free = (expected[0] + expected[1]) / 2  # one above the floor, one below
    dyn, rep, kl = kl_terms(post, prior, free)
    torch.testing.assert_close(kl, torch.tensor(expected))
    floored = torch.tensor([max(e, free) for e in expected])
    torch.testing.assert_close(dyn, floored)
    torch.testing.assert_close(rep, floored)
    # Balancing: dyn trains the prior only, rep the posterior only; below the floor, nothing.
    above = int(expected[1] > expected[0])
    g_post, g_prior = torch.autograd.grad(dyn.sum(), (post, prior), materialize_grads=True)
    assert torch.equal(g_post, torch.zeros_like(g_post)) and g_prior[above].abs().sum() > 0
    assert torch.equal(g_prior[1 - above], torch.zeros(2, 3))
    g_post, g_prior = torch.autograd.grad(rep.sum(), (post, prior), materialize_grads=True)
    assert torch.equal(g_prior, torch.zeros_like(g_prior)) and g_post[above].abs().sum() > 0
    assert torch.equal(g_post[1 - above], torch.zeros(2, 3))


def test_world_model_loss_weights_the_kl_terms():
    agent = make_agent()
    data = agent.prepare(synthetic_batch())
    torch.manual_seed(3)
    loss, parts, _ = agent.world_model.loss(data)
    expected = (parts["recon_loss"] + parts["reward_loss"] + parts["cont_loss"]
                + 0.5 * parts["dyn_loss"] + 0.1 * parts["rep_loss"])  # fmt: skip
    torch.testing.assert_close(loss.detach(), expected)
    assert parts["dyn_loss"] >= 1.0 and parts["rep_loss"] >= 1.0  # free bits


def test_two_hot_and_symlog_round_trip_with_255_bins():
    agent = make_agent()
    two_hot = agent.world_model.two_hot
    assert (two_hot.num_bins, two_hot.vmin, two_hot.vmax) == (255, -20.0, 20.0)
    x = torch.tensor([0.0, 1e-3, -0.37, 1.0, -5.5, 42.0, 1234.5, -1e5])[:, None]
    torch.testing.assert_close(symexp(symlog(x)), x)
    probs = two_hot.encode(x)
    assert probs.shape == (8, 255)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))
    assert ((probs > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(two_hot.decode_probs(probs), x, rtol=1e-5, atol=1e-5)
    # Beyond the range the value saturates at the outer bin.
    big = TwoHot(255, -20.0, 20.0).encode(torch.tensor([[1e12]]))
    assert big[0, -1] == 1.0


# ---- actor-critic pieces -------------------------------------------------------------------
def test_lambda_returns_by_hand():
    torch.manual_seed(0)
    H, N = 4, 2
    reward, value = torch.randn(H, N, 1), torch.randn(H + 1, N, 1)
    disc = 0.9 * (torch.rand(H, N, 1) > 0.2).float()
    lam = 0.7
    got = lambda_returns(reward, value, disc, lam)
    want = torch.zeros(H, N, 1)
    for n in range(N):
        nxt = value[H, n]
        for t in reversed(range(H)):
            nxt = reward[t, n] + disc[t, n] * ((1 - lam) * value[t + 1, n] + lam * nxt)
            want[t, n] = nxt
    torch.testing.assert_close(got, want)
    # lambda = 0: one-step targets; lambda = 1: discounted sums plus the last bootstrap.
    torch.testing.assert_close(lambda_returns(reward, value, disc, 0.0),
                               reward + disc * value[1:])  # fmt: skip
    mc = value[H]
    for t in reversed(range(H)):
        mc = reward[t] + disc[t] * mc
    torch.testing.assert_close(lambda_returns(reward, value, disc, 1.0)[0], mc)


def test_return_normaliser_percentile_ema_by_hand():
    norm = ReturnNorm(decay=0.99, low=0.05, high=0.95, max_inv=1.0)
    norm.update(torch.arange(101.0))  # 5th and 95th percentiles: 5 and 95
    torch.testing.assert_close(norm.low, torch.tensor(0.05))
    torch.testing.assert_close(norm.high, torch.tensor(0.95))
    assert norm.scale() == 1.0  # max(1, 0.9)
    g = torch.Generator().manual_seed(0)
    lo, hi = 0.05, 0.95
    for _ in range(300):
        x = torch.randn(50, 7, generator=g) * 10 + 3
        q = np.percentile(x.numpy(), [5, 95])
        lo, hi = 0.99 * lo + 0.01 * q[0], 0.99 * hi + 0.01 * q[1]
        norm.update(x)
    torch.testing.assert_close(norm.low, torch.tensor(lo, dtype=torch.float32))
    torch.testing.assert_close(norm.high, torch.tensor(hi, dtype=torch.float32))
    torch.testing.assert_close(norm.scale(), torch.tensor(hi - lo, dtype=torch.float32))
    assert set(norm.state_dict()) == {"low", "high"}


# ---- SAM done right ------------------------------------------------------------------------
@pytest.mark.parametrize("discrete", [True, False])
def test_sam_with_zero_radius_is_adam_bit_for_bit(discrete):
    batch = synthetic_batch(discrete=discrete)
    runs = []
    for sam in (None, optim.SamSpec(rho=0.0)):
        agent = make_agent(discrete=discrete, sam=sam)
        torch.manual_seed(5)
        metrics = [agent.update(batch) for _ in range(3)]
        runs.append((metrics, all_params(agent)))
    assert float(runs[0][0][0]["sam_passes"]) == 1.0 and float(runs[1][0][0]["sam_passes"]) == 2.0
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a if k != "sam_passes")
    assert same(runs[0][1], runs[1][1])


def test_imagination_starts_from_first_pass_posteriors(monkeypatch):
    batch = synthetic_batch()
    seen: dict[str, list] = {}
    for name, sam in (("adam", None), ("sam", SAM)):
        agent = make_agent(sam=sam)
        posts, starts = [], []
        spy(monkeypatch, agent.world_model, "loss",
            lambda a, k, out, posts=posts: posts.append(
                {n: v.detach().clone() for n, v in out[2].items()}))  # fmt: skip
        spy(monkeypatch, agent, "train_actor_critic",
            lambda a, k, out, starts=starts: starts.append(
                ({n: v.clone() for n, v in a[0].items()}, torch.get_rng_state())))  # fmt: skip
        torch.manual_seed(5)
        agent.update(batch)
        seen[name] = (posts, starts)
    posts, starts = seen["sam"]
    assert len(posts) == 2 and len(starts) == 1
    start, rng = starts[0]
    for k, v in start.items():
        assert torch.equal(v, posts[0][k].flatten(0, 1))
    # The perturbed pass gives other posteriors; imagination does not start from them.
    assert not torch.equal(start["deter"], posts[1]["deter"].flatten(0, 1))
    # Adam's update starts imagination from the same states, with the same random stream.
    adam_start, adam_rng = seen["adam"][1][0]
    assert all(torch.equal(v, adam_start[k]) for k, v in start.items())
    assert torch.equal(rng, adam_rng)


def test_every_pass_draws_the_same_latent_samples(monkeypatch):
    agent = make_agent(sam=optim.SamSpec(rho=0.5, ascent_steps=2))
    noises: list[list[torch.Tensor]] = []
    logits: list[torch.Tensor] = []
    seq = agent.world_model.seq
    spy(monkeypatch, agent.world_model, "loss", lambda a, k, out: logits.append(
        out[2]["logits"].detach()))  # fmt: skip
    orig_loss = agent.world_model.loss

    def loss(data):
        noises.append([])
        return orig_loss(data)

    monkeypatch.setattr(agent.world_model, "loss", loss)
    spy(monkeypatch, seq, "_noise", lambda a, k, out: noises[-1].append(out.clone()))
    agent.update(synthetic_batch())
    # 1 + 2 ascent steps with T draws each; imagination's draws follow the last pass.
    assert [len(n) for n in noises] == [T, T, T + 3]
    for other in noises[1:]:
        assert all(torch.equal(x, y) for x, y in zip(noises[0], other[:T], strict=True))
    assert not torch.equal(logits[0], logits[1])  # the weights did move between passes


@pytest.mark.parametrize("sam", [None, SAM])
def test_clipping_alike_in_every_pass_and_no_grads_left(monkeypatch, sam):
    clip = 1e-3
    agent = make_agent(sam=sam, wm_grad_clip=clip)
    wm_ids = {id(p) for p in agent.world_model.parameters()}
    calls = []
    orig = agent_module.clip_grad_norm_

    def recording(params, max_norm, **kw):
        params = list(params)
        norm = orig(params, max_norm, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        calls.append(({id(p) for p in params} == wm_ids, max_norm, float(norm), float(after)))
        return norm

    monkeypatch.setattr(agent_module, "clip_grad_norm_", recording)
    before = all_params(agent)
    agent.update(synthetic_batch())
    assert len(calls) == (2 if sam else 1)
    for is_wm, max_norm, norm, after in calls:
        assert is_wm and max_norm == clip and norm > clip and after <= clip * (1 + 1e-4)
    assert not same(before, all_params(agent))
    modules = (agent.world_model, agent.ac)
    assert all(p.grad is None for m in modules for p in m.parameters())


@pytest.mark.parametrize("discrete", [True, False])
def test_actor_critic_step_is_the_same_with_sam_on_or_off(discrete):
    batch = synthetic_batch(discrete=discrete)
    ref = make_agent(discrete=discrete)
    ref.update(batch)  # a trained-a-little world model, shared by both below
    agents = [make_agent(discrete=discrete, sam=s) for s in (None, SAM)]
    data = ref.prepare(batch)
    with torch.no_grad():
        torch.manual_seed(0)
        post = ref.world_model.loss(data)[2]
    start = ref.world_model.seq.imagine_start(post)
    out = []
    for agent in agents:
        agent.world_model.load_state_dict(ref.world_model.state_dict())
        wm_before = [p.detach().clone() for p in agent.world_model.parameters()]
        torch.manual_seed(9)
        m = agent.train_actor_critic(start, data["cont"].flatten(0, 1))
        # The actor-critic step leaves the world model alone.
        assert same(wm_before, [p.detach() for p in agent.world_model.parameters()])
        assert all(p.grad is None for p in agent.world_model.parameters())
        out.append((m, [v.clone() for v in agent.ac.state_dict().values()]))
    assert all(torch.equal(v, out[1][0][k]) for k, v in out[0][0].items())
    assert same(out[0][1], out[1][1])
    assert float(out[0][0]["critic_grad_norm"]) > 0 and float(out[0][0]["actor_grad_norm"]) > 0


@pytest.mark.parametrize("discrete", [True, False])
def test_rollout_gradient_only_where_needed(monkeypatch, discrete):
    """REINFORCE (discrete) imagines under no_grad; continuous actions backpropagate through
    the dynamics into the actor."""
    agent = make_agent(discrete=discrete)
    seen = []
    spy(monkeypatch, agent.ac, "imagine",
        lambda a, k, out: seen.append(out[0].dense.requires_grad))
    agent.update(synthetic_batch(discrete=discrete))
    agent.update(synthetic_batch(discrete=discrete))
    assert seen == [not discrete] * 2


# ---- learning, acting, diagnostics, checkpoints --------------------------------------------
@pytest.mark.parametrize("discrete", [True, False])
def test_updates_lower_world_model_loss(discrete):
    batch = synthetic_batch(discrete=discrete)
    agent = make_agent(discrete=discrete)
    before = agent.diagnostics(batch)["wm_loss"]
    for _ in range(40):
        agent.update(batch)
    after = agent.diagnostics(batch)["wm_loss"]
    assert after < 0.8 * before


def test_act_one_hot_for_discrete_and_bounded_for_continuous():
    agent = make_agent()
    obs = np.linspace(-1, 1, OBS).astype(np.float32)
    for eval_mode in (False, True):
        for t0 in (True, False, False):
            a = agent.act(obs, t0=t0, eval_mode=eval_mode)
            assert a.dtype == np.float32 and a.shape == (ACT,)
            assert sorted(a.tolist()) == [0.0] * (ACT - 1) + [1.0]
    # t0 resets the recurrent state: the same seed gives the same first action.
    torch.manual_seed(3)
    first = agent.act(obs, t0=True, eval_mode=False)
    agent.act(obs, t0=False, eval_mode=False)
    torch.manual_seed(3)
    assert np.array_equal(agent.act(obs, t0=True, eval_mode=False), first)
    cont = make_agent(discrete=False)
    a = [cont.act(obs * 50, t0=i == 0, eval_mode=False) for i in range(20)]
    assert np.abs(np.stack(a)).max() <= 1.0 and a[0].shape == (ACT,)
    assert np.isfinite(cont.value(obs))


def test_evaluation_samples_the_actor_unless_eval_policy_is_mode(monkeypatch):
    obs = np.linspace(-1, 1, OBS).astype(np.float32)

    def eval_calls(agent: DreamerAgent) -> list[str]:
        calls: list[str] = []
        actor = agent.ac.actor
        for name in ("sample", "mode"):
            fn = getattr(actor, name)
            monkeypatch.setattr(actor, name, lambda p, _f=fn, _n=name: calls.append(_n) or _f(p))
        for t in range(3):
            a = agent.act(obs, t0=t == 0, eval_mode=True)
        assert a.shape == (ACT,)
        return calls

    assert eval_calls(make_agent()) == ["sample"] * 3  # DreamerV3 v1 samples in evaluation
    assert eval_calls(make_agent(eval_policy="mode")) == ["mode"] * 3
    assert eval_calls(make_agent(discrete=False, eval_policy="mode")) == ["mode"] * 3
    with pytest.raises(ValueError, match=r"eval_policy='argmax'; accepted: one of \('sample'"):
        make_agent(eval_policy="argmax").cfg.validate()


def test_episodic_flag_sets_the_continue_targets():
    batch = synthetic_batch(terminated=True)
    on = make_agent(episodic=True).prepare(batch)["cont"]
    off = make_agent(episodic=False).prepare(batch)["cont"]
    assert on[2, 1, 0] == 0.0 and on.sum() == T * B - 1
    assert torch.equal(off, torch.ones(T, B, 1))
    assert np.isfinite(float(make_agent(episodic=True).update(batch)["cont_loss"]))


def test_pixel_observations_update_and_act():
    shape = (3, 64, 64)
    agent = make_agent(obs_shape=shape)
    batch = synthetic_batch(obs_shape=shape)
    batch = {k: v[:3, :2] for k, v in batch.items()}
    m = agent.update(batch)
    assert np.isfinite(float(m["wm_loss"])) and float(m["recon_loss"]) > 0
    a = agent.act(batch["obs"][0, 0].numpy(), t0=True, eval_mode=True)
    assert a.shape == (ACT,) and a.sum() == 1.0


def test_diagnostics_measure_only():
    agent = make_agent(sam=SAM)
    batch = synthetic_batch()
    agent.update(batch)
    before = all_params(agent)
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
    assert same(before, all_params(agent))
    assert all(p.grad is None for p in agent.world_model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    after = io.BytesIO()
    torch.save(agent.wm_optim.state_dict(), after)
    assert opt_state.getvalue() == after.getvalue()
    assert agent.diagnostics(batch)["wm_loss"] == d["wm_loss"]  # deterministic measurement


@pytest.mark.parametrize("sam", [None, SAM])
def test_state_dict_round_trip(sam):
    batch = synthetic_batch()
    obs = np.ones(OBS, np.float32)
    a = make_agent(sam=sam)
    for _ in range(3):
        a.update(batch)
    a.act(obs, t0=True, eval_mode=False)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_agent(seed=99, sam=sam)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.updates == 3 and same(all_params(a), all_params(b))
    out = []
    for agent in (a, b):
        torch.manual_seed(11)
        out.append((agent.update(batch), agent.act(obs, t0=False, eval_mode=False),
                    all_params(agent)))  # fmt: skip
    assert all(torch.equal(v, out[1][0][k]) for k, v in out[0][0].items())
    assert np.array_equal(out[0][1], out[1][1]) and same(out[0][2], out[1][2])
