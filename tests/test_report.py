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


def write_run(folder, env, seed, sam, final, lr=3e-4, agent="tdmpc2", env_options=None):
    folder.mkdir(parents=True)
    spec = {"base": "adam", "lr": lr, "sam": {"rho": 0.05, "adaptive": False} if sam else None}
    doc = {"run": {"env": env, "seed": seed, "env_options": env_options or {}},
           "agent": {"name": agent, "config": {"wm_optim": spec}}}
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
    row = frame[(frame["run"] == "dmc-walker-walk/sam_rho-0.05-s3") & (frame["step"] == 15000)]
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
             for s in (6, 7)]  # fmt: skip
    path = report(loose, tmp_path / "loose")  # the earlier API: a list of run folders
    assert "| dmc/cartpole-swingup | 506 ± " in path.read_text()
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


def test_runs_of_other_agents_are_never_pooled_and_a_seed_twice_is_an_error(tmp_path):
    task = "dmc/cartpole-swingup"
    dreamer = write_run(tmp_path / "dreamer", task, 1, False, 500.0, agent="dreamer")
    twister = write_run(tmp_path / "twister", task, 1, False, 100.0, agent="twister")
    labels = load(None, [dreamer, twister]).groupby("run")["label"].first()
    assert labels[str(dreamer)] == "dreamer, adam" and labels[str(twister)] == "twister, adam"
    text = report([dreamer, twister], tmp_path / "agents", reps=100).read_text()
    assert "| task | dreamer, adam | twister, adam |" in text and "500 (n = 1: no" in text
    twin = write_run(tmp_path / "twin", task, 1, False, 300.0)
    first = write_run(tmp_path / "first", task, 1, False, 700.0)
    with pytest.raises(ValueError) as err:
        report([first, twin], tmp_path / "twins")
    assert str(first) in str(err.value) and str(twin) in str(err.value)
    assert "seed 1" in str(err.value)


def test_every_table_and_figure_uses_the_same_runs(sweep, tmp_path):
    (sweep / "dmc-walker-walk" / "adam-s5" / "metrics.csv").unlink()  # not evaluated yet
    text = report(sweep, reps=100).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| dmc/cartpole-swingup"))
    adam_mean = np.mean([final_return(0, False, s) for s in range(1, 5)])
    assert row.startswith(f"| dmc/cartpole-swingup | {adam_mean:.3g} ± ") and "(n=4)" in row
    assert "dmc-cartpole-swingup/adam-s5 (seed 5 of [adam] is not on every task" in text
    iqm = next(line for line in text.splitlines() if line.startswith("| **IQM**"))
    scores = {"adam": np.array([[final_return(t, False, s) / 1000 for t in range(2)]
                                for s in range(1, 5)])}  # fmt: skip
    p, c = aggregate_estimates(scores, reps=100)
    assert f"| {p['adam'][0]:.3g} [{c['adam'][0][0]:.3g}, " in iqm


def test_one_seed_per_arm_says_there_is_no_interval(tmp_path):
    task = "dmc/cartpole-swingup"
    runs = [write_run(tmp_path / "a", task, 1, False, 400.0),
            write_run(tmp_path / "s", task, 1, True, 450.0)]
    text = report(runs, tmp_path / "r", reps=100).read_text()
    lines = text.splitlines()
    for start in ("| dmc/cartpole-swingup", "| **IQM**", "| **mean**", "| **P(point > adam)"):
        row = next(line for line in lines if line.startswith(start))
        assert "n = 1: no interval" in row and "[" not in row.split("|", 2)[2], row
    assert "| sam, rho=0.05 | -0.0267 (-80%) (no interval)" in text
    assert "no interval is shown" in text


def test_shortened_episodes_are_not_scored_against_full_ones(tmp_path):
    task = "dmc/cartpole-swingup"
    opts = {"episode_length": 25}  # agent steps; x2 action repeat: 50 of 1000 control steps
    runs = [write_run(tmp_path / f"r{s}", task, s, False, 40.0, env_options=opts)
            for s in (1, 2)]  # fmt: skip
    text = report(runs, tmp_path / "r", reps=100).read_text()
    assert "Scores: dmc return / 50 (shortened episodes)." in text
    assert "**Shortened episodes** on dmc/cartpole-swingup" in text
    assert "published TD-MPC2" not in text  # the published curves are of 1000-step episodes
    fin = finals(load(None, runs))
    assert fin["score"].tolist() == [40.0 / 50, 40.0 / 50]
    full = [write_run(tmp_path / f"f{s}", task, s, False, 40.0) for s in (1, 2)]
    assert "published TD-MPC2" in report(full, tmp_path / "f", reps=100).read_text()


def test_sharpness_value_correlation_and_arm_changes_equal_scipy_and_rliable(tmp_path):
    from scipy import stats

    from flatworld.experiments.report import arm_changes, seeded, spearman_interval

    rng = np.random.default_rng(5)
    x, y = rng.lognormal(size=12), rng.normal(size=12)
    rho, lo, hi = spearman_interval(x, y, reps=400, seed=3)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    ref = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                          vectorized=False, n_resamples=400, method="percentile",
                          random_state=np.random.default_rng(3))  # fmt: skip
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low,
                                      ref.confidence_interval.high))  # fmt: skip
    assert np.isnan(spearman_interval(x[:2], y[:2])[1])  # two runs: no interval
    # per-arm changes: rliable's stratified bootstrap of the difference of means
    import pandas as pd

    rows = []
    for label, shift in (("adam", 0.0), ("sam", -1.0)):
        for t, task in enumerate(("a/x", "a/y")):
            for seed in (1, 2, 3, 4):
                rows.append({"label": label, "task": task, "seed": seed,
                             "sharpness": 2.0 + shift + 0.1 * seed * (t + 1),
                             "value_error": 5.0 + seed, "model_error": 1.0,
                             "return": 100.0 * (t + 1) - 10 * shift + seed})  # fmt: skip
    fin = pd.DataFrame(rows)
    changes = arm_changes(fin, ["adam", "sam"], "adam", ["a/x", "a/y"], reps=300, seed=2)
    matrix = {lab: fin[fin["label"] == lab].pivot(index="seed", columns="task",
                                                  values="sharpness").to_numpy()
              for lab in ("adam", "sam")}  # fmt: skip
    with seeded(2):
        _, ci = rly.get_interval_estimates({"sam": [matrix["sam"], matrix["adam"]]},
                                           lambda a, b: np.mean(a) - np.mean(b), reps=300)
    d, low, high, base = changes[("sam", "sharpness")]
    assert d == pytest.approx(-1.0) and base == pytest.approx(matrix["adam"].mean())
    assert (low, high) == pytest.approx(tuple(np.asarray(ci["sam"]).reshape(2)))
    assert changes[("sam", "return")][0] == pytest.approx(10.0)
    assert changes[("sam", "value_error")][0] == pytest.approx(0.0)


BOUND_FIELDS = ["diag_s", "bound_loss", "bound_perturbed_loss", "bound_k", "bound_w_norm_sq",
                "bound_rho", "bound_n", "bound_complexity", "bound_value"]  # fmt: skip


def test_the_bound_terms_per_arm_and_the_cost_of_the_diagnostics(tmp_path):
    from flatworld.sharpness import sam_bound

    task, runs = "dmc/cartpole-swingup", []
    for seed in (1, 2, 3):
        for sam in (False, True):
            folder = write_run(tmp_path / f"{'sam' if sam else 'adam'}{seed}", task, seed, sam,
                               400.0)  # fmt: skip
            rows = list(csv.DictReader(open(folder / "metrics.csv")))
            with open(folder / "metrics.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS + BOUND_FIELDS)
                w.writeheader()
                for i, r in enumerate(rows):
                    loss = 1.0 + seed + i
                    b = sam_bound(loss + (0.1 if sam else 0.5), 1000, 50.0 * seed, 0.05,
                                  5000 * (i + 1))  # fmt: skip
                    w.writerow({**r, "diag_s": 2.0 * seed, "bound_loss": loss,
                                "bound_perturbed_loss": b.perturbed_loss, "bound_k": 1000,
                                "bound_w_norm_sq": b.weight_norm_sq, "bound_rho": 0.05,
                                "bound_n": b.n, "bound_complexity": b.complexity,
                                "bound_value": b.value})  # fmt: skip
            runs.append(folder)
    text = report(runs, out=tmp_path / "rep", reps=200).read_text()
    # The final step (i = 2): medians over the 3 seeds are seed 2's values
    b = sam_bound(1.0 + 2 + 2 + 0.5, 1000, 100.0, 0.05, 15000)
    row = next(line for line in text.splitlines() if line.startswith("| adam | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["5", "5.5", "1000", "100", "0.05", "15000",
                         f"{b.complexity:.3g}", f"{b.value:.3g}"]  # fmt: skip
    assert next(line for line in text.splitlines() if line.startswith("| sam, rho=0.05 | 3 |"))
    assert "not the value-estimation gap" in text and "vacuous" in text
    # Cost: 2, 4, 6 s per diagnostic step, 3 diagnostic steps per run of 300 s and 15,000 steps
    per_step = [(300 - 3 * d) / 15000 for d in (2.0, 4.0, 6.0)]
    at_default = np.median([d / (d + p * 10_000) for d, p in zip((2.0, 4.0, 6.0), per_step,
                                                                  strict=True)])  # fmt: skip
    assert "took 4 s (median over 6 runs; range 2–6 s), 4% of the runs' wall time" in text
    assert f"that is {100 * at_default:.2g}% of training time" in text
