"""Gymnasium tasks (`gym/<id>`) and HumanoidBench (`humanoidbench/<id>`) with [-1, 1] actions."""

from __future__ import annotations

import difflib
from typing import Any

import gymnasium as gym
import numpy as np

HUMANOIDBENCH_INSTALL = (
    "HumanoidBench is not on PyPI. Install it from GitHub without its pins (torch 2.3.1, "
    "mujoco 3.1.6, gymnasium 0.29 clash with this stack):\n"
    "  pip install --no-deps git+https://github.com/carlosferrazza/humanoid-bench\n"
    "  pip install jax   # its wrappers import jax\n"
    "and render headless (MUJOCO_GL=egl is set for you when unset): every task opens a "
    "renderer when it is built."
)
# The benchmark's tasks (humanoid_bench.env.TASKS); each is registered once per robot as
# `<robot>-<task>-v0`. h1hand is the benchmark robot; h1 (no hands) is used for locomotion.
HUMANOIDBENCH_TASKS = (
    "stand", "walk", "run", "reach", "hurdle", "crawl", "maze", "sit_simple", "sit_hard",
    "balance_simple", "balance_hard", "stair", "slide", "pole", "push", "cabinet",
    "highbar_simple", "highbar_hard", "door", "truck", "cube", "bookshelf_simple",
    "bookshelf_hard", "basketball", "window", "spoon", "kitchen", "package", "powerlift",
    "room", "insert_small", "insert_normal",
)  # fmt: skip
HUMANOIDBENCH_ROBOTS = ("h1hand", "h1")


class MissingDependencyError(ImportError):
    """An optional suite's package is not installed; the message says how to install it."""


def humanoidbench_ids() -> list[str]:
    return [f"{r}-{t}-v0" for r in HUMANOIDBENCH_ROBOTS for t in HUMANOIDBENCH_TASKS]


def gym_ids() -> list[str]:
    """Gymnasium's MuJoCo tasks, newest version of each."""
    newest: dict[str, str] = {}
    for env_id, spec in gym.envs.registry.items():
        entry = spec.entry_point
        if isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco"):
            name, _, version = env_id.rpartition("-v")
            if version.isdigit():
                old = newest.get(name)
                if old is None or int(version) > int(old.rpartition("-v")[2]):
                    newest[name] = env_id
    return sorted(newest.values())


class GymAdapter(gym.Wrapper):
    """Actions in [-1, 1] rescaled to the task's box, float32 observations, action repeat.

    `episode_length` is the episode length in agent steps (the time limit / action_repeat).
    """

    def __init__(self, env: gym.Env, action_repeat: int = 1) -> None:
        super().__init__(env)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(
                f"{env.spec.id if env.spec else env}: only Box action spaces are "
                f"supported, got {env.action_space}"
            )
        if not isinstance(env.observation_space, gym.spaces.Box):
            raise ValueError(
                f"{env.spec.id if env.spec else env}: only Box observation spaces "
                f"are supported, got {env.observation_space}"
            )
        self.action_repeat = action_repeat
        space = env.action_space
        self._lo = space.low.astype(np.float64)
        self._hi = space.high.astype(np.float64)
        if not (np.all(np.isfinite(self._lo)) and np.all(np.isfinite(self._hi))):
            raise ValueError(f"action space {space} is unbounded: cannot map [-1, 1] onto it")
        self.action_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)
        obs_space = env.observation_space
        self.observation_space = gym.spaces.Box(
            obs_space.low.astype(np.float32), obs_space.high.astype(np.float32),
            obs_space.shape, np.float32,
        )  # fmt: skip
        limit = env.spec.max_episode_steps if env.spec is not None else None
        self.episode_length = -(-limit // action_repeat) if limit else 1000

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return np.asarray(obs, np.float32), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        a = (self._lo + (a + 1.0) * 0.5 * (self._hi - self._lo)).astype(self.env.action_space.dtype)
        reward, terminated, truncated, info = 0.0, False, False, {}
        for _ in range(self.action_repeat):
            obs, r, terminated, truncated, info = self.env.step(a)
            reward += float(r)
            if terminated or truncated:
                break
        return np.asarray(obs, np.float32), reward, bool(terminated), bool(truncated), info


def make_gym(env_id: str, seed: int, action_repeat: int = 1, **kwargs: Any) -> GymAdapter:
    return _make_registered("gym", env_id, gym_ids() or list(gym.envs.registry), seed,
                            action_repeat, kwargs)


def _make_registered(suite: str, env_id: str, known: list[str], seed: int, action_repeat: int,
                     kwargs: dict[str, Any]) -> GymAdapter:
    if env_id not in gym.envs.registry:
        close = difflib.get_close_matches(env_id, known, n=5)
        raise ValueError(
            f"unknown env id '{suite}/{env_id}'; close matches: "
            f"{[f'{suite}/{c}' for c in close] or 'none'} (flatworld.envs.list_envs())"
        )
    env = GymAdapter(gym.make(env_id, **kwargs), action_repeat=action_repeat)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def make_humanoidbench(env_id: str, seed: int, action_repeat: int = 1, **kwargs: Any) -> GymAdapter:
    try:
        import humanoid_bench  # noqa: F401  (registers its tasks with gymnasium)
    except ImportError as e:
        raise MissingDependencyError(
            f"'humanoidbench/{env_id}' needs the humanoid_bench package ({e}).\n"
            + HUMANOIDBENCH_INSTALL
        ) from e
    return _make_registered("humanoidbench", env_id, humanoidbench_ids(), seed, action_repeat,
                            kwargs)
