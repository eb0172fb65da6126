"""`flatworld sweep`: specs fail before anything runs, a smoke sweep gives the same run folders
and metrics on a local pool and on a real local Ray, and a sweep killed by a real signal
resumes without running a finished run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flatworld.cli import main
from flatworld.experiments import SpecError, load, load_spec, run_sweep
from flatworld.runs.logger import TIMING, read_metrics

TINY = {  # a tiny TD-MPC2 on 25-step episodes: a run takes a few seconds on one thread
    "model_size": 1, "enc_dim": 32, "mlp_dim": 64, "latent_dim": 32, "num_q": 2,
    "batch_size": 32, "num_samples": 32, "num_elites": 8, "num_pi_trajs": 4, "iterations": 2,
    "wm_lr": 1e-3, "env_options": {"episode_length": 25}, "seed_steps": 50, "eval_every": 50,
    "eval_episodes": 1, "diag_every": 50, "log_every": 50, "checkpoint_every": 25,
    "tensorboard": False,
}  # fmt: skip


def smoke_spec(tasks=("dmc/cartpole-swingup", "dmc/cartpole-balance"), seeds=(1, 2),
               steps=100, **extra):  # fmt: skip
    spec = {"name": "smoke", "agent": "tdmpc2", "tasks": list(tasks), "seeds": list(seeds),
            "steps": steps, "overrides": dict(TINY), "grid": {"wm_optim": ["adam", "sam"],
                                                              "rho": [0.05]},
            "resources": {"threads": 1, "num_cpus": 1}}  # fmt: skip
    spec.update(extra)
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(run_dir / "metrics.csv")]


def run_folders(sweep: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(sweep)) for p in sweep.glob("*/*/config.yaml"))


def starts(log: Path) -> int:
    return sum(" start " in line for line in log.read_text().splitlines()
               if line.startswith("=== "))  # fmt: skip


# -- specs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    ({"colour": "blue"}, ["'colour'", "accepted", "grid"]),
    ({"grid": {"wm_optim": ["adam"], "rhoo": [0.1]}}, ["'rhoo'", "did you mean rho", "accepted"]),
    ({"agent": "tdmcp2"}, ["unknown agent 'tdmcp2'", "did you mean tdmpc2", "accepted"]),
    ({"agent": "tdmpc2", "tasks": ["gym/CartPole-v1"]},
     ["'tdmpc2' cannot run 'gym/CartPole-v1'", "discrete", "accepted", "dreamer"]),
    ({"tasks": ["gym/CartPoll-v1"]}, ["gym/CartPoll-v1", "close matches"]),
    ({"name": "../../evil"}, ["name='../../evil'", "accepted"]),
    ({"grid": {}}, ["grid is empty", "accepted"]),
    ({"grid": {"wm_optim": []}}, ["grid.wm_optim is empty", "accepted"]),
    ({"steps": -5}, ["steps=-5", "accepted", ">= 1"]),
    ({"grid": {"wm_optim": ["adamw"]}}, ["wm_optim='adamw'", "adam, sam"]),
    ({"overrides": {**TINY, "model_size": 7}}, ["model_size=7", "accepted"]),
    ({"tasks": ["dmc/cartpole-swingupp"]}, ["dmc/cartpole-swingupp", "close matches"]),
    ({"seeds": []}, ["seeds=[]", "accepted"]),
])  # fmt: skip
def test_bad_specs_fail_before_any_run_with_the_key_named(tmp_path, capsys, change, words):
    spec = write_spec(tmp_path / "bad.yaml", {**smoke_spec(), **change})
    out = tmp_path / "sweep"
    for dry_run in ([], ["--dry-run"]):  # the dry run checks what the run checks
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", str(spec), "--out", str(out), "--no-progress", *dry_run])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flatworld: error: ") and "\n" not in err, err
        assert "Traceback" not in err
        for w in words:
            assert w in err, err
        assert not out.exists() and not (tmp_path / "evil").exists()  # nothing was written


def test_adam_points_drop_sam_fields_and_names_follow_the_grid():
    from flatworld.experiments import expand

    spec = load_spec({**smoke_spec(tasks=["dmc/cartpole-swingup"], seeds=[3]),
                      "grid": {"wm_optim": ["adam", "sam"], "rho": [0.01, 0.05]}})
    runs = expand(spec, Path("/sweeps/x"))
    assert [r.run_id for r in runs] == ["dmc-cartpole-swingup/adam-s3",
                                        "dmc-cartpole-swingup/sam_rho-0.01-s3",
                                        "dmc-cartpole-swingup/sam_rho-0.05-s3"]
    assert runs[0].agent_cfg.wm_optim.sam is None
    assert runs[2].agent_cfg.wm_optim.sam.rho == 0.05
    assert runs[2].agent_cfg.wm_optim.lr == 1e-3 and runs[2].agent_cfg.mlp_dim == 64
    assert runs[1].run_cfg.run_dir == "/sweeps/x/dmc-cartpole-swingup/sam_rho-0.01-s3"
    # a list of blocks: Adam once, SAM over a scope axis that Adam does not have
    spec = load_spec({**smoke_spec(tasks=["dmc/cartpole-swingup"], seeds=[1]), "grid": [
        {"wm_optim": "adam"}, {"wm_optim": "sam", "sam_scope": ["all", "encoder_dynamics"]}]})
    assert [r.label for r in expand(spec)] == [
        "adam", "sam, sam_scope=all", "sam, sam_scope=encoder_dynamics"]
    assert expand(spec)[2].agent_cfg.sam_scope == "encoder_dynamics"
    # a prefix reaches a field that a SAM field shadows: TD-MPC2's temporal weight rho
    runs = expand(load_spec({**smoke_spec(), "overrides": {**TINY, "agent.rho": 0.7}}))
    assert runs[-1].agent_cfg.rho == 0.7 and runs[-1].agent_cfg.wm_optim.sam.rho == 0.05
    with pytest.raises(SpecError, match="rho=2.0"):
        expand(load_spec({**smoke_spec(), "overrides": {**TINY, "agent.rho": 2.0}}))


def test_presets_dry_run_prints_runs_and_estimates_even_when_not_installed(capsys):
    main(["sweep", "--preset", "paper-atari100k", "--dry-run"])
    out = capsys.readouterr().out
    assert "416 runs" in out and "atari-Pong/twister_sam_rho-0.1-s4" in out
    assert "a Ray cluster of 8 H200s" in out and "one H200" in out and "proxy" in out
    main(["sweep", "--preset", "paper-humanoidbench", "--dry-run"])
    out = capsys.readouterr().out
    assert "112 runs" in out and "NOT INSTALLED: suite 'humanoidbench'" in out
    assert "humanoidbench-h1hand-walk-v0/sam_rho-0.05-s4" in out
    main(["sweep", "--preset", "paper-dmc", "--dry-run"])
    out = capsys.readouterr().out
    assert "140 runs" in out and "dmc-dog-run/sam_rho-0.0025-s2" in out
    assert "update 240.5 ms x SAM/Adam 1.61" in out and "measured 2026-11-28" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--preset", "paper-humanoidbench"])
    assert exit_info.value.code == 2
    assert "is not installed: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--preset", "paper-dmcc", "--dry-run"])
    assert "did you mean paper-dmc" in capsys.readouterr().err


# -- a real sweep, locally and on Ray -----------------------------------------------------------
def test_smoke_sweep_local_and_ray_give_the_same_runs_and_metrics(tmp_path):
    ray = pytest.importorskip("ray")
    spec = load_spec(smoke_spec())
    local = run_sweep(spec, tmp_path / "local", workers=2, progress=False)
    assert local.ok and len(local.finished) == 8, local.failed
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(spec, tmp_path / "ray", ray_address="auto", progress=False)
    finally:
        ray.shutdown()
    assert remote.ok and len(remote.finished) == 8, remote.failed
    folders = run_folders(tmp_path / "local")
    assert len(folders) == 8 and folders == run_folders(tmp_path / "ray")
    for f in folders:
        assert numbers(tmp_path / "local" / f) == numbers(tmp_path / "ray" / f), f
    # SAM and Adam runs differ (the grid reached the configs), seeds differ too
    a, s = (numbers(tmp_path / "local" / f"dmc-cartpole-swingup/{p}-s1") for p in
            ("adam", "sam_rho-0.05"))  # fmt: skip
    assert a != s
    # the store: a row per run x evaluation, with the grid fields
    frame = load(tmp_path / "local")
    assert len(frame) == 8 * 2 and set(frame["wm_optim"]) == {"adam", "sam"}
    assert {"task", "seed", "env_steps", "return", "sharpness", "value_error", "model_error",
            "wall_time"} <= set(frame.columns)  # fmt: skip
    assert frame["return"].notna().all() and (frame["env_steps"] == 200).sum() == 8
    # started again: everything is finished, nothing runs
    again = run_sweep(spec, tmp_path / "local", workers=2, progress=False)
    assert sorted(again.skipped) == sorted(local.finished) and not again.finished
    for log in (tmp_path / "local" / "logs").iterdir():
        assert starts(log) == 1


def test_failed_run_is_reported_with_its_log_and_not_retried(tmp_path):
    spec = load_spec(smoke_spec(tasks=["dmc/cartpole-swingup"], seeds=[1],
                                overrides={**TINY, "env_options": {"episode_length": -3}},
                                grid={"wm_optim": ["adam"]}))  # fmt: skip
    first = run_sweep(spec, tmp_path / "s", workers=1, progress=False)
    (run_id, why), = first.failed.items()
    error, tail = why.split("\n", 1)
    assert "episode_length=-3" in error and "episode_length=-3" in tail  # and the log's end
    second = run_sweep(spec, tmp_path / "s", workers=1, progress=False)
    assert second.failed.keys() == first.failed.keys() and not second.finished
    log = tmp_path / "s" / "logs" / (run_id.replace("/", "__") + ".log")
    assert starts(log) == 1  # a ValueError is not worth a second attempt
    status = json.loads((tmp_path / "s" / "status.json").read_text())["runs"][run_id]
    assert status["state"] == "failed" and status["attempts"] == 2


# -- a real signal to the sweep process -----------------------------------------------------------
def _wait(cond, proc, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("timed out")


def _finished(out: Path) -> set[str]:
    path = out / "status.json"
    if not path.exists():
        return set()
    try:
        runs = json.loads(path.read_text())["runs"]
    except json.JSONDecodeError:
        return set()
    return {k for k, v in runs.items() if v["state"] == "finished"}


def _running_with_rows(out: Path, done: set[str]) -> bool:
    return any(p.stat().st_size > 300 for p in out.glob("*/*/metrics.csv")
               if str(p.parent.relative_to(out)) not in done)  # fmt: skip


def _no_process_left(pgid: int, timeout: float = 20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_killed_sweep_resumes_without_running_a_finished_run_again(tmp_path):
    out = tmp_path / "sweep"
    spec_path = write_spec(tmp_path / "spec.yaml", smoke_spec(tasks=["dmc/cartpole-swingup"],
                                                              steps=150))  # fmt: skip
    cmd = [sys.executable, "-m", "flatworld.cli", "sweep", str(spec_path), "--out", str(out),
           "--workers", "1", "--no-progress"]  # fmt: skip
    seen: dict[str, tuple[float, int]] = {}  # finished run -> (metrics mtime, starts)
    for sig, want in ((signal.SIGTERM, 1), (signal.SIGKILL, 2)):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
        _wait(lambda want=want: len(_finished(out)) >= want
              and _running_with_rows(out, _finished(out)), proc)  # fmt: skip
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGTERM:  # the driver's and the workers' semaphores were freed
            assert b"leaked semaphore" not in err, err.decode()
        assert proc.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
        assert _no_process_left(proc.pid), "a worker outlived the sweep"
        for run_id in _finished(out):
            seen.setdefault(run_id, ((out / run_id / "metrics.csv").stat().st_mtime,
                                     starts(out / "logs" / (run_id.replace("/", "__") + ".log"))))
    before = _finished(out)
    assert 2 <= len(before) < 4
    result = run_sweep(load_spec(spec_path), out, workers=1, progress=False)
    assert result.ok and sorted(result.skipped) == sorted(before)
    assert len(before) + len(result.finished) == 4
    for run_id in before:  # once finished, a run was neither started nor touched again
        log = out / "logs" / (run_id.replace("/", "__") + ".log")
        assert ((out / run_id / "metrics.csv").stat().st_mtime, starts(log)) == seen[run_id]
    restarted = [r for r in result.finished
                 if starts(out / "logs" / (r.replace("/", "__") + ".log")) > 1]
    assert restarted, "the run cut by the signal went on in a later start"
    for f in run_folders(out):
        rows = read_metrics(out / f / "metrics.csv")
        assert [int(r["step"]) for r in rows] == [50, 100, 150]


def test_a_spec_of_several_agents_sets_each_field_on_the_agents_that_have_it():
    from flatworld.agents import AGENTS
    from flatworld.experiments import expand, preset_path

    if not {"dreamer", "twister"} <= set(AGENTS):
        pytest.skip("the Dreamer family is not registered")
    runs = expand(load_spec(preset_path("paper-atari100k-smoke")))
    by_agent = {r.agent: r for r in runs if r.point["wm_optim"] == "sam"}
    assert by_agent["twister"].agent_cfg.tssm_width == 16
    assert by_agent["dreamer"].agent_cfg.deter == 16
    assert by_agent["dreamer"].agent_cfg.wm_optim.sam.rho == 0.1
    spec = load_spec({**smoke_spec(), "agent": ["tdmpc2", "dreamer"],
                      "overrides": {"tssm_widht": 16}})  # fmt: skip
    with pytest.raises(SpecError, match="tssm_widht"):
        expand(spec)


def test_every_preset_validates_and_has_a_smoke_variant():
    from flatworld.experiments import expand, presets
    from flatworld.experiments.spec import missing

    names = set(presets())
    for name in ("paper-dmc", "paper-humanoidbench", "paper-atari100k"):
        assert {name, f"{name}-smoke"} <= names
    for name, path in presets().items():
        spec = load_spec(path)
        runs = expand(spec, check=not missing(spec))  # configs validated where installed
        assert runs and len({r.run_id for r in runs}) == len(runs), name
        if name.endswith("-smoke"):
            assert spec.steps <= 200 and len(runs) <= 16, name


# -- a sweep folder started again ------------------------------------------------------------------
def test_a_rerun_with_another_spec_is_refused_unless_it_only_adds_runs(tmp_path):
    from flatworld.experiments.sweep import prepare

    one = smoke_spec(tasks=["dmc/cartpole-swingup"], seeds=[1], grid={"wm_optim": ["adam"]})
    out = tmp_path / "s"
    assert run_sweep(load_spec(one), out, workers=1, progress=False).ok
    before = {p: p.read_bytes() for p in (out / "spec.yaml", out / "status.json")}
    for change, words in (
        ({"steps": 150}, ["changed: steps: 100 -> 150", "adam-s1 would change",
                          "run.steps: stored 100, requested 150"]),
        ({"overrides": {**TINY, "wm_lr": 2e-3}}, ["overrides.wm_lr: 0.001 -> 0.002"]),
        ({"seeds": [2]}, ["seeds: [1] -> [2]", "adam-s1 would leave the spec"]),
    ):  # fmt: skip
        with pytest.raises(SpecError) as err:
            run_sweep(load_spec({**one, **change}), out, workers=1, progress=False)
        for w in words:
            assert w in str(err.value), str(err.value)
        assert {p: p.read_bytes() for p in before} == before  # nothing was written
        assert not (out / "dmc-cartpole-swingup" / "adam-s2").exists()
    # more seeds, another grid value: the existing run is unchanged, so the runs are added
    more = {**one, "seeds": [1, 2], "grid": {"wm_optim": ["adam", "sam"]}}
    assert len(prepare(load_spec(more), out)) == 4


def test_a_sweep_folder_with_the_old_run_ids_goes_on_under_them(tmp_path):
    import dataclasses

    from flatworld import runs as fw_runs
    from flatworld.agents import AGENTS
    from flatworld.experiments import expand

    spec = smoke_spec(tasks=["dmc/cartpole-swingup"], seeds=[1])
    spec["grid"] = {"wm_optim": ["sam"], "rho": [0.05]}
    out = tmp_path / "old"
    out.mkdir()
    write_spec(out / "spec.yaml", spec)
    (run,) = expand(load_spec(spec), out)
    legacy = "dmc-cartpole-swingup/sam,rho=0.05-s1"  # as sweeps named it before
    assert run.run_id == "dmc-cartpole-swingup/sam_rho-0.05-s1"
    fw_runs.train_or_resume(dataclasses.replace(run.run_cfg, run_dir=str(out / legacy)),
                            run.agent, run.agent_cfg, agents=AGENTS, progress=False)
    result = run_sweep(load_spec(spec), out, workers=1, progress=False)
    assert result.ok and result.skipped == [legacy] and not result.finished
    assert not (out / run.run_id).exists()  # not run again under the new name
    assert set(load(out)["run"]) == {legacy}


def test_status_marks_only_the_runs_that_started_as_running(tmp_path):
    import threading

    ray = pytest.importorskip("ray")
    spec = load_spec(smoke_spec(tasks=["dmc/cartpole-swingup"], grid={"wm_optim": ["adam"]},
                                seeds=[1, 2, 3]))  # fmt: skip

    def watch(out: Path, stop: threading.Event, seen: list) -> None:
        while not stop.is_set():
            try:
                runs = json.loads((out / "status.json").read_text())["runs"]
            except (OSError, json.JSONDecodeError, KeyError):
                continue
            running = sorted(k for k, v in runs.items() if v["state"] == "running")
            started = [k for k in running
                       if (out / "logs" / (k.replace("/", "__") + ".log")).exists()]
            seen.append((running, started))
            time.sleep(0.05)

    def sweep_watched(out: Path, **kw) -> list:
        stop, seen = threading.Event(), []
        thread = threading.Thread(target=watch, args=(out, stop, seen))
        thread.start()
        try:
            assert run_sweep(spec, out, progress=False, **kw).ok
        finally:
            stop.set()
            thread.join()
        return seen

    for seen in (sweep_watched(tmp_path / "local", workers=1),):
        assert any(running for running, _ in seen)
        # one worker runs one run at a time, and a run marked running has started
        assert all(len(running) <= 1 and running == started for running, started in seen), seen
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        seen = sweep_watched(tmp_path / "ray", ray_address="auto")
    finally:
        ray.shutdown()
    assert any(running for running, _ in seen)
    assert all(len(running) <= 1 and running == started for running, started in seen), seen
