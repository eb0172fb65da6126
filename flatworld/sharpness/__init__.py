"""Sharpness measurements. They only measure: the weights and the `.grad` they find are exactly
the ones they leave. `loss_fn()` computes the loss on a fixed batch without calling backward;
it should be deterministic (eval mode: no dropout, no BatchNorm statistics updates)."""

from flatworld.sharpness.bound import SamBound, sam_bound, weight_terms
from flatworld.sharpness.hessian import Eigen, Trace, hessian_trace, hvp, lambda_max
from flatworld.sharpness.perturb import first_order, m_sharpness, worst_case


def training_diagnostics(loss_fn, params, rho: float, with_lambda_max: bool = False,
                         iters: int = 20) -> dict[str, float]:  # fmt: skip
    """What a training run logs of its world model: first-order sharpness at radius `rho`
    (`wm_sharpness`) and, when asked, the top Hessian eigenvalue (`wm_lambda_max`)."""
    out = {"wm_sharpness": first_order(loss_fn, params, rho)}
    if with_lambda_max:
        out["wm_lambda_max"] = lambda_max(loss_fn, params, iters=iters).value
    return out

__all__ = [
    "Eigen",
    "SamBound",
    "Trace",
    "first_order",
    "hessian_trace",
    "hvp",
    "lambda_max",
    "m_sharpness",
    "sam_bound",
    "training_diagnostics",
    "weight_terms",
    "worst_case",
]
