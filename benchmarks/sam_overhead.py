"""SAM step cost relative to a plain Adam step, in one process, on a TD-MPC2-sized MLP.

Prints one JSON object. Rounds interleave the optimizers so that machine noise hits
each alike; the figures are medians over rounds.

    python benchmarks/sam_overhead.py [--params 5e6] [--batch 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from flatworld import optim


def world_model_stack(width: int, target_params: float, in_dim: int = 64) -> nn.Sequential:
    """Linear -> LayerNorm -> Mish blocks, TD-MPC2's layer type, sized to target_params."""
    per_block = width * width + 3 * width
    blocks = max(1, round((target_params - in_dim * width) / per_block))
    layers: list[nn.Module] = [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.Mish()]
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.Mish()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def time_steps(opt, closure, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=float, default=5e6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--k", type=int, default=5, help="amortised SAM: one SAM step every k")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = world_model_stack(args.width, args.params).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, 64, device=device)
    y = torch.randn(args.batch, 1, device=device)

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    specs = {
        "adam": optim.OptimSpec("adam", lr=1e-5),
        "sam": optim.OptimSpec("adam", lr=1e-5, sam=optim.SamSpec(rho=0.05)),
        "sam_every_k": optim.OptimSpec("adam", lr=1e-5,
                                       sam=optim.SamSpec(rho=0.05, when="every", every=args.k)),
    }
    opts = {name: optim.build(spec, model.parameters()) for name, spec in specs.items()}
    for opt in opts.values():  # warm-up: allocator, Adam state, SAM buffers
        time_steps(opt, closure, 2)
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(args.rounds):
        for name, opt in opts.items():
            # k steps per timing keeps the amortised mode's SAM/plain mix exact
            steps = args.steps - args.steps % args.k or args.k
            times[name].append(time_steps(opt, closure, steps))
        print(f"round {r + 1}/{args.rounds}: " +
              ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items()), file=sys.stderr)
    ratios = {name: statistics.median(a / b for a, b in zip(times[name], times["adam"],
                                                             strict=True))
              for name in ("sam", "sam_every_k")}
    print(json.dumps({
        "device": device, "threads": torch.get_num_threads(), "params": n_params,
        "batch": args.batch, "k": args.k,
        "adam_ms_per_step": round(statistics.median(times["adam"]), 2),
        "sam_ms_per_step": round(statistics.median(times["sam"]), 2),
        "sam_every_k_ms_per_step": round(statistics.median(times["sam_every_k"]), 2),
        "sam_over_adam": round(ratios["sam"], 3),
        "sam_every_k_over_adam": round(ratios["sam_every_k"], 3),
        "targets": {"sam_over_adam": 2.10, "sam_every_k_over_adam": 1.30},
    }, indent=1))


if __name__ == "__main__":
    main()
