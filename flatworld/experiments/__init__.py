"""Sweeps of runs (seeds x optimizers) and the report that compares them."""

from flatworld.experiments.report import load_runs, report
from flatworld.experiments.sweep import sweep

__all__ = ["load_runs", "report", "sweep"]
