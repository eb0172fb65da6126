"""`flatworld report` and the result store: statistics equal rliable's (and a hand computation
where one is simple), figures are drawn, the table exports to Parquet."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml
from rliable import library as rly
from rliable import metrics

from flatworld.cli import main
from flatworld.experiments import expand, load, load_spec, report
from flatworld.experiments.report import (
    aggregate_estimates,
    finals,
    improvement,
    score_matrices,
)

TASKS = ["dmc/cartpole-swingup", "dmc/walker-walk"]
SPEC = {"name": "synthetic", "agent": "tdmpc2", "tasks": TASKS, "seeds": 5, "steps": 15000,
        "overrides": {"eval_every": 5000, "log_every": 5000, "diag_every": 5000},
        "grid": {"wm_optim": ["adam", "sam"], "rho": [0.05]}}  # fmt: skip
FIELDS = ["step", "env_steps", "eval_return", "wm_sharpness", "value_error", "model_error",
          "sps", "wall_s"]  # fmt: skip


def final_return(task: int, sam: bool, seed: int) -> float:
    return 300.0 + 200 * task + (60.0 if sam else 0.0) + 37.0 * ((seed * 7) % 5)


def write_run(folder, env, seed, sam, final, lr=3e-4):
    folder.mkdir(parents=True)
    spec = {"base": "adam", "lr": lr, "sam": {"rho": 0.05, "adaptive": False} if sam else None}
    doc = {"run": {"env": env, "seed": seed},
           "agent": {"name": "tdmpc2", "config": {"wm_optim": spec}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for i, frac in enumerate((0.2, 0.6, 1.0)):
            w.writerow({"step": 5000 * (i + 1), "env_steps": 10000 * (i + 1),
                        "eval_return": final * frac,
                        "wm_sharpness": (0.02 if sam else 0.1) / (i + 1),
                        "value_error": (20 if sam else 40) - seed, "model_error": 1e-3,
                        "sps": 3.0, "wall_s": 100.0 * (i + 1)})  # fmt: skip
    return folder


@pytest.fixture
def sweep(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    for run in expand(load_spec(SPEC), out):
        sam = run.point["wm_optim"] == "sam"
        write_run(out / run.run_id, run.task, run.seed, sam,
                  final_return(TASKS.index(run.task), sam, run.seed))
    return out


def test_loose_runs_that_differ_beyond_the_seed_are_not_pooled(tmp_path):
    task = "dmc/cartpole-swingup"
    runs = [write_run(tmp_path / f"r{s}", task, s, False, 500.0) for s in (1, 2)]
    runs.append(write_run(tmp_path / "r3", task, 1, False, 100.0, lr=1e-4))
    runs.append(write_run(tmp_path / "r4", task, 1, True, 300.0))
    labels = load(None, runs).groupby("run")["label"].first()
    assert labels[str(runs[0])] == labels[str(runs[1])] == "adam, wm_optim.lr=0.0003"
    assert labels[str(runs[2])] == "adam, wm_optim.lr=0.0001"
    assert labels[str(runs[3])] == "sam, rho=0.05, wm_optim.lr=0.0003"
    # Seeds alone do not change a label.
    same = load(None, runs[:2]).groupby("run")["label"].first()
    assert set(same) == {"adam"}


def test_store_has_a_row_per_run_and_evaluation(sweep):
    frame = load(sweep)
    assert len(frame) == 2 * 2 * 5 * 3
    for col in ("run", "task", "seed", "label", "wm_optim", "rho", "env_steps", "return",
                "sharpness", "value_error", "model_error", "wall_time"):
        assert col in frame.columns
    row = frame[(frame["run"] == "dmc-walker-walk/sam,rho=0.05-s3") & (frame["step"] == 15000)]
    assert row["return"].item() == final_return(1, True, 3)
    assert row["env_steps"].item() == 30000 and row["wall_time"].item() == 300.0
    assert row["rho"].item() == 0.05 and frame[frame["wm_optim"] == "adam"]["rho"].isna().all()


def test_aggregates_equal_rliable_and_a_hand_computation():
    rng = np.random.default_rng(3)
    table = {"a": rng.normal(0.5, 0.2, (5, 3)), "b": rng.normal(0.7, 0.2, (5, 3))}
    points, cis = aggregate_estimates(table, reps=500, seed=7)

    def func(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x),
                         metrics.aggregate_median(x)])

    for name in ("a", "b"):
        np.random.seed(7)  # rliable resamples from numpy's global stream
        p, c = rly.get_interval_estimates({name: table[name]}, func, reps=500)
        np.testing.assert_array_equal(points[name], p[name])
        np.testing.assert_array_equal(cis[name], c[name])
        assert c[name].shape == (2, 3) and (c[name][0] <= p[name]).all()
    # by hand: IQM drops the lowest and highest quarter of the 8 scores
    scores = np.array([1.0, 2, 3, 4, 100, 200, 300, 400]).reshape(8, 1)
    p, c = aggregate_estimates({"x": scores}, reps=200)
    assert p["x"][0] == pytest.approx((3 + 4 + 100 + 200) / 4)
    assert p["x"][1] == pytest.approx(scores.mean())
    # rliable's median is the median over tasks of each task's mean over runs
    p, _ = aggregate_estimates({"x": np.array([[0.0, 4, 1], [2, 6, 3]])}, reps=200)
    assert p["x"][2] == pytest.approx(2.0) and p["x"][1] == pytest.approx(16 / 6)
    p, c = aggregate_estimates({"x": np.full((4, 2), 0.25)}, reps=200)
    np.testing.assert_allclose(c["x"], 0.25)  # every resample of a constant is the constant
    poi, poi_ci = improvement({"base": np.zeros((4, 2)), "up": np.ones((4, 2))}, "base", reps=200)
    assert poi == {"up": 1.0} and list(poi_ci["up"]) == [1.0, 1.0]


def _non_blank(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return img.std() > 0.05 and (img < 0.5).mean() > 0.002


def test_report_writes_tables_and_figures_that_match_rliable(sweep, tmp_path):
    path = report(sweep, title="synthetic", reps=300)
    text = path.read_text()
    assert path == sweep / "report" / "report.md"
    for name in ("curves", "aggregate", "profiles", "improvement", "mechanism"):
        png = sweep / "report" / f"{name}.png"
        assert png.exists() and _non_blank(png), name
        assert f"![{name}]({name}.png)" in text
    assert "| task | adam | sam, rho=0.05 |" in text
    # the results table's IQM row is rliable's, on final returns / 1000
    frame = load(sweep)
    scores = score_matrices(finals(frame), ["adam", "sam, rho=0.05"], TASKS)
    by_hand = np.array([[final_return(t, False, s) / 1000 for t in range(2)]
                        for s in range(1, 6)])  # fmt: skip
    np.testing.assert_allclose(scores["adam"], by_hand)
    p, c = aggregate_estimates(scores, reps=300)
    iqm = next(line for line in text.splitlines() if line.startswith("| **IQM**"))
    assert f"{p['adam'][0]:.3g} [{c['adam'][0][0]:.3g}, {c['adam'][1][0]:.3g}]" in iqm
    poi = next(line for line in text.splitlines() if line.startswith("| **P(point > adam)"))
    assert "baseline" in poi
    # by hand: seeds spread the runs by 0, 37, ..., 148 and SAM adds 60, so a SAM run beats
    # an Adam run when its offset is at most one step lower: 19 of the 25 pairs, on each task
    assert "| 0.76 [" in poi
    assert "published TD-MPC2" in text and "dmc/cartpole-swingup" in text


def test_report_on_run_folders_and_export_from_the_command_line(sweep, tmp_path, capsys):
    loose = [write_run(tmp_path / "runs" / f"r{s}", "dmc/cartpole-swingup", s, False, 500.0 + s)
             for s in (1, 2)]  # fmt: skip
    path = report(loose, tmp_path / "loose")  # the earlier API: a list of run folders
    assert "| dmc/cartpole-swingup | 502 ± " in path.read_text()
    main(["report", str(sweep), *map(str, loose), "--out", str(tmp_path / "both"), "--export",
          "--reps", "100"])
    assert (tmp_path / "both" / "report.md").exists()
    import pandas as pd

    table = pd.read_parquet(tmp_path / "both" / "results.parquet")
    assert len(table) == len(load(sweep)) + 2 * 3
    assert set(table["label"]) == {"adam", "sam, rho=0.05"}
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nothing-here")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("flatworld: error: ")
