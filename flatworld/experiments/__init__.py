"""Sweeps of runs (tasks x grid points x seeds), the result store, and the report.

    spec = load_spec("sweep.yaml")            # or load_spec(preset_path("paper-dmc-smoke"))
    run_sweep(spec, "sweeps/mine")            # local pool; ray_address="auto" for Ray
    frame = load("sweeps/mine")               # pandas: a row per run x evaluation
    report("sweeps/mine")                     # report.md and PNG figures
"""

from flatworld.experiments.report import final_value, load_runs, report
from flatworld.experiments.spec import SpecError, expand, load_spec, preset_path, presets
from flatworld.experiments.store import export, load
from flatworld.experiments.sweep import run_state, run_sweep, sweep

__all__ = [
    "SpecError", "expand", "export", "final_value", "load", "load_runs", "load_spec",
    "preset_path", "presets", "report", "run_state", "run_sweep", "sweep",
]  # fmt: skip
