"""flatworld.sharpness against PyHessian on a TD-MPC2-sized MLP (Linear -> LayerNorm -> Mish).

Prints one JSON object to stdout (progress goes to stderr):
- hvp: seconds per Hessian-vector product for double backward on a reused gradient graph
  (flatworld's choice), double backward rebuilt per product, and torch.func's jvp(grad);
- same_iters: lambda_max by power iteration and the Hutchinson trace, flatworld and PyHessian
  doing exactly the same number of products (counted), each timed whole (graph building
  included) over --repeats alternating runs; ratios are medians;
- equal_accuracy: products (and seconds) each library's lambda_max route needs to come within
  1% / 0.1% of a long Lanczos reference: PyHessian's power iteration (its per-product
  Rayleigh quotients, recorded) against flatworld's default Lanczos.

    python benchmarks/hessian.py                      # ~1.3M params, about a minute, 1 thread
    python benchmarks/hessian.py --hidden 1024 --iters 100 --samples 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from flatworld import sharpness
from flatworld.sharpness import hessian as fw_hessian


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def make_model(in_dim: int, hidden: int, layers: int, out_dim: int) -> nn.Module:
    blocks, d = [], in_dim
    for _ in range(layers):
        blocks += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.Mish()]
        d = hidden
    return nn.Sequential(*blocks, nn.Linear(d, out_dim))


class Counter:
    """Counts calls of a module-level function or a method by wrapping it in place."""

    def __init__(self, owner, name: str):
        self.n, fn = 0, getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.n += 1
            return fn(*args, **kwargs)

        setattr(owner, name, wrapped)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def per_call(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    params = [p for p in model.parameters()]
    names = [k for k, _ in model.named_parameters()]
    v = [torch.randn_like(p) for p in params]
    loss = nn.functional.mse_loss(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    reused = per_call(lambda: torch.autograd.grad(g, params, v, retain_graph=True), n)

    def fresh():
        gg = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params, create_graph=True)
        return torch.autograd.grad(gg, params, v)

    out = {"double_backward_reused_graph_s": reused, "double_backward_fresh_s": per_call(fresh, n)}
    from torch.func import functional_call, grad, jvp

    detached, vt = tuple(p.detach() for p in params), tuple(v)

    def func_hvp(criterion):
        def f(ps):
            return criterion(functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

        return lambda: jvp(grad(f), (detached,), (vt,))[1]

    try:
        func_hvp(nn.functional.mse_loss)()
        out["torch_func_mse_loss"] = "ok"
    except RuntimeError as err:  # forward-over-reverse of mse_loss is broken in some torch builds
        out["torch_func_mse_loss"] = f"fails: {str(err)[:80]}"
    manual = func_hvp(lambda o, t: (o - t).square().mean())
    out["torch_func_jvp_grad_s"] = per_call(manual, n)
    out["torch_func_over_reused_ratio"] = out["torch_func_jvp_grad_s"] / reused
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--out-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30, help="power iterations, both libraries")
    ap.add_argument("--samples", type=int, default=30, help="Hutchinson samples, both libraries")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hvp-reps", type=int, default=5)
    ap.add_argument("--ref-iters", type=int, default=150, help="Lanczos products for the reference")
    ap.add_argument("--power-max", type=int, default=100,
                    help="products recorded for the equal-accuracy comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 keeps timings sane on a shared CPU, 0 = torch default")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from pyhessian import hessian as PyHessian  # imported late: only the benchmark needs it

    ph_module = sys.modules["pyhessian.hessian"]  # the package rebinds .hessian to the class

    torch.manual_seed(args.seed)
    model = make_model(args.in_dim, args.hidden, args.layers, args.out_dim).eval()
    x, y = torch.randn(args.batch, args.in_dim), torch.randn(args.batch, args.out_dim)
    criterion = nn.MSELoss()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    log(f"MLP {n_params / 1e6:.2f}M params, batch {args.batch}, threads {torch.get_num_threads()}")

    def loss_fn():
        return criterion(model(x), y)

    # PyHessian 0.1 runs as is on torch 2.13 / numpy 2 for eigenvalues() and trace() (density()
    # would need torch.eig, unused here). Its loops stop early on tol: tol=0 (power) and
    # tol=-inf (trace) make them run every iteration; the counters check it.
    ph_count = Counter(ph_module, "hessian_vector_product")
    fw_count = Counter(fw_hessian._Hessian, "__call__")
    fd_count = Counter(fw_hessian._FiniteDifferenceHessian, "__call__")

    def run_pyhessian(kind: str, n: int, tol: float):
        model.zero_grad(set_to_none=True)
        h = PyHessian(model, criterion, data=(x, y), cuda=False)
        if kind == "eig":
            value = h.eigenvalues(maxIter=n, tol=tol, top_n=1)[0][0]
        else:
            value = float(sum(h.trace(maxIter=n, tol=tol)) / n)
        model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying grads behind
        return value

    log("hvp timings ...")
    hvp = bench_hvp(model, x, y, args.hvp_reps)

    rows = []
    for r in range(args.repeats):
        row = {}
        order = ("fw", "ph") if r % 2 == 0 else ("ph", "fw")
        for who in order:
            torch.manual_seed(args.seed + r)
            if who == "ph":
                c0 = ph_count.n
                row["ph_eig"], row["ph_eig_s"] = timed(
                    lambda: run_pyhessian("eig", args.iters, 0.0))
                row["ph_eig_hvps"], c0 = ph_count.n - c0, ph_count.n
                row["ph_trace"], row["ph_trace_s"] = timed(
                    lambda: run_pyhessian("trace", args.samples, float("-inf")))
                row["ph_trace_hvps"] = ph_count.n - c0
            else:
                c0 = fw_count.n
                eig, row["fw_eig_s"] = timed(lambda seed=r: sharpness.lambda_max(
                    loss_fn, params, iters=args.iters, tol=0.0, method="power", seed=seed))
                row["fw_eig"], row["fw_eig_hvps"], c0 = eig.value, fw_count.n - c0, fw_count.n
                tr, row["fw_trace_s"] = timed(lambda seed=r: sharpness.hessian_trace(
                    loss_fn, params, samples=args.samples, seed=seed))
                row["fw_trace"], row["fw_trace_stderr"] = tr.mean, tr.stderr
                row["fw_trace_hvps"] = fw_count.n - c0
                # The same iterations with finite-difference products (hvp="fd").
                c0 = fd_count.n
                eig, row["fd_eig_s"] = timed(lambda seed=r: sharpness.lambda_max(
                    loss_fn, params, iters=args.iters, tol=0.0, method="power", seed=seed,
                    hvp="fd"))
                row["fd_eig"], row["fd_eig_hvps"], c0 = eig.value, fd_count.n - c0, fd_count.n
                tr, row["fd_trace_s"] = timed(lambda seed=r: sharpness.hessian_trace(
                    loss_fn, params, samples=args.samples, seed=seed, hvp="fd"))
                row["fd_trace"], row["fd_trace_hvps"] = tr.mean, fd_count.n - c0
        log(f"repeat {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        rows.append(row)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    def versus(ours: str, label: str, kind: str) -> dict:
        """One library's medians against PyHessian's for kind 'eig' or 'trace'."""
        mine, theirs = med(f"{ours}_{kind}"), med(f"ph_{kind}")
        return {label: mine, "pyhessian": theirs, "rel_diff": abs(mine - theirs) / abs(theirs),
                f"{label}_s": med(f"{ours}_{kind}_s"), "pyhessian_s": med(f"ph_{kind}_s"),
                "speedup_median": statistics.median(
                    r[f"ph_{kind}_s"] / r[f"{ours}_{kind}_s"] for r in rows)}

    same = {
        "iters": args.iters, "samples": args.samples, "repeats": args.repeats,
        "hvps_equal": all(r["fw_eig_hvps"] == r["ph_eig_hvps"] == args.iters
                          and r["fw_trace_hvps"] == r["ph_trace_hvps"] == args.samples
                          for r in rows),
        "lambda_max": versus("fw", "flatworld", "eig"),
        "trace": {**versus("fw", "flatworld", "trace"),
                  "flatworld_stderr": med("fw_trace_stderr")},
        "fd": {
            "hvps_equal": all(r["fd_eig_hvps"] == args.iters
                              and r["fd_trace_hvps"] == args.samples for r in rows),
            "lambda_max": versus("fd", "flatworld_fd", "eig"),
            "trace": versus("fd", "flatworld_fd", "trace"),
        },
    }

    log(f"equal accuracy: reference by Lanczos ({args.ref_iters} products, tol 1e-7) ...")
    ref = sharpness.lambda_max(loss_fn, params, iters=args.ref_iters, tol=1e-7, seed=1)
    log(f"PyHessian power iteration history, {args.power_max} products ...")
    ph_history: list[float] = []
    original = ph_module.hessian_vector_product

    def recording(gradsH, params_, v):  # PyHessian's own Rayleigh quotient, one per product
        hv = original(gradsH, params_, v)
        ph_history.append(float(sum((h * u).sum() for h, u in zip(hv, v, strict=True))))
        return hv

    ph_module.hessian_vector_product = recording
    torch.manual_seed(args.seed)
    run_pyhessian("eig", args.power_max, 0.0)
    ph_module.hessian_vector_product = original
    log("flatworld Lanczos history ...")
    fw_history: list[float] = []
    op = fw_hessian._Hessian(loss_fn, params)  # products only: weights are never written
    v0 = torch.randn(op.n, generator=op.generator(args.seed))
    fw_hessian._lanczos(op, v0, args.power_max, 0.0, fw_history)
    del op

    def products_to(history: list[float], eps: float) -> int | None:
        return next((i + 1 for i, h in enumerate(history)
                     if abs(h - ref.value) <= eps * abs(ref.value)), None)

    accuracy = {"reference_lambda_max": ref.value, "reference_converged": ref.converged,
                "max_products": args.power_max}
    for eps in (1e-2, 1e-3):
        k_ph, k_fw = products_to(ph_history, eps), products_to(fw_history, eps)
        accuracy[f"rel_err_{eps:g}"] = {
            "pyhessian_power_products": k_ph, "flatworld_lanczos_products": k_fw,
            "product_ratio": None if (k_ph is None or k_fw is None) else k_ph / k_fw}
    k_ph = products_to(ph_history, 1e-3) or args.power_max
    k_fw = products_to(fw_history, 1e-3) or args.power_max
    log(f"timing to 0.1%: PyHessian {k_ph} products, flatworld {k_fw} ...")
    torch.manual_seed(args.seed)
    _, ph_s = timed(lambda: run_pyhessian("eig", k_ph, 0.0))
    fw_eig, fw_s = timed(lambda: sharpness.lambda_max(loss_fn, params, iters=k_fw, tol=0.0))
    accuracy["to_rel_err_1e-3"] = {
        "pyhessian_s": ph_s, "flatworld_s": fw_s, "speedup": ph_s / fw_s,
        "pyhessian_reached": products_to(ph_history, 1e-3) is not None,
        "flatworld_value": fw_eig.value}
    print(json.dumps({
        "model": {"params": n_params, "in_dim": args.in_dim, "hidden": args.hidden,
                  "layers": args.layers, "batch": args.batch},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "hvp": hvp, "same_iters": same, "equal_accuracy": accuracy,
    }, indent=1))


if __name__ == "__main__":
    main()
