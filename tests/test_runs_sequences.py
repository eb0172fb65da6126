"""The runs seam for sequence agents: discrete actions stored one-hot, sequence batches that
cross episodes with `is_first`, a train ratio, and replay rows checkpointed incrementally."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flatworld.agents import AgentEntry
from flatworld.runs import ReplayBuffer, RunConfig, resume, train
from flatworld.runs.checkpoint import list_checkpoints
from flatworld.runs.logger import TIMING, read_metrics


@dataclass
class SeqConfig:
    seq_len: int = 8
    batch_size: int = 4
    train_ratio: float = 16.0  # replayed steps per agent step: 16 / (4 * 8) = 0.5 updates


class SeqAgent:
    """A recurrent-style agent: it checks every batch it gets and learns a running mean."""

    def __init__(self, cfg, obs_shape, action_dim, episode_length, device="cpu",
                 total_steps=None, discrete=False):  # fmt: skip
        self.cfg, self.discrete, self.action_dim = cfg, discrete, action_dim
        self.seq_len, self.batch_size = cfg.seq_len, cfg.batch_size
        self.train_ratio = cfg.train_ratio
        self.horizon, self.discount = cfg.seq_len - 1, 0.99
        self.mean = torch.zeros(obs_shape)
        self.batches: list[dict[str, torch.Tensor]] = []

    def act(self, obs, t0, eval_mode):
        i = int(torch.randint(self.action_dim, (1,)))
        return np.eye(self.action_dim, dtype=np.float32)[i]

    def update(self, batch):
        self.batches.append(batch)
        self.mean += 0.1 * (batch["obs"].mean((0, 1)) - self.mean)
        return {"loss": (batch["obs"] - self.mean).pow(2).mean()}  # a tensor, read when logged

    def diagnostics(self, batch, lambda_max=False, rho=0.05):
        return {"wm_loss": float((batch["obs"] - self.mean).pow(2).mean())}

    def value(self, obs):
        return float(self.mean.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone()}

    def load_state_dict(self, d):
        self.mean.copy_(d["mean"])


SEQ_AGENTS = {"seq": AgentEntry(config_cls=SeqConfig, make=SeqAgent,
                                 action_kinds=("continuous", "discrete"))}


def cfg(run_dir: Path, **kw) -> RunConfig:
    base = dict(env="gym/CartPole-v1", seed=2, steps=300, seed_steps=40, eval_every=100,
                eval_episodes=1, diag_every=50, checkpoint_every=30, log_every=10,
                run_dir=str(run_dir), tensorboard=False)  # fmt: skip
    return RunConfig(**{**base, **kw})


def numbers(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(run_dir / "metrics.csv")]


def test_discrete_sequence_batches_and_train_ratio(tmp_path, monkeypatch):
    seen: list[SeqAgent] = []
    real_init = SeqAgent.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(SeqAgent, "__init__", init)
    train(cfg(tmp_path / "r"), "seq", SeqConfig(), agents=SEQ_AGENTS, progress=False)
    agent = seen[-1]
    assert agent.discrete and agent.action_dim == 2
    # 0.5 updates per step from step 40 on: 261 steps' worth of credit.
    assert len(agent.batches) == int(0.5 * 261)
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    assert rows[-1]["updates"] == str(len(agent.batches))
    crossed = 0
    for b in agent.batches:
        assert b["obs"].shape == (8, 4, 4) and b["action"].shape == (8, 4, 2)
        assert b["is_first"].shape == (8, 4, 1)
        first = b["is_first"][..., 0].bool()
        # Episode starts carry no action and no reward; every other row holds a one-hot action.
        assert (b["action"][first] == 0).all() and (b["reward"][first] == 0).all()
        assert torch.equal(b["action"][~first].sum(-1), torch.ones(int((~first).sum())))
        crossed += int(first[1:].any())
    assert crossed > 0  # windows run across episode boundaries, flagged by is_first


def test_sequence_run_resumes_bit_identical(tmp_path):
    train(cfg(tmp_path / "ref"), "seq", SeqConfig(), agents=SEQ_AGENTS, progress=False)
    train(cfg(tmp_path / "cut"), "seq", SeqConfig(),
          agents=SEQ_AGENTS, progress=False, stop_after=173)
    resume(tmp_path / "cut", agents=SEQ_AGENTS, progress=False)
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "ref")


def row_files(run_dir: Path) -> list[tuple[int, int]]:
    return sorted(tuple(map(int, p.stem.split("_")[1:]))
                  for p in (run_dir / "checkpoints" / "replay").glob("rows_*.pt"))


def test_checkpoints_write_only_new_replay_rows(tmp_path):
    run_dir = tmp_path / "r"
    train(cfg(run_dir, buffer_size=80), "seq", SeqConfig(), agents=SEQ_AGENTS, progress=False)
    files = row_files(run_dir)
    # Contiguous: each file starts where the previous one stopped; no row is written twice.
    assert all(b == c for (_, b), (c, _) in zip(files, files[1:], strict=False))
    (_, ckpt), = list_checkpoints(run_dir / "checkpoints")[-1:]
    state = torch.load(ckpt, weights_only=True)
    assert "obs" not in state["replay"]  # the checkpoint holds counters, not rows
    total, size = state["replay"]["total"], state["replay"]["size"]
    assert files[-1][1] == total and size < total  # the ring wrapped...
    assert files[0][0] > 0  # ...and rows no kept checkpoint needs were deleted
    older = torch.load(list_checkpoints(run_dir / "checkpoints")[0][1], weights_only=True)
    assert files[0][0] <= older["replay"]["total"] - older["replay"]["size"]


def test_wrapped_ring_resumes_bit_identical(tmp_path):
    train(cfg(tmp_path / "ref", buffer_size=80), "seq", SeqConfig(),
          agents=SEQ_AGENTS, progress=False)
    train(cfg(tmp_path / "cut", buffer_size=80), "seq", SeqConfig(),
          agents=SEQ_AGENTS, progress=False,
          stop_after=251)
    resume(tmp_path / "cut", agents=SEQ_AGENTS, progress=False)
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "ref")


def test_missing_replay_rows_refuse_the_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    train(cfg(run_dir), "seq", SeqConfig(), agents=SEQ_AGENTS, progress=False, stop_after=200)
    (a, b) = row_files(run_dir)[-1]
    (run_dir / "checkpoints" / "replay" / f"rows_{a:012d}_{b:012d}.pt").unlink()
    with pytest.warns(RuntimeWarning, match="replay rows .* are missing"):
        resume(run_dir, agents=SEQ_AGENTS, progress=False)
    assert read_metrics(run_dir / "metrics.csv")[-1]["step"] == "300"


def test_replay_rows_round_trip():
    buf = ReplayBuffer(10, (2,), 3)
    for ep in range(3):
        buf.start_episode(np.array([ep, 0], np.float32))
        for t in range(1, 5):
            buf.add(np.array([ep, t], np.float32), np.eye(3, dtype=np.float32)[t % 3], t, t == 4)
    assert buf.total == 15 and buf.size == 10
    other = ReplayBuffer(10, (2,), 3)
    other.load_meta_state(buf.meta_state())
    other.put_rows(5, buf.rows(5, 15))
    a, b = buf.sample_sequences(6, 4), other.sample_sequences(6, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="holds rows"):
        buf.rows(0, 5)  # overwritten by the ring
