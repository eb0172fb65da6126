"""DreamerV3 hyperparameters, all in one place. Defaults follow DreamerV3 v1 (the 2023 paper's
settings, small model, as used on Atari-100k); see ../shared/reference/README.md."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from flatworld import optim
from flatworld.agents.dreamer.transformer import POSITIONS
from flatworld.runs.config import from_dict, pos_int

# DreamerV3 v1's model-size table (the 2023 paper's appendix): GRU units, MLP units and layers,
# CNN depth multiplier. S is the Atari-100k model (about 15.7M world-model parameters on 64x64
# pixels). XS, M and L are the paper's other rows; its XL (GRU 4096) is left out.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "XS": dict(deter=256, units=256, layers=1, cnn_depth=24),
    "S": dict(deter=512, units=512, layers=2, cnn_depth=32),
    "M": dict(deter=1024, units=640, layers=3, cnn_depth=48),
    "L": dict(deter=2048, units=768, layers=4, cnn_depth=64),
}
SEQUENCE_MODELS = ("rssm", "transformer")  # DreamerV3's GRU; the TWISTER-style TSSM
# bf16: matmuls and convs run under torch.autocast in bfloat16 (DreamerV3's later official code
# computes in bfloat16; the v1 settings followed here are fp32, the default); weights, optimizer
# state, latent distributions and losses stay fp32.
PRECISIONS = ("fp32", "bf16")
EVAL_POLICIES = ("sample", "mode")  # DreamerV3 v1 samples the actor in evaluation episodes too
# How the actor learns in imagination: "auto" is DreamerV3's rule (REINFORCE for discrete
# actions, backpropagation through the dynamics for continuous ones).
ACTOR_GRADS = ("auto", "reinforce", "dynamics")
VECTOR_MLPS = ("published", "size")
# DreamerV3 v1 as it ran: vector observations pass through 5 layers of 1024 units at every model
# size (its size presets never reached the vector encoder and decoder).
PUBLISHED_VECTOR_MLP = dict(layers=5, units=1024)
# DreamerV3 v1's train ratio per suite (configs: dmc_proprio/dmc_vision 512, atari100k 1024);
# a suite not listed keeps 1024 (one update per agent step at batch 16 x 64).
SUITE_TRAIN_RATIO = {"dmc": 512, "atari": 1024}
DEFAULT_TRAIN_RATIO = 1024


def default_wm_optim() -> optim.OptimSpec:
    return optim.OptimSpec(base="adam", lr=1e-4, eps=1e-8, sam=None)


@dataclass
class DreamerConfig:
    # architecture; deter/units/layers/cnn_depth override the size table when set (tiny tests)
    model_size: str = field(default="S", metadata={"choices": tuple(MODEL_SIZES)})
    sequence_model: str = field(default="rssm", metadata={"choices": SEQUENCE_MODELS})
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS, "help": "bf16: matmuls and convs in bfloat16 under autocast "
        "(weights, optimizer state and losses fp32); pays where the hardware multiplies bf16 "
        "natively (AMX CPUs, recent GPUs), not on tiny models"})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "replay each update's world-model pass and actor-critic backward as CUDA graphs "
        "(the same numbers, far fewer kernel launches; fp32 only). On a CPU the same "
        "static-tensor path runs eagerly, with no speed-up"})
    deter: int | None = None
    units: int | None = None
    layers: int | None = None
    cnn_depth: int | None = None
    # the transformer (sequence_model="transformer"; TWISTER's published defaults)
    tssm_blocks: int = 4
    tssm_width: int = 512
    tssm_heads: int = 8
    tssm_ff_mult: int = 2  # feed-forward width = tssm_ff_mult * tssm_width
    tssm_dropout: float = 0.1  # on the attention weights and the residuals, not inside the MLP
    # a token attends to this many tokens before it and to itself (TWISTER's att_context_left)
    tssm_context: int = 8
    tssm_positions: str = field(default="xl", metadata={
        "choices": POSITIONS, "help": "relative positions of the TSSM's attention: 'xl' "
        "(Transformer-XL's sinusoidal encodings with a learned projection and u/v biases, as "
        "TWISTER; default) or 'learned' (a learned bias per block, head and distance)"})
    # AC-CPC (transformer only): heads for 0..cpc_steps-1 steps ahead of the prior feature
    # [h_t, z_t ~ prior], weights cpc_decay^k normalised, InfoNCE on random resized crops
    # (area cpc_crop_min..1) of pixel targets
    cpc_steps: int = 10  # 0 turns AC-CPC off
    cpc_scale: float = 1.0
    cpc_decay: float = 0.75
    cpc_crop_min: float = 0.25
    stoch: int = 32  # categorical latents ...
    classes: int = 32  # ... of this many classes each
    unimix: float = 0.01  # uniform mixture of latent, actor (discrete) distributions
    num_bins: int = 255  # symlog two-hot bins for reward and critic ...
    bin_min: float = -20.0  # ... evenly spaced on [bin_min, bin_max] in symlog space
    bin_max: float = 20.0
    # The continue head is always trained; episodic False makes its targets all 1.
    # None: set by the run from the env suite (on where its tasks can terminate).
    episodic: bool | None = field(default=None, metadata={
        "help": "default: follows the env suite (on where its tasks can terminate)"})
    # world-model objective
    kl_dyn: float = 0.5
    kl_rep: float = 0.1
    free_bits: float = 1.0
    decoder_scale: float = 1.0
    reward_scale: float = 1.0
    cont_scale: float = 1.0
    # replay and schedule
    batch_size: int = 16
    seq_len: int = 64
    # replayed steps per env step (1024 / (16 x 64) = 1 update per step); None: the suite's
    # DreamerV3 v1 value (SUITE_TRAIN_RATIO), set by the run
    train_ratio: int | None = field(default=None, metadata={
        "help": "replayed steps per env step; default: the suite's DreamerV3 v1 value "
        "(dmc 512, atari 1024, others 1024)"})
    vector_mlp: str = field(default="published", metadata={
        "choices": VECTOR_MLPS, "help": "encoder and decoder of vector observations: "
        "'published' (5 layers of 1024 units at every size, as DreamerV3 v1 ran; default) or "
        "'size' (the model size's layers and units)"})
    # actor-critic in imagination
    imag_horizon: int = 15
    discount: float = 0.997
    lam: float = 0.95
    entropy: float = 3e-4
    slow_critic_fraction: float = 0.02
    slow_reg: float = 1.0
    retnorm_decay: float = 0.99
    retnorm_low: float = 0.05  # percentiles of the return normaliser
    retnorm_high: float = 0.95
    retnorm_max: float = 1.0  # returns are divided by max(1 / retnorm_max, high - low)
    actor_grad: str = field(default="auto", metadata={
        "choices": ACTOR_GRADS, "help": "the actor's gradient in imagination: 'auto' "
        "(DreamerV3: REINFORCE for discrete actions, backpropagation through the dynamics for "
        "continuous ones), 'reinforce' or 'dynamics'"})
    actor_min_std: float = 0.1  # continuous actions
    actor_max_std: float = 1.0
    eval_policy: str = field(default="sample", metadata={
        "choices": EVAL_POLICIES, "help": "evaluation actions: 'sample' the actor, as "
        "DreamerV3 v1 does (default), or take its 'mode' (argmax; the mean, clipped, for "
        "continuous actions)"})
    # optimisation: the world-model optimizer is this spec; SAM or not is the spec's choice
    wm_optim: optim.OptimSpec = field(default_factory=default_wm_optim)
    wm_grad_clip: float = 1000.0
    actor_lr: float = 3e-5
    actor_eps: float = 1e-5
    actor_grad_clip: float = 100.0
    critic_lr: float = 3e-5
    critic_eps: float = 1e-5
    critic_grad_clip: float = 100.0

    def dims(self) -> dict[str, int]:
        """The resolved widths: the size table, overridden by any field that is set."""
        d = dict(MODEL_SIZES.get(self.model_size, MODEL_SIZES["S"]))
        for k in ("deter", "units", "layers", "cnn_depth"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    def vector_dims(self) -> tuple[int, int]:
        """(layers, units) of the encoder and decoder for vector observations."""
        if self.vector_mlp == "published":
            return PUBLISHED_VECTOR_MLP["layers"], PUBLISHED_VECTOR_MLP["units"]
        d = self.dims()
        return d["layers"], d["units"]

    def resolved_train_ratio(self) -> int:
        return DEFAULT_TRAIN_RATIO if self.train_ratio is None else self.train_ratio

    def for_env(self, env_id: str) -> DreamerConfig:
        """This config with the fields left to the suite (``train_ratio``) set for ``env_id``."""
        if self.train_ratio is not None:
            return self
        suite = env_id.partition("/")[0]
        return replace(self, train_ratio=SUITE_TRAIN_RATIO.get(suite, DEFAULT_TRAIN_RATIO))

    def env_defaults(self, env_id: str) -> dict[str, Any]:
        """``flatworld.envs.make`` options this agent's published runs used on ``env_id``'s
        suite; a run's own env_options override them. DreamerV3 v1 sees one frame on pixel
        DMC (no frame stack)."""
        return {"frame_stack": 1} if env_id.startswith("dmc/") else {}

    def validate(self) -> DreamerConfig:
        def check(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: {accepted}")

        check(self.model_size in MODEL_SIZES, "model_size", f"one of {tuple(MODEL_SIZES)}")
        check(self.sequence_model in SEQUENCE_MODELS, "sequence_model",
              f"one of {SEQUENCE_MODELS}")  # fmt: skip
        check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        check(self.eval_policy in EVAL_POLICIES, "eval_policy", f"one of {EVAL_POLICIES}")
        check(self.tssm_positions in POSITIONS, "tssm_positions", f"one of {POSITIONS}")
        check(self.actor_grad in ACTOR_GRADS, "actor_grad", f"one of {ACTOR_GRADS}")
        check(self.vector_mlp in VECTOR_MLPS, "vector_mlp", f"one of {VECTOR_MLPS}")
        check(self.train_ratio is None or pos_int(self.train_ratio), "train_ratio",
              "None (the suite's value) or an int >= 1")  # fmt: skip
        check(isinstance(self.cuda_graphs, bool), "cuda_graphs", "True or False")
        if self.cuda_graphs and self.precision != "fp32":
            # autocast's cast cache cannot live in a captured graph; turning it off would slow
            # the eager bf16 path, so the two are not combined.
            raise ValueError(f"cuda_graphs=True with precision={self.precision!r}; accepted: "
                             "precision='fp32' with CUDA graphs")  # fmt: skip
        check(self.episodic in (None, True, False), "episodic",
              "None (follow the env suite), True or False")  # fmt: skip
        for k in ("deter", "units", "layers", "cnn_depth"):
            check(getattr(self, k) is None or pos_int(getattr(self, k)), k, "None or an int >= 1")
        for k in ("stoch", "classes", "batch_size", "imag_horizon"):
            check(pos_int(getattr(self, k)), k, "an int >= 1")
        check(pos_int(self.classes) and self.classes >= 2, "classes", "an int >= 2")
        check(pos_int(self.seq_len) and self.seq_len >= 2, "seq_len", "an int >= 2")
        check(pos_int(self.num_bins) and self.num_bins >= 2, "num_bins", "an int >= 2")
        check(self.bin_min < self.bin_max, "bin_max", f"> bin_min={self.bin_min}")
        check(0.0 <= self.unimix < 1.0, "unimix", "0 <= unimix < 1")
        for k in ("kl_dyn", "kl_rep", "free_bits", "decoder_scale", "reward_scale",
                  "cont_scale", "entropy", "slow_reg"):  # fmt: skip
            check(getattr(self, k) >= 0.0, k, "a float >= 0")
        for k in ("tssm_blocks", "tssm_width", "tssm_heads", "tssm_ff_mult", "tssm_context"):
            check(pos_int(getattr(self, k)), k, "an int >= 1")
        check(pos_int(self.tssm_heads) and pos_int(self.tssm_width)
              and self.tssm_width % self.tssm_heads == 0, "tssm_heads",
              f"an int >= 1 dividing tssm_width={self.tssm_width}")  # fmt: skip
        check(0.0 <= self.tssm_dropout < 1.0, "tssm_dropout", "0 <= dropout < 1")
        check(isinstance(self.cpc_steps, int) and not isinstance(self.cpc_steps, bool)
              and self.cpc_steps >= 0, "cpc_steps", "an int >= 0")  # fmt: skip
        check(self.cpc_scale >= 0.0, "cpc_scale", "a float >= 0")
        check(0.0 < self.cpc_decay <= 1.0, "cpc_decay", "0 < decay <= 1")
        check(0.0 < self.cpc_crop_min <= 1.0, "cpc_crop_min", "0 < min <= 1")
        check(0.0 < self.discount <= 1.0, "discount", "0 < discount <= 1")
        check(0.0 <= self.lam <= 1.0, "lam", "0 <= lam <= 1")
        check(0.0 < self.slow_critic_fraction <= 1.0, "slow_critic_fraction", "0 < x <= 1")
        check(0.0 <= self.retnorm_decay < 1.0, "retnorm_decay", "0 <= decay < 1")
        check(0.0 <= self.retnorm_low < self.retnorm_high <= 1.0, "retnorm_high",
              f"retnorm_low={self.retnorm_low} < retnorm_high <= 1")  # fmt: skip
        check(0.0 < self.actor_min_std < self.actor_max_std, "actor_max_std",
              f"> actor_min_std={self.actor_min_std} > 0")  # fmt: skip
        for k in ("retnorm_max", "wm_grad_clip", "actor_lr", "actor_eps", "actor_grad_clip",
                  "critic_lr", "critic_eps", "critic_grad_clip"):  # fmt: skip
            check(getattr(self, k) > 0.0, k, "a float > 0")
        check(hasattr(self.wm_optim, "base") and hasattr(self.wm_optim, "sam"), "wm_optim",
              "a flatworld.optim.OptimSpec")  # fmt: skip
        sam = self.wm_optim.sam
        if sam is not None and getattr(sam, "m", None) is not None:
            # The closure runs the whole sequence batch through the recurrent model; a chunked
            # (m-sharpness) closure does not fit this agent.
            raise ValueError(f"wm_optim.sam.m={sam.m!r}; accepted: None for dreamer")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DreamerConfig:
        """Rebuild from `dataclasses.asdict` output (config.yaml); unknown fields fail."""
        return from_dict(cls, d)



@dataclass
class TwisterConfig(DreamerConfig):
    """TWISTER: DreamerV3 with the transformer state-space model and AC-CPC (the paper's
    Atari-100k agent). As in TWISTER's code, evaluation takes the actor's mode and the actor
    learns by REINFORCE on every suite (continuous actions too); every other default is
    DreamerV3's."""

    sequence_model: str = field(default="transformer", metadata={"choices": SEQUENCE_MODELS})
    eval_policy: str = field(default="mode", metadata={
        "choices": EVAL_POLICIES, "help": "evaluation actions: the actor's 'mode' (argmax; the "
        "mean, clipped, for continuous actions), as TWISTER evaluates (default), or a 'sample'"})
    actor_grad: str = field(default="reinforce", metadata={
        "choices": ACTOR_GRADS, "help": "the actor's gradient in imagination: 'reinforce' (as "
        "TWISTER, for continuous actions too; default), 'dynamics' (backpropagation through "
        "the dynamics) or 'auto' (DreamerV3's rule)"})

    def env_defaults(self, env_id: str) -> dict[str, Any]:
        """TWISTER ran DMC from 64x64 pixels, one frame (no frame stack)."""
        return {"obs": "rgb", "frame_stack": 1} if env_id.startswith("dmc/") else {}
