"""The sweep report groups runs by world-model optimizer and aggregates over seeds."""

from __future__ import annotations

import csv

import yaml

from flatworld.experiments import report


def fake_run(folder, sam, seed, returns):
    folder.mkdir(parents=True)
    spec = {"base": "adam", "sam": {"rho": 0.05, "adaptive": False} if sam else None}
    doc = {"run": {"env": "dmc/cartpole-swingup", "seed": seed},
           "agent": {"name": "tdmpc2", "config": {"wm_optim": spec}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "env_steps", "eval_return", "wm_sharpness",
                                          "value_error", "model_error"])
        w.writeheader()
        for i, r in enumerate(returns):
            w.writerow({"step": i, "env_steps": 2 * i, "eval_return": r, "wm_sharpness": 0.1,
                        "value_error": "", "model_error": 0.5})
    return folder


def test_report_table_and_plot(tmp_path):
    runs = [fake_run(tmp_path / "a1", False, 1, [1, 10]),
            fake_run(tmp_path / "a2", False, 2, [1, 20]),
            fake_run(tmp_path / "s1", True, 1, [1, 30])]
    path = report(runs, tmp_path / "out", title="t")
    text = path.read_text()
    assert "| adam | 2 | 15 ± 7.1 |" in text
    assert "| sam(rho=0.05) | 1 | 30 |" in text
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
