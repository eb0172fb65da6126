"""Dreamer throughput (RSSM and transformer): world-model updates/s with Adam and SAM,
imagination + actor-critic updates/s, imagination steps/s (the transformer with and without its
key/value cache), with FLOPs and the fraction of a measured matmul peak, in fp32 (the default)
and/or with the agent's ``--precision bf16``.

Prints one JSON object: ``{device: {"peak_matmul_gflop_per_s": {precision: ...},
sequence_model: {precision: figures, "bf16_speedup_over_fp32": ..., "reference_published":
...}}}``. Settings default to Atari-100k's: 3x64x64 pixels, 6 discrete actions, batch 16 x 64,
horizon 15, 2 threads, the environment excluded; model size S. FLOPs are counted by
FlopCounterMode (matmuls and convs, a sparse product by its nonzeros); ``frac_peak`` = FLOP/s
over the peak matmul FLOP/s of the same precision measured in the same process, through the
product the agent's layers use (for fp32 on a CPU, flatworld.nn.linear: oneDNN where its route
is on, ``onednn_linear`` in the JSON; torch's own fp32 product, sgemm, is printed beside it as
``peak_torch_matmul_fp32_gflop_per_s``). The
whole update, the world-model step and imagination + actor-critic, with Adam and SAM (and the
precisions), take turns, and ``sam_over_adam_wm_step``, ``update_over_parts`` (the whole update
over the sum of its two parts, about 1) and ``bf16_speedup_over_fp32`` are medians of paired
ratios, so that each compares one stretch of this shared machine's speed. Each timed call
follows an untimed call of the same function (``--primed``, the default), as one update follows
another in a training run: a call that follows another agent's meets a heap laid out for that
agent, and pays in page faults for it (``warmup`` in the JSON gives the faults of the timed
calls).

    python benchmarks/dreamer_throughput.py                        # both models, a few repeats
    python benchmarks/dreamer_throughput.py --sequence-model transformer --repeats 5
    python benchmarks/dreamer_throughput.py --precision fp32 bf16  # and bf16 beside fp32
    python benchmarks/dreamer_throughput.py --quick                # tiny widths: a smoke run
    python benchmarks/dreamer_throughput.py --onednn-linear off    # fp32 products in sgemm
    python benchmarks/dreamer_throughput.py --onednn-linear on     # through oneDNN on any CPU

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
from common import cpu_name, flops_of, minor_faults, peak_matmul_flops, sync

from flatworld import optim
from flatworld.agents.dreamer import DreamerConfig, make
from flatworld.agents.dreamer.config import PRECISIONS
from flatworld.agents.dreamer.networks import compute_precision
from flatworld.nn.linear import linear, onednn_linear, onednn_linear_enabled
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


# --quick: tiny widths, a smoke run of a benchmark rather than a measurement
QUICK_DIMS = dict(deter=32, units=32, layers=1, cnn_depth=4, stoch=4, classes=4, tssm_width=32,
                  tssm_heads=4, cpc_steps=3)  # fmt: skip


# The model's layer shapes (m, k, n): 1024 tokens, widths 512..1536.
PEAK_SHAPES = ((1024, 512, 512), (1024, 512, 1536), (1024, 1536, 512), (2048, 1024, 512))


def peak_matmul(device: torch.device, seconds: float, precision: str = "fp32") -> float:
    """Peak matmul FLOP/s at ``PEAK_SHAPES``, in fp32 or (``precision="bf16"``) bfloat16,
    through the agent's layers' own product (flatworld.nn.linear: oneDNN for fp32 on a CPU
    where that route is on, else torch's)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return peak_matmul_flops(device, PEAK_SHAPES, seconds, rounds=2, dtype=dtype, product=linear)


def peak_sgemm(device: torch.device, seconds: float) -> float:
    """The same peak through torch's own fp32 product (sgemm on a CPU)."""
    return peak_matmul_flops(device, PEAK_SHAPES, seconds, rounds=2)


# Warm-up ends once a whole round of calls faults in fewer pages than this (4 MB of 4 KB
# pages): the heap then holds the rounds' pattern of blocks (see flatworld.runs.memory).
SETTLED_FAULTS = 1024


def one_round(fns: dict, device: torch.device, primed: bool = True
              ) -> tuple[dict[str, float], int]:  # fmt: skip
    """One timed call of every function in turn: (wall seconds of each, page faults of the
    timed calls). ``primed``: each timed call follows an untimed call of the same function, so
    the heap holds that function's own pattern of blocks, as it does in a training run where
    one update follows another. Unprimed, a call follows a different agent's (Adam's after
    SAM's): on a 2-core VM two Dreamer S agents taking turns faulted in 180k pages per update
    and ran 10-25% slower than one agent updating twice in a row, which faulted in none."""
    secs: dict[str, float] = {}
    faults = 0
    for name, fn in fns.items():
        if primed:
            fn()
        sync(device)
        before, t = minor_faults(), time.perf_counter()
        fn()
        sync(device)
        secs[name] = time.perf_counter() - t
        faults += minor_faults() - before
    return secs, faults


def warm_up(fns: dict, device: torch.device, primed: bool = True, min_rounds: int = 2,
            max_rounds: int = 8) -> tuple[int, int]:  # fmt: skip
    """Rounds of :func:`one_round` until the heap settles: at least ``min_rounds``, then until
    a round's timed calls fault in fewer pages than ``SETTLED_FAULTS`` (at most
    ``max_rounds``). Where a page fault costs tens of microseconds (measured on a 2-core VM:
    65k faults added 2 s to a 3.9 s world-model step in its second update), two fixed rounds
    left the timed rounds still faulting. Returns (rounds, faults in the last round)."""
    rounds = faults = 0
    while rounds < max_rounds:
        faults = one_round(fns, device, primed)[1]
        rounds += 1
        if rounds >= min_rounds and faults < SETTLED_FAULTS:
            break
    return rounds, faults


def timed_together(fns: dict, repeats: int, device: torch.device, log: dict | None = None,
                   primed: bool = True) -> dict[str, list[float]]:  # fmt: skip
    """Wall seconds of each call, ``repeats`` rounds of :func:`one_round`, after
    :func:`warm_up`. Taking turns puts every function in the same stretch of this shared
    machine's speed, so ratios between them are fair. ``log`` gets the warm-up rounds and the
    page faults of the warm-up's last round and of the timed rounds (timed calls only)."""
    rounds, last = warm_up(fns, device, primed)
    out: dict[str, list[float]] = {name: [] for name in fns}
    faults = 0
    for _ in range(repeats):
        secs, f = one_round(fns, device, primed)
        faults += f
        for name, sec in secs.items():
            out[name].append(sec)
    if log is not None:
        log.update(warmup_rounds=rounds, warmup_last_round_faults=last,
                   timed_rounds_faults=faults)  # fmt: skip
    return out


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


def bench(seq_model: str, device: torch.device, args: argparse.Namespace,
          peaks: dict[str, float]) -> dict:  # fmt: skip
    """Every figure for each precision in ``args.precision``; the functions compared (Adam and
    SAM, and the precisions) take turns, so their ratios see one stretch of machine speed."""
    extra = QUICK_DIMS if args.quick else {}
    precs = list(args.precision)
    res: dict = {p: {} for p in precs}
    b = make_batch(args.seq_len, args.batch, args.actions, (3, 64, 64), device)

    def agent_for(sam, precision):
        torch.manual_seed(0)
        cfg = DreamerConfig(sequence_model=seq_model, batch_size=args.batch, seq_len=args.seq_len,
                            imag_horizon=args.horizon, precision=precision,
                            wm_optim=optim.OptimSpec(lr=1e-4, eps=1e-8, sam=sam), **extra)
        return make(cfg, obs_shape=(3, 64, 64), action_dim=args.actions, episode_length=27000,
                    device=device, discrete=True)  # fmt: skip

    def record(prec: str, name: str, fn, sec: float, per_call: float = 1.0) -> None:
        fl = flops_of(fn)
        res[prec][name] = {"ms": 1e3 * sec, "per_s": per_call / sec, "gflop": fl / 1e9,
                           "gflop_per_s": fl / sec / 1e9, "frac_peak": fl / sec / peaks[prec]}

    speedup: dict[str, float] = {}
    warmups: list[dict] = []  # per group timed together: its warm-up and page faults

    def paired(secs: dict, a: tuple, b: tuple) -> float:
        return statistics.median(x / y for x, y in zip(secs[a], secs[b], strict=True))

    def together(fns: dict, per_call: float = 1.0) -> dict:
        """Time fns {(name, prec): fn} in turns; record each, and the paired fp32/bf16 ratio."""
        log: dict = {}
        secs = timed_together(fns, args.repeats, device, log, args.primed)
        warmups.append({"timed": sorted(dict.fromkeys(name for name, _ in fns)), **log})
        for (name, prec), fn in fns.items():
            record(prec, name, fn, statistics.median(secs[name, prec]), per_call)
        if len(precs) > 1:
            for name in dict.fromkeys(name for name, _ in fns):
                speedup[name] = paired(secs, (name, "fp32"), (name, "bf16"))
        return secs

    # The whole update, the world-model step (the same update with the actor-critic step left
    # out, on agents of its own) and the actor-critic step alone all take turns, so that the
    # whole update and its parts see one stretch of this shared machine's speed.
    sams = (("adam", None), ("sam", optim.SamSpec(rho=0.1)))
    agents = {(opt, prec): agent_for(sam, prec) for prec in precs for opt, sam in sams}
    wm_agents = {(opt, prec): agent_for(sam, prec) for prec in precs for opt, sam in sams}
    for agent in wm_agents.values():
        agent.train_actor_critic = lambda start, cont0: {}
    fns = {(f"update_{opt}", prec): (lambda a=agent: a.update(b))
           for (opt, prec), agent in agents.items()}  # fmt: skip
    fns.update({(f"wm_step_{opt}", prec): (lambda a=agent: a.update(b))
                for (opt, prec), agent in wm_agents.items()})  # fmt: skip
    n = args.batch * args.seq_len
    acts = torch.nn.functional.one_hot(torch.randint(0, args.actions, (args.horizon, n)),
                                       args.actions).float().to(device)  # fmt: skip
    rollout, recompute = {}, {}
    for prec in precs:
        agent = agent_for(None, prec)
        data = agent.prepare(b)
        with torch.no_grad():
            post = agent.world_model.loss(data)[2]
        cont0 = data["cont"].flatten(0, 1)
        seq = agent.world_model.seq

        def ac_step(agent=agent, seq=seq, post=post, cont0=cont0) -> None:
            agent.ac.update(agent.world_model, seq.imagine_start(post), cont0, agent.actor_optim,
                            agent.critic_optim)  # fmt: skip

        @torch.no_grad()
        def roll(seq=seq, post=post, prec=prec) -> None:  # the sequence model alone
            with compute_precision(device, prec):
                state = seq.imagine_start(post)
                for i in range(args.horizon):
                    state = seq.imagine_step(state, acts[i])

        fns["imag_ac", prec] = ac_step
        name = "imagine_cached" if seq_model == "transformer" else "imagine"
        rollout[name, prec] = roll
        if seq_model == "transformer":
            ctx = seq.context
            tokens = torch.randn(ctx + args.horizon, n, seq.width, device=device)
            start = torch.zeros(ctx, n, dtype=torch.bool, device=device)

            @torch.no_grad()
            def window(seq=seq, tokens=tokens, start=start, prec=prec, ctx=ctx) -> None:
                # no cache: every step reruns the window of its last ctx tokens
                with compute_precision(device, prec):
                    for i in range(args.horizon):
                        h, _, _ = seq.forward_tokens(tokens[i + 1:i + 1 + ctx], start)
                        seq._latent(seq.prior_net(h[-1]), True)

            recompute["imagine_recompute_window", prec] = window
    secs = together(fns)
    for prec in precs:
        res[prec]["sam_over_adam_wm_step"] = paired(secs, ("wm_step_sam", prec),
                                                    ("wm_step_adam", prec))  # fmt: skip
        # the whole update against the sum of its two parts timed beside it (about 1)
        res[prec]["update_over_parts"] = statistics.median(
            u / (w + a) for u, w, a in zip(secs["update_adam", prec], secs["wm_step_adam", prec],
                                           secs["imag_ac", prec], strict=True))  # fmt: skip
    wm = agents["adam", precs[0]].world_model
    params_m = {
        "world_model": sum(p.numel() for p in wm.parameters()) / 1e6,
        "cpc_heads": (sum(p.numel() for p in wm.cpc.parameters()) / 1e6
                      if getattr(wm, "cpc", None) is not None else 0.0),
        "actor_critic": sum(p.numel() for p in agents["adam", precs[0]].ac.parameters()) / 1e6}
    del agents, wm_agents, wm, fns
    together(rollout, per_call=args.horizon * n)
    if recompute:
        together(recompute, per_call=args.horizon * n)
    for prec in precs:
        r = res[prec]
        r["params_m"] = params_m
        if seq_model == "transformer":
            r["cached_over_recompute_speed"] = (r["imagine_cached"]["per_s"]
                                                / r["imagine_recompute_window"]["per_s"])
    if speedup:
        res["bf16_speedup_over_fp32"] = speedup
    res["warmup"] = warmups
    res["reference_published"] = REFERENCE_PUBLISHED[seq_model]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequence-model", nargs="+", default=["rssm", "transformer"],
                   choices=["rssm", "transformer"])  # fmt: skip
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                   help="the agent's --precision; both: they take turns, and the JSON gives "
                        "bf16_speedup_over_fp32 (median of paired ratios)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--actions", type=int, default=6)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    p.add_argument("--quick", action="store_true", help="tiny widths and 1 repeat: a smoke run")
    p.add_argument("--onednn-linear", choices=("auto", "on", "off"), default="auto",
                   help="flatworld.nn.linear's oneDNN route for fp32 CPU products: auto (the "
                        "default) takes it where torch runs AVX-512 kernels; off: torch's "
                        "sgemm")  # fmt: skip
    p.add_argument("--primed", action=argparse.BooleanOptionalAction, default=True,
                   help="each timed call follows an untimed call of the same function, as one "
                        "update follows another in training (the default since 2026-12-06); "
                        "--no-primed: calls of different agents follow one another")  # fmt: skip
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="flatworld.runs.keep_freed_memory (as training runs do); off: malloc as "
                        "it is")  # fmt: skip
    args = p.parse_args()
    args.precision = list(dict.fromkeys(args.precision))  # each once, in the order given
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.quick:
        args.repeats, args.batch, args.seq_len = 1, 4, 16
    torch.set_num_threads(args.threads)
    onednn_linear({"auto": "auto", "on": True, "off": False}[args.onednn_linear])
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    out: dict = {"settings": {k: v for k, v in vars(args).items() if k != "devices"},
                 "torch": torch.__version__, "keep_freed_memory": kept,
                 "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "onednn_linear": onednn_linear_enabled()}  # fmt: skip
    for name in devices:
        device = torch.device(name)
        peaks = {p: peak_matmul(device, 0.3 if args.quick else 1.0, p) for p in args.precision}
        out[name] = {"peak_matmul_gflop_per_s": {p: v / 1e9 for p, v in peaks.items()}}
        if "fp32" in peaks:  # torch's own fp32 product beside it (sgemm on a CPU)
            out[name]["peak_torch_matmul_fp32_gflop_per_s"] = peak_sgemm(
                device, 0.3 if args.quick else 1.0) / 1e9  # fmt: skip
        for seq_model in args.sequence_model:
            out[name][seq_model] = bench(seq_model, device, args, peaks)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
