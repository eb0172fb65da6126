"""metrics.csv (one row per log step, flushed) and optional TensorBoard events."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from flatworld.runs.checkpoint import atomic_write_text

# Always present, in this order; agent update metrics follow as `train/<name>`.
COLUMNS = (
    "step", "env_steps", "episode", "updates", "episode_return", "episode_length",
    "eval_return", "eval_return_std", "eval_length", "eval_discounted_return", "value_pred",
    "value_error", "wm_loss", "wm_sharpness", "model_error", "wm_lambda_max", "sps", "wall_s",
)  # fmt: skip


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsLog:
    """Rows keyed by step. A new column (an agent metric seen for the first time) rewrites the
    file with the wider header, atomically, so the file always has one column set."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = run_dir / "metrics.csv"
        self.fields = list(COLUMNS)
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            # Rows after the checkpoint are redone by the resumed run: drop them first.
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or COLUMNS)
                rows = [r for r in reader if int(r["step"]) <= resume_step]
        self._rewrite(rows)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self.tb = None
            else:
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fields]
        if new:
            self._file.close()
            rows = read_metrics(self.path)
            self.fields += new
            self._rewrite(rows)
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
        self._writer.writerow(row)
        self._file.flush()
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
