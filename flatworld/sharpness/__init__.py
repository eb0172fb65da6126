"""Sharpness measurements. They only measure: the weights and the `.grad` they find are exactly
the ones they leave. `loss_fn()` computes the loss on a fixed batch without calling backward;
it should be deterministic (eval mode: no dropout, no BatchNorm statistics updates)."""

from flatworld.sharpness.bound import SamBound, sam_bound, weight_terms
from flatworld.sharpness.hessian import Eigen, Trace, hessian_trace, hvp, lambda_max
from flatworld.sharpness.perturb import first_order, first_order_losses, m_sharpness, worst_case

# The radius at which runs measure sharpness and the bound: one for every arm (a SAM arm's own
# rho would measure each arm at a different radius), so that arms are comparable.
DIAG_RHO = 0.05


def training_diagnostics(loss_fn, params, rho: float = DIAG_RHO, with_lambda_max: bool = False,
                         iters: int = 20) -> dict[str, float]:  # fmt: skip
    """What a training run logs of its world model at radius `rho`: first-order sharpness
    (`wm_sharpness`), the SAM bound's terms that come from the model (`bound_loss` L(w),
    `bound_perturbed_loss` L(w + e) at the first-order ascent point, `bound_k` parameters,
    `bound_w_norm_sq` |w|^2, `bound_rho`) and, when asked, the top Hessian eigenvalue
    (`wm_lambda_max`). The run adds n, the bound's complexity term and its value."""
    params = list(params)
    loss, perturbed = (x.item() for x in first_order_losses(loss_fn, params, rho))
    k, norm_sq = weight_terms(params)
    out = {"wm_sharpness": perturbed - loss, "bound_loss": loss,
           "bound_perturbed_loss": perturbed, "bound_k": float(k),
           "bound_w_norm_sq": norm_sq, "bound_rho": float(rho)}  # fmt: skip
    if with_lambda_max:
        out["wm_lambda_max"] = lambda_max(loss_fn, params, iters=iters).value
    return out

__all__ = [
    "DIAG_RHO",
    "Eigen",
    "SamBound",
    "Trace",
    "first_order",
    "first_order_losses",
    "hessian_trace",
    "hvp",
    "lambda_max",
    "m_sharpness",
    "sam_bound",
    "training_diagnostics",
    "weight_terms",
    "worst_case",
]
