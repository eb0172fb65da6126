"""Sharpness-aware optimizers that wrap any torch optimizer."""

from flatworld.optim.build import OptimSpec, SamSpec, build
from flatworld.optim.sam import SAM, is_weight_matrix
from flatworld.optim.when import Always, EveryK, LatePhase, RhoSchedule

__all__ = ["SAM", "Always", "EveryK", "LatePhase", "OptimSpec", "RhoSchedule", "SamSpec",
           "build", "is_weight_matrix"]
