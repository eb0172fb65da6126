"""Compare run folders: a markdown table and PNG plots of return, world-model sharpness,
value-prediction error and model error, grouped by world-model optimizer."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

METRICS = {  # column -> (title, higher is better)
    "eval_return": ("return", True),
    "wm_sharpness": ("world-model sharpness", False),
    "value_error": ("value-prediction error", False),
    "model_error": ("model error", False),
}


def label_of(config: dict[str, Any]) -> str:
    spec = config["agent"]["config"].get("wm_optim") or {}
    sam = spec.get("sam")
    if not sam:
        return spec.get("base", "adam")
    extra = ", adaptive" if sam.get("adaptive") else ""
    return f"sam(rho={sam['rho']}{extra})"


def _curve(rows: list[dict[str, str]], column: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in rows:
        v = r.get(column, "")
        if v not in ("", None) and math.isfinite(float(v)):
            xs.append(float(r["env_steps"]))
            ys.append(float(v))
    return np.array(xs), np.array(ys)


def load_runs(run_dirs: list[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """{label: [{"dir", "rows", "seed"}]} from run folders' config.yaml and metrics.csv."""
    from flatworld.runs.logger import read_metrics

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in map(Path, run_dirs):
        if not (d / "config.yaml").exists():
            raise FileNotFoundError(f"{d} has no config.yaml: not a flatworld run folder")
        config = yaml.safe_load((d / "config.yaml").read_text())
        groups[label_of(config)].append({"dir": d, "rows": read_metrics(d / "metrics.csv"),
                                         "seed": config["run"]["seed"],
                                         "env": config["run"]["env"]})
    return dict(groups)


def final_value(run: dict[str, Any], column: str) -> float:
    """The last finite value of ``column`` in a run from ``load_runs`` (nan if none)."""
    _, ys = _curve(run["rows"], column)
    return float(ys[-1]) if len(ys) else float("nan")


def _aggregate(finals: np.ndarray) -> str:
    finals = finals[np.isfinite(finals)]
    if len(finals) == 0:
        return "—"
    if len(finals) == 1:
        return f"{finals[0]:.3g}"
    return f"{finals.mean():.3g} ± {finals.std(ddof=1):.2g}"


def _iqm_ci(finals: np.ndarray, reps: int = 2000) -> str:
    """IQM with a stratified-bootstrap 95% interval (rliable), the honest figure for few seeds."""
    finals = finals[np.isfinite(finals)]
    if len(finals) < 2:
        return "—"
    from rliable import library as rly
    from rliable import metrics

    scores = {"x": finals.reshape(-1, 1)}
    point, ci = rly.get_interval_estimates(
        scores, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps)
    lo, hi = ci["x"][:, 0]
    return f"{point['x'][0]:.3g} [{lo:.3g}, {hi:.3g}]"


def report(run_dirs: list[str | Path], out: str | Path, title: str = "") -> Path:
    """Write ``out/report.md`` and ``out/curves.png``; returns the markdown path."""
    groups = load_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    envs = sorted({r["env"] for runs in groups.values() for r in runs})
    finals = " | ".join(f"final {t} ({'↑' if up else '↓'})" for t, up in METRICS.values())
    head = f"| optimizer | seeds | {finals} | IQM return [95% CI] |"
    lines = [f"# {title or 'flatworld report'}", "", f"Task: {', '.join(envs)}", "", head,
             "|" + "---|" * (len(METRICS) + 3)]
    for label, runs in sorted(groups.items()):
        cells = [_aggregate(np.array([final_value(r, c) for r in runs])) for c in METRICS]
        returns = np.array([final_value(r, "eval_return") for r in runs])
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) +
                     f" | {_iqm_ci(returns)} |")
    lines += ["", "Mean ± sample std over seeds of each run's last logged value; IQM over "
              "seeds with a stratified-bootstrap 95% interval (rliable).", "",
              "![curves](curves.png)", ""]
    _plot(groups, out / "curves.png")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.3))
    for ax, (column, (title, _)) in zip(axes, METRICS.items(), strict=True):
        positive = True
        for label, runs in sorted(groups.items()):
            curves = [_curve(r["rows"], column) for r in runs]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            xs = curves[0][0][:n]
            ys = np.stack([c[1][:n] for c in curves])
            mean = ys.mean(0)
            positive &= bool((ys > 0).all())
            line, = ax.plot(xs, mean, label=label)
            if len(curves) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        ax.set(title=title, xlabel="environment steps")
        if column in ("wm_sharpness", "model_error") and ax.has_data() and positive:
            ax.set_yscale("log")  # these fall by orders of magnitude early in training
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
