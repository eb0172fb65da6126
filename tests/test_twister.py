"""The TWISTER-style transformer (TSSM) and AC-CPC in the Dreamer agent."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from flatworld import optim
from flatworld.agents.dreamer import (
    RSSM,
    SEQUENCE_MODELS,
    TSSM,
    DreamerConfig,
    info_nce,
    make,
    random_boxes,
    resized_crop,
)
from flatworld.agents.dreamer import transformer as tssm_module
from flatworld.agents.dreamer import world_model as wm_module
from flatworld.agents.dreamer.networks import OneHotFeat, onehot_index
from flatworld.agents.dreamer.transformer import ACCPC
from tests.test_dreamer import ACT, OBS, all_params, same, spy, synthetic_batch, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
E, S, C, W = 5, 4, 4, 16
SAM = optim.SamSpec(rho=0.5)


def tiny_tssm(seed: int = 0, **kw) -> TSSM:
    torch.manual_seed(seed)
    base = dict(width=W, blocks=2, heads=2, ff_mult=2, dropout=0.1, context=8,
                stoch=S, classes=C)  # fmt: skip
    return TSSM(E, ACT, **{**base, **kw}).eval()


def twister_cfg(**kw) -> DreamerConfig:
    base = dict(sequence_model="transformer", tssm_width=W, tssm_heads=2, tssm_blocks=2,
                cpc_steps=3)  # fmt: skip
    return tiny(**{**base, **kw})


def make_agent(seed: int = 0, discrete: bool = True, obs_shape=(OBS,), sam=None, lr=1e-3,
               **kw):  # fmt: skip
    torch.manual_seed(seed)
    cfg = twister_cfg(wm_optim=optim.OptimSpec(lr=lr, eps=1e-8, sam=sam), **kw)
    return make(cfg, obs_shape=obs_shape, action_dim=ACT, episode_length=100, discrete=discrete)


def one_hot_actions(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(torch.randint(0, ACT, shape, generator=g), ACT).float()


def observe_inputs(steps: int = 10, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(steps, batch, E, generator=g)
    action = one_hot_actions(steps, batch, seed=seed)
    is_first = torch.zeros(steps, batch, 1)
    is_first[0] = 1.0
    is_first[6, 1] = 1.0
    return embed, action, is_first


def context_tokens(seq: TSSM, stoch, action, is_first):
    """observe's tokens, rebuilt by hand: token t = Mix([z_{t-1}, a_{t-1}]); at an episode start
    (and t = 0) z_{t-1} is the learned initial latent and a_{t-1} = 0."""
    keep = 1.0 - is_first
    z0 = seq.initial_latent().expand_as(stoch[0])
    prev = torch.cat([z0[None], stoch[:-1]])
    prev = prev * keep + z0 * is_first
    return seq.token(prev, action * keep)


# ---- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(tssm_width=16, tssm_heads=3), "tssm_heads"),
    (dict(tssm_context=0), "tssm_context"),
    (dict(tssm_dropout=1.0), "tssm_dropout"),
    (dict(cpc_steps=-1), "cpc_steps"),
    (dict(cpc_decay=0.0), "cpc_decay"),
    (dict(cpc_crop_min=0.0), "cpc_crop_min"),
    (dict(cpc_scale=-1.0), "cpc_scale"),
])  # fmt: skip
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        DreamerConfig(sequence_model="transformer", **kw).validate()


def test_published_defaults_and_what_the_decoder_sees():
    assert "transformer" in SEQUENCE_MODELS
    cfg = DreamerConfig(sequence_model="transformer").validate()
    assert (cfg.tssm_blocks, cfg.tssm_width, cfg.tssm_heads, cfg.tssm_ff_mult,
            cfg.tssm_context) == (4, 512, 8, 2, 8)  # fmt: skip
    assert (cfg.tssm_dropout, cfg.cpc_steps, cfg.cpc_decay, cfg.cpc_scale,
            cfg.cpc_crop_min) == (0.1, 10, 0.75, 1.0, 0.25)  # fmt: skip
    agent = make_agent(obs_shape=(3, 64, 64))
    wm = agent.world_model
    assert isinstance(wm.seq, TSSM) and wm.seq.feat_dim == W + S * C
    assert wm.seq.decoder_dim == S * C and wm.decoder.proj.in_features == S * C
    assert len(wm.cpc.heads) == 3
    state = wm.seq.initial(2)
    seen = wm.seq.decoder_feat(state)
    assert seen.dense.shape[-1] == 0 and seen.onehot is state["stoch"]
    # The RSSM's decoder still sees everything.
    rssm = RSSM(E, ACT, deter=8, units=8, stoch=S, classes=C)
    assert rssm.decoder_dim == rssm.feat_dim
    st = rssm.initial(2)
    seen = rssm.decoder_feat(st)
    torch.testing.assert_close(torch.cat([seen.dense, seen.onehot], -1), rssm.feat(st))


# ---- the transformer -----------------------------------------------------------------------
def test_layers_around_the_transformer_are_the_published_ones():
    """TWISTER's action mixer (Linear, LN, SiLU, Linear, LN, no biases) by hand, ReLU
    feed-forward, single-Linear prior and posterior, and a learned initial latent that an
    episode start reads (with a zero action) and that learns through it."""
    seq = tiny_tssm()
    assert isinstance(seq.prior_net, torch.nn.Linear)
    assert isinstance(seq.post_net, torch.nn.Linear)
    assert seq.tok_action.bias is None and seq.tok_out.bias is None
    g = torch.Generator().manual_seed(1)
    z = F.one_hot(torch.randint(0, C, (3, S), generator=g), C).float().flatten(-2)
    a = one_hot_actions(3, seed=2)
    x = torch.cat([z, a], -1) @ torch.cat([seq.tok_rows, seq.tok_action.weight.t()])
    x = F.silu(F.layer_norm(x, (W,), seq.tok_norm.weight, seq.tok_norm.bias, 1e-3))
    x = F.layer_norm(x @ seq.tok_out.weight.t(), (W,), seq.tok_out_norm.weight,
                     seq.tok_out_norm.bias, 1e-3)  # fmt: skip
    torch.testing.assert_close(seq.token(z, a), x)
    blk = seq.blocks[0]
    h = torch.randn(5, W, generator=g)
    torch.testing.assert_close(blk.ff(h), blk.ff2(torch.relu(blk.ff1(h))))
    z0 = seq.initial_latent()
    assert torch.equal(z0.detach().view(S, C).sum(-1), torch.ones(S))
    assert torch.equal(seq.initial(2)["stoch"], z0.detach().expand(2, S * C))
    embed, action, is_first = observe_inputs()
    post, _, _ = seq.observe(embed, action, is_first)
    # Sample 1 starts an episode at t = 6: its token there is Mix([z0, 0]), as at t = 0.
    zero = torch.zeros(1, ACT)
    for t, b in ((0, 0), (6, 1)):
        alone, _, _ = seq.forward_tokens(seq.token(z0[None], zero)[None], torch.ones(1, 1).bool())
        torch.testing.assert_close(post["deter"][t, b], alone[0, 0])
    post["deter"].square().sum().backward()
    assert seq.initial_deter.grad.abs().sum() > 0 and seq.prior_net.bias.grad.abs().sum() > 0


def test_causal_a_future_token_changes_no_earlier_output():
    seq = tiny_tssm()
    steps, batch = 12, 3
    tokens = torch.randn(steps, batch, W)
    start = torch.zeros(steps, batch, dtype=torch.bool)
    h, k, _ = seq.forward_tokens(tokens, start)
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[t] += torch.randn(batch, W)
        h2, k2, _ = seq.forward_tokens(changed, start)
        torch.testing.assert_close(h2[:t], h[:t], rtol=0, atol=1e-6)
        torch.testing.assert_close(k2[:t], k[:t], rtol=0, atol=1e-6)
        assert (h2[t] - h[t]).abs().max() > 1e-3
    # The context window: block 1 at step t attends to tokens t-8..t only, so the keys of
    # block 2 (computed from block 1's output) ignore token 0 from t = 9 on; the output of
    # block 2 at t = 9 still sees it, through block 1's output at t = 1..8.
    changed = tokens.clone()
    changed[0] += 1.0
    h2, k2, _ = seq.forward_tokens(changed, start)
    assert (k2[9:, :, 1] - k[9:, :, 1]).abs().max() == 0
    assert (k2[8, :, 1] - k[8, :, 1]).abs().max() > 0 and (h2[9] - h[9]).abs().max() > 0
    # Through observe: changing the action that leads to step 5 leaves steps 0..4 alone.
    embed, action, is_first = observe_inputs()
    torch.manual_seed(1)
    post, prior, _ = seq.observe(embed, action, is_first)
    action2 = action.clone()
    action2[5] = action2[5].roll(1, -1)
    torch.manual_seed(1)
    post2, prior2, _ = seq.observe(embed, action2, is_first)
    torch.testing.assert_close(post2["deter"][:5], post["deter"][:5], rtol=0, atol=1e-6)
    torch.testing.assert_close(prior2["logits"][:5], prior["logits"][:5], rtol=0, atol=1e-6)
    assert (post2["deter"][5] - post["deter"][5]).abs().max() > 1e-3


def test_no_attention_across_an_episode_start():
    seq = tiny_tssm()
    steps, batch = 10, 3
    tokens = torch.randn(steps, batch, W)
    start = torch.zeros(steps, batch, dtype=torch.bool)
    start[4, 1] = True
    h, _, _ = seq.forward_tokens(tokens, start)
    changed = tokens.clone()
    changed[:4, 1] += torch.randn(4, W)
    h2, _, _ = seq.forward_tokens(changed, start)
    torch.testing.assert_close(h2[4:, 1], h[4:, 1], rtol=0, atol=1e-6)
    assert (h2[:4, 1] - h[:4, 1]).abs().max() > 1e-3
    assert (h2[4:, 0] - h[4:, 0]).abs().max() == 0  # other sequences untouched
    # The same numbers as a sequence that starts there.
    alone, _, _ = seq.forward_tokens(tokens[4:, 1:2], torch.zeros(steps - 4, 1, dtype=torch.bool))
    torch.testing.assert_close(alone[:, 0], h[4:, 1], rtol=1e-5, atol=1e-5)
    # Without the start, the earlier tokens do reach step 4.
    h3, _, _ = seq.forward_tokens(changed, torch.zeros_like(start))
    h4, _, _ = seq.forward_tokens(tokens, torch.zeros_like(start))
    assert (h3[4, 1] - h4[4, 1]).abs().max() > 1e-3
    # Imagination's start states see only their own episode's context.
    embed, action, is_first = observe_inputs()
    post, _, _ = seq.observe(embed, action, is_first)
    valid = seq.imagine_start(post)["valid"].view(10, 3, 9)
    assert valid[7, 1].tolist() == [False] * 7 + [True] * 2  # steps 6 and 7 of episode 2
    assert valid[8, 0].tolist() == [True] * 9 and valid[2, 0].tolist() == [False] * 6 + [True] * 3


@pytest.mark.parametrize("grad", [False, True])
def test_cached_imagination_equals_the_uncached_forward(grad):
    """15 steps from every posterior state, past the 8-step context, equal the parallel pass
    over the same tokens (context and imagined); no-grad steps write the cache in place."""
    seq = tiny_tssm()
    embed, action, is_first = observe_inputs()
    torch.manual_seed(2)
    post, _, _ = seq.observe(embed, action, is_first)
    state = seq.imagine_start(post)
    n = state["stoch"].shape[0]
    acts = one_hot_actions(15, n, seed=3)
    ptr = state["k"].data_ptr()
    hs, zs, logits = [], [state["stoch"]], []
    with torch.set_grad_enabled(grad):
        torch.manual_seed(4)
        for i in range(15):
            state = seq.imagine_step(state, acts[i])
            assert torch.equal(state["index"], onehot_index(state["stoch"], seq.stoch))
            hs.append(state["deter"])
            zs.append(state["stoch"])
            logits.append(state["logits"])
    assert (state["k"].data_ptr() == ptr) == (not grad)
    assert state["k"].requires_grad == grad
    ctx = context_tokens(seq, post["stoch"], action, is_first)  # (T, B, W)
    steps, batch = embed.shape[:2]
    with torch.no_grad():
        for t in (0, 3, 6, 7, 9):
            for b in range(batch):
                i = t * batch + b
                imag = seq.token(torch.stack([z[i] for z in zs[:-1]]), acts[:, i])
                tokens = torch.cat([ctx[: t + 1, b], imag])[:, None]
                start = torch.cat([is_first[: t + 1, b, 0] > 0, torch.zeros(15, dtype=bool)])
                h, _, _ = seq.forward_tokens(tokens, start[:, None])
                torch.testing.assert_close(torch.stack([x[i] for x in hs]), h[t + 1:, 0],
                                           rtol=1e-5, atol=1e-5)  # fmt: skip
                _, prior_logp, _ = seq._latent(seq.prior_net(h[t + 1:, 0]), False)
                torch.testing.assert_close(torch.stack([x[i] for x in logits]), prior_logp,
                                           rtol=1e-5, atol=1e-5)  # fmt: skip


def test_cached_acting_equals_the_parallel_pass():
    """obs_step from initial(), 13 steps (past the context), with an episode start in the
    middle, gives observe's deterministic states."""
    seq = tiny_tssm()
    steps, batch = 13, 2
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(steps, batch, E, generator=g)
    action = one_hot_actions(steps, batch, seed=5)
    is_first = torch.zeros(steps, batch, 1)
    is_first[0] = is_first[9, 1] = 1.0
    hs, zs = [], []
    with torch.no_grad():
        state = seq.initial(batch)
        for t in range(steps):
            if t == 9:  # an episode starts for sample 1: the agent resets (t0) with initial()
                fresh = seq.initial(batch)
                state["k"][:, 1], state["v"][:, 1] = fresh["k"][:, 1], fresh["v"][:, 1]
                state["valid"][1], state["stoch"][1] = fresh["valid"][1], fresh["stoch"][1]
            a = action[t] * (1 - is_first[t])
            state = seq.obs_step(state, a, embed[t], sample=False)
            hs.append(state["deter"])
            zs.append(state["stoch"])
        tokens = context_tokens(seq, torch.stack(zs), action, is_first)
        h, _, _ = seq.forward_tokens(tokens, is_first[..., 0] > 0)
    torch.testing.assert_close(torch.stack(hs), h, rtol=1e-5, atol=1e-5)


# ---- AC-CPC --------------------------------------------------------------------------------
def test_info_nce_by_hand():
    pred = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]])
    target = torch.tensor([[0.3, 0.2], [-1.0, 0.5], [1.0, 1.0]])
    weight = torch.tensor([1.0, 0.0, 1.0])
    want = []
    for i in range(3):
        dots = [sum(pred[i, d].item() * target[j, d].item() for d in range(2)) for j in range(3)]
        want.append(-math.log(math.exp(dots[i]) / sum(math.exp(x) for x in dots)))
    got = info_nce(pred, target, weight)
    torch.testing.assert_close(got, torch.tensor((want[0] + want[2]) / 2))
    torch.testing.assert_close(info_nce(pred, target, torch.ones(3)), torch.tensor(sum(want) / 3))


def test_ac_cpc_pairs_actions_and_targets_by_hand():
    """Head k (0..K-1) pairs the prior feature at t and the actions into t+1..t+k with the
    augmented posterior sample at t+k; pairs across an episode start are left out."""
    torch.manual_seed(0)
    steps, batch, feat_dim, latent, K = 5, 2, 3, 6, 3
    cpc = ACCPC(feat_dim, latent, ACT, steps=K, units=4, decay=0.75)
    feat = torch.randn(steps, batch, feat_dim)
    action = torch.randn(steps, batch, ACT)
    target_z = torch.randn(steps, batch, latent)
    is_first = torch.zeros(steps, batch, 1)
    is_first[3, 1] = 1.0
    got = cpc(feat, action, target_z, is_first)
    want = 0.0
    w = [1.0, 0.75, 0.75**2]
    for k in range(K):
        preds, tgts, keep = [], [], []
        for t in range(steps - k):
            for b in range(batch):
                acts = [action[t + j, b] for j in range(1, k + 1)]
                preds.append(cpc.heads[k](torch.cat([feat[t, b], *acts])))
                tgts.append(cpc.targets[k](target_z[t + k, b]))  # observation t + k
                keep.append(float(all(is_first[t + j, b, 0] == 0 for j in range(1, k + 1))))
        want = want + w[k] / sum(w) * info_nce(torch.stack(preds), torch.stack(tgts),
                                               torch.tensor(keep))  # fmt: skip
        assert k == 0 or 0 < sum(keep) < len(keep)
    torch.testing.assert_close(got, want)
    assert cpc.weights(3) == pytest.approx([x / sum(w) for x in w])
    # As in TWISTER's code: each side of a head is Linear, ELU, Linear, ELU.
    for side in (cpc.heads[0], cpc.targets[0]):
        assert [type(m) for m in side] == [tssm_module.Linear, torch.nn.ELU,
                                           tssm_module.Linear, torch.nn.ELU]  # fmt: skip


def test_ac_cpc_reads_one_hot_latents_as_their_dense_product():
    """Given OneHotFeat inputs (the world model's samples), AC-CPC sums weight rows instead of
    multiplying dense one-hots: the same loss and the same gradients, to float rounding, for
    the heads and for the straight-through inputs."""
    torch.manual_seed(0)
    steps, batch, deter, groups, classes, K = 6, 3, 5, 4, 3, 3
    latent = groups * classes
    cpc = ACCPC(deter + latent, latent, ACT, steps=K, units=8)
    h = torch.randn(steps, batch, deter)
    action = torch.randn(steps, batch, ACT)
    is_first = torch.zeros(steps, batch, 1)
    is_first[2, 0] = 1.0

    def one_hot_sample():
        index = torch.randint(0, classes, (steps, batch, groups))
        z = torch.nn.functional.one_hot(index, classes).float().flatten(-2).requires_grad_()
        return z, index + torch.arange(0, latent, classes)

    z_prior, prior_index = one_hot_sample()
    z_target, target_index = one_hot_sample()

    def run(one_hot):
        cpc.zero_grad()
        for x in (h, z_prior, z_target):
            x.grad = None
        if one_hot:
            loss = cpc(OneHotFeat(h, z_prior, prior_index), action,
                       OneHotFeat(z_target[..., :0], z_target, target_index), is_first)
        else:
            loss = cpc(torch.cat([h, z_prior], -1), action, z_target, is_first)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in cpc.parameters()], [
            x.grad.clone() for x in (z_prior, z_target)]

    h.requires_grad_()
    dense, rows = run(False), run(True)
    torch.testing.assert_close(rows[0], dense[0])
    for got, want in zip(rows[1] + rows[2], dense[1] + dense[2], strict=True):
        torch.testing.assert_close(got, want)
    assert dense[2][0].abs().sum() > 0  # the straight-through inputs do get a gradient


def test_ac_cpc_reads_the_prior_and_the_augmented_posterior(monkeypatch):
    """The world-model loss feeds AC-CPC [h_t, z_t ~ prior] and posterior samples of every
    augmented frame, and its gradient reaches the prior's logits."""
    agent = make_agent()
    wm = agent.world_model
    seen = {}
    orig = wm.cpc.forward

    def forward(prior_feat, action, target_z, is_first):
        seen.update(prior_feat=prior_feat, target_z=target_z)
        return orig(prior_feat, action, target_z, is_first)

    monkeypatch.setattr(wm.cpc, "forward", forward)
    batch = agent.prepare(synthetic_batch())
    loss, parts, post = wm.loss(batch)
    steps, b = batch["obs"].shape[:2]
    prior_feat, target = seen["prior_feat"], seen["target_z"]
    assert isinstance(prior_feat, OneHotFeat) and isinstance(target, OneHotFeat)
    assert prior_feat.dense.shape[-1] + prior_feat.onehot.shape[-1] == wm.seq.feat_dim
    torch.testing.assert_close(prior_feat.dense, post["deter"])  # the same h_t
    for zs in (prior_feat, target):  # one-hot samples of every frame, their 1s at ``index``
        z = zs.onehot.detach().view(steps, b, S, C)
        assert torch.equal(z.sum(-1), torch.ones(steps, b, S))
        assert torch.equal(onehot_index(zs.onehot, S), zs.index)
    assert target.dense.shape[-1] == 0  # the target side reads the latent alone
    wm.zero_grad()
    parts_cpc = wm.cpc(seen["prior_feat"], batch["action"], seen["target_z"], batch["is_first"])
    parts_cpc.backward()
    assert wm.seq.prior_net.weight.grad.abs().sum() > 0


def _bilinear_reference(img: torch.Tensor, box: list[float]) -> torch.Tensor:
    """One image (C, H, W), cropped to box (x0, y0, w, h) and resized, pixel by pixel."""
    c, hh, ww = img.shape
    x0, y0, bw, bh = box
    out = torch.zeros_like(img)
    for i in range(hh):
        for j in range(ww):
            # the output pixel's centre, as a fraction of the box, then source pixel coords
            u = (x0 + bw * (j + 0.5) / ww) * ww - 0.5
            v = (y0 + bh * (i + 0.5) / hh) * hh - 0.5
            u, v = min(max(u, 0.0), ww - 1.0), min(max(v, 0.0), hh - 1.0)
            j0, i0 = int(math.floor(u)), int(math.floor(v))
            j1, i1 = min(j0 + 1, ww - 1), min(i0 + 1, hh - 1)
            fu, fv = u - j0, v - i0
            out[:, i, j] = ((1 - fv) * ((1 - fu) * img[:, i0, j0] + fu * img[:, i0, j1])
                            + fv * ((1 - fu) * img[:, i1, j0] + fu * img[:, i1, j1]))  # fmt: skip
    return out


def test_batched_crop_equals_a_per_sample_reference():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 5, 6)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.3, 0.5, 0.6], [0.5, 0.05, 0.5, 0.45]])
    got = resized_crop(x, boxes)
    for n in range(3):
        torch.testing.assert_close(got[n], _bilinear_reference(x[n], boxes[n].tolist()))
    torch.testing.assert_close(got[0], x[0])  # the whole image is the identity
    b = random_boxes(2000, "cpu", 0.25)
    x0, y0, w, h = b.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all()
    assert (y0 + h <= 1 + 1e-6).all() and (w * h >= 0.25 - 1e-6).all() and (w * h).max() > 0.9
    assert (w * h).min() < 0.3 and (w / h).max() > 1.25 and (w / h).min() < 0.8


def test_augmentation_is_one_batched_op(monkeypatch):
    agent = make_agent(obs_shape=(3, 64, 64))
    calls = []
    spy(monkeypatch, F, "grid_sample", lambda a, k, out: calls.append(a[0].shape))
    batch = {k: v[:4, :2] for k, v in synthetic_batch(obs_shape=(3, 64, 64)).items()}
    agent.update(batch)
    assert calls == [(4 * 2, 3, 64, 64)]  # every frame of every sequence, at once


# ---- SAM, learning, checkpoints ------------------------------------------------------------
def test_updates_lower_world_model_loss():
    batch = synthetic_batch()
    agent = make_agent()
    before = agent.diagnostics(batch)["wm_loss"]
    for _ in range(40):
        agent.update(batch)
    after = agent.diagnostics(batch)["wm_loss"]
    assert after < 0.8 * before


@pytest.mark.parametrize("discrete", [True, False])
def test_sam_with_zero_radius_is_adam_bit_for_bit(discrete):
    batch = synthetic_batch(discrete=discrete)
    runs = []
    for sam in (None, optim.SamSpec(rho=0.0)):
        agent = make_agent(discrete=discrete, sam=sam)
        torch.manual_seed(5)
        metrics = [agent.update(batch) for _ in range(2)]
        runs.append((metrics, all_params(agent)))
    assert float(runs[1][0][0]["sam_passes"]) == 2.0 and "cpc_loss" in runs[0][0][0]
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a if k != "sam_passes")
    assert same(runs[0][1], runs[1][1])


def test_every_pass_replays_dropout_and_crops(monkeypatch):
    agent = make_agent(obs_shape=(3, 64, 64), sam=SAM)
    passes: list[dict[str, list]] = []
    orig_loss = agent.world_model.loss

    def loss(data):
        passes.append({"drop": [], "boxes": []})
        return orig_loss(data)

    monkeypatch.setattr(agent.world_model, "loss", loss)
    # A mask shows where an input is nonzero (the FF's ReLU zeroes some, and the perturbed pass
    # zeroes others): (dropped, nonzero) pairs, compared where both passes' inputs are nonzero.
    spy(monkeypatch, tssm_module, "_dropout",
        lambda a, k, out: a[2] and passes[-1]["drop"].append(torch.stack([out == 0, a[0] != 0])))
    spy(monkeypatch, wm_module, "random_boxes",
        lambda a, k, out: passes[-1]["boxes"].append(out.clone()))  # fmt: skip
    batch = {k: v[:4, :2] for k, v in synthetic_batch(obs_shape=(3, 64, 64)).items()}
    agent.update(batch)
    agent.update(batch)
    assert len(passes) == 4
    first, second = passes[0], passes[1]
    assert len(first["drop"]) == 2 * 3 and len(first["boxes"]) == 1  # 2 blocks x 3 dropouts

    def same_masks(p: list[Tensor], q: list[Tensor]) -> bool:
        both = [x[1] & y[1] for x, y in zip(p, q, strict=True)]
        assert all(b.any() for b in both)  # entries to compare in every mask
        return all(torch.equal(x[0] & b, y[0] & b) for x, y, b in zip(p, q, both, strict=True))

    assert sum(int((m[0] & m[1]).sum()) for m in first["drop"]) > 0  # dropout dropped some
    assert same_masks(first["drop"], second["drop"])
    assert all(torch.equal(x, y) for x, y in zip(first["boxes"], second["boxes"], strict=True))
    # The next update draws afresh.
    assert not torch.equal(passes[2]["boxes"][0], first["boxes"][0])
    assert not same_masks(first["drop"], passes[2]["drop"])


def test_act_keeps_a_cache_and_resets_at_t0():
    agent = make_agent()
    obs = np.linspace(-1, 1, OBS).astype(np.float32)
    for t in range(12):  # past the 8-step context
        a = agent.act(obs * (t + 1), t0=t == 0, eval_mode=True)
        assert sorted(a.tolist()) == [0.0] * (ACT - 1) + [1.0]
    state = agent._act_state["eval"]
    assert bool(state["valid"].all()) and state["slot"] == 11 % 9  # a ring of 9 slots
    agent.act(obs, t0=True, eval_mode=True)
    assert int(agent._act_state["eval"]["valid"].sum()) == 1
    assert np.isfinite(agent.value(obs))


@pytest.mark.parametrize("sam", [None, SAM])
def test_state_dict_round_trip(sam):
    batch = synthetic_batch()
    obs = np.ones(OBS, np.float32)
    a = make_agent(sam=sam)
    for _ in range(2):
        a.update(batch)
    for t in range(3):
        a.act(obs * t, t0=t == 0, eval_mode=False)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_agent(seed=99, sam=sam)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.updates == 2 and same(all_params(a), all_params(b))
    out = []
    for agent in (a, b):
        torch.manual_seed(11)
        out.append((agent.update(batch), agent.act(obs, t0=False, eval_mode=False),
                    all_params(agent)))  # fmt: skip
    assert all(torch.equal(v, out[1][0][k]) for k, v in out[0][0].items())
    assert np.array_equal(out[0][1], out[1][1]) and same(out[0][2], out[1][2])
    ka, kb = a._act_state["train"]["k"], b._act_state["train"]["k"]
    assert torch.equal(ka, kb) and ka.abs().sum() > 0


def test_a_checkpoint_of_the_earlier_tssm_is_refused_with_a_clear_error():
    a = make_agent()
    d = a.state_dict()
    d["world_model"]["seq.tok_bias"] = torch.zeros(W)
    with pytest.raises(ValueError, match="before 2026-12-04.*893fa02"):
        make_agent().load_state_dict(d)


def test_held_out_figures_are_taken_with_dropout_off():
    agent = make_agent(tssm_dropout=0.5)
    batch = synthetic_batch()
    agent.update(batch)
    d = agent.diagnostics(batch)
    wm, data = agent.world_model, agent.prepare(batch)
    assert wm.training  # the diagnostics hand the model back in training mode
    parts = {}
    with torch.no_grad():
        for training in (False, True):
            wm.train(training)
            torch.manual_seed(0)
            parts[training] = wm.loss(data)[1]
    assert d["model_error"] == pytest.approx(float(parts[False]["kl"]), rel=1e-6)
    assert d["wm_loss"] == pytest.approx(float(parts[False]["wm_loss"]), rel=1e-6)
    # dropout on would have given another figure
    assert abs(float(parts[True]["kl"]) - float(parts[False]["kl"])) > 1e-3


# ---- the published TWISTER, item by item (issue 31) ------------------------------------------
def test_attention_sees_the_8_previous_tokens_and_itself_within_its_episode():
    """A one-block TSSM over 64 tokens with an episode start at t = 30: output i depends on
    token j exactly when 0 <= i - j <= 8 and both lie in the same episode (TWISTER's
    att_context_left = 8); stepping the same tokens through the cache gives the same outputs."""
    seq = tiny_tssm(blocks=1, dropout=0.0)
    steps, begin = 64, 30
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(steps, 1, W, generator=g)
    start = torch.zeros(steps, 1, dtype=torch.bool)
    start[begin] = True
    h, _, _ = seq.forward_tokens(tokens, start)
    seen = torch.zeros(steps, steps, dtype=torch.bool)  # seen[i, j]: output i reads token j
    for j in range(steps):
        changed = tokens.clone()
        changed[j] += 1.0
        h2, _, _ = seq.forward_tokens(changed, start)
        seen[:, j] = (h2 - h).abs().amax((1, 2)) > 0
    episode = [int(t >= begin) for t in range(steps)]
    want = torch.tensor([[0 <= i - j <= 8 and episode[i] == episode[j] for j in range(steps)]
                         for i in range(steps)])  # fmt: skip
    assert torch.equal(seen, want)
    assert seen[40].nonzero().flatten().tolist() == list(range(32, 41))  # 9 positions
    assert seen[33].nonzero().flatten().tolist() == list(range(30, 34))  # not before the start
    # The cached path: an episode begins from initial() at t = 0 and at the start.
    with torch.no_grad():
        outs, state = [], seq.initial(1)
        for t in range(steps):
            state = seq.initial(1) if t == begin else state
            out, cache = seq._step(state, tokens[t])
            state = {**state, **cache}
            outs.append(out)
    torch.testing.assert_close(torch.stack(outs), h, rtol=1e-5, atol=1e-5)
    assert seq.initial(1)["k"].shape[-2] == 9  # the ring: 8 previous tokens and the new one


def test_transformer_xl_score_of_one_head_by_hand():
    """score(i, j) = ((q_i + u) . k_j + (q_i + v) . (W_r s(i - j) + b_r)) / sqrt(d) for one head,
    with s the sinusoidal encoding over the model width (sin even, cos odd features)."""
    seq = tiny_tssm()
    blk = seq.blocks[0]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        blk.u.copy_(torch.randn(W, generator=g))
        blk.v.copy_(torch.randn(W, generator=g))
    steps, heads, hd = 12, 2, W // 2
    x = torch.randn(1, steps, W, generator=g)
    q, k, _ = blk.qkv(x).view(1, steps, 3, heads, hd).permute(2, 0, 3, 1, 4)
    pos = torch.arange(steps)
    dist = (pos[:, None] - pos[None]).clamp(0, 8)
    got = blk.scores(q, k, dist)
    for head, i, j in ((0, 5, 5), (1, 5, 0), (1, 11, 3), (0, 9, 2)):
        d = i - j
        enc = torch.tensor([math.sin(d / 10000 ** (2 * (f // 2) / W)) if f % 2 == 0
                            else math.cos(d / 10000 ** (2 * (f // 2) / W)) for f in range(W)])
        r = blk.pos_proj.weight @ enc + blk.pos_proj.bias
        cols = slice(head * hd, (head + 1) * hd)
        qi, kj = q[0, head, i], k[0, head, j]
        want = ((qi + blk.u[cols]) @ kj + (qi + blk.v[cols]) @ r[cols]) / math.sqrt(hd)
        torch.testing.assert_close(got[0, head, i, j], want, rtol=1e-5, atol=1e-5)
    # The learned-bias option keeps its table per block, head and distance 0..8.
    learned = tiny_tssm(positions="learned").blocks[0]
    assert learned.rel_bias.shape == (2, 9) and not hasattr(learned, "pos_proj")


def test_no_dropout_inside_the_feed_forward_layer(monkeypatch):
    """Dropout acts on the attention weights and on the two residual branches only: three
    draws per block, none on the ReLU's output."""
    seq = tiny_tssm(dropout=0.5).train()
    shapes = []
    real = tssm_module._dropout
    monkeypatch.setattr(tssm_module, "_dropout",
                        lambda x, p, active: shapes.append(x.shape) or real(x, p, active))
    seq.forward_tokens(torch.randn(6, 2, W), torch.zeros(6, 2, dtype=torch.bool), dropout=True)
    assert shapes == [(2, 2, 6, 6), (2, 6, W), (2, 6, W)] * 2  # ff's hidden would be 2W wide


def test_the_s_world_model_has_twisters_parameter_count():
    """TWISTER's S world model on Atari (64x64 RGB, 6 actions) with AC-CPC: 41.30M parameters,
    18.51M of them AC-CPC's heads."""
    cfg = DreamerConfig(sequence_model="transformer")
    model = wm_module.WorldModel(cfg, (3, 64, 64), 6)
    total = sum(p.numel() for p in model.parameters())
    cpc = sum(p.numel() for p in model.cpc.parameters())
    assert round(total / 1e6, 2) == 41.30 and round(cpc / 1e6, 2) == 18.51


def test_twister_defaults_evaluate_by_mode_and_learn_the_actor_by_reinforce():
    from flatworld.agents.dreamer import TwisterConfig

    cfg = TwisterConfig()
    assert (cfg.eval_policy, cfg.actor_grad, cfg.tssm_positions) == ("mode", "reinforce", "xl")
    assert (DreamerConfig().eval_policy, DreamerConfig().actor_grad) == ("sample", "auto")
    # With continuous actions too: the rollout carries no gradient and the actor's loss is
    # REINFORCE's, the Normal's log-density of the action taken times the advantage.
    agent = make_agent(discrete=False, actor_grad="reinforce")
    assert agent.ac.reinforce
    backprop = make_agent(discrete=False)
    assert not backprop.ac.reinforce  # DreamerV3's rule for continuous actions
    mean, std = torch.tensor([[0.2, -0.5]]), torch.tensor([[0.3, 0.8]])
    a = torch.tensor([[0.1, 0.4]])
    want = torch.distributions.Normal(mean, std).log_prob(a).sum(-1, keepdim=True)
    torch.testing.assert_close(agent.ac.actor.log_prob((mean, std), a), want)
    start = agent.world_model.seq.initial(4)
    seen = []
    real = agent.ac.actor.log_prob
    agent.ac.actor.log_prob = lambda p, act: seen.append(act.requires_grad) or real(p, act)
    agent.ac.losses(agent.world_model, start, torch.ones(4, 1))
    assert seen == [False]
    with pytest.raises(ValueError, match="actor_grad='dynamics' with discrete"):
        make_agent(discrete=True, actor_grad="dynamics")


def test_a_checkpoint_of_the_tssm_before_the_xl_positions_is_refused():
    a = make_agent()
    d = a.state_dict()
    d["world_model"]["seq.rel_bias"] = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="before 2026-12-07.*861c492"):
        make_agent().load_state_dict(d)
