"""benchmarks/dreamer_throughput.py's timing: the functions it compares take turns after the
same warm-up, so that a ratio between them (SAM/Adam) sees one stretch of machine speed."""

from __future__ import annotations

import pytest
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
