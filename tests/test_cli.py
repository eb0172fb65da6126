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
    seen = {}

    def fake_train(run_cfg, agent, agent_cfg, *, agents, progress=True):
        seen.update(run=run_cfg, agent=agent, cfg=agent_cfg)
        return tmp_path

    monkeypatch.setattr("flatworld.runs.train", fake_train)
    cli.main(["train", "tdmpc2", "--env", "dmc/cartpole-swingup", "--steps", "5000", "--seed", "3",
              "--wm-optim", "sam", "--rho", "0.1", "--sam-adaptive", "--model-size", "1",
              "--horizon-rho", "0.7", "--sam-scope", "encoder_dynamics"])
    assert seen["run"].env == "dmc/cartpole-swingup" and seen["run"].steps == 5000
    assert seen["run"].seed == 3 and seen["agent"] == "tdmpc2"
    sam = seen["cfg"].wm_optim.sam
    assert sam.rho == 0.1 and sam.adaptive and seen["cfg"].rho == 0.7
    assert seen["cfg"].model_size == 1 and seen["cfg"].sam_scope == "encoder_dynamics"
