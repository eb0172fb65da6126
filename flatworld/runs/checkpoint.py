"""Atomic files and checkpoints that load without unpickling code."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write via a temp file in the same folder, fsync, then rename over `path`: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos")
        if getattr(err, "errno", None) == errno.ENOSPC or _disk_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    # The rename itself is durable only once the folder entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Save `state` as `folder/step_<step>.pt`, keeping the newest `keep` checkpoints.

    The file just written is always kept, whatever its step (a run resumed from an older
    checkpoint writes steps below those of checkpoints it refused).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:010d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    others = [p for _, p in list_checkpoints(folder) if p != path]
    for old in others[: max(len(others) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)
    return path


def unloadable(err: BaseException) -> str:
    """Why a file did not load, in a few words: never torch's advice to load it with
    weights_only=False, which would run whatever code it holds."""
    if isinstance(err, pickle.UnpicklingError):
        return ("it holds pickled Python objects, which flatworld never loads "
                "(only tensors and plain data)")  # fmt: skip
    text = str(err)
    if isinstance(err, EOFError) or "central directory" in text or "zip archive" in text:
        return "it is truncated or not a torch file"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_checkpoint(
    folder: str | Path,
    map_location: str = "cpu",
    validate: Callable[[dict[str, Any]], None] | None = None,
    set_aside: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Load the newest checkpoint that reads back and passes `validate` (which raises on a
    state that lacks something); a damaged one (e.g. truncated by a crash or a full disk) is
    refused with a warning and the one before it is tried. With `set_aside`, refused files
    newer than the one loaded are renamed `<name>.refused`, so they no longer count among
    the checkpoints kept (nor are tried again)."""
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"no checkpoints (step_*.pt) in {folder}")
    errors, refused = [], []
    for _, path in reversed(found):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a flatworld checkpoint (no 'step')")
            if validate is not None:
                validate(state)
        except Exception as e:  # noqa: BLE001  (any failure means: this file is unusable)
            why = unloadable(e)
            errors.append(f"{path.name}: {why}")
            refused.append(path)
            warnings.warn(f"refusing checkpoint {path}: {why}; trying the previous one",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
            continue
        if set_aside:
            for bad in refused:
                bad.rename(bad.with_name(bad.name + ".refused"))
        return state, path
    raise ValueError(f"no checkpoint in {folder} loads: " + "; ".join(errors))


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and CUDA) RNG states, as a checkpoint stores them."""
    # Only tensors, ints, floats, strings and lists: torch.load(weights_only=True) reads them.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
