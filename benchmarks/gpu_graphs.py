"""Dreamer's update replayed as CUDA graphs (``--cuda-graphs``) against the eager update: are
the numbers the same, and how much faster is it?

For each sequence model and optimizer (Adam, SAM), three agents start from one seed: two eager
and one graphed. All three make the same updates on the same batches. The two eager agents
measure the device's own run-to-run noise (atomic adds in backward kernels make CUDA results
vary in their last bits); the graphed agent should differ from the eager one by no more than
ten times that, update by update and in the final weights (``ok``, with a floor of 1e-5
relative). The first updates are eager warm-up calls; the lists' later entries are replays.
Then the eager and graphed updates take turns, and the median of each is timed. Prints JSON;
exits 1 if a check fails, so that a GPU script can fall back to eager runs.

    python benchmarks/gpu_graphs.py                       # CUDA, model S (Atari-100k's)
    python benchmarks/gpu_graphs.py --device cpu --quick  # a rehearsal of this script on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import sync
from dreamer_throughput import QUICK_DIMS, make_batch

from flatworld import optim
from flatworld.agents.dreamer import DreamerConfig, make


def agent_for(seq_model: str, sam: bool, graphs: bool, device: torch.device,
              args: argparse.Namespace):  # fmt: skip
    extra = QUICK_DIMS if args.quick else {}
    spec = optim.OptimSpec(lr=1e-4, eps=1e-8, sam=optim.SamSpec(rho=0.1) if sam else None)
    cfg = DreamerConfig(sequence_model=seq_model, batch_size=args.batch, seq_len=args.seq_len,
                        wm_optim=spec, cuda_graphs=graphs, **extra)  # fmt: skip
    torch.manual_seed(0)
    return make(cfg, obs_shape=(3, 64, 64), action_dim=args.actions, episode_length=27000,
                device=device, discrete=True)  # fmt: skip


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest |x - y| / (|y| + 1e-6), over every element of every pair."""
    return max(float(((x.float() - y.float()).abs() / (y.float().abs() + 1e-6)).max())
               for x, y in zip(a, b, strict=True))  # fmt: skip


def state(agent) -> list[torch.Tensor]:
    return [p.detach() for p in (*agent.world_model.parameters(), *agent.ac.parameters())]


def check(seq_model: str, sam: bool, device: torch.device, args) -> dict:
    batches = [make_batch(args.seq_len, args.batch, args.actions, (3, 64, 64), device)]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # other observations and rewards, the same shapes
        b = dict(batches[0])
        b["obs"] = torch.randint(0, 256, b["obs"].shape, generator=g).float().to(device)
        b["reward"] = torch.randn(b["reward"].shape, generator=g).to(device)
        batches.append(b)
    agents = {name: agent_for(seq_model, sam, name == "graphed", device, args)
              for name in ("eager", "eager2", "graphed")}  # fmt: skip
    metrics: dict[str, list[torch.Tensor]] = {name: [] for name in agents}
    for name, agent in agents.items():
        torch.manual_seed(1)  # every agent draws the same random stream
        for i in range(args.updates):
            m = agent.update(batches[i % len(batches)])
            metrics[name].append(torch.stack([v.float().to(device) for v in m.values()]))
    sync(device)
    # Update by update (a flipped latent sample makes later differences grow, so the early
    # updates are the sharp test), then the weights at the end.
    noise = [rel_diff([a], [b]) for a, b in zip(metrics["eager2"], metrics["eager"], strict=True)]
    noise.append(rel_diff(state(agents["eager2"]), state(agents["eager"])))
    graph = [rel_diff([a], [b]) for a, b in zip(metrics["graphed"], metrics["eager"], strict=True)]
    graph.append(rel_diff(state(agents["graphed"]), state(agents["eager"])))
    ok = all(g <= max(10 * n, 1e-5) for g, n in zip(graph, noise, strict=True))
    out = {"updates": args.updates, "replays": agents["graphed"]._graphs[0].calls
           - agents["graphed"]._graphs[0].warmup,
           "rel_diff_eager_vs_eager": noise, "rel_diff_graphed_vs_eager": graph, "ok": ok}
    # Speed: the eager and the graphed agent take turns (each has captured by now).
    times: dict[str, list[float]] = {"eager": [], "graphed": []}
    for i in range(args.repeats):
        for name in times:
            sync(device)
            t = time.perf_counter()
            agents[name].update(batches[i % len(batches)])
            sync(device)
            times[name].append(time.perf_counter() - t)
    eager, graphed = (statistics.median(times[n]) for n in ("eager", "graphed"))
    out.update(eager_update_ms=1e3 * eager, graphed_update_ms=1e3 * graphed,
               speedup=eager / graphed)  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["rssm", "transformer"],
                   choices=["rssm", "transformer"])  # fmt: skip
    p.add_argument("--updates", type=int, default=6, help="updates compared (3 are warm-up)")
    p.add_argument("--repeats", type=int, default=10, help="timed updates of each agent")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--actions", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="tiny widths: a smoke run")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_graphs.py: --device cuda, but torch.cuda.is_available() is False; pass "
                 "--device cpu to rehearse")  # fmt: skip
    res: dict = {"device": str(device), "torch": torch.__version__,
                 "model_size": "tiny (--quick)" if args.quick else "S"}  # fmt: skip
    ok = True
    for seq_model in args.models:
        for sam in (False, True):
            name = f"{seq_model}-{'sam' if sam else 'adam'}"
            try:
                res[name] = check(seq_model, sam, device, args)
            except Exception as e:  # noqa: BLE001 - the report says what failed, then exit 1
                res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            ok = ok and res[name]["ok"]
            print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
    res["ok"] = ok
    print(json.dumps(res, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
