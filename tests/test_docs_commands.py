"""Every `flatworld ...` command shown in the README and the documentation pages runs as written.

The shell blocks of README.md and docs/**/*.md are collected and each `flatworld` command goes
through the real `flatworld.cli.main`: its argparse parser and the configs' validation run for
real, so a flag that does not exist, a value out of range or an unknown env id fails here. What
would take too long (training, evaluating, sweeping, the demo) is replaced at the boundary where
the CLI hands over its validated configs; listing envs and studies and a sweep's `--dry-run` run
for real.
"""

from __future__ import annotations

import re
import shlex
import types
from pathlib import Path

import pytest

from flatworld import cli

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_commands(text: str) -> list[list[str]]:
    """The words of each command in the text's shell blocks (continuations joined, comments cut)."""
    commands = []
    for block in _SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and _ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def flatworld_argv(words: list[str]) -> list[str] | None:
    """The arguments after `flatworld` or `python -m flatworld`; None for any other command."""
    if words[:1] == ["flatworld"]:
        return words[1:]
    if len(words) >= 3 and words[1:3] == ["-m", "flatworld"] and "python" in words[0]:
        return words[3:]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCUMENTS:
        for words in shell_commands(path.read_text()):
            argv = flatworld_argv(words)
            if argv is not None:
                found.append((f"{path.relative_to(ROOT)}: {shlex.join(words)}", argv))
    return found


@pytest.fixture
def offline_cli(monkeypatch, tmp_path):
    """cli.main with the long-running work replaced; returns what reached each replacement."""
    import flatworld.demo
    import flatworld.experiments
    import flatworld.runs
    import flatworld.studies

    seen: dict[str, object] = {}

    def record(name, result=None):
        def replacement(*args, **kwargs):
            seen[name] = (args, kwargs)
            return result if result is not None else tmp_path
        return replacement

    monkeypatch.setattr(flatworld.runs, "train", record("train"))
    monkeypatch.setattr(flatworld.runs, "resume", record("resume"))
    monkeypatch.setattr(flatworld.runs, "evaluate", record("evaluate", {"eval_return": 0.0}))
    sweep_result = types.SimpleNamespace(skipped=[], finished=[], failed={}, interrupted=False)
    monkeypatch.setattr(flatworld.experiments, "run_sweep", record("sweep", sweep_result))
    monkeypatch.setattr(flatworld.experiments, "report", record("report"))
    monkeypatch.setattr(flatworld.demo, "flagship", record("demo"))
    monkeypatch.setattr(flatworld.demo, "classifier", record("demo"))
    monkeypatch.setattr(flatworld.studies, "run_study", record("study"))
    monkeypatch.chdir(tmp_path)  # anything a command writes lands here

    def run(argv: list[str]) -> dict[str, object]:
        if argv[:1] == ["report"]:  # report reads existing folders: give it empty ones
            for word in argv[1:]:
                if not word.startswith("-"):
                    (tmp_path / word).mkdir(parents=True, exist_ok=True)
        # a file of the repository named relative to its root (a sweep spec) is read from there
        argv = [str(ROOT / word) if not word.startswith("-") and "/" in word
                and (ROOT / word).is_file() else word for word in argv]
        seen.clear()
        try:
            cli.main(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):  # --help exits 0
                raise AssertionError(f"exit {stop.code}") from None
        return dict(seen)

    return run


@pytest.mark.parametrize("where, argv", [pytest.param(where, argv, id=where)
                                         for where, argv in documented_commands()])
def test_documented_command_runs_as_written(where, argv, offline_cli, capsys):
    try:
        offline_cli(argv)
    except AssertionError as err:
        pytest.fail(f"{where}\n  {err}: {capsys.readouterr().err.strip()}")


def test_the_quick_start_trains_each_agent_with_and_without_sam():
    trains = [argv for _, argv in documented_commands() if argv[:1] == ["train"]]
    for agent in ("tdmpc2", "dreamer", "twister"):
        runs = [argv for argv in trains if argv[1:2] == [agent]]
        assert any("--wm-optim" not in argv for argv in runs), f"{agent} without SAM"
        assert any(argv[argv.index("--wm-optim") + 1] == "sam"
                   for argv in runs if "--wm-optim" in argv), f"{agent} with SAM"
    commands = {argv[0] for _, argv in documented_commands()}
    assert {"train", "eval", "sweep", "report"} <= commands


def test_the_train_commands_reach_the_configs_they_document(offline_cli):
    seen = offline_cli(["train", "twister", "--env", "atari/Pong", "--steps", "100000",
                        "--run-dir", "runs/twister-sam", "--wm-optim", "sam", "--rho", "0.1"])
    (run_cfg, agent, agent_cfg), _ = seen["train"]
    assert (run_cfg.env, run_cfg.steps, run_cfg.run_dir) == ("atari/Pong", 100000,
                                                            "runs/twister-sam")
    assert agent == "twister" and agent_cfg.wm_optim.sam.rho == 0.1


@pytest.mark.parametrize("command", [
    "flatworld train tdmpc2 --env dmc/walker-walk --no-such-flag 1",
    "flatworld train dreamer --env dmc/walker-walk --model-size XXL",
    "flatworld train tdmpc2 --env dmc/no-such-task",
    "flatworld eval",
])
def test_a_wrong_documented_command_fails(command, offline_cli):
    (argv,) = [flatworld_argv(words) for words in shell_commands(f"```bash\n{command}\n```\n")]
    with pytest.raises(AssertionError):
        offline_cli(argv)


def test_shell_blocks_join_continuations_and_drop_comments():
    text = ("```bash\nOMP_NUM_THREADS=1 flatworld train tdmpc2 \\\n    --steps 5  # tiny\n"
            "python -m flatworld envs\nmake venv\n```\n```python\nflatworld = 1\n```\n")
    argvs = [flatworld_argv(words) for words in shell_commands(text)]
    assert argvs == [["train", "tdmpc2", "--steps", "5"], ["envs"], None]
