"""DreamerV3: a world model with a swappable sequence model (the RSSM here), an actor-critic
trained in imagination, and a drop-in world-model optimizer."""

from flatworld.agents.dreamer.actor_critic import Actor, ActorCritic, ReturnNorm, lambda_returns
from flatworld.agents.dreamer.agent import DreamerAgent, make
from flatworld.agents.dreamer.config import MODEL_SIZES, SEQUENCE_MODELS, DreamerConfig
from flatworld.agents.dreamer.rssm import RSSM
from flatworld.agents.dreamer.sequence import SequenceModel, kl_terms
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
    "SequenceModel",
    "WorldModel",
    "kl_terms",
    "lambda_returns",
    "make",
]
