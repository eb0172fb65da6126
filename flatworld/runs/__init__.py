"""Online training runs: replay, the loop, evaluation, diagnostics, logging, checkpoints."""

from flatworld.runs.config import RunConfig, from_dict
from flatworld.runs.loop import evaluate, read_config, resume, train
from flatworld.runs.protocol import Agent
from flatworld.runs.replay import ReplayBuffer

__all__ = [
    "Agent", "ReplayBuffer", "RunConfig", "evaluate", "from_dict", "read_config", "resume",
    "train",
]  # fmt: skip
