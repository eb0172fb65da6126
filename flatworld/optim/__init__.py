"""Sharpness-aware optimizers that wrap any torch optimizer, and the related flat-minima
methods: MeCAM, LSQ quantization-aware training (QT-DoG) and Granger-causal pruning."""

from flatworld.optim.build import OptimSpec, SamSpec, build
from flatworld.optim.finite import closure_step, nonfinite, step_if_finite, step_unless
from flatworld.optim.mecam import MeCAM, MeCAMTerms
from flatworld.optim.prune import GrangerPruner
from flatworld.optim.quant import FakeQuant, add_to_optimizer, lsq_quantize, model_bits, quantize_
from flatworld.optim.sam import SAM, is_weight_matrix
from flatworld.optim.when import Always, EveryK, LatePhase, RhoSchedule

__all__ = ["SAM", "Always", "EveryK", "FakeQuant", "GrangerPruner", "LatePhase", "MeCAM",
           "MeCAMTerms", "OptimSpec", "RhoSchedule", "SamSpec", "add_to_optimizer", "build",
           "closure_step", "is_weight_matrix", "lsq_quantize", "model_bits", "nonfinite",
           "quantize_", "step_if_finite", "step_unless"]
