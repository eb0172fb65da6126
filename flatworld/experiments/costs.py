"""What a sweep would take: per-step costs measured on this project's machines, and the
estimate that `flatworld sweep --dry-run` prints.

Every figure names its machine, date and source; an estimate built on a figure that was
not measured for that agent says so ("proxy") instead of pretending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# This CPU: 2 cores, torch 2.13.0 CPU wheel, 2 threads, walker-walk shapes (24-dim obs, 6
# actions), batch 256, horizon 3, MPPI 6 x 512 samples; flatworld's own update and act,
# default allocator, medians. Source: ../shared/reference/tdmpc2-cpu-speed.md (2026-11-29).
CPU_SOURCE = "2 cores, 2 threads, tdmpc2-cpu-speed.md, measured 2026-11-29"
CPU_MS = {  # (agent, model_size) -> ms
    ("tdmpc2", 1): {"update": 88.0, "act": 94.2},
    ("tdmpc2", 5): {"update": 240.5, "act": 225.8},
}
# SAM/Adam update-time ratios on this CPU, benchmarks/tdmpc2_throughput.py (docs/performance.md,
# 2026-11): 1M 1.41-1.47 (1.44 taken), 5M 1.61, 5M with sam_scope=encoder_dynamics 1.52.
CPU_SAM_RATIO = {("tdmpc2", 1, "all"): 1.44, ("tdmpc2", 5, "all"): 1.61,
                 ("tdmpc2", 5, "encoder_dynamics"): 1.52}  # fmt: skip

# The H200 machine: ../shared/gpu/README.md (2026-11-28). A TD-MPC2-sized world-model update
# (4.8M parameters, batch 256, horizon 3, consistency + reward + 5-head Q), fp32, eager.
GPU_SOURCE = "H200 figures, ../shared/gpu/README.md, measured 2026-11-28"
GPU_WM_UPDATE_MS = {"adam": 22.7, "sam": 38.6}
# Environment steps per second there (random actions, one process), per env (= frame-skip
# counted once for ALE; DMC steps are physics control steps, action repeat counts each).
ENV_STEPS_PER_S = {"dmc/walker-walk": 3900.0, "dmc/humanoid-run": 2100.0,
                   "dmc/dog-run": 1000.0, "atari": 3750.0}  # fmt: skip
ENV_SOURCE = "env steps/s on the H200 machine's CPU, ../shared/gpu/README.md, 2026-11-28"
ATARI_EPISODE = 2500  # agent steps per evaluation episode, assumed (not measured)


def _env_ms(task: str) -> tuple[float, str]:
    """ms per env step (one physics control step; one ALE agent step at frame-skip 4)."""
    suite, name = task.split("/", 1)
    if suite == "atari":
        return 1e3 / ENV_STEPS_PER_S["atari"], "ALE Pong, frameskip 4"
    if task in ENV_STEPS_PER_S:
        return 1e3 / ENV_STEPS_PER_S[task], task
    domain = name.split("-")[0]
    for known, sps in ENV_STEPS_PER_S.items():
        if known.startswith(f"{suite}/{domain}-"):
            return 1e3 / sps, known
    if "humanoid" in name or "h1" in name:
        return 1e3 / ENV_STEPS_PER_S["dmc/humanoid-run"], "dmc/humanoid-run (proxy)"
    return 1e3 / ENV_STEPS_PER_S["dmc/walker-walk"], "dmc/walker-walk (proxy)"


def _repeat(run_cfg: Any, task: str) -> int:
    opts = getattr(run_cfg, "env_options", None) or {}
    if "action_repeat" in opts:
        return int(opts["action_repeat"])
    return 2 if task.startswith("dmc/") else 1


def _episode(run_cfg: Any, task: str) -> int:
    opts = getattr(run_cfg, "env_options", None) or {}
    if "episode_length" in opts:
        return int(opts["episode_length"])
    suite = task.split("/", 1)[0]
    # Atari episodes vary by game and skill (the cap is 27,000 agent steps): 2,500 assumed.
    return {"dmc": 1000 // _repeat(run_cfg, task), "humanoidbench": 1000,
            "atari": ATARI_EPISODE}.get(suite, 1000)  # fmt: skip


@dataclass
class StepCost:
    ms: float  # per agent step, evaluation included
    note: str  # what it is built from


def _model_size(agent_cfg: Any) -> int | None:
    return getattr(agent_cfg, "model_size", None)


def _is_sam(run: Any) -> bool:
    cfg = run.agent_cfg
    if cfg is not None:
        return getattr(cfg.wm_optim, "sam", None) is not None
    return run.point.get("wm_optim") == "sam"


def cpu_step(run: Any) -> StepCost | None:
    """ms per agent step on this CPU, or None without a measured figure for the agent."""
    size = _model_size(run.agent_cfg)
    if run.agent != "tdmpc2" or size is None:
        return None
    key_size = size if ("tdmpc2", size) in CPU_MS else None
    if key_size is None:
        return None
    ms = CPU_MS[("tdmpc2", key_size)]
    scope = getattr(run.agent_cfg, "sam_scope", "all")
    ratio = 1.0
    if _is_sam(run):
        ratio = CPU_SAM_RATIO.get(("tdmpc2", key_size, scope),
                                  CPU_SAM_RATIO[("tdmpc2", key_size, "all")])
    dims = run.agent_cfg.dims() if hasattr(run.agent_cfg, "dims") else {}
    smaller = any(getattr(run.agent_cfg, k, None) is not None
                  for k in ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers"))
    env_ms, _ = _env_ms(run.task)
    act = ms["act"] + _repeat(run.run_cfg, run.task) * env_ms
    per = ms["update"] * ratio + act + _eval_acts(run) * act
    note = (f"tdmpc2 {key_size}M: update {ms['update']} ms x SAM/Adam {ratio}, "
            f"act {ms['act']} ms")
    if smaller:
        note += f" (this run's model is smaller, {dims}: an upper bound)"
    return StepCost(per, note)


def _eval_acts(run: Any) -> float:
    cfg = run.run_cfg
    if cfg is None or not cfg.eval_episodes:
        return 0.0
    return cfg.eval_episodes * _episode(cfg, run.task) / cfg.eval_every


def gpu_step(run: Any) -> StepCost:
    """ms per agent step on one H200. Only the world-model update was measured there: the act
    (TD-MPC2's MPPI plan; the Dreamer family's policy step) is taken as costing one more
    eager world-model update, a launch-bound sequence of small kernels of similar count."""
    opt = "sam" if _is_sam(run) else "adam"
    update = GPU_WM_UPDATE_MS[opt]
    act_model = GPU_WM_UPDATE_MS["adam"]
    env_ms, env_note = _env_ms(run.task)
    act = act_model + _repeat(run.run_cfg, run.task) * env_ms
    per = update + act + _eval_acts(run) * act
    kind = "measured world-model update" if run.agent == "tdmpc2" else (
        f"proxy: TD-MPC2's world-model update for {run.agent}, which has no H200 figure yet")
    note = (f"{kind} {update} ms ({opt}, eager, 4.8M params); act assumed "
            f"{act_model} ms (not measured); env {env_ms:.2f} ms/step ({env_note})")
    if run.task.startswith("atari/") and _eval_acts(run):
        note += f"; eval episodes assumed {ATARI_EPISODE:,} agent steps"
    return StepCost(per, note)


def _hours(ms_total: float) -> float:
    return ms_total / 3.6e6


def _fmt_h(h: float) -> str:
    if h < 1:
        return f"{h * 60:.1f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h:.0f} h ({h / 24:.1f} days)"


def estimate(runs: list[Any], gpus: tuple[int, ...] = (1, 8)) -> list[str]:
    """Lines for --dry-run: the compute on this CPU, one H200 and a Ray cluster of 8 H200s."""
    lines = ["estimated compute (agent steps x measured per-step cost; evaluation included):"]
    cpu = [(r, cpu_step(r)) for r in runs]
    known = [(r, c) for r, c in cpu if c is not None]
    if known:
        per_run = [_hours(r.steps * c.ms) for r, c in known]
        total = sum(per_run)
        lines.append(f"  this CPU [{CPU_SOURCE}]: {_fmt_h(total)} for {len(known)} runs one "
                     f"after another (each on both cores; mean run {_fmt_h(total / len(known))})")
        if len(known) < len(runs):
            lines.append(f"    ({len(runs) - len(known)} runs have no CPU figure for their "
                         "agent or model size)")
    else:
        lines.append(f"  this CPU [{CPU_SOURCE}]: no measured figure for these runs' agent "
                     "or model size")
    gpu = [(r, gpu_step(r)) for r in runs]
    per_run = [_hours(r.steps * c.ms) for r, c in gpu]
    total = sum(per_run)
    longest = max(per_run) if per_run else 0.0
    for n in gpus:
        # Runs one per GPU at a time, longest first (list scheduling): the wall is at least
        # the longest run and the GPU-hours / n.
        loads = [0.0] * n
        for h in sorted(per_run, reverse=True):
            loads[loads.index(min(loads))] += h
        wall = max(loads) if loads else 0.0
        where = "one H200" if n == 1 else f"a Ray cluster of {n} H200s"
        lines.append(f"  {where} [{GPU_SOURCE}]: wall {_fmt_h(wall)}, {_fmt_h(total)} "
                     f"GPU-time in all (one run per GPU at a time; longest run "
                     f"{_fmt_h(longest)})")
    lines.append("per-step figures used (ms per agent step, evaluation included):")
    seen: dict[tuple[str, str], list[str]] = {}
    for (r, c), (_, g) in zip(cpu, gpu, strict=True):
        opt = "sam" if _is_sam(r) else "adam"
        key = (f"{r.agent} {opt}: H200 {g.ms:.1f} ms [{g.note}]",
               f"CPU {c.ms:.0f} ms [{c.note}]" if c else "CPU: no figure")
        seen.setdefault(key, [])
        if r.task not in seen[key]:
            seen[key].append(r.task)
    for (gtxt, ctxt), tasks in seen.items():
        shown = ", ".join(tasks[:4]) + (f" and {len(tasks) - 4} more" if len(tasks) > 4 else "")
        lines.append(f"  {gtxt}; {ctxt} -- {shown}")
    return lines
