"""Domain-generalization benchmarks built from scikit-learn's bundled digits (8x8, 1,797 images).

In the style of Rotated-MNIST (DomainBed): the images are shuffled once with a fixed seed and
dealt into disjoint per-domain subsets, each rotated by its domain's angle (bilinear, shape
kept). A second variant shifts contrast and adds pixel noise instead of rotating. Domains are
generated deterministically and cached as npz (written atomically, read without pickle).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flatworld.studies.common import atomic_write_bytes

ANGLES = (0, 15, 30, 45, 60, 75)
# (contrast, noise std) per domain of the shifted variant; pixels live in [0, 1]
SHIFTS = ((1.0, 0.0), (0.8, 0.05), (0.6, 0.1), (0.5, 0.15), (0.4, 0.2), (0.3, 0.25))
KINDS = ("rotated", "shifted")
_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FLATWORLD_CACHE", Path.home() / ".cache" / "flatworld"))


def domain_names(kind: str = "rotated") -> list[str]:
    _check_kind(kind)
    if kind == "rotated":
        return [f"{a}°" for a in ANGLES]
    return [f"c{c:g}/n{s:g}" for c, s in SHIFTS]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown digits variant {kind!r}; accepted: {', '.join(KINDS)}")


def generate(kind: str = "rotated") -> dict[str, np.ndarray]:
    """Build the domains from scratch: x (N, 8, 8) float32 in [0, 1], y (N,), domain (N,)."""
    from scipy.ndimage import rotate
    from sklearn.datasets import load_digits

    _check_kind(kind)
    data = load_digits()
    images = (data.images / 16.0).astype(np.float64)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(12345)
    perm = rng.permutation(len(images))
    n_dom = len(ANGLES) if kind == "rotated" else len(SHIFTS)
    xs, ys, ds = [], [], []
    for d in range(n_dom):
        idx = perm[d::n_dom]
        x = images[idx]
        if kind == "rotated":
            x = np.stack([rotate(im, ANGLES[d], reshape=False, order=1, mode="constant")
                          for im in x])
        else:
            c, s = SHIFTS[d]
            x = 0.5 + c * (x - 0.5) + s * rng.standard_normal(x.shape)
        xs.append(np.clip(x, 0.0, 1.0).astype(np.float32))
        ys.append(labels[idx])
        ds.append(np.full(len(idx), d, dtype=np.int64))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys), "domain": np.concatenate(ds)}


def load(kind: str = "rotated", cache: Path | None = None) -> dict[str, np.ndarray]:
    """The domains, from the cache when present (generated and cached otherwise)."""
    _check_kind(kind)
    path = (cache or cache_dir()) / f"digits_{kind}_v{_VERSION}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in ("x", "y", "domain")}
    arrays = generate(kind)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return arrays


@dataclass
class Split:
    x: torch.Tensor  # (N, 64) float32
    y: torch.Tensor  # (N,) int64
    domain: torch.Tensor  # (N,) int64


@dataclass
class LODOSplit:
    """Leave-one-domain-out: train/val from the source domains, test on the held-out one."""

    train: Split
    val: Split
    test: Split
    sources: list[int]
    target: int


def _split(a: dict[str, np.ndarray], idx: np.ndarray) -> Split:
    return Split(torch.from_numpy(a["x"][idx].reshape(len(idx), -1).copy()),
                 torch.from_numpy(a["y"][idx].copy()), torch.from_numpy(a["domain"][idx].copy()))


def leave_one_out(arrays: dict[str, np.ndarray], target: int, holdout: float = 0.2,
                  seed: int = 0) -> LODOSplit:
    """DomainBed-style split: each source domain keeps `holdout` of its images for validation."""
    n_dom = int(arrays["domain"].max()) + 1
    if not 0 <= target < n_dom:
        raise ValueError(f"target domain {target} out of range; accepted: 0..{n_dom - 1}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout={holdout} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    tr, va = [], []
    sources = [d for d in range(n_dom) if d != target]
    for d in sources:
        idx = rng.permutation(np.flatnonzero(arrays["domain"] == d))
        k = int(round(holdout * len(idx)))
        va.append(idx[:k])
        tr.append(idx[k:])
    test = np.flatnonzero(arrays["domain"] == target)
    return LODOSplit(_split(arrays, np.concatenate(tr)), _split(arrays, np.concatenate(va)),
                     _split(arrays, test), sources, target)


def iid_split(holdout: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """The unrotated digits as a plain classification task: (train, test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    full = {"x": x, "y": data.target.astype(np.int64), "domain": np.zeros(len(x), np.int64)}
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    k = int(round(holdout * len(idx)))
    return _split(full, idx[k:]), _split(full, idx[:k])
