"""Stops and damage in a run folder: Ctrl-C, damaged replay rows, a full disk, a damaged
config.yaml, two processes on one folder, a finished run. Each ends in one clear line, and
what can go on goes on bit-identical to a run that never stopped."""

from __future__ import annotations

import errno
import signal
import warnings

import pytest
import torch

from flatworld.runs import AgentEntry, evaluate, resume, train
from flatworld.runs.checkpoint import list_checkpoints
from flatworld.runs.folder import LockedError, locked_run
from tests.test_runs import (
    FAKE_AGENTS,
    FakeAgent,
    FakeConfig,
    assert_same_agent,
    final_agent,
    numbers,
    run_cfg,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of test_runs' fake agent and config."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train(run_cfg(run_dir), "fake", FakeConfig(), agents=FAKE_AGENTS, progress=False)
    return run_dir


def pressing_ctrl_c(at_update: int, presses: int) -> dict[str, AgentEntry]:
    """The fake agent, with Ctrl-C pressed `presses` times during its update `at_update`."""

    class Pressing(FakeAgent):
        def update(self, batch):
            out = super().update(batch)
            if self.n == at_update:
                for _ in range(presses):
                    signal.raise_signal(signal.SIGINT)
            return out

    return {"fake": AgentEntry(config_cls=FakeConfig, make=Pressing)}


def test_ctrl_c_stops_at_the_episode_end_with_a_checkpoint(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Update 50 runs at step 79 (seeding ends at step 30); the episode ends at step 80.
    train(run_cfg(run_dir), "fake", FakeConfig(), agents=pressing_ctrl_c(50, 1), progress=False)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [60, 80]
    out = capsys.readouterr().out
    assert f"stopped at step 80; go on with `flatworld train --resume {run_dir}`" in out
    resume(run_dir, agents=FAKE_AGENTS, progress=False)
    assert numbers(run_dir) == numbers(reference)
    assert_same_agent(final_agent(run_dir), final_agent(reference))


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # What SIGINT did before (ignored in a background job, Python's handler in a terminal).
    before = signal.getsignal(signal.SIGINT)
    train(run_cfg(run_dir), "fake", FakeConfig(), agents=pressing_ctrl_c(50, 2), progress=False)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [60]
    out = capsys.readouterr().out
    assert "stopped at step 79 without a checkpoint" in out and "(from step 60)" in out
    assert signal.getsignal(signal.SIGINT) is before  # put back
    resume(run_dir, agents=FAKE_AGENTS, progress=False)
    assert numbers(run_dir) == numbers(reference)


class Payload:
    """Stands for code in a file: loading it with weights_only=True is refused."""


def stopped_run(tmp_path):
    """A run killed at step 130: checkpoints at steps 60 and 100, and a replay rows file for
    each (the second holding only the rows since the first)."""
    run_dir = tmp_path / "run"
    train(run_cfg(run_dir), "fake", FakeConfig(), agents=FAKE_AGENTS, progress=False,
          stop_after=130)  # fmt: skip
    rows = sorted((run_dir / "checkpoints" / "replay").glob("rows_*.pt"))
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [60, 100]
    assert len(rows) == 2
    return run_dir, rows


def test_damaged_replay_rows_fall_back_to_the_checkpoint_before(reference, tmp_path):
    run_dir, (first, second) = stopped_run(tmp_path)
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])  # truncated
    with pytest.warns(RuntimeWarning, match=f"{second.name} do not load .it is truncated"):
        resume(run_dir, agents=FAKE_AGENTS, progress=False)
    assert second.with_name(second.name + ".refused").exists()
    assert (run_dir / "checkpoints" / "step_0000000100.pt.refused").exists()
    assert numbers(run_dir) == numbers(reference)
    assert_same_agent(final_agent(run_dir), final_agent(reference))


def test_replay_rows_no_checkpoint_can_do_without_fail_in_one_line(tmp_path):
    run_dir, (first, _) = stopped_run(tmp_path)
    torch.save({"obs": Payload()}, first)  # both checkpoints need it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as err:
            resume(run_dir, agents=FAKE_AGENTS, progress=False)
    message = str(err.value)
    assert "\n" not in message and str(first) in message and "pickled Python objects" in message
    warned = " ".join(str(w.message) for w in caught)
    assert "refusing checkpoint" in warned
    for text in (message, warned):  # torch's advice would run the payload
        assert "weights_only" not in text and "truncated" not in text


def test_a_refused_checkpoint_with_code_is_not_called_truncated(tmp_path):
    run_dir, _ = stopped_run(tmp_path)
    newest = list_checkpoints(run_dir / "checkpoints")[-1][1]
    torch.save({"step": 100, "agent": Payload()}, newest)
    with pytest.warns(RuntimeWarning) as caught:
        resume(run_dir, agents=FAKE_AGENTS, progress=False, stop_after=140)
    warned = " ".join(str(w.message) for w in caught)
    assert f"refusing checkpoint {newest}: it holds pickled Python objects" in warned
    assert "weights_only" not in warned and "truncated" not in warned


def test_disk_full_while_checkpointing_names_the_file_and_the_intact_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the rows and the checkpoint of step 60 fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OSError) as err:
        train(run_cfg(run_dir), "fake", FakeConfig(), agents=FAKE_AGENTS, progress=False)
    message = str(err.value)
    assert "\n" not in message and "no space left on device while writing" in message
    assert str(run_dir / "checkpoints" / "replay" / "rows_") in message
    assert "the previous checkpoint (step 60) is intact" in message
    monkeypatch.setattr(torch, "save", save)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [60]
    assert not [p for p in (run_dir / "checkpoints").rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("text, says", [
    ("run:\n  steps: [1\n", r"config.yaml, line \d+: not a valid config file"),
    ("run: !!python/object/apply:os.system ['true']\n", "config.yaml, line 1: not a valid"),
    ("just a line\n", "config.yaml: expected a mapping"),
])  # fmt: skip
def test_a_damaged_config_is_one_line_naming_the_file(tmp_path, text, says):
    run_dir = tmp_path / "run"
    train(run_cfg(run_dir, steps=40), "fake", FakeConfig(), agents=FAKE_AGENTS, progress=False)
    (run_dir / "config.yaml").write_text(text)
    for call in (lambda: resume(run_dir, agents=FAKE_AGENTS, progress=False),
                 lambda: evaluate(run_dir, agents=FAKE_AGENTS, episodes=1)):  # fmt: skip
        with pytest.raises(ValueError, match=says) as err:
            call()
        assert "\n" not in str(err.value) and str(run_dir / "config.yaml") in str(err.value)


def test_a_run_folder_in_use_is_refused(tmp_path):
    run_dir, _ = stopped_run(tmp_path)
    with locked_run(run_dir), pytest.raises(LockedError, match="being run by another process"):
        resume(run_dir, agents=FAKE_AGENTS, progress=False)
    resume(run_dir, agents=FAKE_AGENTS, progress=False, stop_after=140)  # free again


def test_resuming_a_finished_run_says_where_its_results_are(reference, capsys):
    before = numbers(reference)
    resume(reference, agents=FAKE_AGENTS, progress=False)
    out = capsys.readouterr().out
    assert f"{reference} is finished (200 steps)" in out
    assert str(reference / "metrics.csv") in out and f"flatworld eval {reference}" in out
    assert numbers(reference) == before
