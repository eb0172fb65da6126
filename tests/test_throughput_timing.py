"""benchmarks/dreamer_throughput.py's timing: the functions it compares take turns after the
same warm-up, so that a ratio between them (SAM/Adam) sees one stretch of machine speed."""

from __future__ import annotations

import pytest
import torch


def test_compared_functions_take_turns_after_two_warm_up_rounds(load_benchmark, monkeypatch):
    bench = load_benchmark("dreamer_throughput")
    monkeypatch.setattr(bench, "minor_faults", lambda: 0)  # a settled heap: no page faults
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("adam", "sam")}
    log: dict = {}
    secs = bench.timed_together(fns, repeats=3, device=torch.device("cpu"), log=log,
                                primed=False)  # fmt: skip
    assert calls == ["adam", "sam"] * 5  # 2 warm-up rounds, then 3 timed ones
    assert {k: len(v) for k, v in secs.items()} == {"adam": 3, "sam": 3}
    assert all(t >= 0.0 for v in secs.values() for t in v)
    assert log == {"warmup_rounds": 2, "warmup_last_round_faults": 0, "timed_rounds_faults": 0}
    calls.clear()
    secs = bench.timed_together(fns, repeats=3, device=torch.device("cpu"))  # primed
    assert calls == ["adam", "adam", "sam", "sam"] * 5  # an untimed call before each timed one
    assert {k: len(v) for k, v in secs.items()} == {"adam": 3, "sam": 3}


def test_primed_rounds_time_and_count_the_second_call_only(load_benchmark, monkeypatch):
    """A primed round times the call that follows a call of the same function, and counts
    only that call's page faults: here the first call of each pair faults and takes long."""
    bench = load_benchmark("dreamer_throughput")
    clock = {"t": 0.0, "faults": 0, "calls": 0}

    def update() -> None:
        first = clock["calls"] % 2 == 0
        clock["calls"] += 1
        clock["t"] += 5.0 if first else 1.0
        clock["faults"] += 70_000 if first else 3

    monkeypatch.setattr(bench, "minor_faults", lambda: clock["faults"])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    secs, faults = bench.one_round({"update": update}, torch.device("cpu"))
    assert secs == {"update": 1.0} and faults == 3
    secs, faults = bench.one_round({"update": update}, torch.device("cpu"), primed=False)
    assert secs == {"update": 5.0} and faults == 70_000


def test_warm_up_goes_on_while_a_round_still_faults_in_pages(load_benchmark, monkeypatch):
    """Rounds whose page faults stay above SETTLED_FAULTS are not timed: the warm-up ends at
    the first round below it (after at least two), or at max_rounds."""
    bench = load_benchmark("dreamer_throughput")
    per_round = iter([50_000, 30_000, 4_000, 10, 0, 0, 0, 0])
    total = {"faults": 0}

    def one_round() -> None:
        total["faults"] += next(per_round)

    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "minor_faults", lambda: total["faults"])
    assert bench.warm_up({"update": one_round}, cpu, primed=False) == (4, 10)
    per_round = iter([9_999] * 8)
    assert bench.warm_up({"update": one_round}, cpu, primed=False, max_rounds=5) == (5, 9_999)


def test_flops_count_in_place_matmuls_like_their_out_of_place_twins(load_benchmark):
    flops_of = load_benchmark("common").flops_of
    a, b, c = torch.randn(6, 5), torch.randn(5, 4), torch.randn(6, 4)
    x, y, z = torch.randn(3, 6, 5), torch.randn(3, 5, 4), torch.randn(3, 6, 4)
    assert flops_of(lambda: torch.addmm(c, a, b)) == 2 * 6 * 5 * 4
    assert flops_of(lambda: c.clone().addmm_(a, b)) == 2 * 6 * 5 * 4
    assert flops_of(lambda: z.clone().baddbmm_(x, y)) == flops_of(lambda: torch.baddbmm(z, x, y))
    assert flops_of(lambda: torch.baddbmm(z, x, y)) == 2 * 3 * 6 * 5 * 4


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_flops_count_a_sparse_product_by_its_nonzeros(load_benchmark):
    """The one-hot rows' gradient is a sparse CSR product on a CPU: its FLOPs are 2 per
    nonzero per column, not those of the dense matrix it stands for."""
    flops_of = load_benchmark("common").flops_of
    dense = torch.zeros(6, 5)
    dense[0, 1] = dense[2, 3] = dense[5, 0] = 1.0
    sparse, b = dense.to_sparse_csr(), torch.randn(5, 4)
    assert flops_of(lambda: sparse @ b) == 2 * 3 * 4
    assert flops_of(lambda: dense @ b) == 2 * 6 * 5 * 4
    assert flops_of(lambda: torch.mm(dense, b)) == 2 * 6 * 5 * 4
