"""TD-MPC2 hyperparameters, all in one place. Defaults follow the published TD-MPC2."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flatworld import optim
from flatworld.runs.config import from_dict, pos_int

# TD-MPC2's model-size table (parameters in millions -> widths). ``num_q`` is given where it
# differs from the default of 5.
MODEL_SIZES: dict[int, dict[str, int]] = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}
OBS_TYPES = ("state", "rgb")
SAM_SCOPES = ("all", "encoder_dynamics")
# "elite": the published rule, an elite trajectory drawn by its score (plus noise of the final
# std in training); "mean": the MPPI mean (plus the same noise in training).
PLAN_ACTIONS = ("elite", "mean")


def default_wm_optim() -> optim.OptimSpec:
    return optim.OptimSpec(base="adam", lr=3e-4, weight_decay=0.0, sam=None)


@dataclass
class TDMPC2Config:
    # architecture; the *_dim/num_* fields override the size table when set (tiny test models)
    model_size: int = field(default=5, metadata={"choices": tuple(MODEL_SIZES)})
    obs: str = field(default="state", metadata={"choices": OBS_TYPES})
    enc_dim: int | None = None
    mlp_dim: int | None = None
    latent_dim: int | None = None
    num_enc_layers: int | None = None
    num_q: int | None = None
    num_channels: int = 32
    simnorm_dim: int = 8
    dropout: float = 0.01
    num_bins: int = 101
    vmin: float = -10.0
    vmax: float = 10.0
    log_std_min: float = -10.0
    log_std_max: float = 2.0
    # A termination head that masks bootstraps. None: set by the run from the env suite
    # (flatworld.envs.terminates): on where tasks can terminate, off for DMC.
    episodic: bool | None = field(default=None, metadata={
        "help": "default: follows the env suite (on where its tasks can terminate)"})
    # world-model objective
    horizon: int = 3
    batch_size: int = 256
    rho: float = 0.5  # temporal weight rho^t of the horizon losses
    consistency_coef: float = 20.0
    reward_coef: float = 0.1
    value_coef: float = 0.1
    termination_coef: float = 1.0
    tau: float = 0.01  # Polyak rate of the target Q and of the policy-loss scale
    discount_denom: float = 5.0
    discount_min: float = 0.95
    discount_max: float = 0.995
    # optimisation: the world-model optimizer is this spec; SAM or not is the spec's choice
    wm_optim: optim.OptimSpec = field(default_factory=default_wm_optim)
    sam_scope: str = field(default="all", metadata={"choices": SAM_SCOPES})
    enc_lr_scale: float = 0.3
    grad_clip_norm: float = 20.0
    pi_lr: float = 3e-4
    pi_eps: float = 1e-5
    entropy_coef: float = 1e-4
    # MPPI planning
    mpc: bool = True
    plan_action: str = field(default="elite", metadata={"choices": PLAN_ACTIONS})
    iterations: int = 6  # +2 when the action space has >= 20 dims
    num_samples: int = 512
    num_elites: int = 64
    num_pi_trajs: int = 24
    temperature: float = 0.5
    min_std: float = 0.05
    max_std: float = 2.0
    # torch.compile (inductor) of the world-model loss with its backward (both SAM passes call
    # it), the policy loss with its backward, and the MPPI search: LayerNorm + Mish, SimNorm and
    # the planner's elementwise work run as fused kernels. Random ops run as in eager, so a
    # compiled update matches an eager one to float rounding. Targets, optimizer steps and
    # diagnostics (double backward for lambda_max) stay eager. Measured on a 2-core CPU, one
    # thread: updates 0.7-0.9x, acts 0.6x the eager time, after ~1-2 min of compiling (cold).
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the world-model loss, the policy loss and the MPPI search "
                "(default: off; minutes of compiling at the start on a CPU, then faster)"})

    def dims(self) -> dict[str, int]:
        """The resolved widths: the size table, overridden by any field that is set."""
        d = {"num_q": 5, **MODEL_SIZES.get(self.model_size, MODEL_SIZES[5])}
        for k in ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    def validate(self) -> TDMPC2Config:
        def check(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: {accepted}")

        check(self.model_size in MODEL_SIZES, "model_size", f"one of {sorted(MODEL_SIZES)}")
        check(self.obs in OBS_TYPES, "obs", f"one of {OBS_TYPES}")
        check(self.sam_scope in SAM_SCOPES, "sam_scope", f"one of {SAM_SCOPES}")
        check(self.plan_action in PLAN_ACTIONS, "plan_action", f"one of {PLAN_ACTIONS}")
        check(self.episodic in (None, True, False), "episodic",
              "None (follow the env suite), True or False")  # fmt: skip
        for k in ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q"):
            check(getattr(self, k) is None or pos_int(getattr(self, k)), k, "None or an int >= 1")
        d = self.dims()
        check(d["num_q"] >= 2, "num_q", "an int >= 2 (two heads are subsampled for targets)")
        check(d["latent_dim"] % self.simnorm_dim == 0, "latent_dim",
              f"a multiple of simnorm_dim={self.simnorm_dim}")  # fmt: skip
        for k in ("num_channels", "simnorm_dim", "horizon", "batch_size", "iterations",
                  "num_samples", "num_elites"):  # fmt: skip
            check(pos_int(getattr(self, k)), k, "an int >= 1")
        check(isinstance(self.num_bins, int) and self.num_bins >= 2, "num_bins", "an int >= 2")
        check(self.vmin < self.vmax, "vmax", f"> vmin={self.vmin}")
        check(self.log_std_min < self.log_std_max, "log_std_max", f"> {self.log_std_min}")
        check(0.0 <= self.dropout < 1.0, "dropout", "0 <= dropout < 1")
        check(0.0 < self.rho <= 1.0, "rho", "0 < rho <= 1")
        check(0.0 < self.tau <= 1.0, "tau", "0 < tau <= 1")
        for k in ("consistency_coef", "reward_coef", "value_coef", "termination_coef",
                  "entropy_coef"):  # fmt: skip
            check(getattr(self, k) >= 0.0, k, "a float >= 0")
        for k in ("enc_lr_scale", "grad_clip_norm", "pi_lr", "pi_eps", "temperature",
                  "discount_denom"):  # fmt: skip
            check(getattr(self, k) > 0.0, k, "a float > 0")
        check(0.0 < self.discount_min <= self.discount_max < 1.0, "discount_max",
              f"discount_min <= discount_max < 1 (discount_min={self.discount_min})")  # fmt: skip
        check(self.num_elites <= self.num_samples, "num_elites",
              f"<= num_samples={self.num_samples}")  # fmt: skip
        check(isinstance(self.num_pi_trajs, int) and 0 <= self.num_pi_trajs < self.num_samples,
              "num_pi_trajs", f"an int in [0, num_samples={self.num_samples})")  # fmt: skip
        check(0.0 < self.min_std <= self.max_std, "min_std", "0 < min_std <= max_std")
        check(isinstance(self.compile, bool), "compile", "True or False")
        check(hasattr(self.wm_optim, "base") and hasattr(self.wm_optim, "sam"), "wm_optim",
              "a flatworld.optim.OptimSpec")  # fmt: skip
        sam = self.wm_optim.sam
        if sam is not None and getattr(sam, "m", None) is not None:
            # Batches are time-major (H, B, ...) and the targets are shared across the batch,
            # so a chunked (m-sharpness) closure does not fit this agent.
            raise ValueError(f"wm_optim.sam.m={sam.m!r}; accepted: None for tdmpc2")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TDMPC2Config:
        """Rebuild from `dataclasses.asdict` output (config.yaml); unknown fields fail."""
        return from_dict(cls, d)

