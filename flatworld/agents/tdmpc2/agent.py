"""TD-MPC2 (Hansen et al., 2024) with a drop-in world-model optimizer.

One update, top to bottom:
  1. targets, once, under no_grad: encoded next states and TD targets from the target Q;
  2. the world-model step: ``optim.closure_step(wm_optim, closure)``; the closure computes
     predictions and the loss only, so a SAM optimizer's two passes measure against the same
     targets. A step whose loss or gradient is not finite is skipped (the policy's too);
  3. the policy step on the latent rollout of the first pass (the model at the weights the
     update started from), through a detached but live view of the Q-ensemble;
  4. Polyak update of the target Q from the live weights.
The policy, planner and targets cannot tell which optimizer trained the world model.
With ``cfg.compile`` the world-model loss (both SAM passes), the policy loss and the MPPI search
run under torch.compile; everything else is the same code.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flatworld import optim, sharpness
from flatworld.agents.tdmpc2.config import TDMPC2Config
from flatworld.agents.tdmpc2.planner import MPPIPlanner
from flatworld.agents.tdmpc2.world_model import WorldModel
from flatworld.nn import RunningScale, ShiftAug, rng_state, set_rng_state, soft_cross_entropy


def compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile (inductor), shapes fixed (a run's shapes never change).

    ``fallback_random``: random ops (Q-head dropout, policy noise, MPPI samples) run as the
    eager kernels on the global generator, so the compiled function draws exactly the eager
    randomness: SAM's passes replay it with set_rng_state as in eager, and compiled and eager
    agree to float rounding. (Inductor's own generator is seeded from the global one, so it
    would replay too, but it draws different numbers than eager and measured slower here.)
    """
    return torch.compile(fn, dynamic=False, options={"fallback_random": True})


def _cpp_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def discount_for(cfg: TDMPC2Config, episode_length: int) -> float:
    """TD-MPC2's heuristic: longer episodes, longer horizons, clipped to [min, max]."""
    frac = episode_length / cfg.discount_denom
    return float(min(max((frac - 1) / frac, cfg.discount_min), cfg.discount_max))


class TDMPC2Agent:
    def __init__(self, cfg: TDMPC2Config, obs_shape: Sequence[int], action_dim: int,
                 episode_length: int, device: str | torch.device = "cpu",
                 total_steps: int | None = None) -> None:  # fmt: skip
        self.cfg = cfg.validate()
        self.device = torch.device(device)
        self.horizon, self.batch_size = cfg.horizon, cfg.batch_size
        self.discount = discount_for(cfg, episode_length)
        self.action_dim = action_dim
        self.model = WorldModel(cfg, obs_shape, action_dim).to(self.device).eval()
        # The one place the world-model optimizer is built; SAM or not is cfg.wm_optim's choice.
        groups = self.model.param_groups(cfg.wm_optim.lr)
        self.wm_optim = optim.build(cfg.wm_optim, groups, total_steps=total_steps)
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {"foreach": True}
        self.pi_optim = torch.optim.Adam(self.model.pi_net.parameters(), lr=cfg.pi_lr,
                                         eps=cfg.pi_eps, **fused)  # fmt: skip
        self.planner = MPPIPlanner(cfg, self.model, action_dim, self.discount, self.device)
        self.scale = RunningScale(cfg.tau, self.device)
        self.aug = ShiftAug(pad=3) if cfg.obs == "rgb" else None
        self._wm_params = self.model.wm_parameters()
        self._head_params = self.model.head_parameters()
        self._rho = cfg.rho ** torch.arange(cfg.horizon + 1, dtype=torch.float32,
                                             device=self.device)  # fmt: skip
        self.updates = 0
        # The pieces the update and the planner call; compiled ones with cfg.compile.
        self._wm_loss, self._pi_loss = self.world_model_loss, self.pi_loss
        if cfg.compile:
            if self.device.type == "cpu" and not _cpp_compiler():
                raise ValueError("compile=True on CPU needs a C++ compiler (inductor builds its "
                                 "kernels with one): install g++ or set CXX; accepted "
                                 "otherwise: compile=False")  # fmt: skip
            self._wm_loss, self._pi_loss = compiled(self._wm_loss), compiled(self._pi_loss)
            self.planner.mppi = compiled(self.planner.mppi)  # type: ignore[method-assign]

    # Acting.
    @torch.no_grad()
    def act(self, obs: np.ndarray, t0: bool = False, eval_mode: bool = False) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)[None]
        if self.cfg.mpc:
            a = self.planner.plan(x, t0=t0, eval_mode=eval_mode)
        else:
            sample, mean, _ = self.model.pi(self.model.encode(x))
            a = (mean if eval_mode else sample)[0]
        return a.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> float:
        """Q(s0, a ~ pi(s0)): the mean over all Q heads (lower variance than two subsampled)."""
        z = self.model.encode(torch.as_tensor(np.asarray(obs), dtype=torch.float32,
                                              device=self.device)[None])  # fmt: skip
        a, _, _ = self.model.pi(z)
        return float(self.model.q(z, a, "all_mean").item())

    # Targets and the world-model loss (shared by training and diagnostics).
    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        obs, reward = batch["obs"], batch["reward"]
        if self.aug is not None and self.model.training:
            # Augment once per update: both SAM passes and the targets see the same pixels.
            obs = self.aug(obs.flatten(0, 1)).unflatten(0, obs.shape[:2])
        next_z = self.model.encode(obs[1:])
        a, _, _ = self.model.pi(next_z)
        not_done = 1.0 - batch["terminated"] if self.cfg.episodic else 1.0
        td = reward + self.discount * not_done * self.model.q(next_z, a, "min", target=True)
        two_hot = self.model.two_hot
        return {"obs0": obs[0], "next_z": next_z, "reward_probs": two_hot.encode(reward),
                "td": td, "td_probs": two_hot.encode(td)}  # fmt: skip

    def world_model_loss(self, batch: dict[str, Tensor], tg: dict[str, Tensor]
                         ) -> tuple[Tensor, dict[str, Tensor], Tensor]:  # fmt: skip
        """(total loss, its parts, latent rollout zs (H+1, B, L)); predictions only."""
        cfg, h, m = self.cfg, self.cfg.horizon, self.model
        action, rho = batch["action"], self._rho[:h]
        z = m.encode(tg["obs0"])
        zs = [z]
        for t in range(h):
            z = m.next(z, action[t])
            zs.append(z)
        zs_t = torch.stack(zs)
        err = (zs_t[1:] - tg["next_z"]).pow(2).mean(dim=(1, 2))  # (H,)
        consistency = (err * rho).sum() / h
        z_in = zs_t[:-1]
        r_ce = soft_cross_entropy(m.reward(z_in, action), tg["reward_probs"])  # (H, B, 1)
        reward_loss = (r_ce.mean(dim=(1, 2)) * rho).sum() / h
        q_ce = soft_cross_entropy(m.q_logits(z_in, action), tg["td_probs"])  # (Q, H, B, 1)
        value_loss = (q_ce.mean(dim=(2, 3)) * rho).sum() / (h * m.num_q)
        loss = (cfg.consistency_coef * consistency + cfg.reward_coef * reward_loss
                + cfg.value_coef * value_loss)  # fmt: skip
        parts = {"consistency_loss": consistency, "reward_loss": reward_loss,
                 "value_loss": value_loss, "model_error": err.mean()}  # fmt: skip
        if cfg.episodic:
            logits = m.termination(zs_t[1:])
            term = F.binary_cross_entropy_with_logits(logits, batch["terminated"])
            loss = loss + cfg.termination_coef * term
            parts["termination_loss"] = term
        parts["wm_loss"] = loss
        return loss, parts, zs_t

    # One update.
    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        cfg = self.cfg
        self.model.train()
        tg = self.targets(batch)
        sam = cfg.wm_optim.sam
        split = (cfg.sam_scope == "encoder_dynamics" and sam is not None
                 and bool(getattr(self.wm_optim, "sam_active", False)))  # fmt: skip
        last_pass = sam.ascent_steps if split else 0
        first: dict[str, Any] = {}
        head_grads: list[Tensor] = []

        def closure() -> Tensor:
            k = first.setdefault("calls", 0)
            first["calls"] = k + 1
            # Every pass replays the first pass's random stream (Q-head dropout masks), so SAM
            # perturbs one fixed loss function, and SAM on or off consumes the same randomness.
            if k == 0:
                first["rng"] = rng_state(self.device)
            else:
                set_rng_state(first["rng"], self.device)
            # encoder_dynamics scope: the heads take a plain step with their first-pass gradient.
            # In later passes they pass gradients on to zs but compute none for themselves, and
            # holding no gradient during the ascent they are not perturbed.
            frozen = split and k > 0
            for p in self._head_params if frozen else ():
                p.requires_grad_(False)
            try:
                loss, parts, zs = self._wm_loss(batch, tg)
                loss.backward()
            finally:
                for p in self._head_params if frozen else ():
                    p.requires_grad_(True)
            # Clipping is a uniform scale of the gradient, so clipping each pass's gradient
            # equals clipping the SAM gradient; the ascent direction g/|g| is unchanged by it.
            # (encoder_dynamics: the heads' gradient is clipped as in the plain step, the
            # encoder+dynamics SAM gradient by its own norm.)
            norm = torch.nn.utils.clip_grad_norm_(self._wm_params, cfg.grad_clip_norm,
                                                  foreach=True)  # fmt: skip
            if k == 0:
                first.update(parts, zs=zs.detach(), grad_norm=norm)
            if split:
                if k == 0:
                    head_grads.extend(p.grad for p in self._head_params)
                for p, g in zip(self._head_params, head_grads, strict=True):
                    p.grad = g if k == last_pass else None
            return loss

        self.wm_optim.zero_grad(set_to_none=True)
        optim.closure_step(self.wm_optim, closure)  # a non-finite loss or gradient: no step
        self.wm_optim.zero_grad(set_to_none=True)

        pi_info = self.update_pi(first["zs"])
        self.model.soft_update_target(cfg.tau)
        self.model.eval()
        self.updates += 1
        keys = ["wm_loss", "consistency_loss", "reward_loss", "value_loss", "grad_norm"]
        keys += ["termination_loss"] if cfg.episodic else []
        vals = [first[k].detach().float() for k in keys] + list(pi_info.values())
        # Tensors, not floats: the caller reads them when it logs, so the update never syncs.
        out: dict[str, Tensor | float] = dict(zip(keys + list(pi_info), torch.stack(vals),
                                                  strict=True))  # fmt: skip
        out["sam_passes"] = float(first["calls"])
        return out

    def pi_loss(self, zs: Tensor) -> tuple[Tensor, Tensor]:
        """(policy loss, mean entropy) on latent states zs (H+1, B, L): maximise scaled Q plus
        entropy. Updates the running Q scale in place."""
        cfg = self.cfg
        action, _, info = self.model.pi(zs)
        q = self.model.q(zs, action, "avg", detach=True)
        self.scale.update(q[0])
        q = self.scale(q)
        objective = (cfg.entropy_coef * info["scaled_entropy"] + q).mean(dim=(1, 2))
        return -(objective * self._rho[: zs.shape[0]]).mean(), info["entropy"].detach().mean()

    def update_pi(self, zs: Tensor) -> dict[str, Tensor]:
        """Policy step on latent states zs (H+1, B, L)."""
        cfg = self.cfg
        pi_loss, entropy = self._pi_loss(zs)
        pi_loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.pi_net.parameters(),
                                              cfg.grad_clip_norm, foreach=True)  # fmt: skip
        optim.step_if_finite(self.pi_optim, pi_loss, norm)
        self.pi_optim.zero_grad(set_to_none=True)
        return {"pi_loss": pi_loss.detach(), "pi_grad_norm": norm,
                "pi_entropy": entropy,
                "pi_scale": self.scale.value[0].clone()}  # fmt: skip

    # Measurement only: weights, gradients, optimizer state and the global RNG are untouched.
    def diagnostics(self, batch: dict[str, Tensor], lambda_max: bool = False,
                    rho: float = sharpness.DIAG_RHO) -> dict[str, float]:  # fmt: skip
        was_training = self.model.training
        self.model.eval()  # no dropout: the loss is a deterministic function of the weights
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)  # the same head subsample at every diagnostic step
                tg = self.targets(batch)

                def loss_fn() -> Tensor:
                    return self.world_model_loss(batch, tg)[0]

                with torch.no_grad():
                    _, parts, _ = self.world_model_loss(batch, tg)
                out = {"wm_loss": float(parts["wm_loss"]),
                       "model_error": float(parts["model_error"])}  # fmt: skip
                out.update(sharpness.training_diagnostics(loss_fn, self._wm_params, rho,
                                                          lambda_max))  # fmt: skip
        finally:
            self.model.train(was_training)
        return out

    # Checkpointing: tensors, numbers and nested containers only (torch.load(weights_only=True)).
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "wm_optim": self.wm_optim.state_dict(),
                "pi_optim": self.pi_optim.state_dict(), "planner": self.planner.state_dict(),
                "scale": self.scale.value.clone(), "updates": self.updates}  # fmt: skip

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        self.wm_optim.load_state_dict(d["wm_optim"])
        self.pi_optim.load_state_dict(d["pi_optim"])
        self.planner.load_state_dict(d["planner"])
        self.scale.value.copy_(d["scale"])
        self.updates = int(d["updates"])


def make(cfg: TDMPC2Config, obs_shape: Sequence[int], action_dim: int, episode_length: int,
         device: str | torch.device = "cpu", total_steps: int | None = None) -> TDMPC2Agent:
    """The registry's factory; ``total_steps`` (updates) is needed by late-phase SAM only."""
    return TDMPC2Agent(cfg, obs_shape, action_dim, episode_length, device, total_steps)
