"""TD-MPC2's implicit world model: encoder, latent dynamics, reward, Q-ensemble, policy prior."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flatworld.agents.tdmpc2.config import TDMPC2Config
from flatworld.nn import Ensemble, SimNorm, TwoHot, conv_encoder, mlp
from flatworld.nn import math as fmath


class WorldModel(nn.Module):
    def __init__(self, cfg: TDMPC2Config, obs_shape: Sequence[int], action_dim: int) -> None:
        super().__init__()
        d = cfg.dims()
        self.cfg, self.num_q, self.latent_dim = cfg, d["num_q"], d["latent_dim"]
        latent, hid, act_dim = d["latent_dim"], 2 * [d["mlp_dim"]], action_dim
        if cfg.obs == "rgb":
            simnorm = SimNorm(cfg.simnorm_dim)
            self.encoder = conv_encoder(obs_shape, cfg.num_channels, latent, simnorm)
        else:
            enc_hidden = max(d["num_enc_layers"] - 1, 1) * [d["enc_dim"]]
            self.encoder = mlp(obs_shape[0], enc_hidden, latent, act=SimNorm(cfg.simnorm_dim))
        self.dynamics = mlp(latent + act_dim, hid, latent, act=SimNorm(cfg.simnorm_dim))
        self.reward_head = mlp(latent + act_dim, hid, cfg.num_bins)
        self.qs = Ensemble(self.num_q, latent + act_dim, hid, cfg.num_bins, dropout=cfg.dropout)
        self.termination_head = mlp(latent, hid, 1) if cfg.episodic else None
        self.pi_net = mlp(latent, hid, 2 * act_dim)
        # Zero output layers: predicted reward and value start at exactly 0 (two-hot centre).
        nn.init.zeros_(self.reward_head[-1].weight)
        nn.init.zeros_(self.qs.weights[-1])
        self.target_qs = copy.deepcopy(self.qs).requires_grad_(False)
        self.two_hot = TwoHot(cfg.num_bins, cfg.vmin, cfg.vmax)

    # Parameter sets. The target Q and the policy are not world-model parameters.
    def head_modules(self) -> list[nn.Module]:
        return [m for m in (self.reward_head, self.qs, self.termination_head) if m is not None]

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"params": list(self.encoder.parameters()), "lr": lr * self.cfg.enc_lr_scale},
                  {"params": list(self.dynamics.parameters()), "lr": lr}]  # fmt: skip
        groups += [{"params": list(m.parameters()), "lr": lr} for m in self.head_modules()]
        return groups

    def wm_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups(1.0) for p in g["params"]]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.head_modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> WorldModel:
        super().train(mode)
        self.target_qs.train(False)  # targets never see dropout
        return self

    # Components.
    def encode(self, obs: Tensor) -> Tensor:
        return self.encoder(obs)

    def next(self, z: Tensor, a: Tensor) -> Tensor:
        return self.dynamics(torch.cat([z, a], dim=-1))

    def reward(self, z: Tensor, a: Tensor) -> Tensor:
        """Reward logits over the two-hot bins."""
        return self.reward_head(torch.cat([z, a], dim=-1))

    def termination(self, z: Tensor) -> Tensor:
        """Termination logits (..., 1)."""
        assert self.termination_head is not None
        return self.termination_head(z)

    def pi(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Sample from the tanh-squashed Gaussian policy prior: (action, mean action, info)."""
        mean, log_std = self.pi_net(z).chunk(2, dim=-1)
        log_std = fmath.log_std(log_std, self.cfg.log_std_min, self.cfg.log_std_max)
        eps = torch.randn_like(mean)
        log_prob = fmath.gaussian_logprob(eps, log_std)
        mean, action, squashed_log_prob = fmath.squash(mean, mean + eps * log_std.exp(), log_prob)
        # TD-MPC2's entropy is scaled by the action dimension (the Gaussian part's log-prob
        # times A over the squashed log-prob), so one entropy_coef fits all action sizes.
        scale = log_prob * mean.shape[-1] / (squashed_log_prob + 1e-8)
        info = {"entropy": -squashed_log_prob, "scaled_entropy": -squashed_log_prob * scale,
                "log_std": log_std}  # fmt: skip
        return action, mean, info

    def q_logits(self, z: Tensor, a: Tensor, target: bool = False, detach: bool = False,
                 idx: Tensor | None = None) -> Tensor:  # fmt: skip
        """(num_q or len(idx), ..., num_bins) logits of the online (or target) Q-ensemble."""
        return (self.target_qs if target else self.qs)(torch.cat([z, a], -1), idx, detach)

    def q(self, z: Tensor, a: Tensor, reduce: str = "min", target: bool = False,
          detach: bool = False) -> Tensor:  # fmt: skip
        """Q-value (..., 1): the min or mean of two randomly chosen heads, or the mean of all.

        ``detach`` reads the live weights without letting gradients reach them: the policy's
        view of the Q-function.
        """
        if reduce == "all_mean":
            return self.two_hot.decode(self.q_logits(z, a, target, detach)).mean(0)
        idx = torch.randperm(self.num_q, device=z.device)[:2]
        if self.num_q == 2:
            # The same values. Under torch.compile the slice is a no-op and drops out, and
            # inductor's randperm-index pattern fails on randperm indexing directly (torch 2.13).
            idx = idx + 0
        q1, q2 = self.two_hot.decode(self.q_logits(z, a, target, detach, idx)).unbind(0)
        if reduce == "min":
            return torch.minimum(q1, q2)
        if reduce == "avg":
            return (q1 + q2) / 2
        raise ValueError(f"reduce={reduce!r}; accepted: 'min', 'avg', 'all_mean'")

    @torch.no_grad()
    def soft_update_target(self, tau: float) -> None:
        torch._foreach_lerp_(list(self.target_qs.parameters()),
                             [p.detach() for p in self.qs.parameters()], tau)  # fmt: skip
