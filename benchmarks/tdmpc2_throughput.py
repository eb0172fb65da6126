"""TD-MPC2 throughput: updates/s and MPPI acts/s, Adam vs SAM, with the fraction of peak matmul.

Prints one JSON object. Peak fp32 matmul FLOP/s is measured in the same process at TD-MPC2's
layer shapes; the FLOPs of an update and of a plan are counted by FlopCounterMode (matmuls,
bmm, convs), so ``frac_peak`` says how much of the time goes to useful matrix work.

    python benchmarks/tdmpc2_throughput.py                 # 1M and 5M, CPU (+CUDA if present)
    python benchmarks/tdmpc2_throughput.py --sizes 1 --threads 1 --repeats 5
    python benchmarks/tdmpc2_throughput.py --compile      # also TDMPC2Config(compile=True)

With --compile every variant is also timed with ``compile=True`` (torch.compile'd world-model
loss, policy loss and MPPI search) in the same process: ``<variant>_compiled`` entries, the
ratios under "compiled_over_eager", and the compile time apart from the step time under
"compile_s" (the warm-up calls' wall time less the same number of steady calls). "recompiles"
counts graphs compiled after the warm-up (0: a run compiles in its first steps only).

Both sizes are timed at walker-walk's shapes (24-dim observations, 6-dim actions).

The published TD-MPC2 is not run here. Beside this run's own figures the JSON carries, under
"side_by_side", the figures measured for both implementations in one session on this machine
type, with their date and source; compare like with like (this run's figures are not part of
that measurement, and no ratio against it is computed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from common import flops_of, minor_faults, peak_matmul_flops, sync
from torch._dynamo.utils import counters

from flatworld import optim
from flatworld.agents.tdmpc2 import TDMPC2Config, make
from flatworld.runs.memory import keep_freed_memory

# ../shared/reference/tdmpc2-cpu-speed.md: median ms, default malloc, 2 threads, batch 256.
SIDE_BY_SIDE = {
    "source": "measured side by side on 2026-11-29, 2-core CPU machine type, torch 2.13.0 CPU, "
              "2 threads; published code nicklashansen/tdmpc2 at e9f5932 changed only to run "
              "on CPU (../shared/reference/tdmpc2-cpu-speed.md)",
    "1M": {"published_update_ms": 102.3, "published_act_ms": 123.3,
           "flatworld_update_ms": 88.0, "flatworld_act_ms": 94.2},
    "5M": {"published_update_ms": 337.6, "published_act_ms": 340.1,
           "flatworld_update_ms": 240.5, "flatworld_act_ms": 225.8},
}  # fmt: skip
OBS_DIM, ACTION_DIM = 24, 6  # walker-walk


def peak_matmul(device: torch.device) -> float:
    """Peak fp32 matmul FLOP/s at TD-MPC2's layer shapes (batch 256..1536, width 384..512)."""
    shapes = ((256, 512, 512), (768, 512, 512), (1536, 512, 512), (768, 384, 384))
    return peak_matmul_flops(device, shapes)


def batch(cfg: TDMPC2Config, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, b = cfg.horizon, cfg.batch_size
    out = {"obs": torch.randn(h + 1, b, OBS_DIM, generator=g),
           "action": torch.rand(h, b, ACTION_DIM, generator=g) * 2 - 1,
           "reward": torch.rand(h, b, 1, generator=g),
           "terminated": torch.zeros(h, b, 1)}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


def page_faults(fn, n: int) -> float:
    """Minor page faults per call after warm-up (see common.minor_faults)."""
    fn()
    before = minor_faults()
    for _ in range(n):
        fn()
    return (minor_faults() - before) / n


def timed(fn, n: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """Medians over ``repeats`` of the wall and process-CPU seconds per call (``n`` calls).

    On a shared CPU the wall time counts other processes' time slices; the CPU time does not
    (with one thread it is the wall time an idle machine would show, cache effects aside).
    """
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        sync(device)
        wall.append((time.perf_counter() - t) / n)
        cpu.append((time.process_time() - c) / n)
    return statistics.median(wall), statistics.median(cpu)


def evaluate_every_q_head(agent) -> None:
    """Counterfactual: the published code runs all Q heads and then picks the two it uses
    (targets and the policy's Q); flatworld runs only those two. Same values, more work."""
    run = agent.model.q_logits

    def q_logits(z, a, target=False, detach=False, idx=None):
        out = run(z, a, target, detach)
        return out if idx is None else out[idx]

    agent.model.q_logits = q_logits


def world_model_pass(agent, b: dict[str, torch.Tensor]):
    """One forward+backward of the world-model loss: what exact SAM adds to an update."""
    tg = agent.targets(b)

    def one_pass() -> None:
        agent.world_model_loss(b, tg)[0].backward()
        agent.wm_optim.zero_grad(set_to_none=True)

    return one_pass


def warm_up(fns, device: torch.device) -> float:
    """Wall seconds of the first calls (where torch.compile compiles)."""
    sync(device)
    t = time.perf_counter()
    for fn in fns:
        fn()
    sync(device)
    return time.perf_counter() - t


def bench_size(size: int, device: torch.device, args: argparse.Namespace) -> dict:
    res: dict = {}
    obs = np.random.default_rng(0).normal(size=OBS_DIM).astype(np.float32)
    sam = optim.SamSpec(rho=0.05)
    variants = [("adam", None, "all"), ("sam", sam, "all"),
                ("sam_encoder_dynamics", sam, "encoder_dynamics")]  # fmt: skip
    if args.published_q:
        variants += [("adam_every_q_head", None, "all"), ("sam_every_q_head", sam, "all")]
    modes = [False, True] if args.compile else [False]
    for (base, spec, scope), compile_ in ((v, c) for v in variants for c in modes):
        name = base + ("_compiled" if compile_ else "")
        torch.manual_seed(0)
        torch._dynamo.reset()  # each compiled agent compiles afresh (and counts its own graphs)
        counters.clear()
        cfg = TDMPC2Config(model_size=size, wm_optim=optim.OptimSpec(sam=spec), sam_scope=scope,
                           compile=compile_)  # fmt: skip
        agent = make(cfg, obs_shape=(OBS_DIM,), action_dim=ACTION_DIM, episode_length=1000,
                     device=device)  # fmt: skip
        if base.endswith("every_q_head"):
            evaluate_every_q_head(agent)
        b = batch(cfg, device)
        warm = warm_up([lambda: agent.update(b)] * 2, device)  # noqa: B023
        graphs = counters["stats"]["unique_graphs"]
        sec, cpu = timed(lambda: agent.update(b), args.updates, args.repeats, device)  # noqa: B023
        res[name] = {"update_ms": 1e3 * sec, "updates_per_s": 1 / sec, "update_cpu_ms": 1e3 * cpu}
        if compile_:
            # FlopCounterMode would make dynamo recompile; the FLOPs are the eager ones.
            res[name]["update_gflop"] = res[base]["update_gflop"]
            res.setdefault("compile_s", {})[base] = warm - 2 * sec
            res.setdefault("compiled_over_eager", {})[base] = sec / (1e-3 * res[base]["update_ms"])
        else:
            res[name]["update_gflop"] = flops_of(lambda: agent.update(b)) / 1e9  # noqa: B023
        res[name]["update_page_faults"] = page_faults(lambda: agent.update(b),  # noqa: B023
                                                      args.updates)  # fmt: skip
        if compile_:
            res.setdefault("recompiles", {})[base] = counters["stats"]["unique_graphs"] - graphs
        if name == "adam_compiled":
            warm = warm_up([lambda: agent.act(obs, t0=True, eval_mode=False),  # noqa: B023
                            lambda: agent.act(obs, t0=False, eval_mode=False)], device)  # noqa: B023
            graphs = counters["stats"]["unique_graphs"]
            sec, cpu = timed(lambda: agent.act(obs, t0=False, eval_mode=False),  # noqa: B023
                             args.acts, args.repeats, device)  # fmt: skip
            res[name].update(act_ms=1e3 * sec, acts_per_s=1 / sec, act_cpu_ms=1e3 * cpu)
            res["compile_s"]["act"] = warm - 2 * sec
            res["compiled_over_eager"]["act"] = sec / (1e-3 * res["act_ms"])
            res["recompiles"]["act"] = counters["stats"]["unique_graphs"] - graphs
        if name == "adam":
            res["params_m"] = sum(p.numel() for p in agent.model.parameters()
                                  if p.requires_grad) / 1e6
            agent.model.train()
            one_pass = world_model_pass(agent, b)
            sec, _ = timed(one_pass, args.updates, args.repeats, device)
            res["wm_pass_ms"], res["wm_pass_gflop"] = 1e3 * sec, flops_of(one_pass) / 1e9
            agent.model.eval()
            agent.act(obs, t0=True, eval_mode=False)
            sec, cpu = timed(lambda: agent.act(obs, t0=False, eval_mode=False),  # noqa: B023
                             args.acts, args.repeats, device)  # fmt: skip
            fl = flops_of(lambda: agent.act(obs, t0=False, eval_mode=False))  # noqa: B023
            res["act_ms"], res["acts_per_s"], res["act_cpu_ms"] = 1e3 * sec, 1 / sec, 1e3 * cpu
            res["act_gflop"] = fl / 1e9
            res["act_page_faults"] = page_faults(
                lambda: agent.act(obs, t0=False, eval_mode=False), args.acts)  # noqa: B023
    res["sam_over_adam_update"] = res["sam"]["update_ms"] / res["adam"]["update_ms"]
    res["sam_over_adam_update_cpu"] = res["sam"]["update_cpu_ms"] / res["adam"]["update_cpu_ms"]
    res["sam_ed_over_adam_update"] = (res["sam_encoder_dynamics"]["update_ms"]
                                      / res["adam"]["update_ms"])  # fmt: skip
    # Exact SAM adds one world-model forward+backward; 1.0 here means no overhead beyond it.
    res["sam_extra_over_wm_pass"] = ((res["sam"]["update_ms"] - res["adam"]["update_ms"])
                                     / res["wm_pass_ms"])  # fmt: skip
    res["sam_over_adam_flops"] = res["sam"]["update_gflop"] / res["adam"]["update_gflop"]
    if args.published_q:
        res["sam_over_adam_update_every_q_head"] = (res["sam_every_q_head"]["update_ms"]
                                                    / res["adam_every_q_head"]["update_ms"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 5])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--updates", type=int, default=5, help="timed updates per repeat")
    p.add_argument("--acts", type=int, default=5, help="timed acts per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    p.add_argument("--compile", action="store_true",
                   help="also time every variant with TDMPC2Config(compile=True)")
    p.add_argument("--published-q", action=argparse.BooleanOptionalAction, default=True,
                   help="also time updates that run every Q head as the published code does")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="flatworld.runs.keep_freed_memory (as training runs do); off: malloc as "
                        "it is, for the page faults before")  # fmt: skip
    args = p.parse_args()
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                 "keep_freed_memory": kept, "results": {},
                 "side_by_side": SIDE_BY_SIDE}  # fmt: skip
    for dev in devices:
        device = torch.device(dev)
        peak = peak_matmul(device)
        r: dict = {f"{size}M": bench_size(size, device, args) for size in args.sizes}
        # Measured before and after: a busy moment on a shared CPU cannot pass for the peak.
        peak = max(peak, peak_matmul(device))
        for res in r.values():
            res["act_frac_peak"] = res["act_gflop"] / res["act_ms"] / (peak / 1e12)
            for v in res.values():
                if isinstance(v, dict) and "update_gflop" in v:
                    v["update_frac_peak"] = v["update_gflop"] / v["update_ms"] / (peak / 1e12)
        out["results"][dev] = {"peak_matmul_gflops": peak / 1e9, **r}
    print(json.dumps(_rounded(out), indent=1))


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    main()
