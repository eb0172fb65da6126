"""benchmarks/latent_probe.py: the ridge probe's R^2, and the probe of a real (tiny) run."""

from __future__ import annotations

import math

import pytest
import torch

from flatworld.agents import AGENTS
from flatworld.runs import train
from tests.test_dreamer_runs import run_cfg, tiny_twister

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ridge_r2_tells_a_linear_signal_from_noise(load_benchmark):
    probe = load_benchmark("latent_probe")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    signal = x @ torch.randn(8, 2, generator=g) + 0.01 * torch.randn(600, 2, generator=g)
    noise = torch.randn(600, 2, generator=g)
    train_rows, test_rows = torch.arange(400), torch.arange(400, 600)
    assert min(probe.ridge_r2(x, signal, train_rows, test_rows, lam=1e-3)) > 0.99
    assert max(probe.ridge_r2(x, noise, train_rows, test_rows, lam=1e-3)) < 0.1


def test_probe_of_a_twister_run(tmp_path, load_benchmark, capsys):
    probe = load_benchmark("latent_probe")
    run_dir = tmp_path / "r"
    cfg = run_cfg(run_dir, env="gym/CartPole-v1", env_options={"episode_length": 25}, steps=40)
    train(cfg, "twister", tiny_twister(), agents=AGENTS, progress=False)
    out = probe.probe(run_dir, episodes=2)
    assert out["checkpoint_step"] == 40 and out["episodes"] == 2
    assert 2 * 2 <= out["rows"] <= 2 * 26  # an episode's observations, its first included
    assert out["uniform_entropy"] == pytest.approx(math.log(4))  # tiny: 4 classes
    assert 0.0 <= out["posterior_entropy"] <= out["uniform_entropy"] + 1e-6
    assert set(out["probe_r2"]) == {"embedding", "posterior_probs", "posterior_sample", "h",
                                    "h_and_sample"}  # fmt: skip
    assert all(len(v) == 4 for v in out["probe_r2"].values())  # CartPole's 4 dimensions
    assert len(out["recon_mse"]) == len(out["obs_var"]) == 4
    assert all(v > 0 for v in out["obs_var"])
    assert sum(out["episode_ends"].values()) == 2  # each episode ended one way
    with pytest.raises(SystemExit):
        probe.main([str(run_dir), "--episodes", "0"])
    assert "--episodes 0; accepted: an int >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a flatworld run folder"):
        probe.probe(tmp_path / "nothing")


def test_episode_ends_reads_cartpoles_termination_rules(load_benchmark):
    probe = load_benchmark("latent_probe")
    last = torch.tensor([[2.5, 0.0, 0.0, 0.0],  # cart out (also past the angle: cart counts)
                         [-2.41, 0.0, 0.3, 0.0],
                         [0.0, 0.0, -0.21, 0.0],  # pole fell (12 degrees = 0.2094 rad)
                         [2.3, 0.0, 0.2, 0.0]])  # fmt: skip  # neither: the time limit
    assert probe.episode_ends(last) == {"cart_out": 2, "pole_fell": 1, "time_limit": 1}
