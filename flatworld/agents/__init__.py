"""Agents, by name. Each entry gives its config dataclass and a factory.

``AGENTS[name].make(cfg, obs_shape=..., action_dim=..., episode_length=..., device=...)``
returns an object that follows ``flatworld.runs.protocol.Agent``.
"""

from __future__ import annotations

from flatworld.agents import dreamer, tdmpc2
from flatworld.runs.protocol import AgentEntry

# TWISTER starts training once its replay holds 100 sequence windows of random actions (its
# replay counts windows, one per start step: 163 agent steps at sequence length 64).
TWISTER_PREFILL_WINDOWS = 100

AGENTS: dict[str, AgentEntry] = {
    "tdmpc2": AgentEntry(config_cls=tdmpc2.TDMPC2Config, make=tdmpc2.make, seed_burst=True),
    # DreamerV3 v1 fills the replay with random actions until one batch of sequences fits.
    "dreamer": AgentEntry(config_cls=dreamer.DreamerConfig, make=dreamer.make,
                          action_kinds=("continuous", "discrete"),
                          seed_steps=lambda cfg, _: cfg.batch_size * cfg.seq_len),
    # The same agent with the transformer state-space model and AC-CPC.
    "twister": AgentEntry(config_cls=dreamer.TwisterConfig, make=dreamer.make,
                          action_kinds=("continuous", "discrete"),
                          seed_steps=lambda cfg, _: cfg.seq_len + TWISTER_PREFILL_WINDOWS - 1),
}

__all__ = ["AGENTS", "AgentEntry"]
