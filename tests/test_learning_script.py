"""benchmarks/learning.py for every agent, and the published DreamerV3 curves it reports against:
the curves load with the published numbers, the report draws each agent's own curve, overrides
reach the agent's config (a bad one is a usage error), and the first evaluation at a target
return is found in a metrics table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from flatworld.agents.dreamer import TwisterConfig
from flatworld.experiments import report
from flatworld.experiments.report import atari_random, published_curve
from flatworld.runs.logger import read_metrics


@pytest.fixture(scope="module")
def learning(load_benchmark):
    return load_benchmark("learning")


def test_published_dreamerv3_curve_is_the_shipped_one():
    steps, mean, lo, hi = published_curve("dmc/cartpole-swingup", "dreamer")
    assert steps[0] == 0 and steps[1] == 100_000 and steps[-1] == 3_900_000
    assert np.all(np.diff(steps) > 0) and np.all((lo >= 0) & (hi <= 1000))
    # results/dreamerv3/cartpole-swingup.csv at 100k env steps: 637.2, 674.4, 718.6
    assert mean[1] == pytest.approx((637.2 + 674.4 + 718.6) / 3) and (lo[1], hi[1]) == (
        637.2,
        718.6,
    )
    assert mean[0] == pytest.approx((105.0 + 151.9) / 2)  # step 0 has two seeds
    np.testing.assert_array_equal(published_curve("dmc/cartpole-swingup", "twister")[1], mean)
    tdmpc2 = published_curve("dmc/cartpole-swingup")  # the default: TD-MPC2's
    assert tdmpc2[1][1] == pytest.approx((789.8 + 867.9 + 860.5) / 3)
    assert published_curve("gym/CartPole-v1", "dreamer") is None
    assert published_curve("dmc/cartpole-swingup", "unknown-agent") is None


def test_published_dreamerv3_atari_curve_is_binned_per_seed():
    # dreamerv3-atari100k-scores.json.gz, atari_pong, frames <= 10k: seed 0 -21, -21, -21;
    # seed 1 -21, -19; seed 2 -21, -20; seed 3 -18, -19; seed 4 -20, -21
    steps, mean, lo, hi = published_curve("atari/Pong", "dreamer")
    assert steps[0] == 10_000 and steps[-1] == 400_000 and np.all(np.diff(steps) == 10_000)
    assert mean[0] == pytest.approx((-21 - 20 - 20.5 - 18.5 - 20.5) / 5)
    assert (lo[0], hi[0]) == (-21, -18.5)
    assert np.all((lo <= mean) & (mean <= hi))
    # names as flatworld.envs spells them; TWISTER is drawn beside DreamerV3's curve
    np.testing.assert_array_equal(published_curve("atari/up_n_down", "twister")[1],
                                  published_curve("atari/UpNDown", "dreamer")[1])  # fmt: skip
    assert published_curve("atari/Pong", "tdmpc2") is None
    assert published_curve("atari/Tetris", "dreamer") is None  # not an Atari-100k game


def _run(folder: Path, agent: str, env: str, returns: list[float]) -> Path:
    folder.mkdir(parents=True)
    adam = {"wm_optim": {"base": "adam", "sam": None}}
    doc = {"run": {"env": env, "seed": 1}, "agent": {"name": agent, "config": adam}}
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "env_steps", "eval_return", "wall_s"])
        w.writeheader()
        for i, ret in enumerate(returns, 1):
            w.writerow({"step": 25_000 * i, "env_steps": 50_000 * i, "eval_return": ret,
                        "wall_s": 60.0 * i})  # fmt: skip
    return folder


def test_report_draws_the_published_curve_of_each_tasks_agent(tmp_path):
    runs = [_run(tmp_path / "td", "tdmpc2", "dmc/cartpole-swingup", [300, 600, 800]),
            _run(tmp_path / "dr", "dreamer", "dmc/walker-walk", [200, 400, 500])]  # fmt: skip
    text = report(runs, tmp_path / "report", reps=50).read_text()
    assert "Dashed: published TD-MPC2" in text and "Dotted: published DreamerV3" in text
    td = next(line for line in text.splitlines() if line.startswith("Dashed"))
    dr = next(line for line in text.splitlines() if line.startswith("Dotted"))
    assert "on dmc/cartpole-swingup:" in td and "data/tdmpc2" in td
    assert "on dmc/walker-walk:" in dr and "data/dreamerv3" in dr
    assert (tmp_path / "report" / "curves.png").exists()


def test_report_draws_dreamerv3_atari_curves_beside_twister_runs(tmp_path):
    runs = [_run(tmp_path / "tw", "twister", "atari/Pong", [-21, -20, -19]),
            _run(tmp_path / "td", "tdmpc2", "dmc/cartpole-swingup", [300, 600, 800])]  # fmt: skip
    text = report(runs, tmp_path / "report", reps=50).read_text()
    dotted = [line for line in text.splitlines() if line.startswith("Dotted")]
    assert len(dotted) == 1 and "on atari/Pong:" in dotted[0]
    assert "data/dreamerv3-atari100k" in dotted[0] and "bins of 10k" in dotted[0]
    dashed = next(line for line in text.splitlines() if line.startswith("Dashed"))
    assert "on dmc/cartpole-swingup:" in dashed and "every 100k" in dashed
    randoms = [line for line in text.splitlines() if line.startswith("Dash-dotted")]
    assert len(randoms) == 1 and "on atari/Pong:" in randoms[0]


def test_random_policy_score_of_an_atari_task():
    pytest.importorskip("ale_py")
    # flatworld/envs/data/atari100k.csv: Pong,-20.7,14.6,...; Breakout,1.7,30.5,...
    assert atari_random("atari/Pong") == pytest.approx(-20.7)
    assert atari_random("atari/breakout") == pytest.approx(1.7)
    assert atari_random("dmc/cartpole-swingup") is None
    assert atari_random("atari/Tetris") is None  # not in the table


def test_first_evaluation_at_the_target(tmp_path, learning):
    path = tmp_path / "metrics.csv"
    rows = [  # (step, env_steps, eval_return, wall_s); "" where no evaluation was logged
        (1000, 2000, "", 10.0), (2000, 4000, 150.0, 25.5), (3000, 6000, "", 30.0),
        (4000, 8000, "nan", 41.0), (5000, 10000, 400.0, 52.25), (6000, 12000, 450.0, 60.0),
    ]  # fmt: skip
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "env_steps", "eval_return", "wall_s"])
        w.writerows(rows)
    table = read_metrics(path)
    assert learning.at_target(table, 400) == {"step": 5000, "env_steps": 10000, "wall_s": 52.25}
    assert learning.at_target(table, 100) == {"step": 2000, "env_steps": 4000, "wall_s": 25.5}
    assert learning.at_target(table, 451) is None


def test_overrides_reach_the_agent_config_and_bad_ones_are_usage_errors(
    learning, monkeypatch, capsys, tmp_path
):
    seen = {}

    def fake_sweep(out, agent, agent_cfg, run_cfg, seeds, optimizers, **kw):
        seen.update(agent=agent, cfg=agent_cfg, run=run_cfg, threads=kw["threads"])
        raise KeyboardInterrupt  # stop before anything trains

    monkeypatch.setattr(learning, "sweep", fake_sweep)
    threads = learning.torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            learning.main(["--agent", "twister", "--model-size", "xs", "--train-ratio", "512",
                           "--tssm-width", "256", "--tssm-dropout", "0", "--seq-len", "32",
                           "--wm-lr", "3e-4", "--precision", "bf16",
                           "--seed-steps", "100", "--env",
                           "gym/CartPole-v1", "--out", str(tmp_path)])  # fmt: skip
    finally:
        learning.torch.set_num_threads(threads)  # main() sets its own in this process
    cfg = seen["cfg"]
    assert seen["agent"] == "twister" and isinstance(cfg, TwisterConfig)
    assert (cfg.model_size, cfg.train_ratio, cfg.tssm_width, cfg.seq_len) == ("XS", 512, 256, 32)
    assert cfg.tssm_dropout == 0.0 and cfg.wm_optim.lr == 3e-4 and cfg.precision == "bf16"
    assert cfg.wm_optim.eps == TwisterConfig().wm_optim.eps  # the rest of the spec unchanged
    assert cfg.sequence_model == "transformer" and seen["run"].seed_steps == 100
    assert seen["threads"] == 2
    for argv, message in (
        (["--agent", "dreamer", "--model-size", "5"], "model_size='5'; accepted: one of ('XS'"),
        (["--model-size", "XS"], "model_size='XS'; accepted: one of [1, 5, 19, 48, 317]"),
        (["--train-ratio", "512"], "--train-ratio applies to --agent dreamer or twister"),
        (["--agent", "dreamer", "--tssm-width", "256"], "--tssm-width applies to --agent twister"),
        (["--seq-len", "32"], "--seq-len applies to --agent dreamer or twister"),
        (["--agent", "dreamer", "--tssm-dropout", "0"],
         "--tssm-dropout applies to --agent twister"),
        (["--wm-lr", "3e-4"], "--wm-lr applies to --agent dreamer or twister"),
        (["--agent", "dreamer", "--wm-lr", "0"], "--wm-lr 0.0; accepted: a learning rate > 0"),
        (["--agent", "twister", "--tssm-dropout", "1"],
         "tssm_dropout=1.0; accepted: 0 <= dropout < 1"),
        (["--agent", "dreamer", "--seq-len", "1"], "seq_len=1; accepted: an int >= 2"),
        (["--precision", "bf16"], "--precision applies to --agent dreamer or twister"),
        (["--agent", "dreamer", "--precision", "fp16"],
         "precision='fp16'; accepted: one of ('fp32', 'bf16')"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            learning.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
