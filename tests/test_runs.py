"""flatworld.runs: replay sampling, configs, the loop, checkpoints, bit-identical resume."""

from __future__ import annotations

import csv
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from flatworld import sharpness
from flatworld.agents import AgentEntry
from flatworld.runs import ReplayBuffer, RunConfig, evaluate, from_dict, read_config, resume, train
from flatworld.runs.checkpoint import list_checkpoints, load_checkpoint
from flatworld.runs.folder import config_dict
from flatworld.runs.logger import TIMING
from flatworld.runs.protocol import Agent

# -- replay -----------------------------------------------------------------------------------


def fill(buf: ReplayBuffer, lengths: list[int]) -> None:
    """Episodes whose obs are (episode id, t) and whose action at row t is t."""
    for ep, n in enumerate(lengths):
        buf.start_episode(np.array([ep, 0], np.float32))
        for t in range(1, n + 1):
            buf.add(np.array([ep, t], np.float32), np.full(1, t, np.float32), 10.0 * t, t == n)


@pytest.mark.parametrize("capacity", [200, 23])  # 23: the ring has wrapped
def test_replay_windows_stay_inside_episodes(capacity):
    buf = ReplayBuffer(capacity, (2,), 1, seed=0)
    fill(buf, [2, 7, 1, 12, 4, 9])
    h = 3
    batch = buf.sample(64, h)
    assert batch["obs"].shape == (h + 1, 64, 2) and batch["action"].shape == (h, 64, 1)
    assert batch["reward"].shape == (h, 64, 1) and batch["terminated"].shape == (h, 64, 1)
    assert all(v.dtype == torch.float32 for v in batch.values())
    ep, t = batch["obs"][..., 0], batch["obs"][..., 1]
    assert torch.all(ep == ep[0])  # one episode per sequence
    assert torch.all(t[1:] - t[:-1] == 1)  # consecutive steps
    assert torch.equal(batch["action"][..., 0], t[1:])  # action a_t led to obs_{t+1}
    assert torch.equal(batch["reward"][..., 0], 10 * t[1:])
    # Uniform over exactly the valid starts: all of them appear, nothing else does.
    starts = {(int(e), int(s)) for e, s in zip(ep[0], t[0], strict=True)}
    for _ in range(30):
        b = buf.sample(64, h)["obs"][0]
        starts |= {(int(e), int(s)) for e, s in b.tolist()}
    rows = [(e, s) for e, n in enumerate([2, 7, 1, 12, 4, 9]) for s in range(n + 1)]
    kept = rows[-buf.size :]
    valid = {(e, s) for e, s in kept if (e, s + h) in kept}
    assert starts == valid


def test_replay_state_round_trip(tmp_path):
    buf = ReplayBuffer(50, (2,), 1, seed=4)
    fill(buf, [6, 9])
    buf.sample(5, 2)  # advance the generator
    torch.save(buf.state_dict(), tmp_path / "r.pt")
    other = ReplayBuffer(50, (2,), 1, seed=99)
    other.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    a, b = buf.sample(16, 3), other.sample(16, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fill(buf, [4])
    fill(other, [4])
    assert all(torch.equal(buf.sample(8, 2)[k], other.sample(8, 2)[k]) for k in a)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(60, (2,), 1).load_state_dict(buf.state_dict())


def test_replay_keeps_pixels_uint8():
    buf = ReplayBuffer(10, (3, 2, 2), 1, obs_dtype=np.uint8)
    buf.start_episode(np.full((3, 2, 2), 255, np.uint8))
    buf.add(np.full((3, 2, 2), 7, np.uint8), np.zeros(1), 1.0, False)
    assert buf.obs.dtype == torch.uint8
    obs = buf.sample(2, 1)["obs"]
    assert obs.dtype == torch.float32 and obs[0].eq(255).all() and obs[1].eq(7).all()


@pytest.mark.parametrize("pixels", [False, True])
def test_replay_samples_into_an_earlier_batch(pixels):
    """``out=``: the same values as a fresh batch from the same generator state, written into
    the tensors of the batch passed (the loop allocates its batch once); wrong shapes fail."""
    shape, dtype = ((3, 2, 2), np.uint8) if pixels else ((2,), np.float32)
    buf = ReplayBuffer(40, shape, 1, obs_dtype=dtype, seed=3)
    for ep, n in enumerate([9, 12]):
        buf.start_episode(np.full(shape, ep, dtype))
        for t in range(1, n + 1):
            buf.add(np.full(shape, 10 * ep + t, dtype), np.full(1, t, np.float32), t, t == n)
    for sample, size in ((buf.sample, 3), (buf.sample_sequences, 5)):
        reuse = sample(4, size)
        ptrs = {k: v.data_ptr() for k, v in reuse.items()}
        state = buf.generator.get_state()
        fresh = sample(4, size)
        buf.generator.set_state(state)
        got = sample(4, size, out=reuse)
        assert got is reuse and {k: v.data_ptr() for k, v in got.items()} == ptrs
        assert got.keys() == fresh.keys()
        for k in fresh:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], fresh[k]), k
        with pytest.raises(ValueError, match=r"out\['obs'\] has shape"):
            sample(2, size, out=reuse)


def test_replay_errors():
    buf = ReplayBuffer(20, (2,), 1)
    fill(buf, [2, 2])
    with pytest.raises(ValueError, match="horizon=3"):
        buf.sample(4, 3)
    assert not buf.can_sample(3) and buf.can_sample(2)
    with pytest.raises(ValueError, match="batch_size"):
        buf.sample(0, 1)


# -- configs ----------------------------------------------------------------------------------


@dataclass
class Inner:
    rho: float = 0.05
    steps: tuple[int, ...] = (1, 2)


@dataclass
class FakeConfig:
    lr: float = 0.05
    noise: float = 0.1
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None

    def validate(self) -> FakeConfig:
        if not self.lr > 0:
            raise ValueError(f"FakeConfig.lr={self.lr!r}: expected > 0")
        return self


def test_from_dict_rebuilds_nested_dataclasses():
    cfg = FakeConfig(lr=1e-3, inner=Inner(0.2, (3,)), maybe=Inner(0.1, (4, 5)))
    raw = yaml.safe_load(yaml.safe_dump(config_dict(cfg)))
    assert from_dict(FakeConfig, raw) == cfg
    assert from_dict(FakeConfig, {"maybe": None}) == FakeConfig()
    with pytest.raises(ValueError, match="unknown field"):
        from_dict(FakeConfig, {"lr": 1.0, "typo": 2})


@pytest.mark.parametrize(
    "change, field_name",
    [({"steps": 0}, "steps"), ({"device": "gpu"}, "device"), ({"env": "walker"}, "env"),
     ({"eval_every": 15, "log_every": 10}, "eval_every"), ({"seed_steps": -1}, "seed_steps")],
)  # fmt: skip
def test_run_config_validate_names_the_field(change, field_name):
    with pytest.raises(ValueError, match=f"RunConfig.{field_name}="):
        dataclasses.replace(RunConfig(), **change).validate()


# -- the loop with a fake agent ---------------------------------------------------------------


class FakeAgent:
    """A linear policy and value; update and act draw from torch and numpy global RNGs, so a
    resume that forgot an RNG state would not reproduce the weights."""

    horizon, batch_size, discount = 3, 8, 0.9

    def __init__(self, cfg: FakeConfig, obs_shape, action_dim, episode_length, device,
                 total_steps=None):
        self.cfg, self.device = cfg, device
        self.W = torch.randn(action_dim, obs_shape[0]) * 0.1
        self.v = torch.zeros(obs_shape[0])
        self.n = 0

    def act(self, obs, t0, eval_mode):
        a = torch.tanh(self.W @ torch.as_tensor(obs))
        if not eval_mode:
            a = a + self.cfg.noise * torch.randn(a.shape) + float(np.random.normal(0, 0.01))
        return a.clamp(-1, 1).numpy().astype(np.float32)

    def update(self, batch):
        assert batch["obs"].shape[:2] == (self.horizon + 1, self.batch_size)
        assert batch["action"].shape == (self.horizon, self.batch_size, self.W.shape[0])
        s0, ret = batch["obs"][0], batch["reward"].sum(0).squeeze(-1)
        err = s0 @ self.v - ret
        self.v -= self.cfg.lr * (err[:, None] * s0).mean(0) / (1 + s0.pow(2).sum(1).mean())
        target = batch["action"][0]
        grad = (torch.tanh(s0 @ self.W.T) - target).T @ s0 / len(s0)
        self.W -= self.cfg.lr * (grad + 0.01 * torch.randn_like(self.W))
        self.n += 1
        return {"loss": float(err.pow(2).mean()), "w_norm": float(self.W.norm())}

    def diagnostics(self, batch, lambda_max=False, rho=0.05):
        s0, ret = batch["obs"][0], batch["reward"].sum(0).squeeze(-1)
        err = s0 @ self.v - ret
        out = {"wm_loss": float(err.pow(2).mean()), "model_error": float(self.W.abs().mean())}
        v = self.v.clone().requires_grad_()  # the value weights, as the "world model" measured
        out.update(sharpness.training_diagnostics(lambda: (s0 @ v - ret).pow(2).mean(), [v], rho))
        if lambda_max:
            out["wm_lambda_max"] = float(self.v.norm())
        return out

    def value(self, obs):
        return float(torch.as_tensor(obs) @ self.v)

    def state_dict(self) -> dict[str, Any]:
        return {"W": self.W.clone(), "v": self.v.clone(), "n": self.n}

    def load_state_dict(self, d):
        self.W.copy_(d["W"])
        self.v.copy_(d["v"])
        self.n = d["n"]


FAKE_AGENTS = {"fake": AgentEntry(config_cls=FakeConfig, make=FakeAgent)}


def run_cfg(run_dir: Path, **kw) -> RunConfig:
    base = dict(
        env="dmc/cartpole-swingup", env_options={"episode_length": 20}, seed=3, steps=200,
        seed_steps=30, eval_every=50, eval_episodes=2, diag_every=20, checkpoint_every=50,
        log_every=10, run_dir=str(run_dir), tensorboard=False, lambda_max=True,
    )  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


def numbers(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_agent(run_dir: Path) -> dict[str, Any]:
    state, _ = load_checkpoint(run_dir / "checkpoints")
    assert state["step"] == 200 and state["done"]
    state["replay_obs"] = replay_obs(run_dir, state["replay"])
    return state


def replay_obs(run_dir: Path, meta: dict[str, Any]) -> torch.Tensor:
    """The observations a checkpoint's replay holds, read back from the row files."""
    start, stop, parts = meta["total"] - meta["size"], meta["total"], []
    for path in sorted((run_dir / "checkpoints" / "replay").glob("rows_*.pt")):
        a, b = map(int, path.stem.split("_")[1:])
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            parts.append(torch.load(path, weights_only=True)["obs"][lo - a : hi - a])
    obs = torch.cat(parts)
    assert len(obs) == stop - start
    return obs


def assert_same_agent(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["agent"]["W"], b["agent"]["W"]) and a["agent"]["n"] == b["agent"]["n"]
    assert torch.equal(a["agent"]["v"], b["agent"]["v"])
    assert torch.equal(a["replay_obs"], b["replay_obs"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, shared by the tests that compare against it."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(run_cfg(run_dir, tensorboard=True), "fake", FakeConfig(), agents=FAKE_AGENTS,
          progress=False)
    return run_dir


def test_run_folder_layout(reference):
    assert isinstance(FakeAgent(FakeConfig(), (5,), 1, 20, "cpu"), Agent)
    run_cfg_back, name, agent_cfg = read_config(reference, agents=FAKE_AGENTS)
    assert name == "fake" and agent_cfg == FakeConfig()
    assert run_cfg_back == run_cfg(reference, tensorboard=True)
    rows = numbers(reference)
    assert [int(r["step"]) for r in rows] == list(range(10, 201, 10))
    assert rows[-1]["updates"] == str(200 - 30 + 1) and rows[-1]["episode"] == "10"
    eval_rows = [r for r in rows if r["eval_return"]]
    assert [int(r["step"]) for r in eval_rows] == [50, 100, 150, 200]
    assert all(float(r["value_error"]) >= 0 and r["value_pred"] for r in eval_rows)
    diag = [int(r["step"]) for r in rows if r["wm_loss"]]
    assert diag == list(range(60, 201, 20))  # from the first evaluation (its episodes) on
    assert all(r["wm_lambda_max"] for r in rows if r["wm_loss"])
    assert rows[0]["train/loss"] == "" and rows[3]["train/loss"] != ""
    ckpts = list_checkpoints(reference / "checkpoints")
    assert [s for s, _ in ckpts] == [160, 200]  # keeps the last two
    assert any((reference / "tb").iterdir())
    with pytest.raises(FileExistsError, match="resume"):
        train(run_cfg(reference), "fake", FakeConfig(), agents=FAKE_AGENTS, progress=False)


def test_diagnostics_measure_held_out_windows_at_the_runs_radius(reference, tmp_path):
    # The diagnostics batch is windows of evaluation episodes: none of its observations is
    # one the agent trained on (the replay's).
    state = final_agent(reference)
    held, replay = state["diag_batch"]["obs"].flatten(0, 1), state["replay_obs"]
    assert held.shape == (8 * 4, 5)
    assert not (held[:, None, :] == replay[None]).all(-1).any()
    # The bound's value from the logged terms, n the rows of the replay at that step
    rows = [r for r in numbers(reference) if r["bound_value"]]
    assert [int(r["step"]) for r in rows] == list(range(60, 201, 20))
    for r in rows:
        step, n = int(r["step"]), int(float(r["bound_n"]))
        assert step < n <= step + step // 20 + 1  # a row per step and per episode start
        assert float(r["bound_rho"]) == 0.05 and float(r["bound_k"]) == 5
        b = sharpness.sam_bound(float(r["bound_perturbed_loss"]), 5,
                                float(r["bound_w_norm_sq"]), 0.05, n)  # fmt: skip
        assert float(r["bound_complexity"]) == pytest.approx(b.complexity, rel=1e-12)
        assert float(r["bound_value"]) == pytest.approx(b.value, rel=1e-12)
        assert float(r["wm_sharpness"]) == pytest.approx(
            float(r["bound_perturbed_loss"]) - float(r["bound_loss"]))
    # Another radius: the run's diag_rho, whatever the agent's own
    other = tmp_path / "rho"
    train(run_cfg(other, steps=60, diag_rho=0.2), "fake", FakeConfig(), agents=FAKE_AGENTS,
          progress=False)  # fmt: skip
    assert {r["bound_rho"] for r in numbers(other) if r["bound_value"]} == {"0.2"}
    with pytest.raises(ValueError, match="RunConfig.diag_rho=0.0: expected a finite number > 0"):
        run_cfg(other, diag_rho=0.0).validate()


def test_evaluation_episodes_can_be_recorded(tmp_path):
    from flatworld import envs
    from flatworld.runs.episodes import run_episodes

    env = envs.make("dmc/cartpole-swingup", episode_length=20)
    agent = FakeAgent(FakeConfig(), (5,), 1, 20, "cpu")
    store = ReplayBuffer(100, (5,), 1)
    out = run_episodes(env, agent, [1, 2, 3], record=store)
    assert store.size == 3 * 21 and store.num_episodes == 3  # the first obs and 20 steps each
    rewards = store.reward[: store.size].reshape(3, 21)
    assert rewards[:, 0].eq(0).all() and store.first[: store.size].sum() == 3
    assert rewards[:, 1:].sum(1).tolist() == pytest.approx(out["returns"])
    env.close()


def test_kill_and_resume_is_bit_identical(reference, tmp_path):
    run_dir = tmp_path / "run"
    train(run_cfg(run_dir), "fake", FakeConfig(),
          agents=FAKE_AGENTS, progress=False, stop_after=117)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [60, 100]
    assert int(numbers(run_dir)[-1]["step"]) == 110  # rows past the checkpoint exist...
    # ...and are redone; a second crash
    resume(run_dir, agents=FAKE_AGENTS, stop_after=150, progress=False)
    # the progress bar draws nothing from the RNGs
    resume(run_dir, agents=FAKE_AGENTS, progress=True)
    assert numbers(run_dir) == numbers(reference)
    assert_same_agent(final_agent(run_dir), final_agent(reference))
    # a finished run stays finished
    assert resume(run_dir, agents=FAKE_AGENTS, progress=False) == run_dir


def test_time_limit_stops_at_an_episode_end_and_resumes_bit_identical(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_cfg(run_dir, time_limit_s=1e-9), "fake", FakeConfig(),
          agents=FAKE_AGENTS, progress=False)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in ckpts] == [20]  # the first episode end, not the end of the run
    assert int(numbers(run_dir)[-1]["step"]) == 20
    assert "stopped at step 20" in capsys.readouterr().out
    invocations = 1
    while not load_checkpoint(run_dir / "checkpoints")[0]["done"]:
        # the limit is in the run's config: one episode each
        resume(run_dir, agents=FAKE_AGENTS, progress=False)
        invocations += 1
    assert invocations == 10  # 10 episodes of 20 steps
    assert numbers(run_dir) == numbers(reference)
    assert_same_agent(final_agent(run_dir), final_agent(reference))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1h", True])
def test_time_limit_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"time_limit_s=.*seconds > 0"):
        run_cfg(Path("x"), time_limit_s=bad).validate()


def test_truncated_checkpoint_falls_back_to_previous(reference, tmp_path):
    run_dir = tmp_path / "run"
    train(run_cfg(run_dir), "fake", FakeConfig(),
          agents=FAKE_AGENTS, progress=False, stop_after=130)
    (_, older), (_, newest) = list_checkpoints(run_dir / "checkpoints")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match=f"refusing checkpoint .*{newest.name}"):
        state, path = load_checkpoint(run_dir / "checkpoints")
    assert path == older and state["step"] == 60
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        resume(run_dir, agents=FAKE_AGENTS, progress=False)
    assert numbers(run_dir) == numbers(reference)
    assert_same_agent(final_agent(run_dir), final_agent(reference))


def test_evaluate_loads_the_last_checkpoint(reference):
    out = evaluate(reference, agents=FAKE_AGENTS, episodes=3)
    assert out["step"] == 200 and out["episodes"] == 3 and len(out["returns"]) == 3
    assert out["eval_length"] == 20 and out["value_error"] >= 0
    assert evaluate(reference, agents=FAKE_AGENTS, episodes=3)["returns"] == out["returns"]
    with pytest.raises(ValueError, match="episodes=0"):
        evaluate(reference, agents=FAKE_AGENTS, episodes=0)
