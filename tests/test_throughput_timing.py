"""benchmarks/dreamer_throughput.py's timing: the functions it compares take turns after the
same warm-up, so that a ratio between them (SAM/Adam) sees one stretch of machine speed."""

from __future__ import annotations

import torch


def test_compared_functions_take_turns_after_two_warm_up_rounds(load_benchmark):
    bench = load_benchmark("dreamer_throughput")
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("adam", "sam")}
    secs = bench.timed_together(fns, repeats=3, device=torch.device("cpu"))
    assert calls == ["adam", "sam"] * 5  # 2 warm-up rounds, then 3 timed ones
    assert {k: len(v) for k, v in secs.items()} == {"adam": 3, "sam": 3}
    assert all(t >= 0.0 for v in secs.values() for t in v)
    single: list[int] = []
    assert bench.timed(lambda: single.append(1), repeats=4, device=torch.device("cpu")) >= 0.0
    assert len(single) == 6
