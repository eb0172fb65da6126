"""The result store: one pandas table with a row per run x evaluation.

Columns: ``run`` (the folder, relative to the sweep), ``task``, ``agent``, ``seed``,
``label`` (the grid point: runs of different agents or configs never share one), one column
per grid field, ``episode_length`` and ``action_repeat`` (the run's env options; None: the
suite's default), ``step`` (agent steps), ``env_steps``,
``return``, ``sharpness`` (world-model first-order sharpness), ``value_error``,
``model_error`` and ``wall_time`` (seconds of training so far). A row is a metrics row on
which an evaluation or a diagnostic was logged; missing values are NaN.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

METRIC_COLUMNS = {  # metrics.csv column -> store column
    "eval_return": "return",
    "wm_sharpness": "sharpness",
    "value_error": "value_error",
    "model_error": "model_error",
    "wall_s": "wall_time",
    "diag_s": "diag_s",
    # the SAM bound at each diagnostic step (flatworld.sharpness.bound)
    "bound_loss": "bound_loss",
    "bound_perturbed_loss": "bound_perturbed_loss",
    "bound_k": "bound_k",
    "bound_w_norm_sq": "bound_w_norm_sq",
    "bound_rho": "bound_rho",
    "bound_n": "bound_n",
    "bound_complexity": "bound_complexity",
    "bound_value": "bound",
}


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def label_of(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A loose run folder's label and grid fields, from its config.yaml."""
    spec = config["agent"]["config"].get("wm_optim") or {}
    sam = spec.get("sam")
    if not sam:
        return "adam", {"wm_optim": "adam"}
    fields = {"wm_optim": "sam", "rho": sam["rho"]}
    extra = ""
    if sam.get("adaptive"):
        fields["adaptive"] = True
        extra = ", adaptive=True"
    return f"sam, rho={sam['rho']!r}{extra}", fields


def _rows(run_dir: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    from flatworld.runs.logger import read_metrics

    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    out = []
    for r in read_metrics(path):
        vals = {col: _num(r.get(src)) for src, col in METRIC_COLUMNS.items()}
        if all(math.isnan(vals[c]) for c in ("return", "sharpness", "value_error",
                                              "model_error")):  # fmt: skip
            continue
        out.append({**base, "step": int(_num(r["step"])),
                    "env_steps": int(_num(r.get("env_steps", r["step"]))), **vals})
    return out


Source = tuple[Path, dict[str, Any], dict[str, Any]]  # folder, fields, its config flattened


def _episode_fields(env_options: dict[str, Any] | None) -> dict[str, Any]:
    """The episode length and action repeat a run set (None: the suite's default), which the
    report needs to normalise returns and to compare with published full-episode curves."""
    opts = env_options or {}
    return {"episode_length": opts.get("episode_length"),
            "action_repeat": opts.get("action_repeat")}  # fmt: skip


def _compared(agent_cfg: dict[str, Any], run_cfg: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for runs to be seeds of one arm: the agent config, the env options
    and the budget (flattened)."""
    from flatworld.runs import flat_config

    opts = run_cfg.get("env_options") or {}
    budget = {"steps": run_cfg["steps"]} if "steps" in run_cfg else {}
    return {**flat_config(agent_cfg or {}), **flat_config({"env_options": opts}),
            **{f"env_options.{k}": v for k, v in _episode_fields(opts).items()}, **budget}


def sweep_runs(sweep_dir: str | Path) -> list[Source]:
    """(run folder, its identifying fields, its config flattened) for every run of a sweep
    folder's spec."""
    from flatworld.experiments.spec import expand, load_spec
    from flatworld.runs.folder import config_dict, resolve_episodic

    sweep_dir = Path(sweep_dir)
    raw = yaml.safe_load((sweep_dir / "spec.yaml").read_text())
    spec = load_spec(raw, name=sweep_dir.name, check=False)
    out = []
    for run in expand(spec, sweep_dir, check=False):
        run_cfg = config_dict(run.run_cfg) if run.run_cfg is not None else {}
        agent_cfg = {}
        if run.agent_cfg is not None:  # as the run folder stores it
            agent_cfg = config_dict(resolve_episodic(run.task, run.agent_cfg))
        fields = {"run": run.run_id, "task": run.task, "agent": run.agent, "seed": run.seed,
                  "label": run.label, **{k: v for k, v in run.point.items() if k != "agent"},
                  **_episode_fields(run_cfg.get("env_options"))}  # fmt: skip
        out.append((sweep_dir / run.run_id, fields, _compared(agent_cfg, run_cfg)))
    return out


def loose_run(run_dir: str | Path) -> Source:
    """(folder, its identifying fields, its config flattened)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ValueError(f"{run_dir} has no config.yaml: not a flatworld run folder")
    config = yaml.safe_load(path.read_text())
    label, fields = label_of(config)
    run_cfg = config["run"]
    return run_dir, {"run": str(run_dir), "task": run_cfg["env"],
                     "agent": config["agent"]["name"], "seed": run_cfg["seed"],
                     "label": label, **fields, **_episode_fields(run_cfg.get("env_options"))
                     }, _compared(config["agent"].get("config") or {}, run_cfg)  # fmt: skip


def _label_differences(loose: list[Source]) -> list[Source]:
    """Loose run folders whose agent configs differ beyond the optimizer (a learning rate, a
    model size) get those fields in their labels, so that they are not pooled as seeds of one
    arm; folders that differ only by seed keep the optimizer's label. Folders are compared
    with the others of their agent."""
    configs = [{k: v for k, v in c.items() if not k.startswith("wm_optim.sam")}
               for _, _, c in loose]  # fmt: skip
    out = []
    for (d, base, full), cfg in zip(loose, configs, strict=True):
        peers = [c for (_, b, _), c in zip(loose, configs, strict=True)
                 if b["agent"] == base["agent"]]  # fmt: skip
        keys = sorted({k for c in peers for k in c})
        extra = ", ".join(f"{k}={cfg.get(k)!r}" for k in keys
                          if len({repr(c.get(k)) for c in peers}) > 1)  # fmt: skip
        label = f"{base['label']}, {extra}" if extra else base["label"]
        out.append((d, {**base, "label": label}, full))
    return out


def _arms(sources: list[Source]) -> list[Source]:
    """Labels that never pool runs of different agents or configs: a label shared by several
    agents gets the agent's name in front; a label whose runs on one task differ in config
    (across sweeps, or a sweep and run folders) gets the differing fields. Two runs left with
    the same label, task and seed are an error naming both folders."""

    def groups(srcs: list[Source], key: Any) -> dict[Any, list[int]]:
        out: dict[Any, list[int]] = {}
        for i, (_, base, _) in enumerate(srcs):
            out.setdefault(key(base), []).append(i)
        return out

    srcs = list(sources)
    for idx in groups(srcs, lambda b: b["label"]).values():
        if len({srcs[i][1]["agent"] for i in idx}) > 1:
            for i in idx:
                d, base, cfg = srcs[i]
                srcs[i] = (d, {**base, "label": f"{base['agent']}, {base['label']}"}, cfg)
    for idx in groups(srcs, lambda b: b["label"]).values():
        differ: list[str] = []
        for sub in groups([srcs[i] for i in idx], lambda b: b["task"]).values():
            cfgs = [srcs[idx[j]][2] for j in sub]
            # a key some folders do not record (an older config) cannot tell them apart
            differ += [k for k in sorted(set.intersection(*(set(c) for c in cfgs)))
                       if k not in differ and len({repr(c[k]) for c in cfgs}) > 1]
        for i in idx if differ else ():
            d, base, cfg = srcs[i]
            extra = ", ".join(f"{k}={cfg.get(k)!r}" for k in differ)
            srcs[i] = (d, {**base, "label": f"{base['label']}, {extra}"}, cfg)
    for idx in groups(srcs, lambda b: (b["label"], b["task"], b["seed"])).values():
        if len(idx) > 1:
            a, b = (srcs[i] for i in idx[:2])
            raise ValueError(f"{a[0]} and {b[0]} are both seed {a[1]['seed']} of "
                             f"[{a[1]['label']}] on {a[1]['task']}: a report pools the seeds of "
                             "an arm, so it takes one of them; accepted: leave one out")
    return srcs


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / "spec.yaml").exists()


def load(sweep_dir: str | Path | list[str | Path] | None = None,
         run_dirs: list[str | Path] = ()) -> Any:  # fmt: skip
    """The runs of sweep folders (a path or a list; run folders may be among them) and of any
    extra run folders, as one pandas DataFrame."""
    import pandas as pd

    firsts = [] if sweep_dir is None else (
        list(sweep_dir) if isinstance(sweep_dir, list | tuple) else [sweep_dir])
    sweeps = [Path(s) for s in firsts if is_sweep(s)]
    loose_dirs = [s for s in firsts if not is_sweep(s)] + list(run_dirs)
    for d in firsts:
        if not is_sweep(d) and not (Path(d) / "config.yaml").exists():
            raise ValueError(f"{d} is neither a sweep folder (spec.yaml) nor a run folder "
                             "(config.yaml)")  # fmt: skip
    sources: list[Source] = []
    for s in sweeps:
        found = sweep_runs(s)
        if len(sweeps) + len(loose_dirs) > 1:  # run ids are unique within one sweep only
            found = [(d, {**base, "run": str(d)}, cfg) for d, base, cfg in found]
        sources += found
    sources = _arms(sources + _label_differences([loose_run(d) for d in loose_dirs]))
    rows = [row for d, base, _ in sources for row in _rows(d, base)]
    grid_cols: list[str] = []
    for _, base, _ in sources:
        grid_cols += [k for k in base if k not in grid_cols]
    cols = grid_cols + ["step", "env_steps", *METRIC_COLUMNS.values()]
    return pd.DataFrame(rows, columns=cols)


def export(frame: Any, path: str | Path) -> Path:
    """Write the table as Parquet (pyarrow); object columns of mixed types become strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = frame.copy()
    for c in frame.columns:
        if frame[c].dtype == object:
            kinds = {type(v) for v in frame[c] if v is not None and v == v}
            if len(kinds) > 1 or (kinds and not kinds <= {str}):
                frame[c] = frame[c].map(lambda v: None if v is None or v != v else str(v))
    try:
        frame.to_parquet(path, index=False)
    except ImportError as err:
        raise ValueError(f"writing Parquet needs pyarrow: pip install 'flatworld[logs]' "
                         f"({err})") from None
    return path
