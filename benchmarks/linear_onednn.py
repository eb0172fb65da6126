"""fp32 linear layers on this CPU: torch's sgemm (``F.linear``) against flatworld.nn.linear's
oneDNN route (a 1x1 convolution over a channels-last view), forward and forward + backward, at
the Dreamer agents' shapes.

Prints one JSON object: per shape (rows, in, out), GFLOP/s of each and ``onednn_over_sgemm``,
the median of paired ratios (the two take turns, so each ratio compares one stretch of this
shared machine's speed), with the CPU's model name.

    python benchmarks/linear_onednn.py
    python benchmarks/linear_onednn.py --threads 1 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import cpu_name

from flatworld.nn.linear import linear, onednn_linear
from flatworld.runs.memory import keep_freed_memory

# (rows, in, out): the RSSM's GRU gates and hidden layers at batch 16 x 64 = 1,024 states,
# the heads and the critic over 15 x 1,024 imagined states, the decoder's first layer, the
# transformer's feed-forward over 1,024 tokens, and one tiny product that the route skips.
SHAPES = ((1024, 512, 1536), (1024, 512, 512), (15360, 512, 512), (16384, 512, 255),
          (1024, 1536, 4096), (1024, 512, 1024), (16, 512, 1536))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    out: dict = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "threads": args.threads, "torch": torch.__version__, "shapes": {}}  # fmt: skip
    for rows, k, n in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(rows, k, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        g = torch.randn(rows, n)
        gflop = 2 * rows * k * n / 1e9

        def forward(x=x, w=w) -> None:
            with torch.no_grad():
                linear(x, w)

        def both(x=x, w=w, g=g) -> None:
            x.grad = w.grad = None
            linear(x, w).backward(g)

        res: dict = {}
        for name, fn, flop in (("forward", forward, gflop), ("forward_backward", both,
                                                             3 * gflop)):  # fmt: skip
            secs: dict[bool, list[float]] = {True: [], False: []}
            for i in range(args.repeats + 2):
                for routed in (True, False):
                    with onednn_linear(routed):
                        t = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - t
                    if i >= 2:  # two warm-up rounds
                        secs[routed].append(dt)
            res[name] = {
                "sgemm_gflop_per_s": flop / statistics.median(secs[False]),
                "onednn_gflop_per_s": flop / statistics.median(secs[True]),
                "onednn_over_sgemm": statistics.median(
                    b / a for a, b in zip(secs[True], secs[False], strict=True)),
            }  # fmt: skip
        with torch.no_grad():
            err = (linear(x, w) - F.linear(x, w)).abs().max().item()
        out["shapes"][f"{rows}x{k}x{n}"] = {**res, "max_abs_diff": err}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
