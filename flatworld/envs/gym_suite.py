"""Gymnasium tasks (`gym/<id>`) and HumanoidBench (`humanoidbench/<id>`) with [-1, 1] actions."""

from __future__ import annotations

import difflib
import importlib.util
import sys
import types
from typing import Any

import gymnasium as gym
import numpy as np

HUMANOIDBENCH_PIP = "pip install --no-deps git+https://github.com/carlosferrazza/humanoid-bench"
HUMANOIDBENCH_INSTALL = (
    "HumanoidBench is not on PyPI. Install it from its repository without its pins (torch "
    "2.3.1, mujoco 3.1.6 and gymnasium 0.29 clash with this stack):\n"
    f"  {HUMANOIDBENCH_PIP}\n"
    "That is all: flatworld handles its two differences from MuJoCo 3.17 itself (its copy of "
    "dm_control's named indexing reads struct fields MuJoCo 3.17 no longer has, and its "
    "hierarchical-policy module imports jax, which the locomotion tasks never use), without "
    "changing your install. No jax needed."
)
# The h1hand locomotion tasks: the benchmark's main set (151-dim observations, 61 actions).
HUMANOIDBENCH_MAIN = (
    "stand", "walk", "run", "reach", "hurdle", "crawl", "maze", "sit_simple", "sit_hard",
    "balance_simple", "balance_hard", "stair", "slide", "pole",
)  # fmt: skip
# Every registered task that has a model (an asset XML) in the package, per robot. The
# others are registered by humanoid_bench but fail with OSError when built: h1hand's two
# highbar tasks, and on h1 every task that needs hands but push, door, truck, basketball,
# package and highbar_simple. h1 (no hands) has 51-dim observations and 19 actions.
HUMANOIDBENCH_TASKS = {
    "h1hand": HUMANOIDBENCH_MAIN + (
        "push", "cabinet", "door", "truck", "cube", "bookshelf_simple", "bookshelf_hard",
        "basketball", "window", "spoon", "kitchen", "package", "powerlift", "room",
        "insert_small", "insert_normal",
    ),
    "h1": HUMANOIDBENCH_MAIN + (
        "push", "door", "truck", "basketball", "package", "highbar_simple",
    ),
}  # fmt: skip
# Gymnasium tasks whose episodes only ever end at the time limit.
NEVER_TERMINATE = frozenset({"HalfCheetah", "Swimmer", "Reacher", "Pusher", "HumanoidStandup"})


class MissingDependencyError(ImportError):
    """An optional suite's package is not installed; the message says how to install it."""


def humanoidbench_ids(main_only: bool = False) -> list[str]:
    """Ids that build: `<robot>-<task>-v0`; `main_only`: the h1hand locomotion set."""
    if main_only:
        return [f"h1hand-{t}-v0" for t in HUMANOIDBENCH_MAIN]
    return [f"{r}-{t}-v0" for r, tasks in HUMANOIDBENCH_TASKS.items() for t in tasks]


def gym_ids() -> list[str]:
    """Gymnasium's MuJoCo and classic-control tasks, newest version of each."""
    newest: dict[str, str] = {}
    for env_id, spec in gym.envs.registry.items():
        entry = spec.entry_point
        if isinstance(entry, str) and entry.startswith(
            ("gymnasium.envs.mujoco", "gymnasium.envs.classic_control")
        ):
            name, _, version = env_id.rpartition("-v")
            if version.isdigit():
                old = newest.get(name)
                if old is None or int(version) > int(old.rpartition("-v")[2]):
                    newest[name] = env_id
    return sorted(newest.values())


class GymAdapter(gym.Wrapper):
    """float32 observations, action repeat, and Box actions in [-1, 1] rescaled to the task's
    box. Discrete action spaces pass through: `step` takes the action's index.

    `episode_length` is the episode length in agent steps (the time limit / action_repeat).
    """

    def __init__(self, env: gym.Env, action_repeat: int = 1) -> None:
        super().__init__(env)
        name = env.spec.id if env.spec else env
        if not isinstance(env.observation_space, gym.spaces.Box):
            raise ValueError(f"{name}: only Box observation spaces are supported, "
                             f"got {env.observation_space}")  # fmt: skip
        self.action_repeat = action_repeat
        space = env.action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        if not self.discrete:
            if not isinstance(space, gym.spaces.Box):
                raise ValueError(f"{name}: only Box and Discrete action spaces are supported, "
                                 f"got {space}")  # fmt: skip
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

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.discrete:
            a = int(action)
        else:
            a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
            a = (self._lo + (a + 1.0) * 0.5 * (self._hi - self._lo)).astype(
                self.env.action_space.dtype)  # fmt: skip
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
    if env_id not in humanoidbench_ids():
        close = difflib.get_close_matches(env_id, humanoidbench_ids(), n=5)
        raise ValueError(
            f"unknown env id 'humanoidbench/{env_id}' (only ids with a model in the package "
            f"are listed); close matches: {[f'humanoidbench/{c}' for c in close] or 'none'} "
            "(flatworld.envs.list_envs())"
        )
    import_humanoidbench()
    # The package's default render_mode opens a GL context in the constructor (about 1 s, and
    # it fails where no GL is set up); a run that does not ask for pixels never renders.
    kwargs.setdefault("render_mode", None)
    return _make_registered("humanoidbench", env_id, humanoidbench_ids(), seed, action_repeat,
                            kwargs)


def import_humanoidbench() -> None:
    """Import humanoid_bench (which registers its tasks) with the MuJoCo 3.17 shims applied."""
    if "humanoid_bench" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("humanoid_bench")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingDependencyError(
            "HumanoidBench tasks need the humanoid_bench package, which is not installed.\n"
            + HUMANOIDBENCH_INSTALL
        )
    # Its hierarchical-policy helpers import jax at module level, and every task module
    # imports them; the locomotion tasks never call them. Without jax, a stand-in module
    # takes their place and fails only if a task really uses one.
    if importlib.util.find_spec("jax") is None:
        sys.modules.setdefault(_FLAX_TO_TORCH, _jax_free_flax_to_torch())
    import humanoid_bench  # noqa: F401  (registers its tasks with gymnasium)

    index = sys.modules.get("humanoid_bench.dmc_deps.dmc_index")
    if index is not None:
        patch_dmc_index(index)


_FLAX_TO_TORCH = "humanoid_bench.mjx.flax_to_torch"


def _jax_free_flax_to_torch() -> types.ModuleType:
    module = types.ModuleType(_FLAX_TO_TORCH)

    def needs_jax(name: str) -> type:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            raise MissingDependencyError(
                f"humanoid_bench's {name} (hierarchical reach policies) needs jax: pip install "
                "jax. flatworld's HumanoidBench tasks (flat policies) do not use it."
            )

        return type(name, (), {"__init__": __init__})

    for name in ("TorchModel", "TorchPolicy"):
        setattr(module, name, needs_jax(name))
    module.flax_to_torch = needs_jax("flax_to_torch")
    return module


def patch_dmc_index(index: Any) -> None:
    """Make humanoid_bench's copy of dm_control's named indexing work on MuJoCo 3.17.

    Its size table was written for an older MuJoCo: it lists struct fields that MuJoCo 3.17
    removed (e.g. `flex_evpair`), which `struct_indexer` then reads, and it lacks the size
    names of fields MuJoCo added since. The patch skips the removed fields and derives the
    size name of an unknown `name_<x>adr` pointer as `n<x>`, as dm_control's table would.
    Idempotent; it changes the imported module only, never the installed files.
    """
    if getattr(index, "_flatworld_patched", False):
        return
    original_indexer, original_size_name = index.struct_indexer, index._get_size_name

    def struct_indexer(struct: Any, struct_name: str, size_to_axis_indexer: Any) -> Any:
        table = index.sizes.array_sizes.get(str(struct_name).lower(), {})
        for field in [f for f in table if not hasattr(struct, f)]:
            del table[field]
        return original_indexer(struct, struct_name, size_to_axis_indexer)

    def get_size_name(field_name: str, struct_name: str = "mjmodel") -> str:
        try:
            return original_size_name(field_name, struct_name)
        except KeyError:
            return "n" + field_name[len("name_"):-len("adr")]

    index.struct_indexer, index._get_size_name = struct_indexer, get_size_name
    index._flatworld_patched = True
