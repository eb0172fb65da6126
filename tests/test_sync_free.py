"""The hot paths never read a value back to the host: TD-MPC2's update and plan, Dreamer's
update (world model, imagination, actor and critic), with Adam and with SAM. On a GPU a host
read is a sync that stalls the queue, and a step with none can be captured in a CUDA graph;
the guard makes every such read fail on CPU too."""

from __future__ import annotations

import pytest
import torch

from flatworld import optim

pytestmark = pytest.mark.usefixtures("one_thread")
SPECS = {"adam": None, "sam": optim.SamSpec(rho=0.05)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tdmpc2_update_and_plan_read_nothing_back(name, no_host_reads):
    from tests.test_tdmpc2 import make_agent, synthetic_batch

    agent = make_agent(wm_optim=optim.OptimSpec(sam=SPECS[name]))
    batch = synthetic_batch()
    agent.update(batch)  # the first step allocates optimizer state
    before = [p.detach().clone() for p in agent.model.parameters()]
    obs = torch.zeros(1, 10)
    agent.planner.plan(obs, t0=True, eval_mode=False)
    with no_host_reads():
        metrics = agent.update(batch)
        a = agent.planner.plan(obs, t0=False, eval_mode=False)
        a_eval = agent.planner.plan(obs, t0=False, eval_mode=True)
    assert a.shape == a_eval.shape == (3,)
    assert all(isinstance(v, torch.Tensor) for k, v in metrics.items() if k != "sam_passes")
    assert any(not torch.equal(p, q) for p, q in zip(agent.model.parameters(), before,
                                                     strict=True))  # fmt: skip


@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_dreamer_update_reads_nothing_back(name, discrete, no_host_reads):
    from tests.test_dreamer import make_agent, synthetic_batch

    agent = make_agent(discrete=discrete, sam=SPECS[name])
    batch = synthetic_batch(discrete=discrete)
    agent.update(batch)
    before = [p.detach().clone() for p in agent.world_model.parameters()]
    with no_host_reads():
        metrics = agent.update(batch)
    assert all(isinstance(v, torch.Tensor) for v in metrics.values())
    assert any(not torch.equal(p, q) for p, q in zip(agent.world_model.parameters(), before,
                                                     strict=True))  # fmt: skip


def test_fused_sam_skips_a_non_finite_step_on_the_device(no_host_reads):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = optim.build(optim.OptimSpec(lr=0.1, sam=optim.SamSpec(rho=0.05)), model.parameters())

    def closure(scale=1.0):
        loss = ((model(x) - y) ** 2).mean() * scale
        loss.backward()
        return loss

    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    with no_host_reads():
        opt.zero_grad()
        opt.step(lambda: closure(float("nan")))
    assert opt.skipped_steps == 1 and opt.steps_taken == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in state.items())
    opt.zero_grad()
    opt.step(closure)
    assert opt.steps_taken == 2 and opt.skipped_steps == 1
    assert not torch.equal(model.weight, before[0])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_twister_update_reads_nothing_back(name, no_host_reads):
    from tests.test_dreamer import synthetic_batch
    from tests.test_twister import make_agent

    agent = make_agent(sam=SPECS[name])
    batch = synthetic_batch()
    agent.update(batch)
    with no_host_reads():
        metrics = agent.update(batch)
    assert "cpc_loss" in metrics and all(isinstance(v, torch.Tensor) for v in metrics.values())
