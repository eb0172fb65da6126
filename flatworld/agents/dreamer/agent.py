"""DreamerV3 (Hafner et al., 2023; v1 settings) with a drop-in world-model optimizer.

One update, top to bottom:
  1. targets, once, under no_grad: preprocessed observations (also the decoder's targets),
     two-hot rewards, continue flags, the reset flags;
  2. the world-model step: ``optim.closure_step(wm_optim, closure)``; the closure computes the
     world-model loss only. A step whose loss or gradient is not finite is skipped (the actor's
     and the critic's too), so a NaN never reaches the weights. Every pass replays the first
     pass's random stream (the latent samples; with the transformer also its dropout masks and
     AC-CPC's crops), and clips its own gradient the same way. The first pass keeps its
     posterior states, detached;
  3. the actor-critic step in imagination from those posterior states: the states of the
     unperturbed weights, whichever optimizer trained the world model.
The actor and the critic cannot tell which optimizer trained the world model.

With ``cuda_graphs`` the world-model pass (targets included, so they are computed in each pass)
and the actor-critic's losses and backward replay CUDA graphs (``flatworld.nn.graphs``); the
optimizer steps, SAM's perturbation and the random-stream replay run between the replays, and
the numbers are the eager path's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import clip_grad_norm_

from flatworld import optim, sharpness
from flatworld.agents.dreamer.actor_critic import ActorCritic
from flatworld.agents.dreamer.config import DreamerConfig
from flatworld.agents.dreamer.networks import compute_precision
from flatworld.agents.dreamer.world_model import WorldModel
from flatworld.nn import rng_state, set_rng_state
from flatworld.nn.graphs import CapturedStep, clone_tree


def _copy_state(state: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """A sequence-model state (plus the previous action): tensors cloned (or moved), the rest
    (the transformer's ring slot, an int) kept."""
    return {k: (v.clone() if device is None else v.to(device)) if isinstance(v, Tensor) else v
            for k, v in state.items()}  # fmt: skip


class DreamerAgent:
    def __init__(self, cfg: DreamerConfig, obs_shape: Sequence[int], action_dim: int,
                 episode_length: int, device: str | torch.device = "cpu",
                 total_steps: int | None = None, discrete: bool = False) -> None:  # fmt: skip
        self.cfg = cfg.validate()
        self.device = torch.device(device)
        self.batch_size, self.seq_len = cfg.batch_size, cfg.seq_len
        self.train_ratio = cfg.resolved_train_ratio()
        self.horizon = cfg.seq_len - 1  # the loop's legacy window length
        self.discount = cfg.discount
        self.discrete, self.action_dim = bool(discrete), action_dim
        self.episode_length = episode_length
        # None (the suite did not say): trust the terminated flags of the batch.
        self.episodic = True if cfg.episodic is None else bool(cfg.episodic)
        self.world_model = WorldModel(cfg, obs_shape, action_dim).to(self.device)
        # The one place the world-model optimizer is built; SAM or not is cfg.wm_optim's choice.
        self._wm_params = list(self.world_model.parameters())
        self.wm_optim = optim.build(cfg.wm_optim, self._wm_params, total_steps=total_steps)
        self.ac = ActorCritic(cfg, self.world_model.seq.feat_dim, action_dim, self.discrete,
                              self.world_model.two_hot, self.episodic).to(self.device)  # fmt: skip
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {"foreach": True}
        self.actor_optim = torch.optim.Adam(self.ac.actor.parameters(), lr=cfg.actor_lr,
                                            eps=cfg.actor_eps, **fused)  # fmt: skip
        self.critic_optim = torch.optim.Adam(self.ac.critic.parameters(), lr=cfg.critic_lr,
                                             eps=cfg.critic_eps, **fused)  # fmt: skip
        self._act_state: dict[str, dict[str, Any]] = {}  # "train" and "eval" episodes
        self.updates = 0
        # cuda_graphs: the world-model pass and the actor-critic's backward each captured in a
        # CUDA graph (on a CPU: the same static-tensor path, run eagerly); optimizer steps,
        # SAM's perturbation and the random-stream replay stay on the host side of the graphs.
        self._graphs: tuple[CapturedStep, CapturedStep] | None = None
        if cfg.cuda_graphs:
            ac_params = [*self.ac.actor.parameters(), *self.ac.critic.parameters()]
            self._graphs = (
                CapturedStep(lambda b: self._wm_backward(self.prepare(b)), self._wm_params,
                             self.device),
                CapturedStep(self._ac_backward, ac_params, self.device))  # fmt: skip

    def _precision(self) -> torch.autocast:
        return compute_precision(self.device, self.cfg.precision)

    # ---- acting --------------------------------------------------------------------------
    def _obs(self, obs: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)[None]

    def act(self, obs: np.ndarray, t0: bool = False, eval_mode: bool = False) -> np.ndarray:
        """One action; the recurrent state (and the previous action) is kept between calls,
        apart for training and evaluation episodes, and reset when ``t0``."""
        with torch.no_grad(), self._precision():
            return self._act(obs, t0, eval_mode)

    def _act(self, obs: np.ndarray, t0: bool, eval_mode: bool) -> np.ndarray:
        seq = self.world_model.seq
        key = "eval" if eval_mode else "train"
        prev = self._act_state.get(key)
        if t0 or prev is None:
            state = seq.initial(1)
            action = torch.zeros(1, self.action_dim, device=self.device)
        else:
            state, action = prev, prev["action"]
        post = seq.obs_step(state, action, self.world_model.embed(self._obs(obs)))
        params = self.ac.actor(seq.feat(post))
        greedy = eval_mode and self.cfg.eval_policy == "mode"
        a = self.ac.actor.mode(params) if greedy else self.ac.actor.sample(params)
        if not self.discrete:
            a = a.clamp(-1.0, 1.0)
        self._act_state[key] = {**post, "action": a}  # the whole state (the TSSM's cache too)
        return a[0].cpu().numpy().astype(np.float32)

    def value(self, obs: np.ndarray) -> float:
        """The critic at an episode's first observation (posterior mode: no randomness)."""
        seq = self.world_model.seq
        action = torch.zeros(1, self.action_dim, device=self.device)
        with torch.no_grad(), self._precision():
            post = seq.obs_step(seq.initial(1), action, self.world_model.embed(self._obs(obs)),
                                sample=False)  # fmt: skip
            return float(self.ac.value(seq.feat(post)).item())

    # ---- targets and the world-model loss --------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Everything the loss needs that does not depend on the weights, computed once."""
        wm = self.world_model
        is_first = batch["is_first"].clone()
        is_first[0] = 1.0  # every replayed sequence starts from the initial state
        cont = 1.0 - batch["terminated"] if self.episodic else torch.ones_like(batch["reward"])
        return {"obs": wm.preprocess(batch["obs"]), "action": batch["action"],
                "is_first": is_first, "reward_probs": wm.two_hot.encode(batch["reward"]),
                "cont": cont}  # fmt: skip

    # ---- one update ----------------------------------------------------------------------
    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        graphed = self._graphs is not None
        data = None if graphed else self.prepare(batch)
        first: dict[str, Any] = {"calls": 0}

        def closure() -> Tensor:
            k = first["calls"]
            first["calls"] = k + 1
            # Every pass replays the first pass's random stream (the latent samples), so SAM
            # perturbs one fixed loss function, and SAM on or off consumes the same randomness.
            if k == 0:
                first["rng"] = rng_state(self.device)
            else:
                set_rng_state(first["rng"], self.device)
            if graphed:  # a replay's outputs are overwritten by the next replay: keep copies
                loss, parts, post, norm, cont = clone_tree(self._graphs[0](batch))
            else:
                loss, parts, post, norm, cont = self._wm_backward(data)
            if k == 0:  # imagination starts from the unperturbed weights' posteriors
                first.update(parts, post={k2: v.detach() for k2, v in post.items()},
                             wm_grad_norm=norm, cont=cont)  # fmt: skip
            return loss

        self.world_model.train()
        self.wm_optim.zero_grad(set_to_none=True)
        optim.closure_step(self.wm_optim, closure)  # a non-finite loss or gradient: no step
        self.wm_optim.zero_grad(set_to_none=True)

        cont0 = first["cont"].flatten(0, 1)
        if graphed:
            ac = dict(self._graphs[1](first["post"], cont0))
            self.ac.step(self.actor_optim, self.critic_optim, ac)
        else:
            ac = self.train_actor_critic(self.world_model.seq.imagine_start(first["post"]), cont0)
        self.updates += 1
        keys = ["wm_loss", "recon_loss", "reward_loss", "cont_loss", "dyn_loss", "rep_loss", "kl",
                "wm_grad_norm"] + (["cpc_loss"] if "cpc_loss" in first else [])
        vals = [first[k].detach().float() for k in keys] + [v.float() for v in ac.values()]
        # Tensors, not floats: the caller reads them when it logs, so the update never syncs.
        out = dict(zip(keys + list(ac), torch.stack(vals), strict=True))
        out["sam_passes"] = torch.tensor(float(first["calls"]))
        return out

    def _wm_backward(self, data: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor],
                                                             dict[str, Tensor], Tensor, Tensor]:
        """One world-model pass: the loss, its gradient in ``.grad``, clipped (each pass clips
        its own by the same rule: a uniform scale, so SAM's ascent direction g/|g| is
        unchanged and the SAM gradient is clipped as a plain one would be), the loss's parts,
        the posterior states, the gradient's norm and the continue flags."""
        loss, parts, post = self.world_model.loss(data)
        loss.backward()
        norm = clip_grad_norm_(self._wm_params, self.cfg.wm_grad_clip, foreach=True)
        return loss, parts, post, norm, data["cont"]

    def _ac_backward(self, post: dict[str, Tensor], cont0: Tensor) -> dict[str, Tensor]:
        return self.ac.backward(self.world_model, self.world_model.seq.imagine_start(post), cont0)

    def train_actor_critic(self, start: dict[str, Tensor], cont0: Tensor) -> dict[str, Tensor]:
        """The actor-critic step from start states (N, ...), with 1 - terminated there."""
        return self.ac.update(self.world_model, start, cont0, self.actor_optim,
                              self.critic_optim)  # fmt: skip

    # ---- measurement only: weights, gradients, optimizer state and the RNG are untouched ----
    def diagnostics(self, batch: dict[str, Tensor], lambda_max: bool = False,
                    rho: float = sharpness.DIAG_RHO) -> dict[str, float]:  # fmt: skip
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            data = self.prepare(batch)

            def loss_fn() -> Tensor:
                torch.manual_seed(0)  # the same latent samples in every evaluation
                return self.world_model.loss(data)[0]

            # Held-out figures come from the network as acting and imagination use it: dropout
            # off (the transformer's; the RSSM has none). Sharpness is of the training loss.
            was_training = self.world_model.training
            self.world_model.eval()
            try:
                with torch.no_grad():
                    torch.manual_seed(0)
                    parts = self.world_model.loss(data)[1]
            finally:
                self.world_model.train(was_training)
            out = {"wm_loss": float(parts["wm_loss"]), "model_error": float(parts["kl"])}
            out.update(sharpness.training_diagnostics(loss_fn, self._wm_params, rho, lambda_max))
        return out

    # ---- checkpointing: tensors, numbers, nested containers (torch.load(weights_only=True)) ---
    def state_dict(self) -> dict[str, Any]:
        return {"world_model": self.world_model.state_dict(), "ac": self.ac.state_dict(),
                "wm_optim": self.wm_optim.state_dict(),
                "actor_optim": self.actor_optim.state_dict(),
                "critic_optim": self.critic_optim.state_dict(), "updates": self.updates,
                "act_state": {k: _copy_state(s) for k, s in self._act_state.items()}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "seq.tok_bias" in d["world_model"]:
            raise ValueError(
                "this checkpoint holds a TSSM from before 2026-12-04 (a one-layer token with a "
                "bias, MLP prior and posterior, the earlier AC-CPC heads; key seq.tok_bias); the "
                "TSSM now has the published TWISTER layers and cannot load it. Resume or "
                "evaluate that run with flatworld at commit 893fa02 or earlier")  # fmt: skip
        if "seq.rel_bias" in d["world_model"]:
            raise ValueError(
                "this checkpoint holds a TSSM from before 2026-12-07 (a learned position bias "
                "table, key seq.rel_bias; attention to 8 tokens including the current one; "
                "dropout inside the feed-forward layer; AC-CPC projections ending in a Linear); "
                "the TSSM now follows TWISTER's code (Transformer-XL positions, 8 previous "
                "tokens plus the current one) and cannot load it. Resume or evaluate that run "
                "with flatworld at commit 861c492 or earlier")  # fmt: skip
        try:
            self.world_model.load_state_dict(d["world_model"])
        except RuntimeError as e:
            if not self.world_model.pixels and "encoder" in str(e):
                raise ValueError(
                    "this checkpoint's vector encoder does not match the config's: since "
                    "2026-12-07 vector observations pass through DreamerV3's published 5 x 1024 "
                    "MLP (vector_mlp='published'); a run written before then used the model "
                    "size's MLP: set `vector_mlp: size` in its config.yaml to resume it"
                ) from None  # fmt: skip
            raise
        self.ac.load_state_dict(d["ac"])
        self.wm_optim.load_state_dict(d["wm_optim"])
        self.actor_optim.load_state_dict(d["actor_optim"])
        self.critic_optim.load_state_dict(d["critic_optim"])
        self.updates = int(d["updates"])
        self._act_state = {k: _copy_state(s, self.device) for k, s in d["act_state"].items()}


def make(cfg: DreamerConfig, obs_shape: Sequence[int], action_dim: int, episode_length: int,
         device: str | torch.device = "cpu", total_steps: int | None = None,
         discrete: bool = False) -> DreamerAgent:  # fmt: skip
    """The registry's factory; ``total_steps`` (updates) is needed by late-phase SAM only."""
    return DreamerAgent(cfg, obs_shape, action_dim, episode_length, device, total_steps, discrete)
