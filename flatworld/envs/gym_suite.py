"""Gymnasium tasks (`gym/<id>`) and HumanoidBench (`humanoidbench/<id>`) with [-1, 1] actions."""

from __future__ import annotations

import atexit
import csv
import difflib
import functools
import importlib.resources
import importlib.util
import sys
import types
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

HUMANOIDBENCH_REPO = "https://github.com/carlosferrazza/humanoid-bench"
HUMANOIDBENCH_PIP = f"git clone {HUMANOIDBENCH_REPO} && pip install --no-deps -e humanoid-bench"
HUMANOIDBENCH_INSTALL = (
    "HumanoidBench is not on PyPI. Install it from a clone, editable and without its pins "
    "(torch 2.3.1, mujoco 3.1.6 and gymnasium 0.29 clash with this stack):\n"
    f"  {HUMANOIDBENCH_PIP}\n"
    "and keep the clone: the package reads its tasks and models from it (`pip install "
    "git+...` builds a wheel without its envs/, dmc_deps/ and assets/ folders). flatworld "
    "handles its differences from MuJoCo 3.17 itself, without changing your install. No jax "
    "needed."
)
# What an install of humanoid_bench must hold to build its tasks, relative to the package
# folder; the wheel that `pip install git+...` builds has none of them.
HUMANOIDBENCH_PARTS = ("envs/basic_locomotion_envs.py", "dmc_deps/dmc_index.py", "assets/envs")


@dataclass(frozen=True)
class HumanoidBenchTask:
    """One row of `data/humanoidbench.csv` (see data/README.md for where each value is from)."""

    robot: str
    task: str
    obs_dim: int
    action_dim: int
    max_episode_steps: int  # the package's registered time limit, in env steps
    main: bool  # one of the 14 h1hand locomotion tasks of the benchmark's main set

    @property
    def id(self) -> str:
        return f"{self.robot}-{self.task}-v0"


@functools.cache
def humanoidbench_table() -> dict[str, HumanoidBenchTask]:
    """Every listed HumanoidBench task by id (`h1hand-walk-v0`), in the table's order: the
    tasks that have a model in the package (humanoid_bench registers more, which fail when
    built: h1hand's two highbar tasks, and on h1 every task that needs hands but a few)."""
    text = importlib.resources.files("flatworld.envs").joinpath("data/humanoidbench.csv")
    rows = csv.DictReader(text.read_text().splitlines())
    tasks = [HumanoidBenchTask(r["robot"], r["task"], int(r["obs_dim"]), int(r["action_dim"]),
                               int(r["max_episode_steps"]), r["main"] == "1") for r in rows]
    return {t.id: t for t in tasks}


# Gymnasium tasks whose episodes only ever end at the time limit.
NEVER_TERMINATE = frozenset({"HalfCheetah", "Swimmer", "Reacher", "Pusher", "HumanoidStandup"})


class MissingDependencyError(ImportError):
    """An optional suite's package is not installed; the message says how to install it."""


def humanoidbench_ids(main_only: bool = False) -> list[str]:
    """Ids that build: `<robot>-<task>-v0`; `main_only`: the h1hand locomotion set."""
    return [i for i, t in humanoidbench_table().items() if t.main or not main_only]


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
        self._frees_gl_at_exit = False

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return np.asarray(obs, np.float32), info

    def render(self) -> np.ndarray:
        """The current frame, HxWx3 uint8, headless (MUJOCO_GL=egl for MuJoCo tasks).

        A MuJoCo task built without `render_mode="rgb_array"` (HumanoidBench's default here)
        still renders: its offscreen renderer is made on the first call, from its default
        camera, without task-specific markers.
        """
        inner = self.env.unwrapped
        if self.env.render_mode != "rgb_array" and hasattr(inner, "mujoco_renderer"):
            frame = inner.mujoco_renderer.render("rgb_array")
        else:
            frame = self.env.render()
        if not self._frees_gl_at_exit and hasattr(inner, "mujoco_renderer"):
            # MuJoCo's EGL module ends its display at exit, registered on the first render;
            # registered after it, this frees the context first (atexit runs in reverse), so
            # closing the env at exit (flatworld.envs.close_all) finds nothing left to free.
            atexit.register(_free_gl, weakref.ref(inner))
            self._frees_gl_at_exit = True
        if frame is None:
            name = self.env.spec.id if self.env.spec else self.env
            raise ValueError(f"{name} gave no frame (render_mode={self.env.render_mode!r}): "
                             "build it with render_mode='rgb_array'")  # fmt: skip
        return np.ascontiguousarray(frame, np.uint8)

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


def _free_gl(env_ref: weakref.ref[Any]) -> None:
    env = env_ref()
    if env is not None:
        env.mujoco_renderer.close()


def make_gym(env_id: str, seed: int, action_repeat: int = 1, **kwargs: Any) -> GymAdapter:
    # Frames on demand for video; nothing is drawn until render() is called.
    kwargs.setdefault("render_mode", "rgb_array")
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
    table = humanoidbench_table()
    if env_id not in table:
        close = difflib.get_close_matches(env_id, list(table), n=5)
        raise ValueError(
            f"unknown env id 'humanoidbench/{env_id}' (only ids with a model in the package "
            f"are listed); close matches: {[f'humanoidbench/{c}' for c in close] or 'none'} "
            "(flatworld.envs.list_envs())"
        )
    import_humanoidbench()
    # The package's default render_mode opens a GL context in the constructor (about 1 s, and
    # it fails where no GL is set up); a run that does not ask for pixels never renders, and
    # GymAdapter.render draws frames without it.
    kwargs.setdefault("render_mode", None)
    env = _make_registered("humanoidbench", env_id, list(table), seed, action_repeat, kwargs)
    expected = table[env_id]
    shapes = (env.observation_space.shape, env.action_space.shape)
    if shapes != ((expected.obs_dim,), (expected.action_dim,)):
        warnings.warn(
            f"humanoidbench/{env_id} has observations of shape {shapes[0]} and actions of shape "
            f"{shapes[1]}; flatworld's table (humanoid-bench at 791405f) says "
            f"({expected.obs_dim},) and ({expected.action_dim},): another version of the "
            "package is installed", stacklevel=2,
        )  # fmt: skip
    return env


def humanoidbench_missing() -> str | None:
    """None when humanoid_bench is installed whole; otherwise what is missing, in one line.

    Whole means with its task code and models: `pip install git+...` builds a wheel without
    envs/, dmc_deps/ and assets/ (folders without `__init__.py`, and no package data), which
    imports but cannot build a single task. Looks at the files only; imports nothing.
    """
    try:
        spec = importlib.util.find_spec("humanoid_bench")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "the humanoid_bench package is not installed"
    folders = [Path(f) for f in spec.submodule_search_locations or ()]
    if not folders:
        return f"humanoid_bench at {spec.origin} is a module, not the package"
    lacking = [part for part in HUMANOIDBENCH_PARTS if not (folders[0] / part).exists()]
    if lacking:
        return (f"humanoid_bench at {folders[0]} lacks {', '.join(lacking)} (an install from a "
                "wheel, as `pip install git+...` makes, leaves them out)")  # fmt: skip
    return None


def import_humanoidbench() -> None:
    """Import humanoid_bench (which registers its tasks) with the MuJoCo 3.17 shims applied."""
    if "humanoid_bench" in sys.modules:
        return
    missing = humanoidbench_missing()
    if missing is not None:
        raise MissingDependencyError(
            f"HumanoidBench tasks need the humanoid_bench package: {missing}.\n"
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
    env_module = sys.modules.get("humanoid_bench.env")
    if env_module is not None and hasattr(env_module, "HumanoidEnv"):
        patch_model_loading(env_module.HumanoidEnv)


def patch_model_loading(env_class: type) -> None:
    """Let MuJoCo 3.17 load the models whose included files name their top-level default class.

    An included file such as the kitchen's `kettle_asset.xml` opens with
    `<default class="kettle">`; MuJoCo 3.17 reads that as renaming the model's top-level
    class ("top-level default class 'main' cannot be renamed"), where older versions nested
    it. When a model fails that way, it is loaded again with those files handed to MuJoCo
    from memory, each such class wrapped in a plain `<default>` as MuJoCo reads it today
    (`nested_default_fixes`). Every other model loads as before. Idempotent; it changes the
    class in this process only, never the installed files.
    """
    if getattr(env_class, "_flatworld_patched_loading", False):
        return
    original = env_class._initialize_simulation

    def _initialize_simulation(self: Any) -> tuple[Any, Any]:
        try:
            return original(self)
        except ValueError as err:
            fixes = nested_default_fixes(self.fullpath) if "top-level default" in str(err) else {}
            if not fixes:
                raise
        import mujoco

        model = mujoco.MjModel.from_xml_path(self.fullpath, fixes)
        # As gymnasium's MujocoEnv does: grow the offscreen buffer to the render size.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    env_class._initialize_simulation = _initialize_simulation
    env_class._flatworld_patched_loading = True


def nested_default_fixes(model_path: str | Path) -> dict[str, bytes]:
    """The files `model_path` includes (at any depth) whose top level has a named `<default
    class=...>`, rewritten with each such class inside a plain `<default>`; keyed by the
    include path as written, which is how MuJoCo looks them up in its in-memory assets.
    Include paths are relative to the model's folder, as MuJoCo resolves them."""
    import xml.etree.ElementTree as ET

    base = Path(model_path).parent
    fixes: dict[str, bytes] = {}
    todo, seen = [(str(model_path), Path(model_path))], set()
    while todo:
        name, path = todo.pop()
        if path.resolve() in seen or not path.is_file():
            continue
        seen.add(path.resolve())
        root = ET.parse(path).getroot()
        todo += [(i.get("file", ""), base / i.get("file", "")) for i in root.iter("include")]
        children = list(root)
        named = [c for c in children if c.tag == "default" and "class" in c.attrib]
        if path == Path(model_path) or not named:
            continue
        for child in children:
            root.remove(child)
            if child in named:
                wrapper = ET.Element("default")
                wrapper.append(child)
                child = wrapper
            root.append(child)
        fixes[name] = ET.tostring(root)
    return fixes


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
