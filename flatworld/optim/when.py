"""When SAM is on, and how large its radius is, as a function of the step.

A schedule is a small frozen dataclass with one question to answer, so that the SAM
wrapper stays a single code path and a schedule can be checkpointed as plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class Always:
    """SAM on every step."""

    def sam_on(self, step: int) -> bool:
        return True


@dataclass(frozen=True)
class LatePhase:
    """Plain steps until ``start_step``, SAM afterwards.

    Late-phase SAM (Zhou et al. 2025) reaches most of SAM's flatness at a fraction of
    its cost. The base optimizer's state (Adam moments, momentum) carries over: the
    same optimizer object takes every step, only the gradient it is given changes.
    """

    start_step: int

    def __post_init__(self) -> None:
        _check(self.start_step >= 0, f"LatePhase start_step={self.start_step}; accepted: >= 0")

    @classmethod
    def from_fraction(cls, fraction: float, total_steps: int) -> LatePhase:
        _check(0.0 <= fraction <= 1.0, f"start_fraction={fraction}; accepted: 0 <= x <= 1")
        _check(total_steps > 0, f"total_steps={total_steps}; accepted: > 0 for a late-phase start")
        return cls(int(round(fraction * total_steps)))

    def sam_on(self, step: int) -> bool:
        return step >= self.start_step


@dataclass(frozen=True)
class EveryK:
    """SAM on every k-th step; the steps between are plain (amortised SAM).

    With ``reuse_grad`` the plain steps add the last measured SAM correction
    g_sam - g to their own gradient, the idea behind LookSAM: the sharpness direction
    changes slowly, so an old estimate of it is still worth more than none.
    """

    k: int
    reuse_grad: bool = False

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"EveryK k={self.k}; accepted: an integer >= 1")

    def sam_on(self, step: int) -> bool:
        return step % self.k == 0


Schedule = Always | LatePhase | EveryK


@dataclass(frozen=True)
class RhoSchedule:
    """rho at a step: ``constant``, ``linear`` from rho to rho_end over total_steps, or
    ``lr`` (proportional to the current learning rate, rho * lr / lr0), as in
    GSAM's observation that the perturbation should shrink with the step size."""

    kind: str = "constant"
    rho: float = 0.05
    rho_end: float = 0.0
    total_steps: int = 0
    lr0: float = 0.0

    def __post_init__(self) -> None:
        kinds = ("constant", "linear", "lr")
        _check(self.kind in kinds, f"rho schedule kind={self.kind!r}; accepted: {kinds}")
        _check(self.rho >= 0, f"rho={self.rho}; accepted: rho >= 0")
        _check(self.rho_end >= 0, f"rho_end={self.rho_end}; accepted: rho_end >= 0")
        if self.kind == "linear":
            _check(self.total_steps > 0, "linear rho schedule needs total_steps > 0")
        if self.kind == "lr":
            _check(self.lr0 > 0, f"lr rho schedule lr0={self.lr0}; accepted: lr0 > 0")

    def at(self, step: int, lr: float) -> float:
        if self.kind == "constant":
            return self.rho
        if self.kind == "linear":
            frac = min(step / self.total_steps, 1.0)
            return self.rho + (self.rho_end - self.rho) * frac
        return self.rho * lr / self.lr0
