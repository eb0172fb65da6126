"""DeepMind Control Suite tasks behind the Gymnasium API.

Ids are `dmc/<domain>-<task>` with dm_control's own names (`dmc/ball_in_cup-catch`,
`dmc/cartpole-swingup_sparse`). Hyphens may replace underscores, case is ignored, and
TD-MPC2's short domain names are aliases (`dmc/cup-catch`, `dmc/pointmass-easy`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

# TD-MPC2 names two domains differently; accept its ids unchanged.
DOMAIN_ALIASES = {"cup": "ball_in_cup", "pointmass": "point_mass"}
# Bounds wider than this mean "unbounded" (lqr uses +-1e10): the [-1, 1] action passes
# through instead of being stretched over a range no policy could use.
_MAX_RESCALE_BOUND = 1e3


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def all_tasks() -> list[tuple[str, str]]:
    from dm_control import suite

    return list(suite.ALL_TASKS)


def task_ids() -> list[str]:
    """Canonical ids, without the `dmc/` prefix."""
    return [f"{d}-{t}" for d, t in all_tasks()]


def resolve(name: str) -> tuple[str, str] | None:
    """Map an id (without prefix) to (domain, task), or None when unknown."""
    table = {_norm(f"{d}-{t}"): (d, t) for d, t in all_tasks()}
    for alias, domain in DOMAIN_ALIASES.items():
        table.update({_norm(f"{alias}-{t}"): (domain, t) for d, t in all_tasks() if d == domain})
    return table.get(_norm(name))


class DMCEnv(gym.Env):
    """One dm_control task: action repeat, a fixed episode length, state or pixel observations.

    State observations are the task's observation dict flattened and concatenated in the order
    of its observation_spec (fixed by the task code). Pixel observations are channels-first
    uint8 frames, `frame_stack` of them concatenated along the channel axis.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        domain: str,
        task: str,
        seed: int = 0,
        action_repeat: int = 2,
        obs: str = "state",
        frame_stack: int = 3,
        image_size: int = 64,
        episode_length: int | None = None,
    ) -> None:
        if not isinstance(action_repeat, int) or action_repeat < 1:
            raise ValueError(f"action_repeat={action_repeat!r}: expected an int >= 1")
        if obs not in ("state", "rgb"):
            raise ValueError(f"obs={obs!r}: expected 'state' or 'rgb'")
        if not isinstance(frame_stack, int) or frame_stack < 1:
            raise ValueError(f"frame_stack={frame_stack!r}: expected an int >= 1")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size={image_size!r}: expected an int >= 8")
        bad_length = not isinstance(episode_length, int) or episode_length < 1
        if episode_length is not None and bad_length:
            raise ValueError(f"episode_length={episode_length!r}: expected None or an int >= 1")
        from dm_control import suite

        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        self.domain, self.task = domain, task
        self.action_repeat, self.obs_type = action_repeat, obs
        self.frame_stack, self.image_size = frame_stack, image_size
        # The suite's episodes are 1000 control steps (lqr has none): one budget for all.
        self.episode_length = episode_length or 1000 // action_repeat
        self._camera = 2 if domain == "quadruped" else 0
        self._frames: deque[np.ndarray] = deque(maxlen=frame_stack)
        self._t = 0

        spec = self._env.action_spec()
        lo, hi = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self._rescale = bool(np.all(np.abs(lo) <= _MAX_RESCALE_BOUND))
        self._rescale &= bool(np.all(np.abs(hi) <= _MAX_RESCALE_BOUND))
        self._lo, self._hi = lo, hi
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        if obs == "state":
            dim = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        else:
            shape = (3 * frame_stack, image_size, image_size)
            self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)

    def _state(self, time_step: Any) -> np.ndarray:
        parts = [np.asarray(v, np.float32).reshape(-1) for v in time_step.observation.values()]
        return np.concatenate(parts)

    def _pixels(self) -> np.ndarray:
        frame = self._env.physics.render(self.image_size, self.image_size, camera_id=self._camera)
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    def _obs(self, time_step: Any) -> np.ndarray:
        if self.obs_type == "state":
            return self._state(time_step)
        self._frames.append(self._pixels())
        return np.concatenate(list(self._frames), axis=0)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            # dm_control draws initial states from the task's RandomState; reseeding it makes
            # the episode a function of `seed` alone, without rebuilding the physics.
            self._env.task._random = np.random.RandomState(seed)
        time_step = self._env.reset()
        self._t = 0
        if self.obs_type == "state":
            return self._state(time_step), {}
        # The first frame fills the whole stack, so every observation has the same shape.
        frame = self._pixels()
        self._frames.extend([frame] * self.frame_stack)
        return np.concatenate(list(self._frames), axis=0), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        if self._rescale:
            a = self._lo + (a + 1.0) * 0.5 * (self._hi - self._lo)
        reward, time_step = 0.0, None
        for _ in range(self.action_repeat):
            time_step = self._env.step(a)
            reward += float(time_step.reward or 0.0)
            if time_step.last():
                break
        self._t += 1
        # dm_control ends an episode with discount 0 for a true terminal state, 1 for a limit.
        terminated = bool(time_step.last() and time_step.discount == 0.0)
        truncated = not terminated and (bool(time_step.last()) or self._t >= self.episode_length)
        return self._obs(time_step), reward, terminated, truncated, {}

    def render(self) -> np.ndarray:
        return self._env.physics.render(self.image_size, self.image_size, camera_id=self._camera)

    def close(self) -> None:
        self._env.close()
