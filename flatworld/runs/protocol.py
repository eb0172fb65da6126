"""What the training loop needs from an agent (the seam with flatworld.agents)."""

from __future__ import annotations

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

    def diagnostics(self, batch: dict[str, Tensor], lambda_max: bool = False) -> dict[str, float]:
        """Measure only (weights, grads, optimizer state untouched) on a fixed held-out batch:
        "wm_loss", "wm_sharpness", "model_error", optionally "wm_lambda_max"."""
        ...

    def value(self, obs: np.ndarray) -> float:
        """Q(s0, a ~ pi(s0))."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, floats, nested dicts/lists: loads with torch.load(weights_only=True)."""
        ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...
