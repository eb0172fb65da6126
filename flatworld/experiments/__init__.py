"""Sweeps of runs (seeds x optimizers) and the report that compares them."""

from flatworld.experiments.report import final_value, load_runs, report
from flatworld.experiments.sweep import sweep

__all__ = ["final_value", "load_runs", "report", "sweep"]
