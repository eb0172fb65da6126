"""Dreamer throughput (RSSM and transformer): world-model updates/s with Adam and SAM,
imagination + actor-critic updates/s, imagination steps/s (the transformer with and without its
key/value cache), with FLOPs and the fraction of a measured fp32 matmul peak.

Prints one JSON object. Settings default to Atari-100k's: 3x64x64 pixels, 6 discrete actions,
batch 16 x 64, horizon 15, 2 threads, the environment excluded; model size S. FLOPs are counted
by FlopCounterMode (matmuls and convs); ``frac_peak`` = FLOP/s over the peak fp32 matmul FLOP/s
measured in the same process. Adam and SAM steps take turns, and ``sam_over_adam_wm_step`` is
the median of the paired ratios, so that it compares one stretch of this shared machine's speed.

    python benchmarks/dreamer_throughput.py                        # both, a few repeats
    python benchmarks/dreamer_throughput.py --sequence-model transformer --repeats 5
    python benchmarks/dreamer_throughput.py --quick                # tiny widths: a smoke run

The published codes are not run here. Their figures, measured on this machine type at the same
settings (the issues' numbers), are printed under "reference_published" beside this run's own
figures; they were not measured side by side with it, so no ratio against them is computed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import flops_of, peak_matmul_flops, sync

from flatworld import optim
from flatworld.agents.dreamer import DreamerConfig, make
from flatworld.runs.memory import keep_freed_memory

REFERENCE_PUBLISHED = {
    "rssm": {
        "source": "issue 9: the best public PyTorch DreamerV3, this 2-core CPU, Atari-100k small "
                  "model, batch 16x64, horizon 15, 6 actions, 2 threads, env excluded",
        "wm_step_ms": 2342, "wm_step_gflop": 413, "params_m": 15.7, "imag_ac_ms": 2745,
        "update_ms": 4881, "about_gflop_per_s": 175,
        "goals": "imag+AC >= 2x faster; wm step at least as fast at the same FLOPs; whole "
                 "update >= 1.4x faster; SAM wm step <= 2.1x Adam's",
    },
    "transformer": {
        "source": "issue 10: the published TWISTER code, same machine type and settings",
        "wm_step_ms": 3617, "wm_step_gflop": 780, "params_m": 41.3, "cpc_heads_params_m": 18.5,
        "imag_ac_ms": 6740, "rollout_ms": 4000, "kv_copy_ms": 1500, "update_ms": 9796,
        "goals": "imag+AC >= 2.5x faster; wm step at least as fast; whole update >= 1.7x "
                 "faster; cached imagination >= 3x faster than recomputing the window; SAM wm "
                 "step <= 2.1x Adam's",
    },
}  # fmt: skip


def peak_matmul(device: torch.device, seconds: float) -> float:
    """Peak fp32 matmul FLOP/s at the model's layer shapes (1024 tokens, width 512..1536)."""
    shapes = ((1024, 512, 512), (1024, 512, 1536), (1024, 1536, 512), (2048, 1024, 512))
    return peak_matmul_flops(device, shapes, seconds, rounds=2)


def timed_together(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Wall seconds of each call, ``repeats`` rounds of one call of every function in turn,
    after two warm-up rounds (the heap settles over the first steps: see
    flatworld.runs.memory). Taking turns puts every function in the same stretch of this
    shared machine's speed, so ratios between them are fair."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            out[name].append(time.perf_counter() - t)
    return out


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds per call (see :func:`timed_together`)."""
    return statistics.median(timed_together({"fn": fn}, repeats, device)["fn"])


def make_batch(steps: int, batch: int, actions: int, obs_shape, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, actions, (steps, batch), generator=g)
    is_first = torch.zeros(steps, batch, 1)
    is_first[0] = 1.0
    is_first[steps // 2, ::3] = 1.0  # a few episodes start inside the batch
    out = {"obs": torch.randint(0, 256, (steps, batch, *obs_shape), generator=g).float(),
           "action": torch.nn.functional.one_hot(idx, actions).float() * (1 - is_first),
           "reward": torch.randn(steps, batch, 1, generator=g),
           "terminated": torch.zeros(steps, batch, 1), "is_first": is_first}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


def bench(seq_model: str, device: torch.device, args: argparse.Namespace, peak: float) -> dict:
    extra = dict(deter=32, units=32, layers=1, cnn_depth=4, stoch=4, classes=4, tssm_width=32,
                 tssm_heads=4, cpc_steps=3) if args.quick else {}  # fmt: skip
    res: dict = {}
    b = make_batch(args.seq_len, args.batch, args.actions, (3, 64, 64), device)

    def agent_for(sam):
        torch.manual_seed(0)
        cfg = DreamerConfig(sequence_model=seq_model, batch_size=args.batch, seq_len=args.seq_len,
                            imag_horizon=args.horizon,
                            wm_optim=optim.OptimSpec(lr=1e-4, eps=1e-8, sam=sam), **extra)
        return make(cfg, obs_shape=(3, 64, 64), action_dim=args.actions, episode_length=27000,
                    device=device, discrete=True)  # fmt: skip

    def record(name: str, fn, sec: float, per_call: float = 1.0) -> None:
        fl = flops_of(fn)
        res[name] = {"ms": 1e3 * sec, "per_s": per_call / sec, "gflop": fl / 1e9,
                     "gflop_per_s": fl / sec / 1e9, "frac_peak": fl / sec / peak}  # fmt: skip

    def rate(name: str, fn, per_call: float = 1.0) -> None:
        record(name, fn, timed(fn, args.repeats, device), per_call)

    # Adam and SAM take turns, so that SAM/Adam compares the same stretch of machine speed.
    agents = {opt: agent_for(sam) for opt, sam in (("adam", None),
                                                    ("sam", optim.SamSpec(rho=0.1)))}
    for part in ("update", "wm_step"):
        if part == "wm_step":  # the same update with the actor-critic step left out
            for agent in agents.values():
                agent.train_actor_critic = lambda start, cont0: {}
        fns = {f"{part}_{opt}": (lambda a=agent: a.update(b)) for opt, agent in agents.items()}
        secs = timed_together(fns, args.repeats, device)
        for name, fn in fns.items():
            record(name, fn, statistics.median(secs[name]))
        if part == "wm_step":
            res["sam_over_adam_wm_step"] = statistics.median(
                s / a for s, a in zip(secs["wm_step_sam"], secs["wm_step_adam"], strict=True))
    wm = agents["adam"].world_model
    res["params_m"] = {
        "world_model": sum(p.numel() for p in wm.parameters()) / 1e6,
        "cpc_heads": (sum(p.numel() for p in wm.cpc.parameters()) / 1e6
                      if getattr(wm, "cpc", None) is not None else 0.0),
        "actor_critic": sum(p.numel() for p in agents["adam"].ac.parameters()) / 1e6}  # fmt: skip
    del agents
    agent = agent_for(None)
    data = agent.prepare(b)
    with torch.no_grad():
        post = agent.world_model.loss(data)[2]
    cont0 = data["cont"].flatten(0, 1)
    seq = agent.world_model.seq

    def imag_ac() -> None:
        agent.ac.update(agent.world_model, seq.imagine_start(post), cont0, agent.actor_optim,
                        agent.critic_optim)  # fmt: skip

    rate("imag_ac", imag_ac)
    n = args.batch * args.seq_len
    acts = torch.nn.functional.one_hot(torch.randint(0, args.actions, (args.horizon, n)),
                                       args.actions).float().to(device)  # fmt: skip

    @torch.no_grad()
    def rollout() -> None:  # the sequence model alone, from every posterior state
        state = seq.imagine_start(post)
        for i in range(args.horizon):
            state = seq.imagine_step(state, acts[i])

    rate("imagine_cached" if seq_model == "transformer" else "imagine", rollout,
         per_call=args.horizon * n)
    if seq_model == "transformer":
        ctx = seq.context
        tokens = torch.randn(ctx + args.horizon, n, seq.width, device=device)
        start = torch.zeros(ctx, n, dtype=torch.bool, device=device)

        @torch.no_grad()
        def recompute() -> None:  # no cache: every step reruns the window of its last ctx tokens
            for i in range(args.horizon):
                h, _, _ = seq.forward_tokens(tokens[i + 1:i + 1 + ctx], start)
                seq._latent(seq.prior_net(h[-1]), True)

        rate("imagine_recompute_window", recompute, per_call=args.horizon * n)
        res["cached_over_recompute_speed"] = (res["imagine_cached"]["per_s"]
                                              / res["imagine_recompute_window"]["per_s"])
    res["reference_published"] = REFERENCE_PUBLISHED[seq_model]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequence-model", nargs="+", default=["rssm", "transformer"],
                   choices=["rssm", "transformer"])  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--actions", type=int, default=6)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    p.add_argument("--quick", action="store_true", help="tiny widths and 1 repeat: a smoke run")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="flatworld.runs.keep_freed_memory (as training runs do); off: malloc as "
                        "it is")  # fmt: skip
    args = p.parse_args()
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.quick:
        args.repeats, args.batch, args.seq_len = 1, 4, 16
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    out: dict = {"settings": {k: v for k, v in vars(args).items() if k != "devices"},
                 "torch": torch.__version__, "keep_freed_memory": kept}  # fmt: skip
    for name in devices:
        device = torch.device(name)
        peak = peak_matmul(device, 0.3 if args.quick else 1.0)
        out[name] = {"peak_matmul_gflop_per_s": peak / 1e9}
        for seq_model in args.sequence_model:
            out[name][seq_model] = bench(seq_model, device, args, peak)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
