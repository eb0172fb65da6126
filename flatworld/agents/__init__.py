"""Agents, by name. Each entry gives its config dataclass and a factory.

``AGENTS[name].make(cfg, obs_shape=..., action_dim=..., episode_length=..., device=...)``
returns an object that follows ``flatworld.runs.protocol.Agent``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flatworld.agents import dreamer, tdmpc2


@dataclass(frozen=True)
class AgentEntry:
    config_cls: type
    make: Callable[..., Any]
    action_kinds: tuple[str, ...] = ("continuous",)  # flatworld.envs.action_kind values
    # The published trainer's schedule: when seeding ends, as many updates as seed steps.
    seed_burst: bool = False
    # Random-action steps before the agent acts, from (agent config, episode length), when the
    # run does not set them. TD-MPC2's rule by default.
    seed_steps: Callable[[Any, int], int] = lambda cfg, episode_length: max(
        1000, 5 * episode_length)


AGENTS: dict[str, AgentEntry] = {
    "tdmpc2": AgentEntry(config_cls=tdmpc2.TDMPC2Config, make=tdmpc2.make, seed_burst=True),
    # DreamerV3 v1 fills the replay with random actions until one batch of sequences fits.
    "dreamer": AgentEntry(config_cls=dreamer.DreamerConfig, make=dreamer.make,
                          action_kinds=("continuous", "discrete"),
                          seed_steps=lambda cfg, _: cfg.batch_size * cfg.seq_len),
    # The same agent with the transformer state-space model and AC-CPC.
    "twister": AgentEntry(config_cls=dreamer.TwisterConfig, make=dreamer.make,
                          action_kinds=("continuous", "discrete"),
                          seed_steps=lambda cfg, _: cfg.batch_size * cfg.seq_len),
}

__all__ = ["AGENTS", "AgentEntry"]
