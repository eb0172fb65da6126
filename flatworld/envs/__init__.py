"""One `make(env_id, seed, **options)` for every suite, with the Gymnasium API.

Ids carry the suite as a prefix: `dmc/walker-walk`, `gym/Humanoid-v5`,
`humanoidbench/h1hand-walk-v0`, `atari/Pong`. Observations are float32 (pixels: uint8),
continuous actions live in [-1, 1]^A (Atari's are Discrete), and `episode_length(env)` gives
the episode length in agent steps. `ENV_SETS` names sets of ids (`atari100k`).
"""

from __future__ import annotations

import atexit
import difflib
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

# MuJoCo picks its GL backend when first imported; a headless default must be in place by
# then, so this runs before anything imports mujoco or dm_control (both imported lazily).
if sys.platform.startswith("linux"):
    os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402

from flatworld.envs import atari, dmc, gym_suite  # noqa: E402
from flatworld.envs.gym_suite import MissingDependencyError  # noqa: E402

__all__ = [
    "ENV_SETS", "MissingDependencyError", "Suite", "action_kind", "close_all", "episode_length",
    "eval_episodes", "list_envs", "make", "terminates",
]  # fmt: skip

SUITES = ("dmc", "gym", "humanoidbench", "atari")
ENVS_PIP = "pip install 'flatworld[envs]'"

# Named sets of env ids (`flatworld envs --set NAME`).
ENV_SETS: dict[str, tuple[str, ...]] = {
    "atari100k": tuple(f"atari/{g}" for g in atari.ATARI100K),
    "humanoidbench-main": tuple(
        f"humanoidbench/{i}" for i in gym_suite.humanoidbench_ids(main_only=True)
    ),
}


@dataclass(frozen=True)
class Suite:
    name: str
    ids: tuple[str, ...]  # full ids, prefix included
    available: bool  # False: listed statically, its package is not installed (or not whole)
    requires: str  # what to install for it ("" when it ships with flatworld's extras)
    # Whether its tasks can end in a true terminal state (not a time limit). Agents that
    # bootstrap their value targets must stop at such states: see `terminates`.
    terminates: bool
    # Episodes a score is the mean of, by the suite's published protocol: see `eval_episodes`.
    eval_episodes: int = 10


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def list_envs() -> dict[str, Suite]:
    """Every suite and its env ids. HumanoidBench's list is static (envs/data/humanoidbench.csv)."""
    has_dmc, hb_missing = _installed("dm_control"), gym_suite.humanoidbench_missing()
    hb_requires = gym_suite.HUMANOIDBENCH_PIP
    if hb_missing is not None and _installed("humanoid_bench"):  # there, but not whole
        hb_requires = f"{hb_missing}; install from a clone: {hb_requires}"
    return {
        # DMC tasks never terminate: every episode runs to its time limit.
        "dmc": Suite("dmc", tuple(f"dmc/{t}" for t in dmc.task_ids()) if has_dmc else (),
                     has_dmc, ENVS_PIP, terminates=False),
        # Gymnasium's locomotion tasks end when the body falls (Hopper, Walker2d, Ant, Humanoid).
        "gym": Suite("gym", tuple(f"gym/{t}" for t in gym_suite.gym_ids()), True, ENVS_PIP,
                     terminates=True),
        # HumanoidBench's tasks end when the robot falls.
        "humanoidbench": Suite(
            "humanoidbench", tuple(f"humanoidbench/{t}" for t in gym_suite.humanoidbench_ids()),
            hb_missing is None, hb_requires, terminates=True,
        ),
        # Atari games end at game over (a life loss is not a terminal). Without ale-py the
        # list is the 26 Atari-100k games.
        # Atari-100k is scored as the mean return of 100 episodes at the end of training.
        "atari": Suite("atari", tuple(f"atari/{g}" for g in atari.game_ids()),
                       _installed("ale_py"), atari.ALE_PIP, terminates=True, eval_episodes=100),
    }  # fmt: skip


def terminates(env_id: str) -> bool:
    """Whether `env_id` can end in a true terminal state (`terminated=True`).

    A suite declares it for its tasks; gym tasks that provably never terminate (HalfCheetah,
    Swimmer, Reacher, Pusher, HumanoidStandup) are exempted by name.
    """
    suite, _, name = str(env_id).partition("/")
    suites = list_envs()
    if suite not in suites:
        raise _unknown(str(env_id))
    if suite == "gym" and name.rpartition("-v")[0] in gym_suite.NEVER_TERMINATE:
        return False
    return suites[suite].terminates


def eval_episodes(env_id: str) -> int:
    """Episodes of a run's final evaluation (and of `flatworld eval`) by the suite's published
    protocol: 100 on Atari-100k, 10 elsewhere."""
    suite = str(env_id).partition("/")[0]
    suites = list_envs()
    if suite not in suites:
        raise _unknown(str(env_id))
    return suites[suite].eval_episodes


def action_kind(env: gym.Env) -> str:
    """'continuous' for a Box action space, 'discrete' for a Discrete one."""
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return "discrete"
    if isinstance(space, gym.spaces.Box):
        return "continuous"
    raise ValueError(f"{env}: action space {space} is neither Box nor Discrete")


def _all_ids() -> list[str]:
    return [i for s in list_envs().values() for i in s.ids]


def _unknown(env_id: str) -> ValueError:
    close = difflib.get_close_matches(env_id, _all_ids(), n=5, cutoff=0.5)
    return ValueError(
        f"unknown env id {env_id!r}; close matches: {close or 'none'}. Ids are "
        f"'<suite>/<task>' with suite in {SUITES}; flatworld.envs.list_envs() lists them all."
    )


_OPEN: weakref.WeakSet[gym.Env] = weakref.WeakSet()


def close_all() -> None:
    """Close every environment `make` built that is still alive (runs close their own; this
    catches the rest at interpreter exit, before the GL libraries are unloaded)."""
    for env in list(_OPEN):
        env.close()
        _OPEN.discard(env)


atexit.register(close_all)


def make(env_id: str, seed: int = 0, **options: Any) -> gym.Env:
    """Build a seeded environment (see `_make` for the options); `close_all` closes it at exit
    if nobody else does."""
    env = _make(env_id, seed, **options)
    _OPEN.add(env)
    return env


def _make(env_id: str, seed: int = 0, **options: Any) -> gym.Env:
    """Build a seeded environment.

    Options: `action_repeat` (dmc default 2, others 1; rewards are summed over repeats),
    `episode_length` (agent steps; dmc default 1000 // action_repeat, others the registered
    time limit / action_repeat); dmc only: `obs` ("state" | "rgb"), `frame_stack` (3),
    `image_size` (64). Other options go to `gymnasium.make` for gym/ and humanoidbench/.
    atari/ (see flatworld.envs.atari): `action_repeat` (4), `noop_max` (30), `max_frames`
    (108000), `image_size` (64), `sticky` (0.0).
    """
    if not isinstance(env_id, str) or "/" not in env_id:
        raise _unknown(str(env_id))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: expected an int")
    suite, name = env_id.split("/", 1)
    if suite == "dmc":
        if not _installed("dm_control"):
            raise MissingDependencyError(f"dmc/ tasks need dm-control: {ENVS_PIP}")
        task = dmc.resolve(name)
        if task is None:
            raise _unknown(env_id)
        env: gym.Env = dmc.DMCEnv(*task, seed=seed, **options)
        env.reset(seed=seed)
        env.action_space.seed(seed)
        return env
    if suite in ("gym", "humanoidbench"):
        opts = dict(options)
        action_repeat = opts.pop("action_repeat", 1)
        if not isinstance(action_repeat, int) or action_repeat < 1:
            raise ValueError(f"action_repeat={action_repeat!r}: expected an int >= 1")
        length = opts.pop("episode_length", None)
        if length is not None:
            if not isinstance(length, int) or length < 1:
                raise ValueError(f"episode_length={length!r}: expected None or an int >= 1")
            opts["max_episode_steps"] = length * action_repeat
        fn = gym_suite.make_gym if suite == "gym" else gym_suite.make_humanoidbench
        return fn(name, seed, action_repeat=action_repeat, **opts)
    if suite == "atari":
        # Options (the Atari-100k protocol by default): `action_repeat` (4), `noop_max` (30),
        # `max_frames` (108000 emulator frames), `image_size` (64), `sticky` (0.0).
        game = atari.resolve(name)
        if game is None:
            raise _unknown(env_id)
        return atari.make(game, seed, **options)
    raise _unknown(env_id)


def episode_length(env: gym.Env) -> int:
    """Episode length in agent steps: `env.episode_length`, else the spec's time limit."""
    length = getattr(env, "episode_length", None)
    if length is None and env.spec is not None:
        length = env.spec.max_episode_steps
    if not length:
        raise ValueError(f"{env}: no episode length (set `episode_length` or a time limit)")
    return int(length)
