"""metrics.csv (one row per log step, flushed), and optionally TensorBoard events and a
Weights & Biases run."""

from __future__ import annotations

import csv
import io
import math
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from flatworld.runs.checkpoint import atomic_write_text
from flatworld.runs.config import WANDB_PIP

# The W&B run id of a run folder: kept so that `--resume` goes on in the same W&B run.
WANDB_ID_FILE = "wandb-id.txt"

# Always present, in this order; agent update metrics follow as `train/<name>`.
COLUMNS = (
    "step", "env_steps", "episode", "updates", "episode_return", "episode_length",
    "eval_return", "eval_return_std", "eval_length", "eval_discounted_return", "value_pred",
    "value_error", "wm_loss", "wm_sharpness", "model_error", "wm_lambda_max",
    # the SAM bound's terms and value at each diagnostic step (flatworld.sharpness.bound)
    "bound_loss", "bound_perturbed_loss", "bound_k", "bound_w_norm_sq", "bound_rho", "bound_n",
    "bound_delta", "bound_complexity", "bound_value",
    "diag_s", "sps", "wall_s",
)  # fmt: skip
# Columns that time the run: they differ between two runs that are otherwise bit-identical.
TIMING = ("diag_s", "sps", "wall_s")


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsLog:
    """Rows keyed by step. A new column (an agent metric seen for the first time) rewrites the
    file with the wider header, atomically, so the file always has one column set."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 wandb_project: str = "", echo: bool = False):
        self.echo = echo  # a line per row on stderr, for log files (runs without a bar)
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
        self.wandb = _wandb_run(run_dir, wandb_project) if wandb_project else None

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
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        step = int(row["step"])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            # W&B keeps a step it has seen: rows redone after a resume are dropped there.
            self.wandb.log(scalars, step=step)
        if self.echo:
            print(summary(row), file=sys.stderr, flush=True)  # beside tqdm's bars

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def summary(row: dict[str, Any]) -> str:
    """One line of a metrics row: step, episodes, the last returns, updates and speed."""
    parts = [f"step {row['step']}", f"episode {row.get('episode', 0)}"]
    for key, name in (("episode_return", "return"), ("eval_return", "eval return")):
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(f"{name} {value:.1f}")
    parts += [f"updates {row.get('updates', 0)}", f"{row.get('sps', 0)} steps/s"]
    return ", ".join(parts)


def _wandb_run(run_dir: Path, project: str) -> Any:
    """A W&B run named after the run folder, with its config.yaml as the run's config; the
    same W&B run again when the folder is resumed. WANDB_MODE=offline writes it locally."""
    try:
        import wandb
    except ImportError:
        raise ImportError(f"wandb_project={project!r} needs wandb: {WANDB_PIP}") from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    if not run_id:
        run_id = secrets.token_hex(8)  # not drawn from the run's seeded generators
        atomic_write_text(id_file, run_id + "\n")
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
    return wandb.init(project=project, id=run_id, name=run_dir.name, dir=str(run_dir),
                      config=config, resume="allow")
