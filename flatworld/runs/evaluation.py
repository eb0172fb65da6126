"""Evaluating a run folder: its last good checkpoint's agent on fresh seeded episodes, with
Atari scores human-normalised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from flatworld.runs.checkpoint import load_checkpoint
from flatworld.runs.episodes import EVALUATE, derive_seed, run_episodes
from flatworld.runs.folder import agent_entry, check_device, read_config
from flatworld.runs.loop import Loop
from flatworld.runs.protocol import Agent, Agents


@contextmanager
def trained_agent(run_dir: str | Path, *,
                  agents: Agents) -> Iterator[tuple[Agent, Any, dict[str, Any]]]:  # fmt: skip
    """The agent of a run's last good checkpoint, an evaluation env of the run's task (closed
    on exit), and ``{"step", "path"}`` of the checkpoint with the run's ``config``: for
    evaluation and probes. `agents` maps the agent name in config.yaml to its entry."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} is not a flatworld run folder (no config.yaml)")
    run_cfg, agent_name, agent_cfg = read_config(run_dir, agents)
    check_device(run_cfg.device)
    loop = Loop(run_dir, run_cfg, agent_entry(agents, agent_name), agent_name, agent_cfg,
                replay=False)  # fmt: skip
    try:
        state, path = load_checkpoint(run_dir / "checkpoints", validate=loop.check_agent_state)
        loop.agent.load_state_dict(state["agent"])
        yield loop.agent, loop.eval_env, {"step": state["step"], "path": path, "config": run_cfg}
    finally:
        loop.close()


def evaluate(run_dir: str | Path, *, agents: Agents, episodes: int = 10) -> dict[str, Any]:
    """Evaluate the agent of the last good checkpoint on `episodes` fresh seeded episodes."""
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes={episodes!r}: expected an int >= 1")
    with trained_agent(run_dir, agents=agents) as (agent, env, ckpt):
        run_cfg = ckpt["config"]
        torch.manual_seed(derive_seed(run_cfg.seed, EVALUATE))
        seeds = [derive_seed(run_cfg.seed, EVALUATE, i) for i in range(episodes)]
        out = run_episodes(env, agent, seeds)
    if run_cfg.env.startswith("atari/"):
        out.update(_human_normalized(run_cfg.env, out))
    return {"step": ckpt["step"], "checkpoint": str(ckpt["path"]), "episodes": episodes, **out}


def _human_normalized(env_id: str, out: dict[str, Any]) -> dict[str, Any]:
    """Atari scores as (score - random) / (human - random), from the packaged table."""
    from flatworld.envs.atari import human_normalized

    try:
        return {"human_normalized": human_normalized(env_id, float(out["eval_return"])),
                "human_normalized_per_episode": [human_normalized(env_id, r)
                                                 for r in out["returns"]]}  # fmt: skip
    except ValueError:  # a game outside the Atari-100k table
        return {}
