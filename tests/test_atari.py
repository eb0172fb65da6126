"""atari/<Game>: the Atari-100k protocol on real ROMs (ale-py ships them in its wheel)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

ale_py = pytest.importorskip("ale_py")
import flatworld.envs as envs  # noqa: E402
from flatworld import cli  # noqa: E402
from flatworld.envs import atari  # noqa: E402


def play_until(env, stop, seed=0, max_steps=5000):
    """Random actions (seeded) until stop(reward, terminated, truncated, info) or max_steps."""
    rng = np.random.default_rng(seed)
    for step in range(1, max_steps + 1):
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        if stop(reward, terminated, truncated, info):
            return step, obs, reward, terminated, truncated, info
    raise AssertionError(f"no stop within {max_steps} steps")


def test_protocol_defaults_spaces_and_frames_per_step():
    env = envs.make("atari/Pong", seed=0)
    assert env.episode_length == envs.episode_length(env) == 27_000
    assert (env.action_repeat, env.noop_max, env.max_frames) == (4, 30, 108_000)
    assert env.ale.getFloat("repeat_action_probability") == 0.0
    assert env.action_space.n == 6  # Pong's minimal action set
    assert envs.action_kind(env) == "discrete" and envs.terminates("atari/Pong")
    obs, info = env.reset(seed=1)
    assert obs.shape == (3, 64, 64) == env.observation_space.shape and obs.dtype == np.uint8
    assert info["frame"] == env.noops == env.ale.getEpisodeFrameNumber()
    for action in range(env.action_space.n):
        before = (env.ale.getFrameNumber(), env.ale.getEpisodeFrameNumber())
        obs, reward, terminated, truncated, info = env.step(action)
        after = (env.ale.getFrameNumber(), env.ale.getEpisodeFrameNumber())
        assert (after[0] - before[0], after[1] - before[1]) == (4, 4) and info["frame"] == after[1]
        assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8
        assert isinstance(reward, float) and not terminated and not truncated
    one = envs.make("atari/Pong", seed=0, action_repeat=1, noop_max=0)
    frame = one.ale.getFrameNumber()
    one.step(0)
    assert one.ale.getFrameNumber() - frame == 1 and one.episode_length == 108_000
    with pytest.raises(ValueError, match=r"action=6"):
        env.step(6)
    env.close()


def test_noop_starts_seeded():
    env = envs.make("atari/Pong", seed=0)
    starts = {}
    for seed in range(8):
        obs, info = env.reset(seed=seed)
        assert 0 <= env.noops <= 30 and info["frame"] == env.noops
        starts[seed] = (env.noops, obs)
    assert len({n for n, _ in starts.values()}) > 1  # different seeds, different no-op counts
    # The same seed gives the same start, and the same episode, whatever came before.
    other = envs.make("atari/Pong", seed=5)
    for e in (env, other):
        e.step(2)
    actions = np.random.default_rng(0).integers(6, size=30)
    runs = []
    for e in (env, other, env):
        obs, _ = e.reset(seed=3)
        assert e.noops == starts[3][0]
        np.testing.assert_array_equal(obs, starts[3][1])
        runs.append(np.stack([obs] + [e.step(int(a))[0] for a in actions]))
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    # noop_max=0: the game starts at frame 0.
    assert envs.make("atari/Pong", seed=3, noop_max=0).reset(seed=3)[1]["frame"] == 0


def test_observation_is_max_of_last_two_raw_frames():
    """A second, raw ALE replays the same no-ops and actions frame by frame."""
    env = envs.make("atari/Breakout", seed=0)
    obs, _ = env.reset(seed=1)
    assert env.noops > 0
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", 123)  # sticky actions off: emulation does not depend on it
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(ale_py.roms.get_rom_path("breakout"))
    ale.reset_game()
    frames = [ale.getScreenRGB()]
    for _ in range(env.noops):
        ale.act(ale_py.Action.NOOP)
        frames.append(ale.getScreenRGB())
    expected = atari.resize_area(np.maximum(frames[-1], frames[-2]), 64).transpose(2, 0, 1)
    np.testing.assert_array_equal(obs, expected)
    minimal = ale.getMinimalActionSet()
    pooled_differs = 0
    for action in np.random.default_rng(1).integers(len(minimal), size=40):
        obs, *_ = env.step(int(action))
        for _ in range(4):
            ale.act(minimal[action])
            frames.append(ale.getScreenRGB())
        pooled = np.maximum(frames[-1], frames[-2])
        np.testing.assert_array_equal(obs, atari.resize_area(pooled, 64).transpose(2, 0, 1))
        np.testing.assert_array_equal(env.render(), frames[-1])
        pooled_differs += not np.array_equal(pooled, frames[-1])
    assert pooled_differs > 0  # the pool is not just the last frame


def test_frame_cap_truncates():
    env = envs.make("atari/Pong", seed=0, noop_max=0, max_frames=101)
    assert env.episode_length == 26
    env.reset(seed=0)
    steps, *_, terminated, truncated, info = play_until(env, lambda r, te, tr, i: te or tr)
    assert truncated and not terminated
    assert info["frame"] == 101 and steps == 26 == envs.episode_length(env)
    # No-op frames count toward the cap, as with ALE's max_num_frames_per_episode.
    env = envs.make("atari/Pong", seed=1, max_frames=100)
    env.reset(seed=1)
    assert env.noops > 0
    steps, *_, terminated, truncated, info = play_until(env, lambda r, te, tr, i: te or tr)
    assert truncated and not terminated and info["frame"] == 100
    assert steps == -(-(100 - env.noops) // 4)


def test_life_loss_is_not_terminal_and_game_over_is():
    env = envs.make("atari/Breakout", seed=0)
    _, info = env.reset(seed=0)
    lives = info["lives"]
    assert lives == 5
    _, _, _, terminated, truncated, info = play_until(
        env, lambda r, te, tr, i: te or tr or i["lives"] < lives)
    assert info["lives"] == lives - 1 and not terminated and not truncated
    assert not env.step(1)[2]  # and the episode goes on
    *_, terminated, truncated, info = play_until(env, lambda r, te, tr, i: te or tr)
    assert terminated and not truncated and info["lives"] == 0


def test_rewards_are_not_clipped():
    # Alien scores 10 per egg: rewards come as the game's score changes, never clipped to 1.
    env = envs.make("atari/Alien", seed=0)
    *_, reward, terminated, _, _ = play_until(env, lambda r, te, tr, i: r != 0 or te,
                                              max_steps=500)
    assert reward >= 10 and reward % 10 == 0 and not terminated


def test_unknown_game_and_bad_options():
    with pytest.raises(ValueError, match=r"atari/Pong"):
        envs.make("atari/Pongg")
    with pytest.raises(ValueError, match=r"atari/Breakout"):
        envs.make("atari/Breakuot")
    assert envs.make("atari/ms_pacman").game == "MsPacman"
    for opts, pattern in (({"action_repeat": 0}, r"action_repeat=0.*int >= 1"),
                          ({"noop_max": -1}, r"noop_max=-1.*>= 0"),
                          ({"max_frames": 0}, r"max_frames=0"),
                          ({"image_size": 4}, r"image_size=4.*>= 8"),
                          ({"sticky": 1.5}, r"sticky=1.5.*\[0, 1\]"),
                          ({"frameskip": 4}, r"frameskip.*accepted")):
        with pytest.raises(ValueError, match=pattern):
            envs.make("atari/Pong", **opts)


def test_game_lists_and_sets(capsys):
    assert len(atari.ATARI100K) == len(set(atari.ATARI100K)) == 26
    ids = envs.list_envs()["atari"].ids
    assert {f"atari/{g}" for g in atari.ATARI100K} <= set(ids)
    # Multi-player-only ROMs are left out: loading one makes ALE exit the process.
    assert "atari/Combat" not in ids and "atari/Pong" in ids and len(ids) > 26
    assert envs.ENV_SETS["atari100k"] == tuple(f"atari/{g}" for g in atari.ATARI100K)
    assert len(envs.ENV_SETS["humanoidbench-main"]) == 14
    cli.main(["envs", "--set", "atari100k"])
    printed = capsys.readouterr().out.split()
    assert printed == list(envs.ENV_SETS["atari100k"]) and len(printed) == 26
    with pytest.raises(SystemExit) as exc:
        cli.main(["envs", "--set", "atari57"])
    assert exc.value.code == 2 and "atari100k" in capsys.readouterr().err


def test_human_normalized_table():
    table = atari.score_table()
    assert set(table) == set(atari.ATARI100K)
    assert table["Pong"] == {"random": -20.7, "human": 14.6, "dreamerv3_v1": 18.0}
    for game, row in table.items():
        assert atari.human_normalized(game, row["human"]) == pytest.approx(1.0)
        assert atari.human_normalized(f"atari/{game}", row["random"]) == pytest.approx(0.0)
        assert atari.random_score(f"atari/{game.lower()}") == row["random"]
    assert atari.human_normalized("Breakout", 1.7 + 2 * 28.8) == pytest.approx(2.0)
    hns = [atari.human_normalized(g, r["dreamerv3_v1"]) for g, r in table.items()]
    assert np.mean(hns) == pytest.approx(1.124, abs=5e-4)  # the published mean, recomputed
    with pytest.raises(ValueError, match="Pong"):
        atari.human_normalized("Pongg", 0.0)
    with pytest.raises(ValueError, match="Pong"):
        atari.random_score("Pongg")


def test_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any API warning fails the test
        check_env(envs.make("atari/Pong", seed=0), skip_render_check=True)
