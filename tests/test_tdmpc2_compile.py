"""TDMPC2Config.compile: torch.compile'd world-model loss, policy loss and MPPI search.

Compiled and eager agree to float rounding on the same batch and the same random stream
(random ops run as the eager kernels), SAM's passes replay their randomness inside compiled
graphs, and a run compiles in its first steps and never again.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from flatworld import optim
from flatworld.agents.tdmpc2 import TDMPC2Config
from tests.test_tdmpc2 import OBS, make_agent, synthetic_batch

pytestmark = pytest.mark.usefixtures("one_thread")
# num_q=2 as at model size 1: the case where inductor's randperm-index pattern once failed.
# One MPPI iteration keeps the search's graph small (compiling is most of these tests' time).
KW = dict(num_q=2, iterations=1)
TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts only its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compile_flag_is_validated():
    with pytest.raises(ValueError, match="compile"):
        TDMPC2Config(compile=1).validate()  # type: ignore[arg-type]


def test_compile_without_a_cpp_compiler_is_refused(monkeypatch):
    from flatworld.agents.tdmpc2 import agent as agent_module

    monkeypatch.setattr(agent_module.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="compile=True on CPU needs a C\\+\\+ compiler"):
        make_agent(compile=True, **KW)


def test_compiled_losses_and_gradients_match_eager():
    """The same weights, batch, targets and random stream (Q-head dropout, policy noise, MPPI
    samples): compiled and eager losses, their gradients, the Q scale, the plan and the RNG use
    all agree."""
    batch = synthetic_batch()
    eager, comp = make_agent(**KW), make_agent(compile=True, **KW)
    eager.model.train(), comp.model.train()
    torch.manual_seed(3)
    tg = eager.targets(batch)
    out = {}
    for name, agent in (("eager", eager), ("compiled", comp)):
        torch.manual_seed(4)
        loss, parts, zs = agent._wm_loss(batch, tg)
        loss.backward()
        wm_grads = [p.grad.clone() for p in agent.model.wm_parameters()]
        pi_loss, entropy = agent._pi_loss(zs.detach())
        pi_loss.backward()
        pi_grads = [p.grad.clone() for p in agent.model.pi_net.parameters()]
        agent.model.eval()
        plan = agent.planner.search(batch["obs"][0, :1], t0=True)
        out[name] = (parts, zs, wm_grads, pi_loss, entropy, pi_grads, agent.scale.value.clone(),
                     plan, torch.get_rng_state())  # fmt: skip
    assert graphs() >= 3  # both losses and the search really ran compiled
    (pe, ze, ge, le, ee, gpe, se, ae, re), (pc, zc, gc, lc, ec, gpc, sc, ac, rc) = out.values()
    assert pe.keys() == pc.keys()
    for k in pe:
        torch.testing.assert_close(pc[k], pe[k], **TOL)
    torch.testing.assert_close(zc, ze, **TOL)
    for a, b in zip(gc + gpc, ge + gpe, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(lc, le, **TOL)
    torch.testing.assert_close(ec, ee, **TOL)
    torch.testing.assert_close(sc, se, **TOL)
    for a, b in zip(ac, ae, strict=True):  # mean, std, elites, score
        torch.testing.assert_close(a, b, **TOL)
    assert torch.equal(rc, re)  # the same draws from the global generator


def test_compiled_sam_replays_randomness_and_follows_eager():
    """SAM with rho=0 equals Adam bit for bit only if the second pass replays the first pass's
    dropout masks inside the compiled graph; and compiled SAM updates follow eager ones."""
    batch = synthetic_batch()
    runs = {}
    for name, rho, compile_ in (("adam", None, True), ("sam0", 0.0, True),
                                ("sam", 0.1, True), ("sam_eager", 0.1, False)):  # fmt: skip
        sam = None if rho is None else optim.SamSpec(rho=rho)
        agent = make_agent(wm_optim=optim.OptimSpec(sam=sam), compile=compile_, **KW)
        torch.manual_seed(5)
        metrics = [agent.update(batch) for _ in range(2)]
        runs[name] = (metrics, agent.model.state_dict())
    assert all(torch.equal(v, runs["sam0"][1][k]) for k, v in runs["adam"][1].items())
    assert [m["wm_loss"] for m in runs["adam"][0]] == [m["wm_loss"] for m in runs["sam0"][0]]
    assert runs["sam"][0][-1]["sam_passes"] == 2.0
    for k, v in runs["sam_eager"][1].items():
        torch.testing.assert_close(runs["sam"][1][k], v, rtol=1e-4, atol=1e-5)


def test_no_recompilation_after_the_first_steps():
    """Updates (both SAM passes; the encoder_dynamics scope freezes the heads in the second,
    one more graph) and plans (first step of an episode or not, train or eval) compile in the
    first steps; later ones reuse those graphs."""
    agent = make_agent(wm_optim=optim.OptimSpec(sam=optim.SamSpec(rho=0.1)),
                       sam_scope="encoder_dynamics", compile=True, **KW)  # fmt: skip
    batch = synthetic_batch()
    obs = torch.zeros(OBS).numpy()

    def steps() -> None:
        agent.update(batch)
        agent.act(obs, t0=True, eval_mode=False)
        agent.act(obs, t0=False, eval_mode=True)

    steps()
    first = (graphs(), counters["frames"]["total"], counters["frames"]["ok"])
    assert first[0] >= 3  # world-model loss, policy loss, MPPI search
    for _ in range(3):
        steps()
    assert (graphs(), counters["frames"]["total"], counters["frames"]["ok"]) == first
    assert not counters["recompiles"] and not counters["graph_break"]
