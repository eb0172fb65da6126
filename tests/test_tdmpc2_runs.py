"""TD-MPC2 end to end through flatworld.runs on a real DeepMind Control task (tiny model)."""

from __future__ import annotations

import dataclasses

import pytest

from flatworld import optim
from flatworld.agents import AGENTS
from flatworld.agents.tdmpc2 import TDMPC2Config
from flatworld.runs import RunConfig, resume, train
from flatworld.runs.logger import TIMING, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(sam: bool) -> TDMPC2Config:
    spec = optim.OptimSpec(lr=1e-3, sam=optim.SamSpec(rho=0.05) if sam else None)
    return TDMPC2Config(model_size=1, enc_dim=32, mlp_dim=64, latent_dim=32, num_q=2,
                        batch_size=32, num_samples=32, num_elites=8, num_pi_trajs=4,
                        iterations=2, wm_optim=spec)


def run_cfg(run_dir, steps=300) -> RunConfig:
    return RunConfig(env="dmc/cartpole-swingup", env_options={"episode_length": 25}, seed=3,
                     steps=steps, seed_steps=50, eval_every=50, eval_episodes=1, diag_every=50,
                     checkpoint_every=50, log_every=50, run_dir=str(run_dir),
                     tensorboard=False)


def numbers(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(run_dir / "metrics.csv")]


def test_a_few_hundred_steps_lower_the_world_model_loss(tmp_path):
    cfg = dataclasses.replace(run_cfg(tmp_path / "r"), diag_rho=0.1)  # SAM's own rho is 0.05
    train(cfg, "tdmpc2", tiny(sam=True), agents=AGENTS, progress=False)
    losses = [float(r["wm_loss"]) for r in numbers(tmp_path / "r") if r["wm_loss"]]
    assert len(losses) >= 4 and losses[-1] < 0.7 * losses[0]
    rows = numbers(tmp_path / "r")
    assert all(float(r["wm_sharpness"]) == float(r["wm_sharpness"]) for r in rows
               if r["wm_sharpness"])  # logged and finite
    assert any(r["value_error"] for r in rows)
    bounds = [r for r in rows if r["bound_value"]]
    assert len(bounds) >= 4 and all(r["bound_rho"] == "0.1" for r in bounds)
    assert all(float(r["bound_value"]) > float(r["bound_perturbed_loss"]) for r in bounds)


@pytest.mark.parametrize("sam", [False, True])
def test_killed_run_resumes_to_the_same_numbers(tmp_path, sam):
    steps = 200
    train(run_cfg(tmp_path / "ref", steps), "tdmpc2", tiny(sam), agents=AGENTS, progress=False)
    train(run_cfg(tmp_path / "cut", steps), "tdmpc2", tiny(sam), agents=AGENTS, progress=False,
          stop_after=137)
    resume(tmp_path / "cut", agents=AGENTS, progress=False)
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "ref")
