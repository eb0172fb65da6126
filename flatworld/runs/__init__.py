"""Online training runs: replay, the loop, evaluation, diagnostics, logging, checkpoints.

`flatworld.runs` never imports `flatworld.agents`: a caller resolves agents by name and hands
the table of entries it may use (``agents=flatworld.agents.AGENTS``) to the functions that
build one.
"""

from flatworld.runs.config import RunConfig, from_dict
from flatworld.runs.evaluation import evaluate, trained_agent
from flatworld.runs.folder import (
    ConfigMismatchError,
    check_device,
    config_differences,
    flat_config,
    read_config,
)
from flatworld.runs.loop import resume, train, train_or_resume
from flatworld.runs.memory import keep_freed_memory
from flatworld.runs.protocol import Agent, AgentEntry, Agents
from flatworld.runs.replay import ReplayBuffer

__all__ = [
    "Agent", "AgentEntry", "Agents", "ConfigMismatchError", "ReplayBuffer", "RunConfig",
    "check_device", "config_differences", "evaluate", "flat_config", "from_dict",
    "keep_freed_memory", "read_config", "resume", "train", "train_or_resume", "trained_agent",
]  # fmt: skip
