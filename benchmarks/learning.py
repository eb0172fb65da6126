"""Seeds x world-model optimizers on one task: final return, sharpness and value error.

Runs TD-MPC2 with Adam and with SAM through flatworld.experiments.sweep (resumable, one
run folder each), writes the comparison report, and prints one JSON object. Real runs
belong on a GPU (``--device cuda``); on a CPU keep them small.

Steps are agent steps; DMC's action repeat 2 makes the default 50,000 the 100k environment
steps at which published TD-MPC2 reaches 839 (cartpole-swingup) and 962 (walker-walk).

    python benchmarks/learning.py --env dmc/cartpole-swingup --steps 50000 --seeds 1 2 3 \
        --device cuda --out runs/learning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from flatworld.agents.tdmpc2 import TDMPC2Config
from flatworld.experiments import final_value, load_runs, report, sweep
from flatworld.runs import RunConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="dmc/cartpole-swingup")
    ap.add_argument("--steps", type=int, default=50_000,
                    help="agent steps per run (env steps / action repeat)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sam"], choices=["adam", "sam"])
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--model-size", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=10_000)
    ap.add_argument("--eval-episodes", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=1, help="runs at once (local pool)")
    ap.add_argument("--backend", default="local", choices=["local", "ray"])
    ap.add_argument("--out", default="runs/learning")
    args = ap.parse_args()

    log_every = math.gcd(args.eval_every, 1000)
    run_cfg = RunConfig(env=args.env, steps=args.steps, eval_every=args.eval_every,
                        eval_episodes=args.eval_episodes, diag_every=args.eval_every,
                        log_every=log_every, checkpoint_every=max(args.steps // 10, 1),
                        device=args.device)
    agent_cfg = dataclasses.replace(TDMPC2Config(), model_size=args.model_size)
    dirs = sweep(args.out, "tdmpc2", agent_cfg, run_cfg, args.seeds, tuple(args.optimizers),
                 rho=args.rho, workers=args.workers, backend=args.backend)
    path = report(dirs, Path(args.out) / "report", title=f"TD-MPC2 on {args.env}")
    out = {"env": args.env, "steps": args.steps, "device": args.device, "report": str(path)}
    for label, runs in load_runs(dirs).items():
        out[label] = {
            "final_return": [final_value(r, "eval_return") for r in runs],
            "final_wm_sharpness": [final_value(r, "wm_sharpness") for r in runs],
            "final_value_error": [final_value(r, "value_error") for r in runs],
            # Over the whole run, evaluation and diagnostics included.
            "steps_per_s": [final_value(r, "step") / final_value(r, "wall_s")
                            for r in runs],  # fmt: skip
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
