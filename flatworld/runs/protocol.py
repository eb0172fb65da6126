"""What the training loop needs from an agent (the seam with flatworld.agents)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor


@runtime_checkable
class Agent(Protocol):
    """An online agent driven by `flatworld.runs.train`.

    Batches are dicts of float32 tensors on the agent's device, horizon H, batch B:
    `obs` (H+1, B, *obs_shape), `action` (H, B, A), `reward` (H, B, 1), `terminated` (H, B, 1);
    actions live in [-1, 1]^A.
    """

    horizon: int
    batch_size: int
    discount: float  # used for the value-prediction error

    def act(self, obs: np.ndarray, t0: bool, eval_mode: bool) -> np.ndarray:
        """float32 action in [-1, 1]; `t0` marks an episode's first step."""
        ...

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One agent update; returns scalar metrics."""
        ...

    def diagnostics(self, batch: dict[str, Tensor], lambda_max: bool = False,
                    rho: float = 0.05) -> dict[str, float]:  # fmt: skip
        """Measure only (weights, grads, optimizer state untouched) on a held-out batch (from
        evaluation episodes, never in the replay): "wm_loss", "wm_sharpness" at radius `rho`,
        "model_error", optionally "wm_lambda_max", and the SAM bound's terms from the model
        ("bound_loss", "bound_perturbed_loss", "bound_k", "bound_w_norm_sq", "bound_rho";
        flatworld.sharpness.training_diagnostics returns them all)."""
        ...

    def value(self, obs: np.ndarray) -> float:
        """Q(s0, a ~ pi(s0))."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, floats, nested dicts/lists: loads with torch.load(weights_only=True)."""
        ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class AgentEntry:
    """What a run needs of an agent family: its config dataclass and a factory.

    ``make(cfg, obs_shape=..., action_dim=..., episode_length=..., device=..., total_steps=...)``
    returns an `Agent`. The caller (the CLI, a sweep, the demo) resolves the agent's name to
    its entry and hands `flatworld.runs` the table of entries it may use (`Agents`).
    """

    config_cls: type
    make: Callable[..., Any]
    action_kinds: tuple[str, ...] = ("continuous",)  # flatworld.envs.action_kind values
    # The published trainer's schedule: when seeding ends, as many updates as seed steps.
    seed_burst: bool = False
    # Random-action steps before the agent acts, from (agent config, episode length), when the
    # run does not set them. TD-MPC2's rule by default.
    seed_steps: Callable[[Any, int], int] = lambda cfg, episode_length: max(
        1000, 5 * episode_length)


Agents = Mapping[str, AgentEntry]  # agent name (as config.yaml stores it) -> its entry
