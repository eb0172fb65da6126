"""Seeds x world-model optimizers on one task: final return, steps and time to a target return,
sharpness and value error.

Runs one agent (TD-MPC2, DreamerV3 or TWISTER) with Adam and/or SAM through
flatworld.experiments.sweep (resumable, one run folder each), writes the comparison report (on
a DMC task with the agent's published curve: TD-MPC2's, or DreamerV3's for dreamer and
twister), and prints one JSON object. Real runs belong on a GPU (``--device cuda``); on a CPU
keep them small.

Steps are agent steps: env steps / action repeat (2 on DMC, 1 on Gym). On DMC the default
50,000 are the 100k env steps at which published TD-MPC2 reaches 839 (cartpole-swingup) and
962 (walker-walk), and published DreamerV3 677 (cartpole-swingup).

    python benchmarks/learning.py --env dmc/cartpole-swingup --steps 50000 --seeds 1 2 3 \
        --device cuda --out runs/learning
    python benchmarks/learning.py --agent dreamer --model-size XS --env gym/CartPole-v1 \
        --steps 50000 --eval-every 2500 --seeds 1 --optimizers adam --target-return 400 \
        --out runs/learning-dreamer-cartpole      # --agent twister: the transformer agent
    python benchmarks/learning.py --agent dreamer --model-size S --env dmc/cartpole-swingup \
        --steps 50000 --eval-every 5000 --seeds 1 --optimizers adam \
        --out runs/learning-dreamer-swingup       # beside published DreamerV3 in the report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from flatworld.agents import AGENTS
from flatworld.experiments import final_value, load_runs, report, sweep
from flatworld.runs import RunConfig

NAMES = {"tdmpc2": "TD-MPC2", "dreamer": "DreamerV3", "twister": "TWISTER"}


def at_target(rows: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """The first evaluation (metrics row) whose eval_return >= target: its step, env steps and
    wall seconds; None if no evaluation reached it."""
    for r in rows:
        v = r.get("eval_return")
        if v not in ("", None) and float(v) >= target:
            return {
                "step": int(r["step"]),
                "env_steps": int(r["env_steps"]),
                "wall_s": float(r["wall_s"]),
            }
    return None


def agent_config(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The agent's registry config with this command's overrides; a bad one is a usage error."""
    over: dict[str, Any] = {}
    size = args.model_size
    if size is not None:  # TD-MPC2's sizes are ints (millions of parameters), Dreamer's names
        over["model_size"] = (
            size.upper() if args.agent != "tdmpc2" else int(size) if size.isdigit() else size
        )
    for flag, key, agents in (
        ("--train-ratio", "train_ratio", ("dreamer", "twister")),
        ("--seq-len", "seq_len", ("dreamer", "twister")),
        ("--tssm-width", "tssm_width", ("twister",)),
        ("--tssm-dropout", "tssm_dropout", ("twister",)),
        ("--precision", "precision", ("dreamer", "twister")),
    ):
        value = getattr(args, key)
        if value is not None and args.agent not in agents:
            ap.error(f"{flag} applies to --agent {' or '.join(agents)}, not {args.agent}")
        if value is not None:
            over[key] = value
    cfg = dataclasses.replace(AGENTS[args.agent].config_cls(), **over)
    if args.wm_lr is not None:
        if args.agent not in ("dreamer", "twister"):
            ap.error(f"--wm-lr applies to --agent dreamer or twister, not {args.agent}")
        if not args.wm_lr > 0:
            ap.error(f"--wm-lr {args.wm_lr}; accepted: a learning rate > 0")
        cfg = dataclasses.replace(cfg, wm_optim=dataclasses.replace(cfg.wm_optim, lr=args.wm_lr))
    try:
        return cfg.validate()
    except ValueError as err:
        ap.error(f"--agent {args.agent}: {err}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", default="tdmpc2", choices=tuple(NAMES))
    ap.add_argument("--env", default="dmc/cartpole-swingup")
    ap.add_argument(
        "--steps", type=int, default=50_000, help="agent steps per run (env steps / action repeat)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sam"], choices=["adam", "sam"])
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument(
        "--model-size",
        help="tdmpc2: 1, 5 (default), 19, 48, 317; dreamer and twister: XS, S (default), M, L",
    )
    ap.add_argument(
        "--train-ratio",
        type=int,
        help="dreamer/twister: replayed steps per agent step (default 1024)",
    )
    ap.add_argument(
        "--seq-len", type=int, help="dreamer/twister: replayed sequence length (default 64)"
    )
    ap.add_argument("--tssm-width", type=int, help="twister: the transformer's width (512)")
    ap.add_argument(
        "--wm-lr", type=float, help="dreamer/twister: the world model's learning rate (1e-4)"
    )
    ap.add_argument(
        "--tssm-dropout", type=float, help="twister: the transformer's dropout (0.1)"
    )
    ap.add_argument(
        "--precision", help="dreamer/twister: fp32 (default) or bf16 (autocast matmuls and convs)"
    )
    ap.add_argument("--seed-steps", type=int, help="random-action steps (default: the agent's)")
    ap.add_argument(
        "--target-return", type=float, help="report the first evaluation at or above this return"
    )
    ap.add_argument("--eval-every", type=int, default=10_000)
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=1, help="runs at once (local pool)")
    ap.add_argument(
        "--threads", type=int, help="torch threads per run (default: 2 shared among the workers)"
    )
    ap.add_argument("--backend", default="local", choices=["local", "ray"])
    ap.add_argument("--out", default="runs/learning")
    args = ap.parse_args(argv)

    agent_cfg = agent_config(ap, args)
    threads = args.threads or max(1, 2 // args.workers)
    torch.set_num_threads(threads)
    log_every = math.gcd(args.eval_every, 1000)
    run_cfg = RunConfig(
        env=args.env,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        diag_every=args.eval_every,
        log_every=log_every,
        checkpoint_every=max(args.steps // 10, 1),
        seed_steps=args.seed_steps,
        device=args.device,
    )
    dirs = sweep(
        args.out,
        args.agent,
        agent_cfg,
        run_cfg,
        args.seeds,
        tuple(args.optimizers),
        rho=args.rho,
        workers=args.workers,
        backend=args.backend,
        threads=threads,
    )
    title = f"{NAMES[args.agent]}, model size {agent_cfg.model_size}, on {args.env}"
    path = report(dirs, Path(args.out) / "report", title=title)
    out = {
        "agent": args.agent,
        "model_size": agent_cfg.model_size,
        "env": args.env,
        "steps": args.steps,
        "device": args.device,
        "threads": threads,
        "target_return": args.target_return,
        "report": str(path),
    }
    if args.agent != "tdmpc2":
        out["train_ratio"] = agent_cfg.train_ratio
        out["seq_len"] = agent_cfg.seq_len
        out["wm_lr"] = agent_cfg.wm_optim.lr
        out["precision"] = agent_cfg.precision
    if args.agent == "twister":
        out["tssm_width"], out["tssm_dropout"] = agent_cfg.tssm_width, agent_cfg.tssm_dropout
    for label, runs in load_runs(dirs).items():
        out[label] = res = {
            "seed": [r["seed"] for r in runs],
            "final_return": [final_value(r, "eval_return") for r in runs],
            "final_env_steps": [final_value(r, "env_steps") for r in runs],
            "final_wall_s": [final_value(r, "wall_s") for r in runs],
            "final_wm_sharpness": [final_value(r, "wm_sharpness") for r in runs],
            "final_value_error": [final_value(r, "value_error") for r in runs],
            # Over the whole run, evaluation and diagnostics included.
            "steps_per_s": [final_value(r, "step") / final_value(r, "wall_s") for r in runs],
        }
        if args.target_return is not None:
            hits = [at_target(r["rows"], args.target_return) for r in runs]
            for key, col in (
                ("first_step_at_target", "step"),
                ("env_steps_at_target", "env_steps"),
                ("wall_s_at_target", "wall_s"),
            ):
                res[key] = [h[col] if h else None for h in hits]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
