"""The command line end to end on a tiny run (dmc/cartpole-swingup, a tiny DreamerV3; gym's
CartPole needs pygame to render, which is not a dependency): --config,
--no-progress lines, training and `flatworld eval` videos, the eval flags, the suite's
evaluation protocol and the optional W&B logger (a stand-in module, and the real package in
offline mode where it is installed)."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import json
import sys
import types

import pytest
import yaml

from flatworld import cli, envs, optim
from flatworld.agents import AGENTS
from flatworld.agents.tdmpc2 import TDMPC2Config
from flatworld.runs import RunConfig, evaluation, folder
from flatworld.runs import loop as runs_loop
from flatworld.runs.logger import WANDB_ID_FILE, MetricsLog, read_metrics

pytest.importorskip("imageio_ffmpeg")
import imageio.v2 as imageio  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model_size="XS", deter=16, units=16, layers=1, cnn_depth=2, stoch=4, classes=4,
            batch_size=2, seq_len=8, train_ratio=8, imag_horizon=3, vector_mlp="size")
RUN = dict(env="dmc/cartpole-swingup", env_options={"episode_length": 25}, seed=5, steps=40,
           seed_steps=20, eval_every=20, eval_episodes=1, diag_every=20, log_every=20,
           checkpoint_every=20, tensorboard=False, video_every=20, wandb_project="flatworld-t")


class StandInWandb:
    """What flatworld calls of wandb: init(...) -> run with log(dict, step=) and finish()."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        self.module = types.ModuleType("wandb")
        self.module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.module.init = self.init

    def init(self, **kw):
        self.inits.append(kw)
        run = types.SimpleNamespace(log=lambda d, step: self.logged.append((step, dict(d))))
        run.finish = lambda: setattr(self, "finished", self.finished + 1)
        return run


def frames(path):
    with imageio.get_reader(path) as reader:
        return [f.shape for f in reader]


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """One tiny run through `flatworld train --config`, recording the episode counts of its
    evaluations and what it sent to W&B."""
    tmp = tmp_path_factory.mktemp("cli")
    wandb, counts = StandInWandb(), []
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump({"run": RUN, "agent": {"name": "dreamer",
                                                            "config": TINY}}))
    original = runs_loop.run_episodes

    def counting(env, agent, seeds, **kw):
        counts.append(len(seeds))
        return original(env, agent, seeds, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", wandb.module)
        mp.setattr("flatworld.runs.loop.run_episodes", counting)
        out = tmp / "stderr.txt"
        mp.setattr(sys, "stderr", out.open("w"))
        cli.main(["train", "--config", str(config), "--run-dir", str(tmp / "run"),
                  "--no-progress"])
        sys.stderr.close()
    return dict(dir=tmp / "run", wandb=wandb, counts=counts, stderr=out.read_text())


def test_no_progress_prints_a_line_per_log_step(cartpole_run):
    lines = [line for line in cartpole_run["stderr"].splitlines() if line.startswith("step ")]
    assert [line.split(",")[0] for line in lines] == ["step 20", "step 40"]
    assert "eval return" in lines[-1] and "updates" in lines[-1]


def test_the_last_evaluation_follows_the_suites_protocol(cartpole_run):
    assert cartpole_run["counts"] == [1, 10]  # eval_episodes, then DMC's 10 at the end
    assert envs.eval_episodes("atari/Pong") == 100 and envs.eval_episodes("dmc/walker-walk") == 10


def test_training_writes_evaluation_videos(cartpole_run):
    rows = {int(r["step"]): r for r in read_metrics(cartpole_run["dir"] / "metrics.csv")}
    shapes = frames(cartpole_run["dir"] / "videos" / "step-20.mp4")
    # One evaluation episode at step 20: a frame after the reset and after every step.
    assert len(shapes) == float(rows[20]["eval_length"]) + 1
    assert set(shapes) == {(64, 64, 3)}  # DMC's frame size (image_size)
    assert frames(cartpole_run["dir"] / "videos" / "step-40.mp4")


def test_wandb_gets_every_row_and_the_config(cartpole_run, monkeypatch):
    wandb, run_dir = cartpole_run["wandb"], cartpole_run["dir"]
    rows = read_metrics(run_dir / "metrics.csv")
    assert [step for step, _ in wandb.logged] == [int(r["step"]) for r in rows]
    assert wandb.logged[-1][1]["eval_return"] == float(rows[-1]["eval_return"])
    (init,) = wandb.inits
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert init["project"] == "flatworld-t" and init["id"] == run_id and init["resume"] == "allow"
    assert init["config"]["run"]["env"] == "dmc/cartpole-swingup" and wandb.finished == 1
    # A resumed run goes on in the same W&B run.
    monkeypatch.setitem(sys.modules, "wandb", wandb.module)
    MetricsLog(run_dir, tensorboard=False, resume_step=40, wandb_project="flatworld-t").close()
    assert wandb.inits[-1]["id"] == run_id


def test_wandb_offline_with_the_real_package(tmp_path, monkeypatch):
    """Where wandb is installed (`pip install 'flatworld[wandb]'`; CI does not install it):
    WANDB_MODE=offline writes the run, its config and every logged value under the run
    folder, and a resumed folder logs to the same W&B run id."""
    import re

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"run": {"env": "dmc/cartpole-x"}}))
    for steps, resume_step in (((10, 20), None), ((30,), 20)):
        log = MetricsLog(run_dir, tensorboard=False, resume_step=resume_step,
                         wandb_project="flatworld-t")  # fmt: skip
        for step in steps:
            log.write({"step": step, "eval_return": float(step) + 0.5})
        log.close()
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline and all(d.name.endswith(f"-{run_id}") for d in offline)
    data = b"".join((d / f"run-{run_id}.wandb").read_bytes() for d in offline)
    assert b"dmc/cartpole-x" in data  # the config
    for value in (b"10.5", b"20.5", b"30.5"):  # each row's value, as W&B's history holds it
        assert re.search(rb"eval_return.{1,4}" + re.escape(value), data), value


def test_eval_flags_video_and_progress(cartpole_run, tmp_path, capsys):
    run_dir, video = str(cartpole_run["dir"]), tmp_path / "eval.mp4"
    cli.main(["eval", run_dir, "--episodes", "1", "--seed", "3", "--policy", "mode",
              "--device", "cpu", "--video", str(video)])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "evaluating" in captured.err  # the progress bar
    assert (result["episodes"], result["seed"], result["device"]) == (1, 3, "cpu")
    assert len(frames(video)) == result["eval_length"] + 1
    cli.main(["eval", run_dir, "--no-progress"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["episodes"] == 10 and "evaluating" not in captured.err


def test_policy_is_refused_for_an_agent_without_one():
    with pytest.raises(ValueError, match="agent 'tdmpc2' has no evaluation policy to choose"):
        evaluation._with_policy(TDMPC2Config(), "tdmpc2", "sample", AGENTS)


def test_default_run_folders_tell_agent_and_optimizer_apart():
    cfg = RunConfig(env="gym/CartPole-v1", seed=5)
    adam = AGENTS["dreamer"].config_cls()
    sam = dataclasses.replace(adam, wm_optim=dataclasses.replace(adam.wm_optim,
                                                                 sam=optim.SamSpec()))
    assert str(folder.run_dir_of(cfg, "dreamer", adam)) == "runs/dreamer-adam-gym-CartPole-v1-s5"
    assert str(folder.run_dir_of(cfg, "dreamer", sam)) == "runs/dreamer-sam-gym-CartPole-v1-s5"


def test_atari100k_presets_score_by_the_suites_protocol(tmp_path):
    from flatworld import experiments as ex

    counts = {}
    for name in ("paper-atari100k", "paper-atari100k-smoke"):
        runs = ex.expand(ex.load_spec(ex.preset_path(name), check=False), tmp_path, check=False)
        counts[name] = {r.run_cfg.final_eval_episodes or envs.eval_episodes(r.task)
                        for r in runs}  # what the loop's last evaluation plays
    assert counts == {"paper-atari100k": {100}, "paper-atari100k-smoke": {1}}
