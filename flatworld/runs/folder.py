"""A run folder and its config: where a run lives, what `config.yaml` holds, and the checks
every config passes before anything is written."""

from __future__ import annotations

import dataclasses
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from flatworld.runs.checkpoint import atomic_write_text, list_checkpoints
from flatworld.runs.config import RunConfig, default_run_dir, from_dict, read_config_file
from flatworld.runs.protocol import AgentEntry, Agents


class ConfigMismatchError(ValueError):
    """A run folder holds a run whose stored config differs from the requested one."""


class LockedError(BlockingIOError):
    """Another process holds the lock: it is running the same run."""


def agent_entry(agents: Agents, name: str) -> AgentEntry:
    """The entry of agent `name`, or a ValueError naming the accepted ones."""
    if name not in agents:
        raise ValueError(f"agent={name!r}: expected one of {sorted(agents)}")
    return agents[name]


def check_device(device: str) -> None:
    """Fail before anything runs when `device` is not usable on this machine."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU seen"
            raise ValueError(f"device={device!r}: CUDA is not available here ({why}, torch "
                             f"{torch.__version__}); accepted here: 'cpu'")  # fmt: skip
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps': MPS is not available here; accepted here: 'cpu'")


def resolve_episodic(env_id: str, agent_cfg: Any) -> Any:
    """The agent config with `episodic` set from the env suite when left None.

    Forcing it off on a suite whose tasks terminate is refused: the value targets would
    bootstrap through terminal states (the published TD-MPC2 trainer refuses it too).
    """
    from flatworld.envs import terminates

    if not hasattr(agent_cfg, "episodic"):
        return agent_cfg
    can_terminate = terminates(env_id)
    if agent_cfg.episodic is None:
        return dataclasses.replace(agent_cfg, episodic=can_terminate)
    if agent_cfg.episodic is False and can_terminate:
        raise ValueError(
            f"episodic=False, but {env_id} can terminate (its episodes end when the agent "
            "fails, not only at the time limit); with episodic off the value targets would "
            "bootstrap through terminal states. Leave episodic unset, so it follows the suite, "
            "or pass --episodic."
        )
    return agent_cfg


def checked_configs(run_cfg: RunConfig, agent_name: str, agent_cfg: Any,
                    agents: Agents) -> Any:  # fmt: skip
    """Validate both configs and the device; returns the agent config with the suite's
    `episodic` filled in. Reads and writes nothing."""
    run_cfg.validate()
    entry = agent_entry(agents, agent_name)
    if not isinstance(agent_cfg, entry.config_cls):
        raise ValueError(
            f"agent_cfg: expected a {entry.config_cls.__name__} for agent "
            f"{agent_name!r}, got {type(agent_cfg).__name__}"
        )
    agent_cfg = resolve_episodic(run_cfg.env, agent_cfg)
    if hasattr(agent_cfg, "for_env"):  # fields the agent leaves to the suite (train ratio)
        agent_cfg = agent_cfg.for_env(run_cfg.env)
    if hasattr(agent_cfg, "validate"):
        agent_cfg.validate()
    check_device(run_cfg.device)
    return agent_cfg


def with_agent_env_defaults(run_cfg: RunConfig, agent_cfg: Any) -> RunConfig:
    """`run_cfg` with the env options the agent's published runs used on its suite (the agent
    config's `env_defaults(env_id)`, e.g. pixels for TWISTER on DMC) under the run's own."""
    if not hasattr(agent_cfg, "env_defaults"):
        return run_cfg
    defaults = agent_cfg.env_defaults(run_cfg.env)
    return dataclasses.replace(run_cfg, env_options={**defaults, **run_cfg.env_options})


# -- where a run lives ------------------------------------------------------------------------
def run_dir_of(cfg: RunConfig, agent_name: str, agent_cfg: Any) -> Path:
    """`cfg.run_dir`, or `runs/<agent>-<optimizer>-<env>-s<seed>` when it is not set."""
    return Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, agent_name, agent_cfg)


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").exists() or bool(list_checkpoints(run_dir / "checkpoints"))


@contextmanager
def exclusive(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (made if missing) for the block, or raise
    LockedError naming `what` when another process holds it. The operating system lets the
    lock go when its holder dies, so a killed run never leaves its folder locked."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{what} is being run by another process (it holds "
                              f"{lock_file}); wait for it to stop") from None  # fmt: skip
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def locked_run(run_dir: Path) -> Any:
    """The lock of a run folder, held while a process trains it."""
    return exclusive(run_dir / ".lock", str(run_dir))


# -- config.yaml ------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
    """asdict output with tuples as lists, so yaml.safe_dump can write it."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain dicts, lists and scalars (what config.yaml stores)."""
    return _plain(dataclasses.asdict(cfg))


def write_config(run_dir: Path, run_cfg: RunConfig, agent_name: str, agent_cfg: Any) -> None:
    from flatworld import __version__

    doc = {
        "flatworld_version": __version__,
        "run": config_dict(run_cfg),
        "agent": {"name": agent_name, "config": config_dict(agent_cfg)},
    }
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def read_config(run_dir: str | Path, agents: Agents) -> tuple[RunConfig, str, Any]:
    """(run config, agent name, agent config) rebuilt from `run_dir/config.yaml`; the agent's
    config class comes from its entry in `agents`."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a flatworld run folder?")
    doc = read_config_file(path)  # one line naming the file (and the line) when damaged
    agent = doc.get("agent", {})
    if "run" not in doc or "name" not in agent or "config" not in agent:
        raise ValueError(f"{path}: a run folder's config needs run, agent.name and "
                         "agent.config; it is damaged or not a flatworld config")
    run_cfg = RunConfig.from_dict(doc["run"])
    name = doc["agent"]["name"]
    cls = agent_entry(agents, name).config_cls
    make_cfg = getattr(cls, "from_dict", None)
    raw = doc["agent"]["config"]
    agent_cfg = make_cfg(raw) if make_cfg is not None else from_dict(cls, raw)
    return run_cfg, name, agent_cfg


def flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b.c": value} (also used to compare run folders' configs)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(run_dir: str | Path, run_cfg: RunConfig, agent_name: str,
                       agent_cfg: Any, agents: Agents) -> list[str]:  # fmt: skip
    """`field: stored X, requested Y` for every config field that differs from the run's."""
    stored_run, stored_name, stored_agent = read_config(run_dir, agents)
    stored = flat_config({"run": config_dict(stored_run), "agent": stored_name,
                          "config": config_dict(stored_agent)})  # fmt: skip
    wanted = flat_config({"run": config_dict(run_cfg), "agent": agent_name,
                          "config": config_dict(agent_cfg)})  # fmt: skip
    return [f"{k}: stored {stored.get(k)!r}, requested {wanted.get(k)!r}"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
