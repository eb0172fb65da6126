"""The studies: their data, the closed forms they rest on, and an end-to-end tiny run of each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flatworld import optim
from flatworld.studies import STUDIES, digits, run_study
from flatworld.studies.linear_eos import gd, gradient_flow, hessian, sharpness


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATWORLD_CACHE", str(cache))


def test_digits_domains_are_deterministic_and_cached(cache: Path) -> None:
    a, b = digits.generate("rotated"), digits.generate("rotated")
    for k in ("x", "y", "domain"):
        assert a[k].tobytes() == b[k].tobytes()
    assert a["x"].shape == (1797, 8, 8) and set(np.unique(a["domain"])) == set(range(6))
    loaded = digits.load("rotated")
    path = cache / "digits_rotated_v1.npz"
    assert path.exists()
    again = digits.load("rotated")
    for k in ("x", "y", "domain"):
        assert np.array_equal(loaded[k], a[k]) and np.array_equal(again[k], a[k])
    # domain 0 is unrotated: its images are the original digits of its subset
    assert not np.allclose(a["x"][a["domain"] == 0].mean(0), a["x"][a["domain"] == 3].mean(0))
    with pytest.raises(ValueError, match="rotated"):
        digits.load("mirrored")


def test_leave_one_out_split_is_disjoint_and_holds_out_the_target() -> None:
    split = digits.leave_one_out(digits.load("rotated"), target=2)
    assert set(split.test.domain.tolist()) == {2}
    assert 2 not in split.train.domain.tolist() and 2 not in split.val.domain.tolist()
    assert len(split.val.y) == pytest.approx(0.2 * (len(split.train.y) + len(split.val.y)), abs=5)
    with pytest.raises(ValueError, match="target"):
        digits.leave_one_out(digits.load("rotated"), target=6)


def test_imbalance_recurrence_holds_to_float64_precision() -> None:
    rng = np.random.default_rng(0)
    a, b, phi = rng.standard_normal(4), 0.2 * rng.standard_normal(4), 1.0
    for eta in (0.05, 0.3, 0.45):
        r = gd(a, b, phi, eta, steps=200)
        q, eps, n2 = r["Q"], r["eps"], r["norm"] ** 2
        pred = (1 - eta**2 * eps[:-1] ** 2) * q[:-1]
        assert np.max(np.abs(q[1:] - pred) / n2[:-1]) < 1e-14
    flow = gradient_flow(a, b, phi, t_end=30.0)
    assert np.max(np.abs(flow["Q"] - flow["Q"][0])) < 1e-9  # gradient flow conserves Q


def test_hessian_closed_form_at_a_minimum() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(3), rng.standard_normal(3)
    phi = float(a @ b)  # (a, b) is a minimum
    assert sharpness(a, b, phi) == pytest.approx(a @ a + b @ b, rel=1e-12)
    h = hessian(a, b, phi + 0.3)  # off the minimum: compare with finite differences
    w = np.concatenate([a, b])

    def grad(v: np.ndarray) -> np.ndarray:
        eps = v[:3] @ v[3:] - (phi + 0.3)
        return np.concatenate([eps * v[3:], eps * v[:3]])

    fd = np.stack([(grad(w + 1e-6 * e) - grad(w - 1e-6 * e)) / 2e-6 for e in np.eye(6)])
    np.testing.assert_allclose(h, fd, atol=1e-6)


def test_late_sam_takes_plain_steps_before_its_start_and_sam_steps_after() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    late, plain = nn.Linear(5, 3), nn.Linear(5, 3)
    plain.load_state_dict(late.state_dict())
    spec = optim.OptimSpec(base="sgd", lr=0.1, sam=optim.SamSpec(rho=0.1, when="late",
                                                                  start_fraction=0.5))
    opt_late = optim.build(spec, late.parameters(), total_steps=6)
    opt_plain = optim.build(optim.OptimSpec(base="sgd", lr=0.1), plain.parameters())
    calls = []
    for _ in range(6):
        n = [0]

        def closure(model: nn.Module = late, n: list[int] = n) -> torch.Tensor:
            n[0] += 1
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt_late.zero_grad(set_to_none=True)
        opt_late.step(closure)
        calls.append(n[0])
        opt_plain.zero_grad(set_to_none=True)
        opt_plain.step(lambda: closure(plain, [0]))
        same = all(torch.equal(p, q) for p, q in zip(late.parameters(), plain.parameters(),
                                                      strict=True))
        assert same == (sum(c == 2 for c in calls) == 0)
    assert calls == [1, 1, 1, 2, 2, 2]


def test_unknown_study_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="linear-eos"):
        run_study("no-such-study", tmp_path)


@pytest.mark.parametrize("name", list(STUDIES))
def test_each_study_runs_end_to_end_in_quick_mode(name: str, tmp_path: Path) -> None:
    report = run_study(name, tmp_path / name, quick=True)
    assert report == tmp_path / name / "report.md"
    text = report.read_text()
    assert text.startswith("# ") and "| " in text and "claim" in text.lower()
    pngs = list(report.parent.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    json.loads((report.parent / "results.json").read_text())
    assert not list(report.parent.glob(".*.tmp"))  # atomic writes leave no temp files
