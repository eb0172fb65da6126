"""Sharpness measurements. They only measure: the weights and the `.grad` they find are exactly
the ones they leave. `loss_fn()` computes the loss on a fixed batch without calling backward;
it should be deterministic (eval mode: no dropout, no BatchNorm statistics updates)."""

from flatworld.sharpness.hessian import Eigen, Trace, hessian_trace, hvp, lambda_max
from flatworld.sharpness.perturb import first_order, m_sharpness, worst_case

__all__ = [
    "Eigen",
    "Trace",
    "first_order",
    "hessian_trace",
    "hvp",
    "lambda_max",
    "m_sharpness",
    "worst_case",
]
