"""Online training runs: replay, the loop, evaluation, diagnostics, logging, checkpoints."""

from flatworld.runs.config import RunConfig, from_dict
from flatworld.runs.loop import (
    ConfigMismatchError,
    check_device,
    config_differences,
    evaluate,
    read_config,
    resume,
    train,
    train_or_resume,
    trained_agent,
)
from flatworld.runs.memory import keep_freed_memory
from flatworld.runs.protocol import Agent
from flatworld.runs.replay import ReplayBuffer

__all__ = [
    "Agent", "ConfigMismatchError", "ReplayBuffer", "RunConfig", "check_device",
    "config_differences", "evaluate", "from_dict", "keep_freed_memory", "read_config", "resume",
    "train", "train_or_resume", "trained_agent",
]  # fmt: skip
