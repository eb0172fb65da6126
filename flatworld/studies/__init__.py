"""Small studies of the flat-minima literature, on data that ships with a dependency.

`flatworld study NAME [--full] [--out DIR]` calls `run_study`. Each study writes `report.md`
(a table and what the original work claimed against what this run found), PNG plots and
`results.json` into its output folder.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Study:
    name: str
    summary: str
    module: str  # imported on use, so listing the studies stays cheap

    def run(self, out_dir: Path, full: bool = False, seed: int = 0, quick: bool = False) -> Path:
        mod = importlib.import_module(f"flatworld.studies.{self.module}")
        return mod.run(Path(out_dir), full=full, seed=seed, quick=quick)


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study("linear-eos", "GD vs gradient flow on a depth-2 linear net: edge of stability, "
              "imbalance recurrence, flatter minima at large step sizes", "linear_eos"),
        Study("late-sam", "SGD, SAM, and SGD switching to SAM for the last 20% of training",
              "late_sam"),
        Study("sam-approx", "1-step SAM vs n-step ascent vs the (approximate) exact worst case",
              "sam_approx"),
        Study("dg-digits", "ERM, SAM, MeCAM, QT-DoG, EoQ on rotated digits, leave-one-domain-out",
              "dg_digits"),
        Study("granger-prune", "Granger-causal (Lasso) iterative pruning: accuracy and sharpness "
              "against the fraction pruned", "granger_prune"),
    )
}


def run_study(name: str, out_dir: Path, full: bool = False, seed: int = 0,
              quick: bool = False) -> Path:
    """Run study `name` into `out_dir`; returns the path of its report.md.

    `quick` is a tiny setting for the tests only: it checks the plumbing, not the claims.
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; accepted: {', '.join(STUDIES)}")
    with single_thread():
        return STUDIES[name].run(Path(out_dir), full=full, seed=seed, quick=quick)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread for the duration of a study, restored afterwards.

    The studies' models are tiny: with several threads each op pays more in synchronisation
    than it computes, and on a loaded 2-core machine one MLP step went from ~0.4 ms to ~40 ms.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
