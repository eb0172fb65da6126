"""SAM under real DistributedDataParallel (gloo, 2 CPU processes)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatworld.optim import SAM


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _sam_step_under_ddp(rank: int) -> list[torch.Tensor]:
    ddp = nn.parallel.DistributedDataParallel(_model())
    sam = SAM(torch.optim.SGD(ddp.parameters(), lr=0.1), rho=0.1, no_sync=ddp.no_sync)
    x, y = _data(rank)

    def closure():
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        return loss

    sam.step(closure)
    return [p.detach().clone() for p in ddp.parameters()]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    params = _sam_step_under_ddp(rank)  # DDP is freed on return, before the group goes
    torch.save(params, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # With torch 2.13 a gloo worker process sometimes aborts at interpreter exit, after the
    # group is destroyed ("terminate called without an active exception", about 1 run in 30):
    # our results are on disk by now, so leave without running C++ static destructors.
    os._exit(0)


def test_ddp_ascent_is_local_and_sam_gradient_is_averaged():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        got = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in (0, 1)]
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)  # one all-reduce keeps the replicas identical
    # By hand: each rank perturbs with its own gradient, the SAM gradients are averaged.
    sam_grads = []
    for rank in (0, 1):
        model = _model()
        x, y = _data(rank)
        ((model(x) - y) ** 2).mean().backward()
        g = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(model.parameters(), g, strict=True):
                p.add_(0.1 * t / norm)
                p.grad = None
        ((model(x) - y) ** 2).mean().backward()
        sam_grads.append([p.grad.clone() for p in model.parameters()])
    for p0, g0, g1, got_p in zip(_model().parameters(), *sam_grads, got[0], strict=True):
        torch.testing.assert_close(got_p, p0.detach() - 0.1 * (g0 + g1) / 2)
