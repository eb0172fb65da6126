"""Episode video: every suite renders HxWx3 uint8 frames headless, and VideoRecorder writes
them as an MP4 that reads back with the episode's frame count at the frame size."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("dm_control")
import imageio.v2 as imageio  # noqa: E402

import flatworld.envs as envs  # noqa: E402
from flatworld.envs.video import VideoRecorder  # noqa: E402
from tests.test_envs import _can_render  # noqa: E402

needs_gl = pytest.mark.skipif(not _can_render(), reason="no headless OpenGL here (MUJOCO_GL=egl)")


def record_episode(env, path, seed=0) -> tuple[int, tuple[int, ...]]:
    """One episode with random actions, a frame after reset and after every step."""
    env.reset(seed=seed)
    env.action_space.seed(seed)
    frames, shape = 0, None
    with VideoRecorder(path, fps=20) as video:
        done = False
        while True:
            frame = env.render()
            shape = frame.shape
            assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
            video.add(frame)
            frames += 1
            if done:
                break
            *_, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
    return frames, shape


def read_back(path) -> np.ndarray:
    with imageio.get_reader(path) as reader:
        return np.stack([frame for frame in reader.iter_data()])


@needs_gl
def test_dmc_episode_video_has_every_frame_at_its_size(tmp_path):
    env = envs.make("dmc/cartpole-swingup", seed=0, episode_length=12)
    frames, shape = record_episode(env, tmp_path / "dmc.mp4")
    assert frames == 13 and shape == (64, 64, 3)  # the reset frame and 12 steps
    video = read_back(tmp_path / "dmc.mp4")
    assert video.shape == (13, 64, 64, 3)
    env.reset(seed=0)  # the same start: the first frame is what the video opens with
    assert np.abs(video[0].astype(int) - env.render()).mean() < 8
    env.close()


@needs_gl
def test_gym_mujoco_episode_video_keeps_a_non_square_size(tmp_path):
    env = envs.make("gym/HalfCheetah-v5", seed=0, episode_length=9, width=96, height=80)
    frames, shape = record_episode(env, tmp_path / "cheetah.mp4")
    assert frames == 10 and shape == (80, 96, 3)
    video = read_back(tmp_path / "cheetah.mp4")
    assert video.shape == (10, 80, 96, 3)
    assert video.std() > 5  # a rendered scene, not a blank frame
    env.close()


@pytest.mark.skipif(importlib.util.find_spec("ale_py") is None, reason="ale-py not installed")
def test_atari_renders_its_raw_frames_into_a_video(tmp_path):
    env = envs.make("atari/Pong", seed=0)
    env.reset(seed=0)
    with VideoRecorder(tmp_path / "pong.mp4", fps=15) as video:
        for _ in range(6):
            video.add(env.render())
            env.step(env.action_space.sample())
    assert read_back(tmp_path / "pong.mp4").shape == (6, 210, 160, 3)
    env.close()


def test_odd_sizes_are_kept_and_frames_come_back_close(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (33, 45, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(base[::8, ::8], 8, 0), 8, 1)[:33, :45]
    with VideoRecorder(tmp_path / "odd.mp4", fps=10) as video:
        for i in range(4):
            video.add(np.roll(smooth, i, axis=1))
    back = read_back(tmp_path / "odd.mp4")
    assert back.shape == (4, 33, 45, 3)
    assert np.abs(back[2].astype(int) - np.roll(smooth, 2, axis=1)).mean() < 12


def test_bad_frames_and_paths_are_refused_with_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"fps=0: expected an int >= 1"):
        VideoRecorder(tmp_path / "a.mp4", fps=0)
    with pytest.raises(ValueError, match=r"'.*a\.gif': expected a file name ending in \.mp4"):
        VideoRecorder(tmp_path / "a.gif")
    video = VideoRecorder(tmp_path / "a.mp4")
    with pytest.raises(ValueError, match=r"\(8, 8, 3\) and dtype float32: expected an HxWx3"):
        video.add(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(8, 8\) and dtype uint8"):
        video.add(np.zeros((8, 8), np.uint8))
    video.add(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(8, 10, 3\): this video's frames are \(8, 8, 3\)"):
        video.add(np.zeros((8, 10, 3), np.uint8))
    assert video.close() == tmp_path / "a.mp4"
    with pytest.raises(ValueError, match="closed"):
        video.add(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames were added"):
        VideoRecorder(tmp_path / "empty.mp4").close()
    assert not (tmp_path / "empty.mp4").exists()


def test_a_failed_episode_leaves_no_file_and_no_temporary(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="env crashed"):
        with VideoRecorder(tmp_path / "out" / "ep.mp4") as video:
            video.add(np.zeros((16, 16, 3), np.uint8))
            raise RuntimeError("env crashed")
    assert list((tmp_path / "out").iterdir()) == []


def test_the_file_appears_only_when_closed(tmp_path):
    video = VideoRecorder(tmp_path / "ep.mp4")
    for _ in range(3):
        video.add(np.full((16, 16, 3), 128, np.uint8))
    assert not (tmp_path / "ep.mp4").exists()  # still being written elsewhere
    video.close()
    assert [p.name for p in tmp_path.iterdir()] == ["ep.mp4"]
    assert read_back(tmp_path / "ep.mp4").shape == (3, 16, 16, 3)


def test_an_env_that_cannot_render_is_refused_before_a_run_starts(tmp_path, capsys):
    """A missing renderer (gymnasium's classic control without pygame) or a renderer that does
    not start: one line, before the run folder exists and before evaluation plays."""
    from gymnasium.error import DependencyNotInstalled

    from flatworld.cli import main
    from flatworld.envs.gym_suite import MissingDependencyError
    from flatworld.envs.video import check_renders

    class Unrenderable:
        def __init__(self, err):
            self.err, self.resets = err, []

        def reset(self, seed=None):
            self.resets.append(seed)

        def render(self):
            raise self.err

    env = Unrenderable(DependencyNotInstalled('pygame is not installed, run `pip install '
                                              '"gymnasium[classic-control]"`'))  # fmt: skip
    with pytest.raises(MissingDependencyError, match=r"gym/X cannot draw video frames here: "
                                                     r"pygame is not installed"):  # fmt: skip
        check_renders(env, "gym/X")
    assert env.resets == [0]
    with pytest.raises(ValueError, match=r"\(RuntimeError: no display\); MuJoCo tasks render "
                                         "headless with MUJOCO_GL=egl"):  # fmt: skip
        check_renders(Unrenderable(RuntimeError("no display")), "dmc/y")
    if importlib.util.find_spec("pygame") is not None:
        return  # CartPole renders here: the refusal below cannot be seen
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "dreamer", "--env", "gym/CartPole-v1", "--steps", "200", "--model-size",
              "XS", "--eval-every", "100", "--log-every", "100", "--video-every", "100",
              "--run-dir", str(run_dir), "--no-progress", "--seeding-only"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: flatworld train") and len(err) == 2, err  # argparse's form
    assert "gym/CartPole-v1 cannot draw video frames here" in err[1] and "pygame" in err[1]
    assert not run_dir.exists()
