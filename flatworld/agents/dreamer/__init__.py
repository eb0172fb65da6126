"""DreamerV3: a world model with a swappable sequence model (the RSSM, or the TWISTER-style
transformer TSSM with AC-CPC), an actor-critic
trained in imagination, and a drop-in world-model optimizer."""

from flatworld.agents.dreamer.actor_critic import Actor, ActorCritic, ReturnNorm, lambda_returns
from flatworld.agents.dreamer.agent import DreamerAgent, make
from flatworld.agents.dreamer.config import (
    MODEL_SIZES,
    SEQUENCE_MODELS,
    DreamerConfig,
    TwisterConfig,
)
from flatworld.agents.dreamer.rssm import RSSM
from flatworld.agents.dreamer.sequence import SequenceModel, kl_terms
from flatworld.agents.dreamer.transformer import TSSM, info_nce, random_boxes, resized_crop
from flatworld.agents.dreamer.world_model import WorldModel

__all__ = [
    "MODEL_SIZES",
    "RSSM",
    "SEQUENCE_MODELS",
    "Actor",
    "ActorCritic",
    "DreamerAgent",
    "DreamerConfig",
    "ReturnNorm",
    "TSSM",
    "SequenceModel",
    "TwisterConfig",
    "WorldModel",
    "info_nce",
    "kl_terms",
    "lambda_returns",
    "make",
    "random_boxes",
    "resized_crop",
]
