"""TD-MPC2 as published, on real DMC and Gymnasium envs: the elite action rule, the update
burst after seeding, terminations, and the run-level errors a new user meets first."""

from __future__ import annotations

import dataclasses
import types
import warnings

import numpy as np
import pytest
import torch
import yaml

from flatworld import cli, envs, runs
from flatworld.agents import AGENTS
from flatworld.agents.tdmpc2 import TDMPC2Config
from flatworld.envs import gym_suite
from flatworld.runs.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from flatworld.runs.logger import TIMING, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> TDMPC2Config:
    base = dict(model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2, batch_size=16,
                num_samples=32, num_elites=8, num_pi_trajs=4, iterations=2)  # fmt: skip
    return TDMPC2Config(**{**base, **kw})


def run_cfg(run_dir, env="dmc/cartpole-swingup", steps=120, **kw) -> runs.RunConfig:
    base = dict(env=env, env_options={"episode_length": 25}, seed=3, steps=steps,
                seed_steps=50, eval_every=60, eval_episodes=1, diag_every=60,
                checkpoint_every=25, log_every=10, run_dir=str(run_dir), tensorboard=False)
    return runs.RunConfig(**{**base, **kw})


def numbers(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(run_dir / "metrics.csv")]


def updates_by_step(run_dir) -> dict[int, int]:
    return {int(r["step"]): int(r["updates"]) for r in read_metrics(run_dir / "metrics.csv")}


# ---- the action: an elite drawn by its score ----------------------------------------------
def test_default_action_is_an_elite_drawn_by_score_on_dmc():
    env = envs.make("dmc/walker-walk", seed=0)
    obs, _ = env.reset(seed=0)
    env.close()
    torch.manual_seed(0)
    agent = AGENTS["tdmpc2"].make(tiny(), obs_shape=obs.shape, action_dim=6,
                                            episode_length=500)  # fmt: skip
    x = torch.as_tensor(obs)[None]
    for eval_mode in (True, False):
        torch.manual_seed(5)
        _, std, elites, score = agent.planner.search(x, t0=True)
        # By hand: a Gumbel argmax over log-scores picks elite e with probability score[e].
        e = torch.empty_like(score).exponential_()
        pick = int(torch.argmax(score.log() - e.log()))
        want = elites[0, pick]
        if not eval_mode:  # training adds noise of the final std
            want = want + std[0] * torch.randn(6)
        torch.manual_seed(5)
        got = agent.act(obs, t0=True, eval_mode=eval_mode)
        np.testing.assert_array_equal(got, want.clamp(-1, 1).numpy())
    assert score.numel() == 8 and torch.isclose(score.sum(), torch.tensor(1.0))


# ---- the update burst when seeding ends ----------------------------------------------------
def test_burst_runs_once_as_updates_and_can_be_turned_off(tmp_path):
    runs.train(run_cfg(tmp_path / "on"), "tdmpc2", tiny(), agents=AGENTS, progress=False)
    runs.train(run_cfg(tmp_path / "off", seed_burst=False), "tdmpc2", tiny(),
               agents=AGENTS, progress=False)
    on, off = updates_by_step(tmp_path / "on"), updates_by_step(tmp_path / "off")
    assert on[40] == 0 and on[50] == 50 and on[60] == 60 and on[120] == 120
    assert off[50] == 1 and off[120] == 71
    assert max(on) == max(off) == 120  # the burst is updates, not environment steps


@pytest.mark.parametrize("stop_after", [40, 77])  # killed before the burst, and after it
def test_resumed_run_does_not_repeat_the_burst(tmp_path, stop_after):
    runs.train(run_cfg(tmp_path / "ref"), "tdmpc2", tiny(), agents=AGENTS, progress=False)
    runs.train(run_cfg(tmp_path / "cut"), "tdmpc2", tiny(), agents=AGENTS, progress=False,
               stop_after=stop_after)
    runs.resume(tmp_path / "cut", agents=AGENTS, progress=False)
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "ref")
    assert updates_by_step(tmp_path / "cut")[120] == 120


# ---- terminations --------------------------------------------------------------------------
def hopper_window_ending_in_a_fall(horizon: int = 3) -> dict[str, torch.Tensor]:
    env = envs.make("gym/Hopper-v5", seed=1)
    rng = np.random.default_rng(1)
    obs, _ = env.reset(seed=1)
    rows = [(obs, np.zeros(3, np.float32), 0.0, False)]
    for _ in range(1000):
        a = rng.uniform(-1, 1, 3).astype(np.float32)
        obs, r, term, trunc, _ = env.step(a)
        rows.append((obs, a, r, term))
        if term or trunc:
            break
    env.close()
    assert rows[-1][3], "a random Hopper falls within 1000 steps"
    w = rows[-(horizon + 1):]

    def col(i, start=1):
        return torch.tensor(np.array([x[i] for x in w[start:]], np.float32))

    return {"obs": col(0, 0)[:, None], "action": col(1)[:, None],
            "reward": col(2)[:, None, None], "terminated": col(3)[:, None, None]}


def trained_looking(agent):
    """Move every weight off its initial value (the Q outputs start at zero, so a fresh
    model's bootstrap is 0 and hides the difference)."""
    g = torch.Generator().manual_seed(0)
    for t in agent.model.state_dict().values():
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=g) * 0.3)
    return agent


def test_td_target_at_a_terminal_step_is_the_reward(tmp_path):
    batch = hopper_window_ending_in_a_fall()
    assert batch["terminated"][-1].item() == 1.0 and batch["reward"][-1].item() != 0.0
    cfg = runs.folder.resolve_episodic("gym/Hopper-v5", tiny())
    assert cfg.episodic is True  # set from the suite, not by the user
    torch.manual_seed(0)
    agent = trained_looking(AGENTS["tdmpc2"].make(
        cfg, obs_shape=(11,), action_dim=3, episode_length=1000))  # fmt: skip
    agent.model.train()
    td = agent.targets(batch)["td"]
    assert td[-1].item() == batch["reward"][-1].item()  # exactly the reward, no bootstrap
    assert (td[:-1] != batch["reward"][:-1]).all()  # earlier steps do bootstrap
    torch.manual_seed(0)
    blind = trained_looking(AGENTS["tdmpc2"].make(
        tiny(episodic=False), obs_shape=(11,), action_dim=3, episode_length=1000))
    blind.model.train()
    assert blind.targets(batch)["td"][-1].item() != batch["reward"][-1].item()


def test_suites_declare_terminations():
    assert not envs.terminates("dmc/walker-walk")
    assert envs.terminates("gym/Hopper-v5") and envs.terminates("gym/Humanoid-v5")
    assert not envs.terminates("gym/HalfCheetah-v5")
    assert envs.terminates("humanoidbench/h1hand-walk-v0")
    assert runs.folder.resolve_episodic("dmc/walker-walk", tiny()).episodic is False


def test_forcing_no_episodic_on_a_terminating_suite_fails(tmp_path, capsys):
    with pytest.raises(ValueError, match="can terminate"):
        runs.train(run_cfg(tmp_path / "r", env="gym/Hopper-v5"), "tdmpc2",
                   tiny(episodic=False), agents=AGENTS, progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "tdmpc2", "--env", "gym/Hopper-v5", "--no-episodic",
                  "--run-dir", str(tmp_path / "c")])
    assert exc.value.code == 2 and "bootstrap through terminal states" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("env_id", ["gym/Hopper-v5", "gym/Ant-v5", "gym/Humanoid-v5"])
def test_gymnasium_mujoco_runs_end_to_end_with_terminations(tmp_path, env_id):
    cfg = run_cfg(tmp_path / "r", env=env_id, steps=80, seed_steps=30, eval_every=40,
                  diag_every=40, log_every=20, env_options={"episode_length": 40})
    runs.train(cfg, "tdmpc2", tiny(), agents=AGENTS, progress=False)
    stored = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert stored["agent"]["config"]["episodic"] is True
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    assert rows[-1]["step"] == "80" and rows[-1]["updates"] == "80"
    assert np.isfinite(float(rows[-1]["train/termination_loss"]))
    assert np.isfinite(float(rows[-1]["eval_return"]))


# ---- the command line and run folders, as a new user meets them ---------------------------
def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--env", "dmc/walker-walkk"], "close matches: ['dmc/walker-walk'"),
    (["--env", "gym/CartPole-v1"], "has discrete actions"),
    (["--device", "cuda"], "CUDA is not available here"),
])  # fmt: skip
def test_bad_env_or_device_fails_before_the_folder_exists(tmp_path, capsys, extra, message):
    if message.startswith("CUDA") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "r"
    err = cli_error(["train", "tdmpc2", "--run-dir", str(run_dir), *extra], capsys)
    assert message in err and not run_dir.exists()


def test_run_folder_errors_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in cli_error(["train", "tdmpc2", "--run-dir", str(a_file)], capsys)
    assert "not a flatworld run folder" in cli_error(["train", "--resume", str(tmp_path)], capsys)
    assert "not a folder" in cli_error(["train", "--resume", str(tmp_path / "no")], capsys)
    run_dir = tmp_path / "r"
    runs.train(run_cfg(run_dir, steps=30, seed_steps=20), "tdmpc2", tiny(),
               agents=AGENTS, progress=False)
    err = cli_error(["train", "tdmpc2", "--env", "dmc/cartpole-swingup",
                     "--run-dir", str(run_dir)], capsys)  # fmt: skip
    assert f"flatworld train --resume {run_dir}" in err


def test_help_lists_accepted_values_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--plan-action {elite,mean}", "--sam-when {always,late,every}",
                 "--obs {state,rgb}", "--sam-scope {all,encoder_dynamics}"):  # fmt: skip
        assert flag in out
    assert "default: elite" in out and "follows the env suite" in out


def test_checkpoint_missing_keys_falls_back_and_is_set_aside(tmp_path):
    runs.train(run_cfg(tmp_path / "ref"), "tdmpc2", tiny(), agents=AGENTS, progress=False)
    cut = tmp_path / "cut"
    runs.train(run_cfg(cut), "tdmpc2", tiny(), agents=AGENTS, progress=False, stop_after=90)
    (_, older), (_, newest) = list_checkpoints(cut / "checkpoints")
    state = torch.load(newest, weights_only=True)
    del state["agent"]["scale"]  # loads, but lacks part of the state
    torch.save(state, newest)
    with pytest.warns(RuntimeWarning, match=f"refusing checkpoint .*{newest.name}.*'scale'"):
        runs.resume(cut, agents=AGENTS, progress=False)
    assert numbers(cut) == numbers(tmp_path / "ref")
    assert newest.with_name(newest.name + ".refused").exists()
    assert [s for s, _ in list_checkpoints(cut / "checkpoints")][-1] == 120


def test_a_refused_checkpoint_never_costs_the_newest_good_one(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, 100, {"step": 100, "ok": True})
    save_checkpoint(folder, 200, {"step": 200})  # lacks "ok"

    def need_ok(state):
        if "ok" not in state:
            raise ValueError("missing 'ok'")

    with pytest.warns(RuntimeWarning):
        state, _ = load_checkpoint(folder, validate=need_ok, set_aside=True)
    assert state["step"] == 100
    save_checkpoint(folder, 150, {"step": 150, "ok": True})  # the resumed run's next one
    assert [s for s, _ in list_checkpoints(folder)] == [100, 150]
    save_checkpoint(folder, 175, {"step": 175, "ok": True})
    assert [s for s, _ in list_checkpoints(folder)] == [150, 175]


def test_resume_only_with_the_same_config(tmp_path):
    cfg = run_cfg(tmp_path / "r", steps=60)
    runs.train_or_resume(cfg, "tdmpc2", tiny(), agents=AGENTS, progress=False, stop_after=40)
    with pytest.raises(runs.ConfigMismatchError, match=r"run\.steps: stored 60, requested 90"):
        runs.train_or_resume(dataclasses.replace(cfg, steps=90), "tdmpc2", tiny(),
                             agents=AGENTS, progress=False)  # fmt: skip
    with pytest.raises(runs.ConfigMismatchError, match=r"run\.env"):
        runs.train_or_resume(dataclasses.replace(cfg, env="dmc/walker-walk"), "tdmpc2",
                             tiny(), agents=AGENTS, progress=False)  # fmt: skip
    runs.train_or_resume(cfg, "tdmpc2", tiny(), agents=AGENTS, progress=False)  # the same: goes on
    assert read_metrics(tmp_path / "r" / "metrics.csv")[-1]["step"] == "60"


def test_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    runs.train(run_cfg(tmp_path / "ref", steps=60), "tdmpc2", tiny(), agents=AGENTS, progress=False)
    cut = tmp_path / "cut"
    runs.train(run_cfg(cut, steps=60), "tdmpc2", tiny(),
               agents=AGENTS, progress=False, stop_after=20)
    assert not list_checkpoints(cut / "checkpoints")
    with pytest.warns(RuntimeWarning, match="starting it again"):
        runs.resume(cut, agents=AGENTS, progress=False)
    assert numbers(cut) == numbers(tmp_path / "ref")


def test_every_environment_is_closed(tmp_path, monkeypatch):
    made, closed = [], []
    real_make = envs.make

    def tracking_make(*args, **kwargs):
        env = real_make(*args, **kwargs)
        made.append(env)
        real_close = env.close
        env.close = lambda: (closed.append(env), real_close())[1]
        return env

    monkeypatch.setattr(envs, "make", tracking_make)
    runs.train(run_cfg(tmp_path / "r", steps=30, seed_steps=20), "tdmpc2", tiny(),
               agents=AGENTS, progress=False)  # fmt: skip
    runs.evaluate(tmp_path / "r", agents=AGENTS, episodes=1)
    with pytest.raises(ValueError):
        runs.train(run_cfg(tmp_path / "bad", env="gym/CartPole-v1"), "tdmpc2", tiny(),
                   agents=AGENTS, progress=False)  # fmt: skip
    assert len(made) == 6 and all(any(e is c for c in closed) for e in made)


# ---- HumanoidBench, without the package ----------------------------------------------------
def test_humanoidbench_lists_only_ids_with_a_model():
    ids = set(gym_suite.humanoidbench_ids())
    assert "h1hand-walk-v0" in ids and "h1-walk-v0" in ids
    for gone in ("h1hand-highbar_simple-v0", "h1hand-highbar_hard-v0", "h1-cabinet-v0",
                 "h1-kitchen-v0", "h1-insert_small-v0", "h1-highbar_hard-v0"):  # fmt: skip
        assert gone not in ids
    assert len(ids) == 30 + 20
    main = gym_suite.humanoidbench_ids(main_only=True)
    assert len(main) == 14 and all(i.startswith("h1hand-") for i in main)
    with pytest.raises(ValueError, match="close matches"):
        envs.make("humanoidbench/h1hand-highbar_hard-v0")


def test_humanoidbench_missing_package_message():
    if importlib_find("humanoid_bench"):
        pytest.skip("humanoid_bench is installed")
    with pytest.raises(envs.MissingDependencyError) as exc:
        envs.make("humanoidbench/h1hand-walk-v0")
    msg = str(exc.value)
    assert gym_suite.HUMANOIDBENCH_PIP in msg and "--no-deps" in msg
    assert "handles" in msg and "MuJoCo 3.17" in msg and "No jax needed" in msg


def importlib_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def stand_in_dmc_index() -> types.ModuleType:
    """A module shaped like humanoid_bench's dmc_index: a size table written for an older
    MuJoCo, and an indexer that reads every field the table lists."""
    index = types.ModuleType("dmc_index_stand_in")
    index.sizes = types.SimpleNamespace(array_sizes={"mjmodel": {
        "body_pos": ("nbody", "xyz"), "flex_evpair": ("nflexevpair", 2)}})
    names = {"name_bodyadr": "nbody"}

    def _get_size_name(field_name, struct_name="mjmodel"):
        return names[field_name]

    def struct_indexer(struct, struct_name, size_to_axis_indexer):
        table = index.sizes.array_sizes[struct_name]
        return {f: getattr(struct, f) for f in table}

    index._get_size_name, index.struct_indexer = _get_size_name, struct_indexer
    return index


def test_dmc_index_shim_handles_old_and_new_struct_layouts():
    old = types.SimpleNamespace(body_pos=np.zeros((2, 3)), flex_evpair=np.zeros((0, 2)))
    new = types.SimpleNamespace(body_pos=np.zeros((2, 3)))  # MuJoCo 3.17: no flex_evpair
    index = stand_in_dmc_index()
    with pytest.raises(AttributeError, match="flex_evpair"):
        index.struct_indexer(new, "mjmodel", {})
    gym_suite.patch_dmc_index(index)
    assert set(index.struct_indexer(old, "mjmodel", {})) == {"body_pos", "flex_evpair"}
    assert set(index.struct_indexer(new, "mjmodel", {})) == {"body_pos"}
    assert index._get_size_name("name_bodyadr") == "nbody"
    assert index._get_size_name("name_flexadr") == "nflex"  # newer than the table
    patched = index.struct_indexer
    gym_suite.patch_dmc_index(index)  # idempotent
    assert index.struct_indexer is patched


def test_jax_free_stand_in_fails_only_when_used():
    module = gym_suite._jax_free_flax_to_torch()
    assert {"TorchModel", "TorchPolicy", "flax_to_torch"} <= set(vars(module))
    with pytest.raises(envs.MissingDependencyError, match="needs jax"):
        module.TorchPolicy()


def test_warnings_module_is_quiet_on_import():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert envs.list_envs()["humanoidbench"].terminates


def test_killed_episodic_run_resumes_to_identical_metrics(tmp_path):
    cfg = dict(env="gym/Hopper-v5", steps=100, seed_steps=30, eval_every=50, diag_every=50,
               checkpoint_every=10, env_options={"episode_length": 30})
    runs.train(run_cfg(tmp_path / "ref", **cfg), "tdmpc2", tiny(), agents=AGENTS, progress=False)
    runs.train(run_cfg(tmp_path / "cut", **cfg), "tdmpc2", tiny(), agents=AGENTS, progress=False,
               stop_after=71)
    assert list_checkpoints(tmp_path / "cut" / "checkpoints")
    runs.resume(tmp_path / "cut", agents=AGENTS, progress=False)
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "ref")


def test_missing_suite_package_is_one_cli_line(tmp_path, capsys):
    if importlib_find("humanoid_bench"):
        pytest.skip("humanoid_bench is installed")
    err = cli_error(["train", "tdmpc2", "--env", "humanoidbench/h1hand-walk-v0",
                     "--run-dir", str(tmp_path / "r")], capsys)  # fmt: skip
    assert gym_suite.HUMANOIDBENCH_PIP in err and not (tmp_path / "r").exists()


def test_close_all_closes_what_make_built():
    env = envs.make("dmc/cartpole-swingup", seed=0)
    closed = []
    real_close = env.close
    env.close = lambda: (closed.append(1), real_close())[1]
    envs.close_all()
    assert closed == [1] and env not in envs._OPEN


def test_demo_runs_refuse_a_folder_with_another_config(tmp_path):
    from flatworld import demo

    cfg = run_cfg(tmp_path / "adam-s1", steps=30, seed_steps=20)
    demo._run_one_thread(cfg, tiny())
    with pytest.raises(runs.ConfigMismatchError, match="run.env: stored 'dmc/cartpole-swingup'"):
        demo._run_one_thread(dataclasses.replace(cfg, env="dmc/walker-walk"), tiny())
    assert demo._run_one_thread(cfg, tiny()) == str(tmp_path / "adam-s1")  # same: finished
