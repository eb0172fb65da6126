"""DreamerV3 end to end through flatworld.runs on real envs (tiny models): Atari pixels with
discrete actions, Gymnasium vectors with discrete actions, DMC with continuous actions."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from flatworld import cli, optim
from flatworld.agents import AGENTS
from flatworld.agents.dreamer import DreamerConfig
from flatworld.runs import RunConfig, resume, train
from flatworld.runs.logger import TIMING, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(sam: bool = False, **kw) -> DreamerConfig:
    spec = optim.OptimSpec(lr=1e-3, eps=1e-8, sam=optim.SamSpec(rho=0.1) if sam else None)
    base = dict(model_size="XS", deter=16, units=16, layers=1, cnn_depth=2, stoch=4, classes=4,
                batch_size=2, seq_len=8, train_ratio=8, imag_horizon=3, wm_optim=spec,
                vector_mlp="size")
    return DreamerConfig(**{**base, **kw})


def tiny_twister(sam: bool = False, **kw):
    from flatworld.agents.dreamer import TwisterConfig

    base = dict(tssm_width=16, tssm_heads=2, tssm_blocks=1, tssm_context=4, cpc_steps=3)
    dreamer = {k: v for k, v in dataclasses.asdict(tiny(sam)).items() if k != "sequence_model"}
    return TwisterConfig(**{**dreamer, "wm_optim": tiny(sam).wm_optim, **base, **kw})


def run_cfg(run_dir, env, steps=60, **kw) -> RunConfig:
    base = dict(env=env, seed=5, steps=steps, seed_steps=20, eval_every=30, eval_episodes=1,
                diag_every=30, checkpoint_every=10, log_every=10, run_dir=str(run_dir),
                tensorboard=False)  # fmt: skip
    return RunConfig(**{**base, **kw})


def numbers(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(run_dir / "metrics.csv")]


CASES = {
    "atari": dict(env="atari/Pong", env_options={"max_frames": 160}),
    "gym": dict(env="gym/CartPole-v1", env_options={"episode_length": 25}),
    "dmc": dict(env="dmc/cartpole-swingup", env_options={"episode_length": 25}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_dreamer_run_resumes_to_identical_metrics(tmp_path, case):
    kw, sam = CASES[case], case != "gym"
    train(run_cfg(tmp_path / "ref", **kw), "dreamer", tiny(sam), agents=AGENTS, progress=False)
    train(run_cfg(tmp_path / "cut", **kw), "dreamer", tiny(sam),
          agents=AGENTS, progress=False, stop_after=47)
    resume(tmp_path / "cut", agents=AGENTS, progress=False)
    ref = numbers(tmp_path / "ref")
    assert numbers(tmp_path / "cut") == ref
    assert ref[-1]["updates"] == str((60 - 20 + 1) // 2)  # train ratio 8 / (2 x 8) = 0.5
    assert any(r["wm_sharpness"] for r in ref) and any(r["value_error"] for r in ref)
    stored = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())
    assert stored["agent"]["config"]["episodic"] is (case != "dmc")


def test_train_dreamer_from_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "r"
    cli.main(["train", "dreamer", "--env", "gym/CartPole-v1", "--steps", "30", "--seed-steps",
              "20", "--model-size", "XS", "--deter", "16", "--units", "16", "--cnn-depth", "2",
              "--stoch", "4", "--classes", "4", "--batch-size", "2", "--seq-len", "8",
              "--imag-horizon", "3", "--wm-optim", "sam", "--rho", "0.1", "--eval-every", "30",
              "--diag-every", "30", "--log-every", "10", "--run-dir", str(run_dir),
              "--no-progress", "--no-tensorboard"])  # fmt: skip
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["agent"]["name"] == "dreamer"
    assert stored["agent"]["config"]["wm_optim"]["sam"]["rho"] == 0.1
    assert read_metrics(run_dir / "metrics.csv")[-1]["step"] == "30"
    with pytest.raises(SystemExit):
        cli.main(["train", "dreamer", "--model-size", "XXL"])
    assert "--model-size: invalid choice: 'XXL'" in capsys.readouterr().err


def test_eval_gives_human_normalized_atari_scores(tmp_path, capsys):
    import json

    from flatworld.envs.atari import score_table

    run_dir = tmp_path / "r"
    train(run_cfg(run_dir, **CASES["atari"], steps=30), "dreamer", tiny(),
          agents=AGENTS, progress=False)
    cli.main(["eval", str(run_dir), "--episodes", "2"])
    out = json.loads(capsys.readouterr().out)
    row = score_table()["Pong"]
    want = (out["eval_return"] - row["random"]) / (row["human"] - row["random"])
    assert out["human_normalized"] == pytest.approx(want)
    assert len(out["human_normalized_per_episode"]) == 2


@pytest.mark.parametrize("case", ["atari", "gym"])
def test_killed_twister_run_resumes_to_identical_metrics(tmp_path, case):
    kw = CASES[case]
    train(run_cfg(tmp_path / "ref", **kw), "twister", tiny_twister(sam=True),
          agents=AGENTS, progress=False)
    train(run_cfg(tmp_path / "cut", **kw), "twister", tiny_twister(sam=True),
          agents=AGENTS, progress=False,
          stop_after=47)
    resume(tmp_path / "cut", agents=AGENTS, progress=False)
    ref = numbers(tmp_path / "ref")
    assert numbers(tmp_path / "cut") == ref
    stored = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())
    assert stored["agent"]["name"] == "twister"
    assert stored["agent"]["config"]["sequence_model"] == "transformer"
    cpc = [r["train/cpc_loss"] for r in ref if r.get("train/cpc_loss")]
    assert cpc and all(float(c) > 0 for c in cpc)  # AC-CPC is trained (crops on pixels only)


def test_the_suite_and_the_agent_set_train_ratio_pixels_and_prefill(tmp_path):
    """What a run records is what it ran: DreamerV3's train ratio comes from the suite (512 on
    DMC); TWISTER runs DMC from one 64x64 frame (obs='rgb', frame_stack=1) and DreamerV3 from one
    frame too, while the run's own env_options win; TWISTER's prefill is 100 windows."""
    from flatworld.agents.dreamer import TwisterConfig

    dreamer_dir = train(run_cfg(tmp_path / "d", "dmc/cartpole-swingup", steps=2, seed_steps=2,
                                env_options={"episode_length": 25}),
                        "dreamer", tiny(train_ratio=None), agents=AGENTS)  # fmt: skip
    stored = yaml.safe_load((dreamer_dir / "config.yaml").read_text())
    assert stored["agent"]["config"]["train_ratio"] == 512
    assert stored["run"]["env_options"] == {"frame_stack": 1, "episode_length": 25}
    twister_dir = train(run_cfg(tmp_path / "t", "dmc/cartpole-swingup", steps=2, seed_steps=2,
                                env_options={"episode_length": 25}),
                        "twister", tiny_twister(), agents=AGENTS)  # fmt: skip
    stored = yaml.safe_load((twister_dir / "config.yaml").read_text())
    assert stored["run"]["env_options"] == {"obs": "rgb", "frame_stack": 1,
                                            "episode_length": 25}  # fmt: skip
    own = train(run_cfg(tmp_path / "s", "dmc/cartpole-swingup", steps=2, seed_steps=2,
                        env_options={"episode_length": 25, "obs": "state"}),
                "twister", tiny_twister(), agents=AGENTS)  # fmt: skip
    assert yaml.safe_load((own / "config.yaml").read_text())["run"]["env_options"]["obs"] == "state"
    assert AGENTS["twister"].seed_steps(TwisterConfig(), 1000) == 163
    assert AGENTS["twister"].seed_steps(TwisterConfig(seq_len=16), 1000) == 115
    assert AGENTS["dreamer"].seed_steps(DreamerConfig(), 1000) == 1024
