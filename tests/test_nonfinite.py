"""A non-finite loss never reaches the weights: flatworld.optim's guarded steps, and every
agent's update with a NaN in its batch (plain Adam and SAM), leave weights, buffers and
optimizer state bit for bit as they were; the next clean update trains as usual."""

from __future__ import annotations

import pytest
import torch

from flatworld import optim

pytestmark = pytest.mark.usefixtures("one_thread")
SPECS = {"adam": None, "sam": optim.SamSpec(rho=0.05)}


def snapshot(tree):
    """A deep copy of a state dict's tensors (and numbers), for bit-for-bit comparison."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(snapshot(v) for v in tree)
    return tree


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def small_model(fused: bool | None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    return model, x, y, opt


@pytest.mark.parametrize("fused", [True, None])
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_closure_step_skips_a_non_finite_loss_or_gradient(fused, poison):
    model, x, y, opt = small_model(fused)

    def closure(bad: bool = False):
        loss = ((model(x) - y) ** 2).mean()
        if bad and poison == "loss":
            loss = loss * float("inf")
        loss.backward()
        if bad and poison == "grad":  # a finite loss whose gradient overflowed
            model.weight.grad[0, 0] = float("nan")
        return loss

    optim.closure_step(opt, closure)  # the first step creates the optimizer state
    opt.zero_grad()
    before = snapshot({"model": model.state_dict(), "opt": opt.state_dict()})
    optim.closure_step(opt, lambda: closure(bad=True))
    assert_same(before, {"model": model.state_dict(), "opt": opt.state_dict()})
    opt.zero_grad()
    optim.closure_step(opt, closure)
    assert not torch.equal(model.weight, before["model"]["weight"])
    assert int(opt.state[model.weight]["step"]) == 2  # the skipped step is not counted


def test_step_if_finite_on_a_fused_adam_reads_nothing_back(no_host_reads):
    model, x, y, opt = small_model(True)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    before = snapshot(model.state_dict())
    with no_host_reads():
        stepped = optim.step_if_finite(opt, torch.tensor(float("nan")))
    assert isinstance(stepped, torch.Tensor) and not bool(stepped)
    assert_same(before, model.state_dict())
    with pytest.raises(ValueError, match="at least one tensor"):
        optim.nonfinite()


def test_closure_step_leaves_sam_to_check_its_own_passes():
    model, x, y, _ = small_model(True)
    sam = optim.build(optim.OptimSpec(lr=0.1, sam=optim.SamSpec(rho=0.05)), model.parameters())
    calls = []

    def closure():
        calls.append(1)
        loss = ((model(x) - y) ** 2).mean() * (float("nan") if len(calls) == 2 else 1.0)
        loss.backward()
        return loss

    optim.closure_step(sam, closure)
    assert len(calls) == 2 and sam.skipped_steps == 1  # the perturbed pass was the bad one


def poisoned(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = {k: v.clone() for k, v in batch.items()}
    batch["obs"].view(-1)[5] = float("nan")
    return batch


def all_finite(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return all(all_finite(v) for v in tree)
    return True


def agent_state(agent) -> dict:
    """The world model and its optimizer in the agent's checkpoint (TD-MPC2's policy too), less
    the Polyak targets, which move toward the unchanged weights as usual."""
    state = snapshot(agent.state_dict())
    keep = ("model", "wm_optim", "pi_optim", "scale") if "model" in state else (
        "world_model", "wm_optim")  # fmt: skip
    state = {k: state[k] for k in keep}
    if "model" in state:
        state["model"] = {k: v for k, v in state["model"].items() if "target" not in k}
    if "sam" in state["wm_optim"]:  # SAM's counters: checked apart
        state["wm_optim"] = state["wm_optim"]["base"]
    return state


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("family", ["dreamer", "twister", "tdmpc2"])
def test_a_nan_in_the_batch_never_reaches_the_weights(family, name):
    """The world-model step is skipped; with Dreamer the actor-critic may still step, on the
    finite states that the discrete latent samples make of the batch (tested below with
    non-finite states)."""
    if family == "tdmpc2":
        from tests.test_tdmpc2 import make_agent, synthetic_batch

        agent = make_agent(wm_optim=optim.OptimSpec(sam=SPECS[name]))
    else:
        from tests.test_dreamer import synthetic_batch

        if family == "dreamer":
            from tests.test_dreamer import make_agent
        else:
            from tests.test_twister import make_agent
        agent = make_agent(sam=SPECS[name])
    batch = synthetic_batch()
    agent.update(batch)  # optimizer state exists from here on
    before = agent_state(agent)
    agent.update(poisoned(batch))
    assert all_finite(agent.state_dict())
    assert_same(before, agent_state(agent))
    if name == "sam":
        assert agent.wm_optim.skipped_steps == 1 and agent.wm_optim.steps_taken == 1
    agent.update(batch)
    after = agent_state(agent)
    weights = "model" if family == "tdmpc2" else "world_model"
    assert any(not torch.equal(before[weights][k], after[weights][k]) for k in after[weights])


@pytest.mark.parametrize("discrete", [True, False])
def test_dreamer_actor_critic_skips_non_finite_start_states(discrete):
    from tests.test_dreamer import make_agent, synthetic_batch

    agent = make_agent(discrete=discrete)
    agent.update(synthetic_batch(discrete=discrete))
    data = agent.prepare(synthetic_batch(discrete=discrete))
    with torch.no_grad():
        post = agent.world_model.loss(data)[2]
    cont0 = data["cont"].flatten(0, 1)
    start = agent.world_model.seq.imagine_start(post)
    bad = {k: v.clone() for k, v in start.items()}
    bad["deter"][3] = float("nan")

    def ac_state():  # less the slow critic, which moves toward the critic as usual
        ac = {k: v for k, v in agent.ac.state_dict().items() if not k.startswith("slow_critic")}
        return snapshot({"ac": ac, "actor": agent.actor_optim.state_dict(),
                         "critic": agent.critic_optim.state_dict()})  # fmt: skip

    before = ac_state()
    agent.train_actor_critic(bad, cont0)
    assert_same(before, ac_state())
    agent.train_actor_critic(start, cont0)
    after = ac_state()
    for net in ("actor.", "critic."):  # each trains on the finite states
        assert any(not torch.equal(v, after["ac"][k]) for k, v in before["ac"].items()
                   if k.startswith(net))  # fmt: skip
