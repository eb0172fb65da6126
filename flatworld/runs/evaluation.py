"""Evaluating a run folder: its last good checkpoint's agent on fresh seeded episodes, with
Atari scores human-normalised."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from flatworld.runs.checkpoint import load_checkpoint
from flatworld.runs.config import check_device_name
from flatworld.runs.episodes import EVALUATE, derive_seed, run_episodes
from flatworld.runs.folder import agent_entry, check_device, read_config
from flatworld.runs.loop import Loop
from flatworld.runs.protocol import Agent, Agents


@contextmanager
def trained_agent(run_dir: str | Path, *, agents: Agents, device: str | None = None,
                  policy: str | None = None) -> Iterator[tuple[Agent, Any, dict[str, Any]]]:
    """The agent of a run's last good checkpoint, an evaluation env of the run's task (closed
    on exit), and ``{"step", "path"}`` of the checkpoint with the run's ``config``: for
    evaluation and probes. `agents` maps the agent name in config.yaml to its entry.
    `device` and `policy` ('mode' or 'sample': the agent's evaluation actions) replace the
    run's own."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} is not a flatworld run folder (no config.yaml)")
    run_cfg, agent_name, agent_cfg = read_config(run_dir, agents)
    if device is not None:
        check_device_name(device)
        run_cfg = dataclasses.replace(run_cfg, device=device)
    if policy is not None:
        agent_cfg = _with_policy(agent_cfg, agent_name, policy, agents)
    check_device(run_cfg.device)
    loop = Loop(run_dir, run_cfg, agent_entry(agents, agent_name), agent_name, agent_cfg,
                replay=False)  # fmt: skip
    try:
        state, path = load_checkpoint(run_dir / "checkpoints", validate=loop.check_agent_state)
        loop.agent.load_state_dict(state["agent"])
        yield loop.agent, loop.eval_env, {"step": state["step"], "path": path, "config": run_cfg}
    finally:
        loop.close()


def _with_policy(agent_cfg: Any, agent_name: str, policy: str, agents: Agents) -> Any:
    """The agent config evaluating by `policy`, for agents whose config has `eval_policy`."""
    choosers = sorted(n for n, e in agents.items()
                      if "eval_policy" in {f.name for f in dataclasses.fields(e.config_cls)})
    if not hasattr(agent_cfg, "eval_policy"):
        raise ValueError(f"policy={policy!r}: agent {agent_name!r} has no evaluation policy to "
                         f"choose (it acts by its planner); accepted for {choosers}")
    cfg = dataclasses.replace(agent_cfg, eval_policy=policy)
    cfg.validate()
    return cfg


def evaluate(run_dir: str | Path, *, agents: Agents, episodes: int | None = None,
             seed: int | None = None, device: str | None = None, policy: str | None = None,
             video: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate the agent of the last good checkpoint on fresh seeded episodes.

    `episodes`: default the suite's protocol (flatworld.envs.eval_episodes: 100 on Atari,
    10 elsewhere). `seed`: the episodes' seeds derive from it (default: the run's seed).
    `device`, `policy`: see `trained_agent`. `video`: an MP4 of the first episode.
    `progress`: a bar over the episodes.
    """
    from flatworld.envs import eval_episodes

    if episodes is not None and (not isinstance(episodes, int) or episodes < 1):
        raise ValueError(f"episodes={episodes!r}: expected an int >= 1")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed={seed!r}: expected an int >= 0")
    with trained_agent(run_dir, agents=agents, device=device, policy=policy) as (
            agent, env, ckpt):
        run_cfg = ckpt["config"]
        episodes = episodes or eval_episodes(run_cfg.env)
        seed = run_cfg.seed if seed is None else seed
        torch.manual_seed(derive_seed(seed, EVALUATE))
        seeds = [derive_seed(seed, EVALUATE, i) for i in range(episodes)]
        if video is not None:
            from flatworld.envs.video import check_renders

            check_renders(env, run_cfg.env)
        out = run_episodes(env, agent, seeds, progress=progress, video=video)
    if run_cfg.env.startswith("atari/"):
        out.update(_human_normalized(run_cfg.env, out))
    result = {"step": ckpt["step"], "checkpoint": str(ckpt["path"]), "episodes": episodes,
              "seed": seed, "device": run_cfg.device, **out}
    if video is not None:
        result["video"] = str(video)
    return result


def _human_normalized(env_id: str, out: dict[str, Any]) -> dict[str, Any]:
    """Atari scores as (score - random) / (human - random), from the packaged table."""
    from flatworld.envs.atari import human_normalized

    try:
        return {"human_normalized": human_normalized(env_id, float(out["eval_return"])),
                "human_normalized_per_episode": [human_normalized(env_id, r)
                                                 for r in out["returns"]]}  # fmt: skip
    except ValueError:  # a game outside the Atari-100k table
        return {}
