"""CUDA-graph replay of Dreamer's update (flatworld.nn.graphs): on a CPU the captured path runs
eagerly on static tensors with a graph's aliasing (outputs and gradients overwritten by each
call), so these tests check everything but the capture itself: the numbers equal the eager
update's bit for bit, SAM's two passes see one random stream and imagination starts from the
first pass, whatever the second overwrote. benchmarks/gpu_graphs.py checks the capture on a
GPU."""

from __future__ import annotations

import pytest
import torch

from flatworld import optim
from flatworld.agents import AGENTS
from flatworld.agents.dreamer import DreamerConfig
from flatworld.nn.graphs import CapturedStep
from tests import test_dreamer, test_twister

pytestmark = pytest.mark.usefixtures("one_thread")
SAM = optim.SamSpec(rho=0.5)


def _run(make_agent, synthetic_batch, graphs: bool, updates: int = 6, **kw):
    agent = make_agent(cuda_graphs=graphs, **kw)
    batches = [synthetic_batch(seed=s, discrete=kw.get("discrete", True)) for s in range(3)]
    metrics = [agent.update(batches[i % 3]) for i in range(updates)]
    return agent, metrics


def _params(agent):
    return [*agent.world_model.parameters(), *agent.ac.parameters(),
            *agent.ac.retnorm.buffers()]  # fmt: skip


@pytest.mark.parametrize("model", ["rssm", "transformer"])
@pytest.mark.parametrize("sam", [None, SAM], ids=["adam", "sam"])
@pytest.mark.parametrize("discrete", [True, False])
def test_graphed_update_equals_the_eager_update(model, sam, discrete):
    mod = test_dreamer if model == "rssm" else test_twister
    # 6 updates: the first 3 calls of each step are eager (warm-up), the rest replay; with SAM
    # every update makes two world-model passes, so replays start in the second update.
    eager, m_eager = _run(mod.make_agent, test_dreamer.synthetic_batch, False, sam=sam,
                          discrete=discrete)  # fmt: skip
    graphed, m_graphed = _run(mod.make_agent, test_dreamer.synthetic_batch, True, sam=sam,
                              discrete=discrete)  # fmt: skip
    assert graphed._graphs[0].calls == 6 * (2 if sam else 1)
    assert graphed._graphs[0].warmup < graphed._graphs[0].calls
    for a, b in zip(m_eager, m_graphed, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for p, q in zip(_params(eager), _params(graphed), strict=True):
        assert torch.equal(p, q)
    # The optimizers stepped on the replayed gradients, which are then released as usual.
    assert all(p.grad is None for p in graphed.world_model.parameters())
    assert all(p.grad is None for p in graphed.ac.parameters())


def test_imagination_starts_from_the_first_pass_although_the_second_overwrites_it(monkeypatch):
    """With SAM, the replayed pass at the perturbed weights overwrites the static posteriors;
    the actor-critic must still start from the first (unperturbed) pass's."""
    agent = test_dreamer.make_agent(cuda_graphs=True, sam=SAM)
    batch = test_dreamer.synthetic_batch()
    seen = []
    real = agent._graphs[0].fn

    def spy(b):
        out = real(b)
        seen.append({k: v.detach().clone() for k, v in out[2].items()})
        return out

    monkeypatch.setattr(agent._graphs[0], "fn", spy)
    starts = []
    real_ac = agent._graphs[1].fn
    monkeypatch.setattr(agent._graphs[1], "fn",
                        lambda post, cont0: starts.append({k: v.clone() for k, v in post.items()})
                        or real_ac(post, cont0))  # fmt: skip
    for _ in range(3):
        agent.update(batch)
    assert len(seen) == 6 and len(starts) == 3
    last_first, last_second = seen[4], seen[5]
    assert not torch.equal(last_first["deter"], last_second["deter"])  # SAM moved the weights
    assert torch.equal(starts[-1]["deter"], last_first["deter"])
    assert torch.equal(starts[-1]["stoch"], last_first["stoch"])


def test_a_captured_step_rejects_other_shapes_and_keeps_fixed_inputs():
    w = torch.nn.Parameter(torch.ones(3))

    def fn(x, scale):
        loss = (w * x).sum() * scale
        loss.backward()
        return loss

    step = CapturedStep(fn, [w], torch.device("cpu"), warmup=1)
    step(torch.ones(3), 2.0)  # eager warm-up
    out = step(torch.full((3,), 2.0), 2.0)
    assert out.item() == 12.0 and torch.equal(w.grad, torch.full((3,), 4.0))
    again = step(torch.full((3,), 3.0), 2.0)
    assert again is out and out.item() == 18.0  # static: the next call overwrites it
    with pytest.raises(ValueError, match=r"input 0 is \(4,\).*takes \(3,\)"):
        step(torch.ones(4), 2.0)
    with pytest.raises(ValueError, match="non-tensor input 1 is 3.0.*fixed it at 2.0"):
        step(torch.ones(3), 3.0)
    with pytest.raises(ValueError, match="warmup=0"):
        CapturedStep(fn, [w], torch.device("cpu"), warmup=0)


def test_cuda_graphs_is_fp32_only():
    with pytest.raises(ValueError, match="cuda_graphs=True with precision='bf16'"):
        DreamerConfig(cuda_graphs=True, precision="bf16").validate()
    with pytest.raises(ValueError, match="cuda_graphs=1"):
        DreamerConfig(cuda_graphs=1).validate()


def test_a_graphed_run_equals_the_eager_run_and_resumes_to_it(tmp_path):
    """Through the training loop: diagnostics between updates, checkpoints, a kill and a
    resume (a fresh agent warms up and captures again)."""
    from flatworld.runs import resume, train
    from tests.test_dreamer_runs import CASES, numbers, run_cfg, tiny

    kw = CASES["gym"]
    train(run_cfg(tmp_path / "eager", **kw), "dreamer", tiny(sam=True),
          agents=AGENTS, progress=False)
    train(run_cfg(tmp_path / "graphed", **kw), "dreamer", tiny(sam=True, cuda_graphs=True),
          agents=AGENTS, progress=False, stop_after=47)  # fmt: skip
    resume(tmp_path / "graphed", agents=AGENTS, progress=False)
    ref = numbers(tmp_path / "eager")
    assert ref[-1]["updates"] == "20" and numbers(tmp_path / "graphed") == ref
