"""Building blocks shared by agents."""

from flatworld.nn.layers import (
    Ensemble,
    Mish,
    NormedLinear,
    ShiftAug,
    SimNorm,
    conv_encoder,
    mish,
    mlp,
    num_params,
)
from flatworld.nn.linear import Linear, linear, onednn_linear, onednn_linear_enabled
from flatworld.nn.math import (
    RunningScale,
    TwoHot,
    rng_state,
    set_rng_state,
    soft_cross_entropy,
    symexp,
    symlog,
)

__all__ = [
    "Ensemble",
    "Linear",
    "Mish",
    "NormedLinear",
    "RunningScale",
    "ShiftAug",
    "SimNorm",
    "TwoHot",
    "rng_state",
    "set_rng_state",
    "conv_encoder",
    "linear",
    "mish",
    "mlp",
    "num_params",
    "onednn_linear",
    "onednn_linear_enabled",
    "soft_cross_entropy",
    "symexp",
    "symlog",
]
