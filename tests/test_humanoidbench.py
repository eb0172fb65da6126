"""HumanoidBench against a stand-in package laid out like carlosferrazza/humanoid-bench at 791405f
(the real one cannot be installed here): the install check, the kitchen model on MuJoCo 3.17,
the task table, and rendering."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("mujoco")
import mujoco  # noqa: E402

import flatworld.envs as envs  # noqa: E402
from flatworld.envs import gym_suite  # noqa: E402

CLONE = "git clone https://github.com/carlosferrazza/humanoid-bench && pip install --no-deps -e"

# The robot: a free base and a chain of 61 position-controlled hinges, as many as h1hand has.
ROBOT = """<mujocoinclude>
  <worldbody><body name="pelvis" pos="0 0 1"><freejoint name="free_base"/>
    <geom size="0.1" mass="1"/>{chain}
  </body></worldbody>
  <actuator>{motors}</actuator>
</mujocoinclude>"""
CHAIN = "".join(f'<body pos="0 0 0.01"><joint name="j{i}" axis="{i % 3 == 0:d} {i % 3 == 1:d} '
                f'{i % 3 == 2:d}" damping="1"/><geom size="0.01" mass="0.01"/>'
                for i in range(61)) + "</body>" * 61  # fmt: skip
MOTORS = "".join(f'<position joint="j{i}" kp="1" ctrlrange="-1 1"/>' for i in range(61))
# The kitchen's kettle asset opens with a named top-level default, as the real file does.
KETTLE_ASSET = """<mujocoinclude>
    <compiler angle="radian"/>
    <asset><mesh file="../kitchen/adept_models/kitchen/meshes/kettle.obj" name="kettle"/></asset>
    <default class="kettle">
        <geom conaffinity="0" contype="0" group="2" rgba=".9 .9 .9 1" type="mesh"/>
    </default>
</mujocoinclude>"""
KITCHEN_TASK = """<mujocoinclude>
    <include file="../kitchen/adept_models/kitchen/assets/kettle_asset.xml"/>
    <worldbody><body name="kettle" pos="-0.269 0.35 1"><freejoint name="free_kettle"/>
        <geom class="kettle" mesh="kettle" mass="0.5"/></body></worldbody>
</mujocoinclude>"""
DMC_INDEX = """sizes = None


def struct_indexer(struct, struct_name, size_to_axis_indexer):
    return struct


def _get_size_name(field_name, struct_name="mjmodel"):
    return "n" + field_name
"""
TETRAHEDRON = "v 0 0 0\nv 0.1 0 0\nv 0 0.1 0\nv 0 0 0.1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n"
MODEL = """<mujoco model="h1hand_pos_{task}"><option timestep="0.002"/>
    <worldbody><light pos="0 0 3"/><geom type="plane" size="5 5 0.1" rgba=".8 .6 .4 1"/>
    </worldbody><include file="../robots/h1hand_pos.xml"/>{extra}</mujoco>"""
TASK_MODULE = """class {name}:
    obs_dim = {obs_dim}
    max_episode_steps = {steps}
"""
INIT = """from gymnasium.envs import register

from .env import ROBOTS, TASKS

for robot in ROBOTS:
    for task, task_info in TASKS.items():
        register(id=f"{robot}-{task}-v0", entry_point="humanoid_bench.env:HumanoidEnv",
                 max_episode_steps=task_info.max_episode_steps,
                 kwargs={"robot": robot, "control": "pos", "task": task})
"""
ENV = """import os

import numpy as np
from gymnasium.envs.mujoco import MujocoEnv
from gymnasium.spaces import Box

from humanoid_bench.dmc_deps import dmc_index  # noqa: F401
from .envs.basic_locomotion_envs import Walk
from .envs.kitchen import Kitchen

ROBOTS = {"h1hand": None}
TASKS = {"walk": Walk, "kitchen": Kitchen}


class HumanoidEnv(MujocoEnv):
    metadata = {"render_modes": ["human", "rgb_array", "depth_array"], "render_fps": 50}

    def __init__(self, robot=None, control=None, task=None, render_mode="rgb_array",
                 width=64, height=48, **kwargs):
        self.task_info = TASKS[task]
        path = os.path.join(os.path.dirname(__file__), "assets", "envs",
                            f"{robot}_{control}_{task}.xml")
        space = Box(-np.inf, np.inf, (self.task_info.obs_dim,), np.float64)
        MujocoEnv.__init__(self, path, frame_skip=10, observation_space=space,
                           render_mode=render_mode, width=width, height=height)

    def _obs(self):
        state = np.concatenate([self.data.qpos, self.data.qvel])
        return np.resize(state, self.observation_space.shape)

    def step(self, action):
        self.do_simulation(action, self.frame_skip)
        return self._obs(), float(self.data.qpos[2]), False, False, {}

    def reset_model(self):
        return self._obs()
"""


def write_stand_in(root: Path, whole: bool = True, walk_obs_dim: int = 151) -> Path:
    """humanoid_bench under `root`: whole (a clone's layout) or as the wheel that `pip install
    git+...` builds (the Python files beside `__init__.py` only)."""
    pkg = root / "humanoid_bench"
    files = {"__init__.py": INIT, "env.py": ENV}
    if whole:
        files |= {
            "envs/basic_locomotion_envs.py": TASK_MODULE.format(name="Walk",
                                                                obs_dim=walk_obs_dim, steps=1000),
            "envs/kitchen.py": TASK_MODULE.format(name="Kitchen", obs_dim=97, steps=500),
            "dmc_deps/dmc_index.py": DMC_INDEX,
            "assets/robots/h1hand_pos.xml": ROBOT.format(chain=CHAIN, motors=MOTORS),
            "assets/envs/h1hand_pos_walk.xml": MODEL.format(task="walk", extra=""),
            "assets/envs/h1hand_pos_kitchen.xml": MODEL.format(
                task="kitchen", extra='<include file="../tasks/kitchen.xml"/>'),
            "assets/tasks/kitchen.xml": KITCHEN_TASK,
            "assets/kitchen/adept_models/kitchen/assets/kettle_asset.xml": KETTLE_ASSET,
            "assets/kitchen/adept_models/kitchen/meshes/kettle.obj": TETRAHEDRON,
        }  # fmt: skip
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """Puts a stand-in first on sys.path; forgets its modules and registered ids afterwards."""
    registered = set(gym.envs.registry)

    def install(**kwargs) -> Path:
        pkg = write_stand_in(tmp_path, **kwargs)
        monkeypatch.syspath_prepend(str(tmp_path))
        return pkg

    yield install
    for name in [m for m in sys.modules if m.partition(".")[0] == "humanoid_bench"]:
        del sys.modules[name]
    for env_id in set(gym.envs.registry) - registered:
        del gym.envs.registry[env_id]
    importlib.invalidate_caches()


def _can_render() -> bool:
    try:
        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody/></mujoco>")
        with mujoco.Renderer(model, 8, 8) as renderer:
            renderer.render()
        return True
    except Exception:  # noqa: BLE001
        return False


# ---- item 20: installed means installed whole -------------------------------------------
def test_a_wheel_install_is_reported_missing_with_what_it_lacks(stand_in, capsys):
    pkg = stand_in(whole=False)
    suite = envs.list_envs()["humanoidbench"]
    assert not suite.available
    assert f"humanoid_bench at {pkg} lacks envs/basic_locomotion_envs.py, " in suite.requires
    assert "dmc_deps/dmc_index.py, assets/envs" in suite.requires and CLONE in suite.requires
    with pytest.raises(envs.MissingDependencyError) as err:
        envs.make("humanoidbench/h1hand-walk-v0")
    assert "lacks envs/basic_locomotion_envs.py" in str(err.value) and CLONE in str(err.value)
    assert "humanoid_bench" not in sys.modules  # refused before importing anything

    from flatworld.cli import main

    main(["envs"])
    out = capsys.readouterr().out
    assert "humanoidbench (50 tasks)  [not installed: humanoid_bench at " in out


def test_a_whole_install_is_available_and_builds_with_the_tables_shapes(stand_in):
    stand_in()
    assert gym_suite.humanoidbench_missing() is None
    assert envs.list_envs()["humanoidbench"].available
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shapes equal to the table's: no warning
        env = envs.make("humanoidbench/h1hand-walk-v0", seed=3)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (151,) == env.observation_space.shape and obs.dtype == np.float32
    assert env.action_space.shape == (61,) and envs.episode_length(env) == 1000
    obs, reward, *_ = env.step(np.zeros(61, np.float32))
    assert np.isfinite(reward) and obs.shape == (151,)
    env.close()


def test_shapes_that_differ_from_the_table_are_named_in_a_warning(stand_in):
    stand_in(walk_obs_dim=140)
    with pytest.warns(UserWarning, match=r"shape \(140,\) .* says \(151,\) and \(61,\): another"):
        env = envs.make("humanoidbench/h1hand-walk-v0")
    env.close()


# ---- item 21: the kitchen on MuJoCo 3.17 ---------------------------------------------------
def test_kitchen_builds_although_its_kettle_names_the_top_level_default(stand_in):
    pkg = stand_in()
    model_path = pkg / "assets/envs/h1hand_pos_kitchen.xml"
    with pytest.raises(ValueError, match="top-level default class 'main' cannot be renamed"):
        mujoco.MjModel.from_xml_path(str(model_path))  # what the package does unaided
    env = envs.make("humanoidbench/h1hand-kitchen-v0", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (97,) and env.action_space.shape == (61,)
    assert envs.episode_length(env) == 500
    model = env.unwrapped.model
    assert model.nmesh == 1 and model.geom(model.ngeom - 1).group[0] == 2  # class 'kettle'
    env.step(env.action_space.sample())
    env.close()
    before = (pkg / "assets/kitchen/adept_models/kitchen/assets/kettle_asset.xml").read_text()
    assert before == KETTLE_ASSET  # the installed files are left as they were


def test_nested_default_fixes_touch_only_the_files_that_need_it(tmp_path):
    pkg = write_stand_in(tmp_path)
    assert gym_suite.nested_default_fixes(pkg / "assets/envs/h1hand_pos_walk.xml") == {}
    fixes = gym_suite.nested_default_fixes(pkg / "assets/envs/h1hand_pos_kitchen.xml")
    assert list(fixes) == ["../kitchen/adept_models/kitchen/assets/kettle_asset.xml"]
    assert b'<default><default class="kettle">' in fixes[next(iter(fixes))]


# ---- item 22: the task table -----------------------------------------------------------
def test_task_table_agrees_with_the_measured_package():
    table = gym_suite.humanoidbench_table()
    assert len(table) == 50 and list(table) == gym_suite.humanoidbench_ids()
    dims = {i: t.obs_dim for i, t in table.items()}
    main = gym_suite.humanoidbench_ids(main_only=True)
    assert len(main) == 14 and all(i.startswith("h1hand-") for i in main)
    for task, dim in {"reach": 157, "sit_hard": 164, "balance_simple": 164,
                      "balance_hard": 177}.items():  # fmt: skip
        assert dims[f"h1hand-{task}-v0"] == dim
    assert {dims[i] for i in main} - {157, 164, 177} == {151}
    assert max(dims[i] for i in table if i.startswith("h1hand-")) == 308
    assert dims["h1hand-bookshelf_simple-v0"] == dims["h1hand-bookshelf_hard-v0"] == 308
    h1 = [dims[i] for i in table if i.startswith("h1-")]
    assert min(h1) == 51 and max(h1) == 116
    short = {i for i, t in table.items() if t.max_episode_steps == 500}
    assert short == {"h1hand-cube-v0", "h1hand-basketball-v0", "h1hand-push-v0",
                     "h1hand-insert_small-v0", "h1hand-insert_normal-v0", "h1-push-v0",
                     "h1-basketball-v0", "h1hand-kitchen-v0"}  # fmt: skip
    assert {t.max_episode_steps for i, t in table.items() if i not in short} == {1000}
    assert {t.action_dim for t in table.values() if t.robot == "h1hand"} == {61}
    assert {t.action_dim for t in table.values() if t.robot == "h1"} == {19}


# ---- item 17: frames without a render_mode -----------------------------------------------
@pytest.mark.skipif(not _can_render(), reason="no headless OpenGL here (MUJOCO_GL=egl)")
def test_humanoidbench_episode_video(stand_in, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    from flatworld.envs.video import VideoRecorder

    stand_in()
    env = envs.make("humanoidbench/h1hand-walk-v0", seed=0, episode_length=5)
    assert env.unwrapped.render_mode is None  # no GL context made in the constructor
    env.reset(seed=0)
    with VideoRecorder(tmp_path / "walk.mp4", fps=25) as video:
        video.add(env.render())
        truncated = False
        while not truncated:
            *_, truncated, _ = env.step(env.action_space.sample())
            video.add(env.render())
    with imageio.get_reader(tmp_path / "walk.mp4") as reader:
        frames = np.stack([frame for frame in reader.iter_data()])
    assert frames.shape == (6, 48, 64, 3) and frames.std() > 1
    env.close()
