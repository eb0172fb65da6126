"""flatworld.envs: ids, shapes, seeding, action repeat, rescaling, errors."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

pytest.importorskip("dm_control")
import flatworld.envs as envs  # noqa: E402


def rollout(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    out, rewards = [obs], []
    for a in actions:
        obs, r, *_ = env.step(a)
        out.append(obs)
        rewards.append(r)
    return np.stack(out), np.array(rewards)


def test_walker_shapes_dtype_bounds():
    env = envs.make("dmc/walker-walk", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (24,) == env.observation_space.shape and obs.dtype == np.float32
    assert env.action_space.shape == (6,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, r, term, trunc, _ = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and isinstance(r, float) and not term and not trunc


def test_seeding_is_deterministic():
    env_a, env_b = envs.make("dmc/cartpole-swingup", seed=3), envs.make("dmc/cartpole-swingup")
    actions = np.random.default_rng(0).uniform(-1, 1, (20, 1)).astype(np.float32)
    obs_a, rew_a = rollout(env_a, actions, seed=7)
    obs_b, rew_b = rollout(env_b, actions, seed=7)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    obs_c, _ = rollout(env_b, actions, seed=8)
    assert not np.array_equal(obs_a[0], obs_c[0])


def test_action_repeat_sums_rewards_and_halves_episode():
    one = envs.make("dmc/cartpole-swingup", seed=0, action_repeat=1)
    two = envs.make("dmc/cartpole-swingup", seed=0)
    assert (envs.episode_length(one), envs.episode_length(two)) == (1000, 500)
    actions = np.random.default_rng(1).uniform(-1, 1, (10, 1)).astype(np.float32)
    obs1, rew1 = rollout(one, np.repeat(actions, 2, axis=0), seed=5)
    obs2, rew2 = rollout(two, actions, seed=5)
    np.testing.assert_allclose(rew2, rew1.reshape(-1, 2).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(obs2, obs1[::2])
    for env, expected in ((one, 1000), (two, 500)):
        env.reset(seed=0)
        steps, done = 0, False
        while not done:
            _, _, term, trunc, _ = env.step(np.zeros(1, np.float32))
            steps, done = steps + 1, term or trunc
        assert steps == expected and trunc and not term


def test_dmc_aliases_and_every_task_listed():
    from dm_control import suite

    assert envs.dmc.resolve("cartpole-swingup_sparse") == ("cartpole", "swingup_sparse")
    assert envs.dmc.resolve("cartpole-swingup-sparse") == ("cartpole", "swingup_sparse")
    assert envs.dmc.resolve("cup-catch") == envs.dmc.resolve("ball_in_cup-catch")
    assert envs.dmc.resolve("pointmass-easy") == ("point_mass", "easy")
    assert envs.dmc.resolve("humanoid_CMU-run") == ("humanoid_CMU", "run")
    ids = envs.list_envs()["dmc"].ids
    assert len(ids) == len(suite.ALL_TASKS)
    assert {"dmc/humanoid-run", "dmc/dog-run", "dmc/ball_in_cup-catch"} <= set(ids)
    assert envs.make("dmc/cup-catch", seed=0).observation_space.shape == (8,)


def test_gym_actions_rescaled_to_unit_box():
    env = envs.make("gym/Pendulum-v1", seed=0)  # torque in [-2, 2]
    assert env.action_space.low[0] == -1 and env.action_space.high[0] == 1
    env.reset(seed=0)
    for a, torque in ((1.0, 2.0), (-1.0, -2.0), (0.5, 1.0)):
        obs, *_ = env.step(np.array([a], np.float32))
        assert env.unwrapped.last_u == pytest.approx(torque) and obs.dtype == np.float32
    cheetah = envs.make("gym/HalfCheetah-v5", seed=0, episode_length=7)
    obs, _ = cheetah.reset(seed=0)
    assert obs.shape == (17,) and obs.dtype == np.float32 and envs.episode_length(cheetah) == 7
    assert "gym/HalfCheetah-v5" in envs.list_envs()["gym"].ids


def test_unknown_id_lists_close_matches():
    with pytest.raises(ValueError, match="dmc/walker-walk"):
        envs.make("dmc/walker-wlak")
    with pytest.raises(ValueError, match="gym/HalfCheetah-v5"):
        envs.make("gym/HalfCheeta-v5")
    with pytest.raises(ValueError, match="close matches"):
        envs.make("walker-walk")
    with pytest.raises(ValueError, match="action_repeat"):
        envs.make("dmc/walker-walk", action_repeat=0)
    with pytest.raises(ValueError, match="obs='depth'"):
        envs.make("dmc/walker-walk", obs="depth")


def test_without_dm_control_other_suites_work_and_dmc_says_how_to_install(monkeypatch):
    # As on a machine with ale-py alone: nothing outside dmc/ may import dm_control.
    monkeypatch.setitem(sys.modules, "dm_control", None)  # `import dm_control` now fails
    monkeypatch.setattr(envs, "_installed", lambda m: m != "dm_control")
    suites = envs.list_envs()
    assert not suites["dmc"].available and suites["dmc"].ids == ()
    assert envs.terminates("gym/CartPole-v1") and not envs.terminates("dmc/walker-walk")
    env = envs.make("gym/CartPole-v1", seed=0)
    assert env.action_space.n == 2
    with pytest.raises(envs.MissingDependencyError, match=r"dmc/ tasks need dm-control: pip"):
        envs.make("dmc/walker-walk")


@pytest.mark.skipif(importlib.util.find_spec("humanoid_bench") is not None,
                    reason="humanoid_bench is installed")  # fmt: skip
def test_humanoidbench_missing_package_says_how_to_install():
    with pytest.raises(envs.MissingDependencyError) as e:
        envs.make("humanoidbench/h1hand-walk-v0")
    clone = "git clone https://github.com/carlosferrazza/humanoid-bench && pip install --no-deps -e"
    assert clone in str(e.value) and "not installed" in str(e.value)
    assert "jax" in str(e.value)
    suite = envs.list_envs()["humanoidbench"]
    assert not suite.available and "humanoidbench/h1hand-walk-v0" in suite.ids


def _can_render() -> bool:
    try:
        from dm_control import suite

        suite.load("cartpole", "swingup").physics.render(8, 8)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_pixels_are_stacked_channels_first():
    if not _can_render():
        pytest.skip("no headless OpenGL here (MUJOCO_GL=egl/osmesa unavailable)")
    env = envs.make("dmc/cartpole-swingup", seed=0, obs="rgb", frame_stack=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (9, 64, 64) == env.observation_space.shape and obs.dtype == np.uint8
    np.testing.assert_array_equal(obs[:3], obs[6:])  # the first frame fills the stack
    nxt = obs
    for _ in range(5):
        nxt, *_ = env.step(np.ones(1, np.float32))
    np.testing.assert_array_equal(nxt.shape, obs.shape)
    assert not np.array_equal(nxt[6:], obs[6:])  # the cart moved
