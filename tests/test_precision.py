"""Dreamer's ``precision="bf16"``: matmuls and convs in bfloat16 under autocast, with weights,
optimizer state, latent distributions and losses in fp32, for both sequence models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatworld import optim
from flatworld.agents.dreamer import DreamerConfig, make
from flatworld.agents.dreamer.networks import compute_precision
from tests.test_dreamer import ACT, OBS, all_params, same, synthetic_batch, tiny
from tests.test_twister import twister_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = {"rssm": tiny, "transformer": twister_cfg}


def agent_for(seq_model: str, precision: str, seed: int = 0, discrete: bool = True,
              obs_shape=(OBS,), sam=None):  # fmt: skip
    torch.manual_seed(seed)
    cfg = MODELS[seq_model](precision=precision, wm_optim=optim.OptimSpec(lr=1e-3, eps=1e-8,
                                                                          sam=sam))
    return make(cfg, obs_shape=obs_shape, action_dim=ACT, episode_length=100, discrete=discrete)


def output_dtypes(agent, run) -> set[torch.dtype]:
    """The dtypes of every Linear and conv output while ``run()`` runs."""
    seen: set[torch.dtype] = set()
    mods = [m for net in (agent.world_model, agent.ac) for m in net.modules()
            if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]  # fmt: skip
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for m in mods]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision='fp16'; accepted: one of"):
        DreamerConfig(precision="fp16").validate()
    assert DreamerConfig().precision == "fp32"


@pytest.mark.parametrize("seq_model", sorted(MODELS))
def test_bf16_runs_layers_in_bf16_and_keeps_weights_and_losses_fp32(seq_model):
    shape = (3, 64, 64)
    batch = {k: v[:4, :2] for k, v in synthetic_batch(obs_shape=shape).items()}
    for precision, expected in (("fp32", {torch.float32}), ("bf16", {torch.bfloat16})):
        agent = agent_for(seq_model, precision, obs_shape=shape)
        metrics: dict = {}
        seen = output_dtypes(agent, lambda a=agent, m=metrics: m.update(a.update(batch)))
        assert expected <= seen
        assert precision == "bf16" or seen == {torch.float32}
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in metrics.values())
        state = agent.wm_optim.state_dict()["state"]
        assert all(p.dtype == torch.float32 for p in agent.world_model.parameters())
        assert all(t.dtype == torch.float32 for s in state.values() for t in s.values()
                   if torch.is_tensor(t) and t.is_floating_point())  # fmt: skip
        a = agent.act(batch["obs"][0, 0].numpy(), t0=True, eval_mode=False)
        assert a.dtype == np.float32 and sorted(a.tolist()) == [0.0] * (ACT - 1) + [1.0]


@pytest.mark.parametrize("seq_model", sorted(MODELS))
def test_bf16_losses_states_and_distributions_are_computed_in_fp32(seq_model, monkeypatch):
    reduced: list[torch.dtype] = []  # the inputs of every softmax-like reduction
    for mod, name in ((torch, "logsumexp"), (torch, "softmax"), (F, "softmax"),
                      (F, "log_softmax")):  # fmt: skip
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda x, *a, _f=orig, **k: (
            reduced.append(x.dtype), _f(x, *a, **k))[1])  # fmt: skip
    shape = (3, 64, 64)
    batch = {k: v[:4, :2] for k, v in synthetic_batch(obs_shape=shape).items()}
    agent = agent_for(seq_model, "bf16", obs_shape=shape)
    data = agent.prepare(batch)
    with compute_precision(agent.device, "bf16"):
        loss, parts, post = agent.world_model.loss(data)
        start = agent.world_model.seq.imagine_start(post)
        actor_loss, critic_loss, ac = agent.ac.losses(agent.world_model, start,
                                                      data["cont"].flatten(0, 1))  # fmt: skip
    assert seq_model != "transformer" or "cpc_loss" in parts
    assert reduced and set(reduced) == {torch.float32}
    for t in (loss, actor_loss, critic_loss, *parts.values(), *ac.values(), post["deter"],
              post["logits"]):  # fmt: skip
        assert t.dtype == torch.float32


@pytest.mark.parametrize("seq_model", sorted(MODELS))
@pytest.mark.parametrize("discrete", [True, False])
def test_bf16_update_is_close_to_fp32_at_the_same_weights(seq_model, discrete):
    batch = synthetic_batch(discrete=discrete)
    out = {}
    for precision in ("fp32", "bf16"):
        agent = agent_for(seq_model, precision, discrete=discrete)
        torch.manual_seed(5)
        out[precision] = {k: float(v) for k, v in agent.update(batch).items()}
    # The world-model terms; the actor-critic's imagined samples may flip where a class's
    # probability moves by a rounding, so its losses are not compared here.
    for key in ("wm_loss", "recon_loss", "reward_loss", "kl"):
        f, h = out["fp32"][key], out["bf16"][key]
        assert abs(f - h) <= 0.03 * abs(f) + 1e-3, (key, f, h)
    assert out["fp32"] != out["bf16"]  # bf16 products round differently: it did run in bf16


@pytest.mark.parametrize("seq_model", sorted(MODELS))
def test_bf16_is_deterministic_and_sam_at_zero_radius_is_adam_bit_for_bit(seq_model):
    batch = synthetic_batch()
    runs = []
    for sam in (None, None, optim.SamSpec(rho=0.0)):
        agent = agent_for(seq_model, "bf16", sam=sam)
        torch.manual_seed(5)
        metrics = [agent.update(batch) for _ in range(2)]
        runs.append(([{k: v for k, v in m.items() if k != "sam_passes"} for m in metrics],
                     all_params(agent)))  # fmt: skip
    for metrics, params in runs[1:]:
        assert all(torch.equal(a[k], b[k]) for a, b in zip(runs[0][0], metrics, strict=True)
                   for k in a)  # fmt: skip
        assert same(runs[0][1], params)


@pytest.mark.parametrize("seq_model", sorted(MODELS))
def test_bf16_updates_lower_world_model_loss(seq_model):
    batch = synthetic_batch()
    agent = agent_for(seq_model, "bf16")
    before = agent.diagnostics(batch)["wm_loss"]
    for _ in range(40):
        agent.update(batch)
    assert agent.diagnostics(batch)["wm_loss"] < 0.8 * before
