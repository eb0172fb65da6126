"""The command line: bad input fails at parse time with the field and accepted values."""

from __future__ import annotations

import pytest

from flatworld import cli


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "tdmpc2", "--obs", "pixels"], "--obs: invalid choice: 'pixels'"),
    (["train", "tdmpc2", "--wm-optim", "sam", "--rho", "-1"], "sam.rho=-1.0; accepted: rho >= 0"),
    (["train", "tdmpc2", "--steps", "0"], "RunConfig.steps=0"),
    (["train", "tdmpc2", "--rho", "0.1"], "given with --wm-optim adam"),
    (["train", "tdmpc2", "--env", "nowhere"], "RunConfig.env='nowhere'"),
    (["train", "tdmpc2", "--plan-action", "best"], "--plan-action: invalid choice: 'best'"),
    (["train", "dreamerx"], "agent='dreamerx'; accepted: ['dreamer', 'tdmpc2', 'twister']"),
    (["study", "nope"], "unknown study 'nope'"),
])
def test_bad_input_names_the_field(argv, message, capsys):
    code, err = run(argv, capsys)
    assert code == 2 and message in err


def test_envs_lists_suites(capsys):
    cli.main(["envs"])
    out = capsys.readouterr().out
    assert "dmc/walker-walk" in out and "humanoidbench/h1hand-walk-v0" in out


def test_train_flags_reach_the_configs(monkeypatch, tmp_path):
    seen = fake_train(monkeypatch, tmp_path)
    cli.main(["train", "tdmpc2", "--env", "dmc/cartpole-swingup", "--steps", "5000", "--seed", "3",
              "--wm-optim", "sam", "--rho", "0.1", "--sam-adaptive", "--model-size", "1",
              "--horizon-rho", "0.7", "--sam-scope", "encoder_dynamics"])
    assert seen["run"].env == "dmc/cartpole-swingup" and seen["run"].steps == 5000
    assert seen["run"].seed == 3 and seen["agent"] == "tdmpc2"
    sam = seen["cfg"].wm_optim.sam
    assert sam.rho == 0.1 and sam.adaptive and seen["cfg"].rho == 0.7
    assert seen["cfg"].model_size == 1 and seen["cfg"].sam_scope == "encoder_dynamics"


def fake_train(monkeypatch, tmp_path):
    """Replace runs.train by a recorder; returns what it was called with."""
    seen = {}

    def train(run_cfg, agent, agent_cfg, *, agents, progress=True):
        seen.update(run=run_cfg, agent=agent, cfg=agent_cfg)
        return tmp_path

    monkeypatch.setattr("flatworld.runs.train", train)
    return seen


def test_a_run_shorter_than_its_seeding_is_refused_unless_asked(monkeypatch, tmp_path, capsys):
    seen = fake_train(monkeypatch, tmp_path)
    # TD-MPC2's rule on DMC: max(1000, 5 * 500 steps per episode) = 2,500 random steps.
    code, err = run(["train", "tdmpc2", "--env", "dmc/cartpole-swingup", "--steps", "100"],
                    capsys)
    assert code == 2 and "steps=100" in err and "seed_steps=2500" in err
    assert "--seeding-only" in err and not seen
    code, err = run(["train", "dreamer", "--env", "gym/CartPole-v1", "--steps", "100",
                     "--seed-steps", "150"], capsys)
    assert code == 2 and "steps=100" in err and "seed_steps=150" in err
    cli.main(["train", "tdmpc2", "--env", "dmc/cartpole-swingup", "--steps", "100",
              "--seeding-only"])
    assert seen["run"].steps == 100


def test_the_agent_may_follow_options(monkeypatch, tmp_path, capsys):
    seen = fake_train(monkeypatch, tmp_path)
    cli.main(["train", "--env", "gym/CartPole-v1", "dreamer", "--model-size", "XS",
              "--steps", "2000"])
    assert seen["agent"] == "dreamer" and seen["cfg"].model_size == "XS"
    assert seen["run"].env == "gym/CartPole-v1"
    # An agent name read as an option's value: the flags were another agent's, so refuse.
    code, err = run(["train", "--run-dir", "dreamer", "tdmpc2"], capsys)
    assert code == 2 and "the agent comes first: flatworld train AGENT" in err


def test_log_every_alone_moves_the_unset_eval_and_diag_defaults(monkeypatch, tmp_path, capsys):
    seen = fake_train(monkeypatch, tmp_path)
    cli.main(["train", "tdmpc2", "--env", "dmc/cartpole-swingup", "--log-every", "30"])
    assert seen["run"].log_every == 30
    assert seen["run"].eval_every == seen["run"].diag_every == 10_020  # 10,000 rounded up
    code, err = run(["train", "tdmpc2", "--log-every", "30", "--diag-every", "100"], capsys)
    assert code == 2 and "diag_every=100" in err and "log_every=30" in err


def test_train_from_a_config_file_with_flags_over_it(monkeypatch, tmp_path, capsys):
    seen = fake_train(monkeypatch, tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(
        "run: {env: gym/CartPole-v1, steps: 3000, seed: 4, log_every: 500, eval_every: 1000}\n"
        "agent:\n  name: dreamer\n  config:\n    model_size: XS\n    train_ratio: 64\n"
        "    wm_optim: {base: adam, lr: 0.0002, sam: {rho: 0.2}}\n")
    cli.main(["train", "dreamer", "--config", str(path), "--seed", "7", "--train-ratio", "32"])
    run_cfg, cfg = seen["run"], seen["cfg"]
    assert (run_cfg.env, run_cfg.steps, run_cfg.seed, run_cfg.eval_every) == (
        "gym/CartPole-v1", 3000, 7, 1000)
    assert cfg.model_size == "XS" and cfg.train_ratio == 32 and cfg.wm_optim.lr == 0.0002
    assert cfg.wm_optim.sam.rho == 0.2  # the file's SAM holds unless a flag changes it
    # The agent may be left to the file; --wm-optim adam overrides the file's SAM.
    seen.clear()
    cli.main(["train", "--config", str(path), "--wm-optim", "adam"])
    assert seen["agent"] == "dreamer" and seen["cfg"].wm_optim.sam is None
    assert seen["cfg"].model_size == "XS"  # the dreamer flags and config were used


@pytest.mark.parametrize("text, message", [
    ("run: {stepz: 5}\n", "run: unknown key 'stepz'; accepted: env, env_options, seed"),
    ("runs: {}\n", "unknown key 'runs'; accepted: flatworld_version, run, agent"),
    ("agent: {name: dreamer, size: XS}\n", "agent: unknown key 'size'; accepted: name, config"),
    ("agent: {name: dreamer, config: {sizes: XS}}\n", "unknown field(s) ['sizes']; accepted"),
    ("run:\n  steps: [1\n", "line 3"),
    ("run: !!python/object/apply:os.system ['true']\n", "not a valid config file"),
    ("agent: {name: tdmpc2}\n", "configures agent 'tdmpc2', not 'dreamer'"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, err = run(["train", "dreamer", "--config", str(path)], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the usage line and the error


def test_a_reader_that_goes_away_is_not_an_error():
    """`flatworld envs | head`: the pipe closes before flatworld writes."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "flatworld", "envs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started to write
    err = proc.stderr.read().decode()
    proc.wait()
    assert "BrokenPipeError" not in err and "Traceback" not in err and proc.returncode == 1


def test_help_shows_the_accepted_values_of_choice_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "tdmpc2", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model-size {1,5,19,48,317}" in out
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--policy {mode,sample}" in out and "--device {cpu,cuda,cuda:N,mps}" in out
    assert "--video PATH.mp4" in out and "--seed SEED" in out
