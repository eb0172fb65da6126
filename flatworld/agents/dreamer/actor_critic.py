"""Dreamer's actor-critic, trained in imagination.

From every posterior state of the replayed batch, the actor imagines ``imag_horizon`` steps with
the sequence model's prior. Rewards and continue flags come from the world model's heads;
lambda-returns bootstrap from the critic; returns are scaled by a running 5-95 percentile range.

- Discrete actions: REINFORCE. The rollout needs no gradient at all, so it runs under
  ``no_grad``; only the actor's log-probabilities of the imagined actions are differentiated.
- Continuous actions: the return is backpropagated through the dynamics and the heads into
  the actor (the world model's weights get no gradient: backward is restricted to the actor).
- Critic: two-hot cross-entropy to the lambda-returns plus a regulariser towards a slow
  (EMA) copy of itself.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grad_norm_

from flatworld.agents.dreamer.config import DreamerConfig
from flatworld.agents.dreamer.networks import OneHotFeat, compute_precision, feed, mlp
from flatworld.agents.dreamer.sequence import (
    SequenceModel,
    State,
    onehot_mode,
    onehot_sample,
    unimix_logits,
)
from flatworld.nn import TwoHot, soft_cross_entropy
from flatworld.optim import nonfinite, step_if_finite

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def lambda_returns(reward: Tensor, value: Tensor, disc: Tensor, lam: float) -> Tensor:
    """TD(lambda) returns. reward, disc (H, ...): the reward and the discount (gamma * continue)
    on arriving at step t + 1; value (H + 1, ...). Returns (H, ...):
    R_t = r_{t+1} + d_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1}), with R_H = v_H."""
    interm = reward + disc * value[1:] * (1.0 - lam)
    out = [value[-1]]
    for t in reversed(range(reward.shape[0])):
        out.append(interm[t] + disc[t] * lam * out[-1])
    return torch.stack(out[:0:-1])


class ReturnNorm(nn.Module):
    """Running 5-95 percentile range of the returns (an EMA of each percentile, from zero, as
    in DreamerV3); returns are divided by max(1 / max_inv, high - low)."""

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95,
                 max_inv: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.decay, self.min_scale = decay, 1.0 / max_inv
        self.register_buffer("q", torch.tensor([low, high]), persistent=False)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """One EMA step toward the batch's percentiles; none where they are not finite (a NaN
        in the returns would otherwise stay in the scale for good)."""
        lo, hi = torch.quantile(x.detach().flatten().float(), self.q.to(x.device))
        keep = nonfinite(lo, hi)
        self.low.copy_(torch.where(keep, self.low, self.low.lerp(lo, 1.0 - self.decay)))
        self.high.copy_(torch.where(keep, self.high, self.high.lerp(hi, 1.0 - self.decay)))

    def scale(self) -> Tensor:
        return (self.high - self.low).clamp_min(self.min_scale)


class Actor(nn.Module):
    """A one-hot categorical with a uniform mixture (discrete), or a Normal with mean tanh(mu)
    and std in [min_std, max_std] whose samples are clipped to [-1, 1] (continuous)."""

    def __init__(self, feat_dim: int, action_dim: int, units: int, layers: int, discrete: bool,
                 unimix: float = 0.01, min_std: float = 0.1,
                 max_std: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.discrete, self.unimix, self.action_dim = discrete, unimix, action_dim
        self.min_std, self.max_std = min_std, max_std
        self.net = mlp(feat_dim, units, layers, action_dim if discrete else 2 * action_dim)

    def forward(self, feat: Tensor | OneHotFeat) -> tuple[Tensor, Tensor]:
        """Distribution parameters: (log-probs, log-probs) or (mean, std)."""
        out = feed(self.net, feat)
        if self.discrete:
            logp = unimix_logits(out, self.unimix)
            return logp, logp
        mean, std = out.chunk(2, -1)
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        return torch.tanh(mean), std

    def sample(self, params: tuple[Tensor, Tensor]) -> Tensor:
        """A differentiable sample for continuous actions (reparameterised, clipped with a
        straight-through gradient); a one-hot sample (no gradient needed) for discrete ones."""
        a, b = params
        if self.discrete:
            return onehot_sample(a, torch.rand(*a.shape[:-1], 1, device=a.device, dtype=a.dtype))
        x = a + b * torch.randn_like(a)
        return x + (x.clamp(-1.0, 1.0) - x).detach()

    def mode(self, params: tuple[Tensor, Tensor]) -> Tensor:
        return onehot_mode(params[0]) if self.discrete else params[0]

    def log_prob(self, params: tuple[Tensor, Tensor], action: Tensor) -> Tensor:
        """log pi(action), (..., 1), for REINFORCE: of the one-hot action (discrete), or the
        Normal's density at the action taken (continuous; clipped to [-1, 1] as it was taken)."""
        if self.discrete:
            return (params[0] * action).sum(-1, keepdim=True)
        mean, std = params
        z = (action - mean) / std
        return (-0.5 * z.square() - std.log() - _HALF_LOG_2PI).sum(-1, keepdim=True)

    def entropy(self, params: tuple[Tensor, Tensor]) -> Tensor:
        a, b = params
        if self.discrete:
            return -(a.exp() * a).sum(-1, keepdim=True)
        return (b.log() + _HALF_LOG_2PI_E).sum(-1, keepdim=True)


class ActorCritic(nn.Module):
    def __init__(self, cfg: DreamerConfig, feat_dim: int, action_dim: int, discrete: bool,
                 two_hot: TwoHot, episodic: bool) -> None:  # fmt: skip
        super().__init__()
        d = cfg.dims()
        self.cfg, self.discrete, self.episodic, self.two_hot = cfg, discrete, episodic, two_hot
        # REINFORCE, or backpropagation of the returns through the dynamics (continuous only).
        self.reinforce = cfg.actor_grad == "reinforce" or (cfg.actor_grad == "auto" and discrete)
        if cfg.actor_grad == "dynamics" and discrete:
            raise ValueError("actor_grad='dynamics' with discrete actions: a one-hot sample has "
                             "no gradient; accepted: 'auto' or 'reinforce'")  # fmt: skip
        self.actor = Actor(feat_dim, action_dim, d["units"], d["layers"], discrete, cfg.unimix,
                           cfg.actor_min_std, cfg.actor_max_std)  # fmt: skip
        self.critic = mlp(feat_dim, d["units"], d["layers"], cfg.num_bins, out_scale=0.0)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = ReturnNorm(cfg.retnorm_decay, cfg.retnorm_low, cfg.retnorm_high,
                                  cfg.retnorm_max)  # fmt: skip

    def value(self, feat: Tensor | OneHotFeat) -> Tensor:
        return self.two_hot.decode(feed(self.critic, feat))

    def imagine(self, seq: SequenceModel, start: State, horizon: int
                ) -> tuple[OneHotFeat, Tensor, tuple[Tensor, Tensor]]:  # fmt: skip
        """feats (H+1, N, F) of the imagined states (a OneHotFeat: every head's first layer
        reads the one-hot latent by summing weight rows), actions (H, N, A) taken in the first
        H, and the policy's distribution parameters there (H, N, ...), which keep their gradient
        even when the rollout runs under no_grad. The actor sees detached states."""
        state, feats, actions, params = start, [seq.onehot_feat(start)], [], []
        for _ in range(horizon):
            with torch.enable_grad():
                p = self.actor(feats[-1].detach())
            # REINFORCE needs no gradient through the sample; backprop does (reparameterised).
            action = self.actor.sample((p[0].detach(), p[1].detach()) if self.reinforce else p)
            state = seq.imagine_step(state, action)
            feats.append(seq.onehot_feat(state))
            actions.append(action)
            params.append(p)
        a, b = zip(*params, strict=True)
        with torch.enable_grad():
            params_t = (torch.stack(a), torch.stack(b))
        feat = OneHotFeat(*(torch.stack(x) for x in zip(*(
            (f.dense, f.onehot, f.index) for f in feats), strict=True)))  # fmt: skip
        return feat, torch.stack(actions), params_t

    def losses(self, wm: nn.Module, start: State, cont0: Tensor
               ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
        """(actor loss, critic loss, metrics) from an imagined rollout out of ``start`` (N
        states; ``cont0`` (N, 1) is 1 - terminated there)."""
        cfg = self.cfg
        with torch.set_grad_enabled(not self.reinforce):
            feats, actions, params = self.imagine(wm.seq, start, cfg.imag_horizon)
            reward = wm.reward_mean(feats[1:])
            if self.episodic:
                cont = (feed(wm.cont, feats[1:]) > 0).to(reward.dtype)
            else:
                cont = torch.ones_like(reward)
            live_value = None if self.reinforce else self.value(feats)
        with torch.no_grad():
            cont = torch.cat([cont0[None], cont.detach()])  # (H+1, N, 1)
            weight = torch.cumprod(cfg.discount * cont, 0) / cfg.discount
            weight = weight[:-1]
        # One critic pass on the detached states serves the critic loss and, for REINFORCE,
        # the returns as well.
        v_logits = feed(self.critic, feats.detach())
        value = self.two_hot.decode(v_logits) if live_value is None else live_value
        if self.reinforce:
            value = value.detach()
        ret = lambda_returns(reward, value, cfg.discount * cont[1:], cfg.lam)  # (H, N, 1)
        self.retnorm.update(ret)
        adv = (ret - value[:-1]) / self.retnorm.scale()
        if self.reinforce:
            objective = self.actor.log_prob(params, actions) * adv.detach()
        else:
            objective = adv
        entropy = self.actor.entropy(params)
        actor_loss = -((objective + cfg.entropy * entropy) * weight).mean()
        with torch.no_grad():
            slow = self.two_hot.decode(feed(self.slow_critic, feats[:-1].detach()))
        ce = soft_cross_entropy(v_logits[:-1], self.two_hot.encode(ret.detach()))
        reg = soft_cross_entropy(v_logits[:-1], self.two_hot.encode(slow))
        critic_loss = ((ce + cfg.slow_reg * reg) * weight).mean()
        metrics = {"actor_loss": actor_loss.detach(), "critic_loss": critic_loss.detach(),
                   "actor_entropy": entropy.detach().mean(), "imag_return": ret.detach().mean(),
                   "imag_reward": reward.detach().mean(), "value": value.detach().mean(),
                   "return_scale": self.retnorm.scale().detach()}  # fmt: skip
        return actor_loss, critic_loss, metrics

    def update(self, wm: nn.Module, start: State, cont0: Tensor,
               actor_optim: torch.optim.Optimizer, critic_optim: torch.optim.Optimizer
               ) -> dict[str, Tensor]:  # fmt: skip
        metrics = self.backward(wm, start, cont0)
        self.step(actor_optim, critic_optim, metrics)
        return metrics

    def backward(self, wm: nn.Module, start: State, cont0: Tensor) -> dict[str, Tensor]:
        """The losses, their gradients (clipped) in the actor's and the critic's ``.grad``, and
        the metrics: the part of :meth:`update` that a CUDA graph captures."""
        cfg = self.cfg
        with compute_precision(cont0.device, cfg.precision):
            actor_loss, critic_loss, metrics = self.losses(wm, start, cont0)
        actor_params = list(self.actor.parameters())
        critic_params = list(self.critic.parameters())
        # Restricted backwards: the actor's loss reaches the critic and (continuous) the world
        # model, but only the actor's gradient is computed.
        actor_loss.backward(inputs=actor_params)
        critic_loss.backward(inputs=critic_params)
        metrics["actor_grad_norm"] = clip_grad_norm_(actor_params, cfg.actor_grad_clip,
                                                     foreach=True)  # fmt: skip
        metrics["critic_grad_norm"] = clip_grad_norm_(critic_params, cfg.critic_grad_clip,
                                                      foreach=True)  # fmt: skip
        return metrics

    def step(self, actor_optim: torch.optim.Optimizer, critic_optim: torch.optim.Optimizer,
             metrics: dict[str, Tensor]) -> None:  # fmt: skip
        """The optimizer steps on the gradients :meth:`backward` left (each skipped if its loss
        or gradient, in ``metrics``, is not finite), and the slow critic."""
        step_if_finite(actor_optim, metrics["actor_loss"], metrics["actor_grad_norm"])
        step_if_finite(critic_optim, metrics["critic_loss"], metrics["critic_grad_norm"])
        actor_optim.zero_grad(set_to_none=True)
        critic_optim.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.slow_critic.parameters()),
                                 list(self.critic.parameters()),
                                 self.cfg.slow_critic_fraction)  # fmt: skip
