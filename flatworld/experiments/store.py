"""The result store: one pandas table with a row per run x evaluation.

Columns: ``run`` (the folder, relative to the sweep), ``task``, ``agent``, ``seed``,
``label`` (the grid point), one column per grid field, ``step`` (agent steps), ``env_steps``,
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


def sweep_runs(sweep_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(run folder, its identifying fields) for every run of a sweep folder's spec."""
    from flatworld.experiments.spec import expand, load_spec

    sweep_dir = Path(sweep_dir)
    raw = yaml.safe_load((sweep_dir / "spec.yaml").read_text())
    spec = load_spec(raw, name=sweep_dir.name)
    out = []
    for run in expand(spec, sweep_dir, check=False):
        fields = {"run": run.run_id, "task": run.task, "agent": run.agent, "seed": run.seed,
                  "label": run.label, **{k: v for k, v in run.point.items() if k != "agent"}}
        out.append((sweep_dir / run.run_id, fields))
    return out


def loose_run(run_dir: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, its identifying fields, its agent config flattened)."""
    from flatworld.runs import flat_config

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ValueError(f"{run_dir} has no config.yaml: not a flatworld run folder")
    config = yaml.safe_load(path.read_text())
    label, fields = label_of(config)
    return run_dir, {"run": str(run_dir), "task": config["run"]["env"],
                     "agent": config["agent"]["name"], "seed": config["run"]["seed"],
                     "label": label, **fields}, flat_config(config["agent"].get("config") or {})


def _label_differences(loose: list[tuple[Path, dict[str, Any], dict[str, Any]]]
                       ) -> list[tuple[Path, dict[str, Any]]]:  # fmt: skip
    """Loose run folders whose agent configs differ beyond the optimizer (a learning rate, a
    model size) get those fields in their labels, so that they are not pooled as seeds of one
    arm; folders that differ only by seed keep the optimizer's label. Folders are compared
    with the others of their agent."""
    configs = [{k: v for k, v in c.items() if not k.startswith("wm_optim.sam")}
               for _, _, c in loose]  # fmt: skip
    out = []
    for (d, base, _), cfg in zip(loose, configs, strict=True):
        peers = [c for (_, b, _), c in zip(loose, configs, strict=True)
                 if b["agent"] == base["agent"]]  # fmt: skip
        keys = sorted({k for c in peers for k in c})
        extra = ", ".join(f"{k}={cfg.get(k)!r}" for k in keys
                          if len({repr(c.get(k)) for c in peers}) > 1)  # fmt: skip
        out.append((d, {**base, "label": f"{base['label']}, {extra}" if extra else base["label"]}))
    return out


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / "spec.yaml").exists()


def load(sweep_dir: str | Path | None = None, run_dirs: list[str | Path] = ()) -> Any:
    """The sweep's runs (and any extra run folders) as one pandas DataFrame."""
    import pandas as pd

    sources: list[tuple[Path, dict[str, Any]]] = []
    loose_dirs = list(run_dirs)
    if sweep_dir is not None:
        if is_sweep(sweep_dir):
            sources += sweep_runs(sweep_dir)
        elif (Path(sweep_dir) / "config.yaml").exists():
            loose_dirs.insert(0, sweep_dir)
        else:
            raise ValueError(f"{sweep_dir} is neither a sweep folder (spec.yaml) nor a run "
                             "folder (config.yaml)")  # fmt: skip
    sources += _label_differences([loose_run(d) for d in loose_dirs])
    rows = [row for d, base in sources for row in _rows(d, base)]
    grid_cols: list[str] = []
    for _, base in sources:
        grid_cols += [k for k in base if k not in grid_cols]
    cols = grid_cols + ["step", "env_steps", *METRIC_COLUMNS.values()]
    frame = pd.DataFrame(rows, columns=cols)
    return frame


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
