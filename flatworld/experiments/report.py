"""`flatworld report`: report.md and PNG figures for a sweep (and any extra run folders).

- learning curves, a panel per task and a line per grid point: the mean over seeds with a 95%
  percentile-bootstrap band, and the published curves of the sweep's agent where the task
  matches (TD-MPC2's for tdmpc2, DreamerV3's for dreamer and twister);
- aggregate IQM, mean and median of the final normalised scores, each with a 95%
  stratified-bootstrap confidence interval (rliable);
- performance profiles, and the probability that each point improves over the Adam
  baseline, with its interval (rliable);
- world-model sharpness and value-prediction error against final return, one point per run;
- sharpness against value-prediction error at every logged step (log x), Spearman's
  correlation over runs of their final values with a bootstrap interval, and each arm's
  change against the Adam arm in sharpness, value error, model error and return with
  stratified-bootstrap intervals (none with fewer than 3 runs per arm);
- a results table laid out like a paper's: per task, then the aggregates.

Every table and figure uses one set of runs (`select_runs`); one run per arm gives
"n = 1: no interval", never a zero-width interval. Scores are normalised per task: DMC
returns / 1000 (runs with shortened episodes: / their own episode's control steps, marked,
and without the published full-episode curves), Atari human-normalised
(flatworld.envs.atari.human_normalized), other suites' raw returns.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flatworld.experiments import store

DATA = Path(__file__).parent / "data"


class Published(NamedTuple):
    """Published learning curves shipped in flatworld/experiments/data/<folder>."""

    folder: str
    name: str
    source: str
    style: str  # matplotlib line style ...
    style_name: str  # ... and its name in report.md
    sampling: str  # how the points of the curve were taken, for report.md


_DMC_SAMPLING = "It is sampled every 100k environment steps"
_TDMPC2 = Published("tdmpc2", "TD-MPC2", "nicklashansen/tdmpc2 results/, 3 seeds", "--",
                    "dashed", _DMC_SAMPLING)  # fmt: skip
_DREAMERV3 = Published("dreamerv3", "DreamerV3", "the DreamerV3 runs in nicklashansen/tdmpc2 "
                       "results/dreamerv3/, 3 seeds", ":", "dotted", _DMC_SAMPLING)  # fmt: skip
_DREAMERV3_ATARI = Published("dreamerv3-atari100k", "DreamerV3", "its Atari-100k evaluation "
                             "scores, 5 seeds", ":", "dotted",
                             "Each seed's points are averaged over bins of 10k environment "
                             "steps (frames) and drawn at each bin's end")  # fmt: skip
# The curves drawn beside each agent. TWISTER has no published curves here; it is DreamerV3
# with another sequence model.
PUBLISHED = {"tdmpc2": _TDMPC2, "dreamer": _DREAMERV3, "twister": _DREAMERV3}


# -- scores ----------------------------------------------------------------------------------
DMC_EPISODE = 1000  # control steps in a full DMC episode (reward <= 1 per step)


def _set(x: Any) -> bool:
    """A run's env option was set (not None, not the store's NaN)."""
    return x is not None and x == x


def _dmc_steps(episode_length: Any, action_repeat: Any) -> int:
    """Control steps in a DMC run's episode (agent steps x action repeat, default 2)."""
    return int(episode_length) * (int(action_repeat) if _set(action_repeat) else 2)


def shortened(task: str, episode_length: Any, action_repeat: Any) -> bool:
    """Whether a run's episodes are shorter than the suite's full ones (the published curves
    and the usual normalisation are for full episodes). Outside DMC any episode length the
    run set counts as shortened, as the full length is not known here."""
    if not _set(episode_length):
        return False
    if task.startswith("dmc/"):
        return _dmc_steps(episode_length, action_repeat) < DMC_EPISODE
    return True


def normalizer(task: str, episode_length: Any = None, action_repeat: Any = None
               ) -> tuple[Any, str]:  # fmt: skip
    """(score -> normalised score, what it is) for a task; DMC runs with shortened episodes
    are normalised by their own episode's maximum return, not the full episode's 1000."""
    suite = task.split("/", 1)[0]
    if suite == "dmc" and shortened(task, episode_length, action_repeat):
        top = _dmc_steps(episode_length, action_repeat)
        return (lambda s: s / top), f"return / {top} (shortened episodes)"
    if suite == "dmc":
        return (lambda s: s / 1000.0), "return / 1000"
    if suite == "atari":
        try:
            from flatworld.envs.atari import human_normalized
        except ImportError:
            return (lambda s: s), "raw return (no human-normalisation table installed)"
        return (lambda s: human_normalized(task, s)), "human-normalised"
    return (lambda s: s), "raw return"


# The SAM bound's columns (store names) and how the report names them.
BOUND_TERMS = ("bound_loss", "bound_perturbed_loss", "bound_k", "bound_w_norm_sq", "bound_rho",
               "bound_n", "bound_complexity", "bound")  # fmt: skip
# (no "|" in a name: they head a markdown table)
BOUND_NAMES = ("L_S(w)", "L_S(w + e)", "k", "‖w‖²", "rho", "n", "complexity", "bound")


def finals(frame: Any) -> Any:
    """One row per run: the last finite value of each metric, and the env steps of the last
    evaluation."""
    import pandas as pd

    keys = [c for c in frame.columns if c not in ("step", "env_steps", *store.METRIC_COLUMNS
                                                  .values())]  # fmt: skip
    out = []
    lasts = ("return", "sharpness", "value_error", "model_error", "wall_time", *BOUND_TERMS)
    for _, g in frame.groupby("run", sort=False):
        g = g.sort_values("step")
        row = {k: g[k].iloc[0] for k in keys}
        for col in lasts:
            vals = g[col].dropna()
            row[col] = float(vals.iloc[-1]) if len(vals) else float("nan")
        diag = g["diag_s"].dropna()
        row["diag_s"] = float(np.median(diag)) if len(diag) else float("nan")
        row["diag_total_s"] = float(np.sum(diag)) if len(diag) else float("nan")
        row["steps"] = int(g["step"].iloc[-1])
        evals = g.dropna(subset=["return"])
        row["env_steps"] = int(evals["env_steps"].iloc[-1]) if len(evals) else 0
        norm, _ = normalizer(row["task"], row.get("episode_length"), row.get("action_repeat"))
        row["score"] = norm(row["return"]) if math.isfinite(row["return"]) else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def select_runs(fin: Any) -> tuple[Any, list[str]]:
    """The runs every table and figure uses, and why others were left out: a run with no
    evaluation yet, and a seed that an arm does not have on each of its tasks (aggregates
    need one run per seed and task, and the per-task table must show the same runs)."""
    notes = [f"{r} (no evaluation logged yet)" for r in fin[fin["score"].isna()]["run"]]
    fin = fin[fin["score"].notna()]
    keep = []
    for label, g in fin.groupby("label", sort=False):
        seeds = set.intersection(*[set(t["seed"]) for _, t in g.groupby("task", sort=False)])
        for _, row in g.iterrows():
            if row["seed"] in seeds:
                keep.append(row["run"])
            else:
                notes.append(f"{row['run']} (seed {row['seed']} of [{label}] is not on every "
                             "task of that arm)")  # fmt: skip
    return fin[fin["run"].isin(keep)].reset_index(drop=True), notes


def score_matrices(fin: Any, labels: list[str], tasks: list[str]) -> dict[str, np.ndarray]:
    """{label: (seeds x tasks)} of final normalised scores, over the seeds that every task
    of the label has (rliable needs a full matrix)."""
    out = {}
    for label in labels:
        g = fin[(fin["label"] == label) & fin["score"].notna()]
        per_task = [set(g[g["task"] == t]["seed"]) for t in tasks]
        seeds = sorted(set.intersection(*per_task)) if per_task else []
        if not seeds:
            continue
        m = np.array([[float(g[(g["task"] == t) & (g["seed"] == s)]["score"].iloc[0])
                       for t in tasks] for s in seeds])  # fmt: skip
        out[label] = m
    return out


AGGREGATES = ("IQM", "mean", "median")


def aggregate_estimates(scores: dict[str, np.ndarray], reps: int = 2000, seed: int = 0
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """rliable's point estimates and 95% stratified-bootstrap intervals of IQM, mean and
    median: ({label: [iqm, mean, median]}, {label: 2 x 3 [lower; upper]})."""
    from rliable import library as rly
    from rliable import metrics

    def func(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x),
                         metrics.aggregate_median(x)])  # fmt: skip

    points, cis = {}, {}
    for label, m in scores.items():  # one label at a time, each from the same seed
        with seeded(seed):
            p, c = rly.get_interval_estimates({label: m}, func, reps=reps)
        points[label], cis[label] = p[label], c[label]
    return points, cis


@contextlib.contextmanager
def seeded(seed: int) -> Any:
    """numpy's global stream seeded for the block, then put back: rliable's stratified
    bootstrap draws from it (its `random_state` argument does not reach the resampling)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def improvement(scores: dict[str, np.ndarray], baseline: str, reps: int = 2000,
                seed: int = 0) -> tuple[dict[str, float], dict[str, np.ndarray]]:  # fmt: skip
    """P(label > baseline) with 95% intervals (rliable), for every other label."""
    from rliable import library as rly
    from rliable import metrics

    points, cis = {}, {}
    for label, m in scores.items():
        if label == baseline:
            continue
        pair = {label: [m, scores[baseline]]}
        with seeded(seed):
            p, c = rly.get_interval_estimates(pair, metrics.probability_of_improvement,
                                              reps=reps)
        points[label], cis[label] = float(p[label]), np.asarray(c[label]).reshape(2)
    return points, cis


MIN_RUNS_FOR_INTERVAL = 3  # fewer runs per arm: no interval is shown
MECHANISM = (("sharpness", "world-model sharpness"), ("value_error", "value error"),
             ("model_error", "model error"), ("return", "return"))  # fmt: skip


def spearman_interval(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0
                      ) -> tuple[float, float, float]:  # fmt: skip
    """Spearman's rank correlation of paired values over runs (scipy) and its 95% percentile
    bootstrap interval over runs (scipy.stats.bootstrap, pairs resampled together); the
    interval is NaN with fewer than MIN_RUNS_FOR_INTERVAL runs or when resamples are tied."""
    import warnings

    from scipy import stats

    def statistic(a: np.ndarray, b: np.ndarray) -> float:
        return stats.spearmanr(a, b).statistic

    x, y = np.asarray(x, float), np.asarray(y, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant (or, resampled, tied) ranks give NaN
        rho = float(statistic(x, y))
        if len(x) < MIN_RUNS_FOR_INTERVAL or not np.isfinite(rho):
            return rho, float("nan"), float("nan")
        res = stats.bootstrap((x, y), statistic, paired=True, vectorized=False,
                              n_resamples=reps, method="percentile",
                              random_state=np.random.default_rng(seed))  # fmt: skip
    # the percentile interval of the resamples that have a correlation (scipy's own interval
    # when none is tied; with 3 runs about one resample in nine draws one run thrice)
    lo, hi = np.nanpercentile(res.bootstrap_distribution, [2.5, 97.5])
    return rho, float(lo), float(hi)


def arm_matrix(fin: Any, label: str, tasks: list[str], col: str) -> np.ndarray | None:
    """(seeds x tasks) of a final metric for one arm, or None when a value is missing."""
    g = fin[fin["label"] == label]
    seeds = sorted(set(g["seed"]))
    try:
        m = np.array([[float(g[(g["task"] == t) & (g["seed"] == s)][col].iloc[0])
                       for t in tasks] for s in seeds])  # fmt: skip
    except IndexError:
        return None
    return m if m.size and np.isfinite(m).all() else None


def arm_changes(fin: Any, labels: list[str], baseline: str, tasks: list[str], reps: int = 2000,
                seed: int = 0) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """{(label, metric): (change, low, high, baseline mean)}: the mean of a final metric over
    an arm's runs and tasks minus the baseline arm's, with a 95% stratified-bootstrap interval
    (rliable: runs resampled within each task, both arms independently); NaN bounds with
    fewer than MIN_RUNS_FOR_INTERVAL runs in either arm."""
    from rliable import library as rly

    def change(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(a) - np.mean(b))

    out = {}
    for col, _ in MECHANISM:
        base = arm_matrix(fin, baseline, tasks, col)
        for label in labels:
            m = arm_matrix(fin, label, tasks, col) if label != baseline else None
            if base is None or m is None:
                continue
            lo = hi = float("nan")
            if min(len(m), len(base)) >= MIN_RUNS_FOR_INTERVAL:
                with seeded(seed):
                    _, ci = rly.get_interval_estimates({label: [m, base]}, change, reps=reps)
                lo, hi = (float(v) for v in np.asarray(ci[label]).reshape(2))
            out[(label, col)] = (change(m, base), lo, hi, float(np.mean(base)))
    return out


def bootstrap_band(ys: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Mean over rows (seeds) with a 95% percentile-bootstrap band: (mean, low, high)."""
    mean = ys.mean(0)
    if len(ys) < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ys), size=(reps, len(ys)))
    means = ys[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    return mean, lo, hi


# -- published curves ------------------------------------------------------------------------
ATARI_BIN = 10_000  # frames: the published Atari-100k points are averaged per seed over bins


def published(task: str, agent: str) -> Published | None:
    """Which published curves go beside `agent`'s runs on `task` (a DMC task; an Atari game
    for DreamerV3's), if any."""
    ref = PUBLISHED.get(agent)
    if task.startswith("atari/"):
        return _DREAMERV3_ATARI if ref is _DREAMERV3 else None
    return ref if task.startswith("dmc/") else None


def published_curve(task: str, agent: str = "tdmpc2"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:  # fmt: skip
    """(env steps, mean, min, max) of the published curve of `agent` (TD-MPC2's for tdmpc2,
    DreamerV3's for dreamer and twister) on a DMC task or (DreamerV3's only) an Atari-100k
    game, or None."""
    ref = published(task, agent)
    if ref is _DREAMERV3_ATARI:
        return _atari100k_curve(task.split("/", 1)[1])
    if ref is None:
        return None
    name = task.split("/", 1)[1].lower().replace("_", "-")
    name = name.replace("ball-in-cup-", "cup-").replace("point-mass-", "pointmass-")
    path = DATA / ref.folder / f"{name}.csv"
    if not path.exists():
        return None
    raw = np.genfromtxt(path, delimiter=",", names=True)
    steps = np.unique(raw["step"])
    means, lows, highs, xs = [], [], [], []
    for s in steps:
        r = raw["reward"][raw["step"] == s]
        if len(r) == 0:
            continue
        xs.append(s)
        means.append(r.mean())
        lows.append(r.min())
        highs.append(r.max())
    return np.array(xs), np.array(means), np.array(lows), np.array(highs)


def atari_random(task: str) -> float | None:
    """A random policy's score on an Atari task, from the packaged random/human table (the
    zero of the human-normalised score); None for other tasks, games outside the table, or
    without ale-py's extra installed."""
    if not task.startswith("atari/"):
        return None
    try:
        from flatworld.envs.atari import random_score
    except ImportError:
        return None
    try:
        return random_score(task)
    except ValueError:
        return None


def _atari100k_curve(game: str) -> tuple[np.ndarray, ...] | None:
    """DreamerV3's published Atari-100k evaluation returns of ``game`` (case, `_` and `-`
    ignored): each seed's points averaged over bins of ATARI_BIN frames, (bin ends, mean, min,
    max) over the seeds with a point in the bin. Steps are frames, as an Atari run's
    ``env_steps``."""
    import gzip
    import json

    key = game.lower().replace("_", "").replace("-", "")
    with gzip.open(DATA / "dreamerv3-atari100k" / "scores.json.gz", "rt") as f:
        runs = [r for r in json.load(f)
                if r["task"].removeprefix("atari_").replace("_", "") == key]  # fmt: skip
    if not runs:
        return None
    top = max(max(r["xs"]) for r in runs)
    ends = np.arange(ATARI_BIN, top + ATARI_BIN, ATARI_BIN, dtype=float)
    per_seed = np.full((len(runs), len(ends)), np.nan)
    for i, r in enumerate(runs):
        xs, ys = np.asarray(r["xs"], float), np.asarray(r["ys"], float)
        b = np.ceil(xs / ATARI_BIN).astype(int) - 1  # x in (end - bin, end]
        for j in np.unique(b[(b >= 0) & (b < len(ends))]):
            per_seed[i, j] = ys[b == j].mean()
    keep = ~np.isnan(per_seed).all(0)
    vals = per_seed[:, keep]
    return ends[keep], np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)


# -- figures ---------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(labels: list[str]) -> dict[str, Any]:
    plt = _plt()
    cycle = plt.get_cmap("tab10")
    return {lab: cycle(i % 10) for i, lab in enumerate(labels)}


def plot_curves(frame: Any, labels: list[str], tasks: list[str], path: Path,
                seed: int = 0, short: tuple[str, ...] = ()) -> dict[Published, list[str]]:
    """Returns {published curves: the tasks they were drawn on}; each task gets the
    published curves of the agents in its runs (PUBLISHED), except the tasks in `short`
    (runs with shortened episodes: the published curves are of full ones)."""
    plt = _plt()
    colors = _colors(labels)
    n = len(tasks)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    drawn: dict[Published, list[str]] = {}
    for ax, task in zip(axes.flat, tasks, strict=False):
        tf = frame[(frame["task"] == task) & frame["return"].notna()]
        top = 0
        for label in labels:
            g = tf[tf["label"] == label]
            if g.empty:
                continue
            curves = [r.sort_values("env_steps") for _, r in g.groupby("run", sort=False)]
            common = sorted(set.intersection(*[set(c["env_steps"]) for c in curves]))
            if not common:
                continue
            ys = np.stack([c.set_index("env_steps").loc[common, "return"].to_numpy(float)
                           for c in curves])  # fmt: skip
            mean, lo, hi = bootstrap_band(ys, seed=seed)
            xs = np.array(common, float)
            top = max(top, xs.max())
            ax.plot(xs, mean, "o-", markersize=3, color=colors[label],
                    label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.2, linewidth=0)
        random_score = atari_random(task)
        if random_score is not None and top > 0:
            ax.axhline(random_score, color="0.5", linestyle="-.", linewidth=1.0,
                       label="random policy (score table)")  # fmt: skip
        refs = {published(task, a): a for a in dict.fromkeys(tf["agent"])}
        refs.pop(None, None)
        if task in short:
            refs = {}
            ax.text(0.02, 0.98, "shortened episodes: published full-episode curves not "
                    "drawn", transform=ax.transAxes, fontsize=7, va="top")  # fmt: skip
        for ref, agent in refs.items():
            pub = published_curve(task, agent)
            if pub is None or top <= 0:
                continue
            xs, mean, lo, hi = pub
            # over this sweep's range only, cut at its last step by linear interpolation
            grid = np.array(sorted({*xs[xs < top].tolist(), float(min(top, xs.max()))}))
            if len(grid) >= 2:
                ax.plot(grid, np.interp(grid, xs, mean), "k" + ref.style, linewidth=1.2,
                        label=f"{ref.name} published (mean, range)")
                ax.plot(xs[xs <= top], mean[xs <= top], "k.", markersize=5)
                ax.fill_between(grid, np.interp(grid, xs, lo), np.interp(grid, xs, hi),
                                color="k", alpha=0.08, linewidth=0)
                drawn.setdefault(ref, []).append(task)
        ax.set(title=task, xlabel="environment steps", ylabel="evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_aggregates(points: dict[str, np.ndarray], cis: dict[str, np.ndarray],
                    labels: list[str], path: Path, what: str,
                    no_interval: set[str] = frozenset()) -> None:  # fmt: skip
    """Point estimates with their intervals; labels in `no_interval` (one run) get the
    point only."""
    plt = _plt()
    colors = _colors(labels)
    shown = [lab for lab in labels if lab in points]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.55 * len(shown) + 1.6), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], AGGREGATES, strict=True)):
        for i, lab in enumerate(shown):
            p, lo, hi = points[lab][j], cis[lab][0][j], cis[lab][1][j]
            if lab not in no_interval:
                ax.barh(i, hi - lo, left=lo, height=0.6, color=colors[lab], alpha=0.6)
            ax.plot([p, p], [i - 0.3, i + 0.3], color="k", linewidth=2)
        ax.set_yticks(range(len(shown)), shown if j == 0 else [""] * len(shown))
        ax.set(title=name, xlabel=what)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profiles(scores: dict[str, np.ndarray], labels: list[str], path: Path, what: str,
                  reps: int) -> None:  # fmt: skip
    from rliable import library as rly
    from rliable import plot_utils

    plt = _plt()
    allv = np.concatenate([m.ravel() for m in scores.values()])
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        hi = lo + 1.0
    taus = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 81)
    with seeded(0):
        prof, prof_ci = rly.create_performance_profile(scores, taus, reps=reps)
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_utils.plot_performance_profiles(prof, taus, performance_profile_cis=prof_ci,
                                         colors={k: colors[k] for k in prof}, ax=ax,
                                         xlabel=f"{what} (τ)")  # fmt: skip
    from matplotlib.lines import Line2D

    ax.legend([Line2D([0], [0], color=colors[k], linewidth=2) for k in prof], list(prof),
              fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_improvement(points: dict[str, float], cis: dict[str, np.ndarray], baseline: str,
                     labels: list[str], path: Path,
                     no_interval: set[str] = frozenset()) -> None:  # fmt: skip
    plt = _plt()
    colors = _colors(labels)
    shown = [lab for lab in labels if lab in points]
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(shown) + 1.4))
    for i, lab in enumerate(shown):
        lo, hi = cis[lab]
        if lab not in no_interval:
            ax.barh(i, hi - lo, left=lo, height=0.6, color=colors[lab], alpha=0.6)
        ax.plot([points[lab]] * 2, [i - 0.3, i + 0.3], color="k", linewidth=2)
    ax.axvline(0.5, color="gray", linestyle=":")
    ax.set_yticks(range(len(shown)), shown)
    ax.set(xlim=(0, 1), xlabel=f"P(X > {baseline})", title="probability of improvement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mechanism(fin: Any, labels: list[str], path: Path, what: str) -> None:
    plt = _plt()
    colors = _colors(labels)
    tasks = list(dict.fromkeys(fin["task"]))
    markers = "osD^v<>pP*X"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, name in ((axes[0], "sharpness", "world-model sharpness (final)"),
                          (axes[1], "value_error", "value-prediction error (final)")):
        positive = True
        for lab in labels:
            for ti, task in enumerate(tasks):
                g = fin[(fin["label"] == lab) & (fin["task"] == task)]
                g = g[g[col].notna() & g["score"].notna()]
                if g.empty:
                    continue
                positive &= bool((g[col] > 0).all())
                ax.scatter(g[col], g["score"], color=colors[lab], marker=markers[ti % 11],
                           s=40, alpha=0.85, edgecolor="k", linewidth=0.4,
                           label=lab if ti == 0 else None)
        if positive and ax.has_data():
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel=f"final {what}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if len(tasks) > 1:
        axes[1].set_title("markers: " + ", ".join(f"{markers[i % 11]}={t}"
                                                  for i, t in enumerate(tasks)), fontsize=7)
    fig.suptitle("the mechanism: flatter world model / lower value error vs return, one "
                 "point per run", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sharpness_value(frame: Any, labels: list[str], path: Path) -> int:
    """World-model sharpness (log x) against value-prediction error, a point per run and
    logged step that has both, coloured by arm; a run's last such point is ringed. Returns
    the number of points."""
    both = frame[(frame["sharpness"] > 0) & frame["value_error"].notna()]
    if both.empty:
        return 0
    plt = _plt()
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for lab in labels:
        g = both[both["label"] == lab]
        if g.empty:
            continue
        ax.scatter(g["sharpness"], g["value_error"], color=colors[lab], s=14, alpha=0.6,
                   label=lab)  # fmt: skip
        last = g.sort_values("step").groupby("run", sort=False).tail(1)
        ax.scatter(last["sharpness"], last["value_error"], facecolor="none", s=60,
                   edgecolor=colors[lab], linewidth=1.2)  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="world-model first-order sharpness (log scale)",
           ylabel="value-prediction error", title="every run and logged step (ringed: the "
           "last step of each run)")  # fmt: skip
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(both)


# -- the report ------------------------------------------------------------------------------
def _g(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _ci(p: float, lo: float, hi: float) -> str:
    return f"{_g(p)} [{_g(lo)}, {_g(hi)}]"


def _baseline(fin: Any, labels: list[str]) -> str | None:
    if "wm_optim" not in fin.columns:
        return None
    adam = [lab for lab in labels if (fin[fin["label"] == lab]["wm_optim"] == "adam").any()]
    return adam[0] if len(adam) == 1 else None


def _collect(sources: Any) -> Any:
    """Every source (sweep folders and run folders) in one table, labelled together so that
    runs of different agents or configs never share an arm."""
    sources = [sources] if isinstance(sources, str | Path) else list(sources)
    frame = store.load(sources)
    if frame.empty:
        raise ValueError(f"no evaluations logged yet in {', '.join(map(str, sources))}")
    return frame


def report(sources: Any, out: str | Path | None = None, title: str = "", reps: int = 2000,
           seed: int = 0, export: str | Path | None = None) -> Path:  # fmt: skip
    """Write ``out/report.md`` and its figures for a sweep folder and/or run folders (a path or
    a list); returns the markdown path. ``out`` defaults to ``<sweep>/report``."""
    first = Path(sources if isinstance(sources, str | Path) else list(sources)[0])
    frame = _collect(sources)
    if out is None:
        out = first / "report" if store.is_sweep(first) else Path("report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if export is not None:
        store.export(frame, export)
    fin, left_out = select_runs(finals(frame))
    if fin.empty:
        raise ValueError("no run has an evaluation logged yet: nothing to report")
    frame = frame[frame["run"].isin(set(fin["run"]))]  # one set of runs for everything
    labels = list(dict.fromkeys(fin["label"]))
    tasks = list(dict.fromkeys(fin["task"]))
    kinds = {normalizer(r["task"], r.get("episode_length"), r.get("action_repeat"))[1]
             for _, r in fin.iterrows()}  # fmt: skip
    what = "normalised score" if all(k.startswith(("return / ", "human")) for k in kinds) \
        else "score"
    short = tuple(t for t in tasks if any(
        shortened(t, r.get("episode_length"), r.get("action_repeat"))
        for _, r in fin[fin["task"] == t].iterrows()))  # fmt: skip
    scores = score_matrices(fin, labels, tasks)
    one_run = {lab for lab, m in scores.items() if len(m) < 2}

    lines = [f"# {title or 'flatworld report'}", ""]
    seeds = sorted(set(fin["seed"]))
    steps = fin["env_steps"]
    lines += [f"{len(fin)} runs: {len(tasks)} task(s) × {len(labels)} grid point(s), seeds "
              f"{', '.join(map(str, seeds))}; final evaluation at "
              + (f"{int(steps.min()):,}" if steps.min() == steps.max()
                 else f"{int(steps.min()):,}–{int(steps.max()):,}") + " environment steps.",
              "", "Scores: " + "; ".join(sorted(
                  {f"{r['task'].split('/')[0]} " + normalizer(
                      r["task"], r.get("episode_length"), r.get("action_repeat"))[1]
                   for _, r in fin.iterrows()})) + ".", ""]  # fmt: skip
    if short:
        lines += [f"**Shortened episodes** on {', '.join(short)}: these runs' episodes are "
                  "shorter than the suite's full ones, so their scores are not comparable to "
                  "published full-episode results (DMC: normalised by their own episode's "
                  "maximum return, not 1000) and the published curves are not drawn there.",
                  ""]  # fmt: skip
    if left_out:
        lines += ["Left out of every table and figure: " + "; ".join(left_out) + ".", ""]
    missing_tasks = [lab for lab in labels if lab not in scores]
    if missing_tasks:
        lines += ["No aggregate for " + ", ".join(f"[{lab}]" for lab in missing_tasks)
                  + ": not on every task of the report.", ""]  # fmt: skip

    # the results table: tasks as rows, grid points as columns
    lines += ["## Results", "", "Final evaluation return, mean ± 95% bootstrap half-width "
              "over seeds (bold: best mean per task).", "",
              "| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task in tasks:
        cells, means = [], []
        for lab in labels:
            v = fin[(fin["task"] == task) & (fin["label"] == lab)]["return"].dropna()
            v = v.to_numpy(float)
            means.append(v.mean() if len(v) else -np.inf)
            if len(v) == 0:
                cells.append("—")
            elif len(v) == 1:
                cells.append(f"{_g(v[0])} (n = 1: no interval)")
            else:
                m, lo, hi = bootstrap_band(v[:, None], seed=seed)
                cells.append(f"{_g(m[0])} ± {_g((hi[0] - lo[0]) / 2)} (n={len(v)})")
        best = int(np.argmax(means))
        if len(labels) > 1 and np.isfinite(means[best]):
            cells[best] = f"**{cells[best]}**"
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    points, cis = aggregate_estimates(scores, reps=reps, seed=seed) if scores else ({}, {})
    for j, name in enumerate(AGGREGATES):
        cells = [("—" if lab not in points else
                  f"{_g(points[lab][j])} (n = 1: no interval)" if lab in one_run else
                  _ci(points[lab][j], cis[lab][0][j], cis[lab][1][j])) for lab in labels]
        lines.append(f"| **{name}** ({what}) [95% CI] | " + " | ".join(cells) + " |")
    base = _baseline(fin, labels)
    poi, poi_ci = improvement(scores, base, reps, seed) if base in scores else ({}, {})
    if poi:
        cells = [("baseline" if lab not in poi else
                  f"{_g(poi[lab])} (n = 1: no interval)" if {lab, base} & one_run else
                  _ci(poi[lab], *poi_ci[lab])) for lab in labels]
        lines.append(f"| **P(point > {base})** [95% CI] | " + " | ".join(cells) + " |")
    for col, name in (("sharpness", "final world-model sharpness"),
                      ("value_error", "final value-prediction error"),
                      ("model_error", "final model error")):
        cells = []
        for lab in labels:
            v = fin[fin["label"] == lab][col].dropna().to_numpy(float)
            cells.append(_g(float(np.median(v))) if len(v) else "—")
        lines.append(f"| {name} (median over runs) | " + " | ".join(cells) + " |")
    lines += ["", f"IQM, mean and median pool every run and task of a grid point ({what}); "
              "their intervals are 95% stratified-bootstrap confidence intervals over runs "
              f"(rliable, {reps} resamples). P(point > baseline) is the probability that a "
              "run of the point scores higher than a run of the baseline on a task, averaged "
              "over tasks (rliable), with its 95% interval. The median is rliable's: the "
              "median over tasks of each task's mean over runs.", ""]

    figures = []
    drawn = plot_curves(frame, labels, tasks, out / "curves.png", seed=seed, short=short)
    figures.append(("Learning curves (mean over seeds, 95% bootstrap band)", "curves.png"))
    if scores:
        plot_aggregates(points, cis, labels, out / "aggregate.png", what, one_run)
        figures.append((f"Aggregate {what}: IQM, mean, median with 95% CIs", "aggregate.png"))
        plot_profiles(scores, labels, out / "profiles.png", what, reps=min(reps, 1000))
        figures.append(("Performance profiles", "profiles.png"))
    if poi:
        no_poi_interval = {lab for lab in poi if {lab, base} & one_run}
        plot_improvement(poi, poi_ci, base, labels, out / "improvement.png", no_poi_interval)
        figures.append((f"Probability of improvement over {base}", "improvement.png"))
    if fin["sharpness"].notna().any() or fin["value_error"].notna().any():
        plot_mechanism(fin, labels, out / "mechanism.png", what)
        figures.append(("World-model sharpness and value error against final score, one "
                        "point per run", "mechanism.png"))
    lines += mechanism_section(frame, fin, labels, tasks, base, out, reps, seed, figures)
    lines += bound_section(fin, labels)
    lines += diagnostics_cost(fin)
    for ref, on in drawn.items():
        lines += [f"{ref.style_name.capitalize()}: published {ref.name} ({ref.source}; shipped "
                  f"in flatworld/experiments/data/{ref.folder}), on {', '.join(on)}: the mean "
                  f"and range over its seeds, drawn over this sweep's steps. {ref.sampling}; "
                  "between samples the line is a straight interpolation.", ""]  # fmt: skip
    randoms = [t for t in tasks if atari_random(t) is not None]
    if randoms:
        lines += [f"Dash-dotted grey, on {', '.join(randoms)}: a random policy's score in the "
                  "packaged random/human table (flatworld/envs/data/atari100k.csv), the zero of "
                  "the human-normalised score.", ""]  # fmt: skip
    lines += ["## Figures", ""]
    for caption, name in figures:
        lines += [f"### {caption}", "", f"![{name.removesuffix('.png')}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def mechanism_section(frame: Any, fin: Any, labels: list[str], tasks: list[str],
                      base: str | None, out: Path, reps: int, seed: int,
                      figures: list[tuple[str, str]]) -> list[str]:  # fmt: skip
    """The paper's story in numbers: sharpness against value error (figure and Spearman's
    correlation over runs at their final diagnostic), and each arm's change against the
    baseline arm in sharpness, value error, model error and return."""
    lines = ["## Sharpness and value error", ""]
    if plot_sharpness_value(frame, labels, out / "sharpness_value.png"):
        figures.append(("World-model sharpness against value-prediction error, every run and "
                        "step", "sharpness_value.png"))  # fmt: skip
    else:
        lines += ["No logged step has both sharpness and value error, so there is no "
                  "sharpness-value figure: value error is logged with evaluations "
                  "(eval_every) and sharpness with diagnostics (diag_every); runs with "
                  "diag_every equal to eval_every log both on the same steps.", ""]  # fmt: skip
    pairs = fin[(fin["sharpness"] > 0) & fin["value_error"].notna()]
    n = len(pairs)
    if n >= 2:
        rho, lo, hi = spearman_interval(pairs["sharpness"].to_numpy(float),
                                        pairs["value_error"].to_numpy(float), reps, seed)
        ci = (f"95% bootstrap interval over runs [{_g(lo)}, {_g(hi)}]" if np.isfinite(lo)
              else f"n = {n} runs: fewer than {MIN_RUNS_FOR_INTERVAL}, no interval is shown")
        lines += [f"Spearman rank correlation of final world-model sharpness and final "
                  f"value-prediction error over {n} runs: {_g(rho)}; {ci}. Runs of every arm "
                  "and task are pooled; a rank correlation says whether flatter runs had "
                  "smaller value errors, not that one caused the other.", ""]  # fmt: skip
    else:
        lines += ["Fewer than two runs logged both sharpness and value error: no "
                  "correlation.", ""]  # fmt: skip
    changes = arm_changes(fin, labels, base, tasks, reps, seed) if base else {}
    if changes:
        arms = [lab for lab in labels if any((lab, c) in changes for c, _ in MECHANISM)]
        lines += [f"Change against [{base}]: the mean over an arm's runs and tasks minus the "
                  f"baseline's, with a 95% stratified-bootstrap interval (rliable, {reps} "
                  "resamples; runs resampled within each task). Final values of each run.",
                  "", "| arm | " + " | ".join(name for _, name in MECHANISM) + " |",
                  "|---|" + "---|" * len(MECHANISM)]  # fmt: skip
        small = False
        for lab in arms:
            cells = []
            for col, _ in MECHANISM:
                if (lab, col) not in changes:
                    cells.append("—")
                    continue
                d, lo, hi, mean = changes[(lab, col)]
                rel = f" ({100 * d / abs(mean):+.0f}%)" if mean else ""
                if np.isfinite(lo):
                    cells.append(f"{d:+.3g}{rel} [{lo:+.3g}, {hi:+.3g}]")
                else:
                    small = True
                    cells.append(f"{d:+.3g}{rel} (no interval)")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
        if small:
            lines += [f"No interval is shown where an arm has fewer than "
                      f"{MIN_RUNS_FOR_INTERVAL} runs per task.", ""]  # fmt: skip
    elif base is None:
        lines += ["No per-arm change: the report has no single Adam arm to compare with.", ""]
    return lines


def bound_section(fin: Any, labels: list[str]) -> list[str]:
    """The SAM bound's terms per arm at each run's last diagnostic step (medians over runs)."""
    have = fin[fin["bound"].notna()]
    lines = ["## The SAM bound (Foret et al. 2021, Theorem 1)", ""]
    if have.empty:
        return lines + ["No run logged the bound's terms (runs from before they were logged, "
                        "or no diagnostic step after an evaluation).", ""]  # fmt: skip
    lines += ["Its terms at each run's last diagnostic step, the median over the arm's runs: "
              "the world model's training loss on the held-out batch L_S(w), the loss at the "
              "first-order ascent point L_S(w + e) (‖e‖ = rho, an estimate from below of the "
              "max over the ball), k parameters, their squared norm ‖w‖², the radius rho, n "
              "rows of replay, the complexity term (delta = 0.05) and the bound "
              "L_S(w + e) + complexity.", "",
              "| arm | runs | " + " | ".join(BOUND_NAMES) + " |",
              "|---|---|" + "---|" * len(BOUND_NAMES)]  # fmt: skip
    for lab in labels:
        g = have[have["label"] == lab]
        if g.empty:
            continue
        cells = [_g(float(np.median(g[c]))) for c in BOUND_TERMS]
        lines.append(f"| {lab} | {len(g)} | " + " | ".join(cells) + " |")
    vacuous = bool((have["bound_complexity"] >= 1).all())
    lines += ["", "What it says: with probability 0.95 over the draw of the training data, the "
              "world model's expected loss is at most the bound, if the theorem's assumptions "
              "hold. They do not quite: the theorem is for a loss in [0, 1] and i.i.d. "
              "examples; a world model's loss is unbounded and replay rows are neither "
              "independent nor identically distributed. It bounds the world model's loss, "
              "not the value-estimation gap (the paper's own theorem is not evaluated here). "
              + ("Every run's complexity term is >= 1: the bound is vacuous (it would be for a "
                 "[0, 1] loss too), as it is wherever k is far above n; compare arms by "
                 "L_S(w + e) - L_S(w), the sharpness, not by the bound's value." if vacuous
                 else "Where the complexity term is >= 1 the bound is vacuous."), ""]
    return lines


def diagnostics_cost(fin: Any) -> list[str]:
    """Seconds per diagnostic step and their share of the runs' wall time, as run and at the
    default diag_every."""
    from flatworld.runs.config import EVERY

    g = fin[fin["diag_s"].notna() & (fin["wall_time"] > 0)]
    if g.empty:
        return []
    per = g["diag_s"].to_numpy(float)
    share = g["diag_total_s"].to_numpy(float) / g["wall_time"].to_numpy(float)
    per_step = (g["wall_time"] - g["diag_total_s"]).to_numpy(float) / g["steps"].to_numpy(float)
    at_default = per / (per + per_step * EVERY)
    return ["## What the diagnostics cost", "",
            "A diagnostic step (sharpness and the bound on the held-out batch, and "
            f"lambda_max where a run asked for it) took {_g(float(np.median(per)))} s "
            f"(median over {len(g)} runs; range "
            f"{_g(float(per.min()))}–{_g(float(per.max()))} s), {100 * np.median(share):.2g}% "
            f"of the runs' wall time as they ran. At the default diag_every of {EVERY:,} "
            f"steps that is {100 * np.median(at_default):.2g}% of training time (each run's "
            "seconds per step without diagnostics).", ""]  # fmt: skip


# -- helpers kept for callers of the earlier report ------------------------------------------
def load_runs(run_dirs: list[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """{label: [{"dir", "rows", "seed", "env"}]} from run folders (config.yaml, metrics.csv)."""
    import yaml

    from flatworld.runs.logger import read_metrics

    groups: dict[str, list[dict[str, Any]]] = {}
    for d in map(Path, run_dirs):
        if not (d / "config.yaml").exists():
            raise FileNotFoundError(f"{d} has no config.yaml: not a flatworld run folder")
        config = yaml.safe_load((d / "config.yaml").read_text())
        label = store.label_of(config)[0]
        groups.setdefault(label, []).append(
            {"dir": d, "rows": read_metrics(d / "metrics.csv"), "seed": config["run"]["seed"],
             "env": config["run"]["env"]})  # fmt: skip
    return groups


def final_value(run: dict[str, Any], column: str) -> float:
    """The last finite value of ``column`` in a run from ``load_runs`` (nan if none)."""
    for r in reversed(run["rows"]):
        v = r.get(column, "")
        if v not in ("", None) and math.isfinite(float(v)):
            return float(v)
    return float("nan")
