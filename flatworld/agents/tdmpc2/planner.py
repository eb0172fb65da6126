"""MPPI planning in the latent space of a TD-MPC2 world model.

The planner reads the world model only (encode, next, reward, termination, pi, Q); it cannot
tell which optimizer trained it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatworld.agents.tdmpc2.config import TDMPC2Config
from flatworld.agents.tdmpc2.world_model import WorldModel


class MPPIPlanner:
    def __init__(self, cfg: TDMPC2Config, model: WorldModel, action_dim: int, discount: float,
                 device: torch.device) -> None:  # fmt: skip
        self.cfg, self.model, self.action_dim, self.discount = cfg, model, action_dim, discount
        self.iterations = cfg.iterations + 2 * int(action_dim >= 20)  # large action spaces
        # The previous plan's mean: shifted by one step, it warm-starts the next plan.
        self.prev_mean = torch.zeros(cfg.horizon, action_dim, device=device)

    @torch.no_grad()
    def estimate_value(self, z: Tensor, actions: Tensor) -> Tensor:
        """Discounted H-step model return plus a bootstrapped Q; z (N, L), actions (H, N, A)."""
        g, disc = torch.zeros(z.shape[0], 1, device=z.device), 1.0
        alive = torch.ones_like(g)
        for t in range(self.cfg.horizon):
            r = self.model.two_hot.decode(self.model.reward(z, actions[t]))
            z = self.model.next(z, actions[t])
            g = g + disc * alive * r
            if self.cfg.episodic:
                alive = alive * (self.model.termination(z) <= 0).float()  # sigmoid <= 0.5
            disc *= self.discount
        a, _, _ = self.model.pi(z)
        return g + disc * alive * self.model.q(z, a, "avg")

    @torch.no_grad()
    def plan(self, obs: Tensor, t0: bool, eval_mode: bool) -> Tensor:
        """One action (A,) in [-1, 1] for a single observation (1, *obs_shape)."""
        mean, std, elites, score = self.search(obs, t0)
        return select_action(self.cfg.plan_action, mean, std, elites, score, eval_mode)

    @torch.no_grad()
    def search(self, obs: Tensor, t0: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """MPPI: (mean (H, A), std (H, A), elites (H, E, A), score (E,)) of the last iteration."""
        mean = torch.zeros(self.cfg.horizon, self.action_dim, device=obs.device)
        if not t0:
            mean[:-1] = self.prev_mean[1:]
        mean, std, elites, score = self.mppi(obs, mean)
        self.prev_mean.copy_(mean)
        return mean, std, elites, score

    @torch.no_grad()
    def mppi(self, obs: Tensor, mean: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The search from a starting mean (H, A): a pure function of its inputs and the RNG
        (the one graph that ``TDMPC2Config.compile`` compiles for acting)."""
        cfg, h, a_dim = self.cfg, self.cfg.horizon, self.action_dim
        z = self.model.encode(obs)
        n_pi, n = cfg.num_pi_trajs, cfg.num_samples
        actions = torch.empty(h, n, a_dim, device=z.device)
        if n_pi > 0:  # policy-prior trajectories, rolled out once and kept in every iteration
            zp = z.expand(n_pi, -1)
            for t in range(h):
                actions[t, :n_pi] = self.model.pi(zp)[0]
                if t < h - 1:
                    zp = self.model.next(zp, actions[t, :n_pi])
        std = torch.full((h, a_dim), cfg.max_std, device=z.device)
        z = z.expand(n, -1)
        for _ in range(self.iterations):
            noise = torch.randn(h, n - n_pi, a_dim, device=z.device)
            actions[:, n_pi:] = (mean.unsqueeze(1) + std.unsqueeze(1) * noise).clamp(-1, 1)
            value = self.estimate_value(z, actions).nan_to_num(0.0).squeeze(1)
            elite_value, elite_idx = torch.topk(value, cfg.num_elites)
            elites = actions[:, elite_idx]  # (H, E, A)
            score = torch.softmax(cfg.temperature * elite_value, dim=0)  # exp(T(v - max)) / sum
            mean = torch.einsum("e,hea->ha", score, elites)
            std = torch.einsum("e,hea->ha", score, (elites - mean.unsqueeze(1)).pow(2)).sqrt()
            std = std.clamp(cfg.min_std, cfg.max_std)
        return mean, std, elites, score

    def state_dict(self) -> dict[str, Tensor]:
        return {"prev_mean": self.prev_mean.clone()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.prev_mean.copy_(d["prev_mean"])


def select_action(rule: str, mean: Tensor, std: Tensor, elites: Tensor, score: Tensor,
                  eval_mode: bool) -> Tensor:  # fmt: skip
    """The action taken from a finished MPPI search.

    "elite" (published TD-MPC2): the first action of one elite trajectory, drawn with
    probability `score`, in training and in evaluation alike. "mean": the first action of the
    MPPI mean. Training adds Gaussian noise of the final std to either. The draw is a Gumbel
    argmax, argmax(log score + G) with G = -log(Exp(1)), so it never reads a value back to the
    host (torch.multinomial would).
    """
    if rule == "elite":
        gumbel = -torch.empty_like(score).exponential_().log()
        a = elites[0, torch.argmax(score.log() + gumbel)]
    else:
        a = mean[0]
    if not eval_mode:
        a = a + std[0] * torch.randn(a.shape[0], device=a.device)
    return a.clamp(-1, 1)
