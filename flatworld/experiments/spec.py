"""Sweep specs: a YAML file (or a preset) naming the agent, tasks, seeds, budget, common
overrides and a grid; validated whole before anything runs, then expanded into runs.

    name: cartpole-sam            # optional ([A-Za-z0-9._-]); the default folder is sweeps/<name>
    agent: tdmpc2                 # a key of flatworld.agents.AGENTS (or a list: an axis)
    tasks: [dmc/cartpole-swingup] # env ids, or the name of a set (flatworld envs --set)
    seeds: [1, 2, 3]              # a list, or a count n for seeds 1..n
    steps: 50000                  # agent steps per run (env steps / action repeat)
    overrides: {model_size: 1}    # any config field, for every run
    grid:                         # a mapping of field -> values (their product), or a
      wm_optim: [adam, sam]       # list of such mappings (the union of their products)
      rho: [0.01, 0.05]
    resources: {num_cpus: 1, num_gpus: 0, threads: 1}   # per run
    max_attempts: 2               # a run that keeps failing is reported, not retried forever

A key names a field wherever it lives:
- ``wm_optim``: ``adam`` or ``sam`` (the world-model optimizer; SAM wraps the agent's base);
- a field of ``flatworld.optim.SamSpec`` (``rho``, ``adaptive``, ``when``, ...): SAM's
  settings; on points where ``wm_optim`` is adam they do not apply and are dropped (the
  Adam point is then run once, not once per rho);
- ``wm_<field>`` for a field of ``flatworld.optim.OptimSpec`` (``wm_lr``, ``wm_weight_decay``);
- a field of ``flatworld.runs.RunConfig`` (``eval_every``, ``device``, ``env_options``, ...;
  not ``env``, ``seed``, ``run_dir`` or ``steps``, which the spec sets);
- a field of the agent's config dataclass (``model_size``, ``sam_scope``, ...).
Prefixes pick a place explicitly: ``sam.rho``, ``wm.lr``, ``run.device``, ``agent.rho``
(TD-MPC2's temporal weight, which a bare ``rho`` would not reach).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_KEYS = {
    "name": "a short name (the default sweep folder is sweeps/<name>)",
    "description": "free text",
    "agent": "an agent name or a list of them",
    "tasks": "a list of env ids, or the name of an env set",
    "seeds": "a list of ints >= 0, or a count n (seeds 1..n)",
    "steps": "agent steps per run, an int >= 1",
    "overrides": "a mapping of field -> value for every run",
    "grid": "a mapping of field -> list of values, or a list of such mappings",
    "resources": "per-run num_cpus, num_gpus, threads",
    "max_attempts": "an int >= 1",
}
RESOURCE_KEYS = ("num_cpus", "num_gpus", "threads")
SPEC_SET = {"env": "tasks", "seed": "seeds", "run_dir": "the sweep (one folder per run)",
            "steps": "the top-level 'steps'"}  # fmt: skip
WM_OPTIMS = ("adam", "sam")
# Sweep names and run ids: safe in shell globs and every tool, and a name never climbs out of
# sweeps/ ('..').
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
PRESETS_DIR = Path(__file__).parent / "presets"


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the key and what is accepted."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: a task, a grid point and a seed."""

    run_id: str  # the run folder, relative to the sweep folder
    task: str
    seed: int
    agent: str
    point: dict[str, Any]  # the grid values that name it (SAM fields dropped for Adam)
    label: str  # the point as a short legend label
    steps: int
    run_cfg: Any = None  # RunConfig; None when the agent is not installed
    agent_cfg: Any = None


@dataclass
class Spec:
    name: str
    agents: list[str]
    tasks: list[str]
    seeds: list[int]
    steps: int
    overrides: dict[str, Any]
    grid: list[dict[str, list[Any]]]
    resources: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 2
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # as written, stored in the sweep folder

    @property
    def grid_keys(self) -> list[str]:
        keys: list[str] = ["agent"] if len(self.agents) > 1 else []
        for block in self.grid:
            keys += [k for k in block if k not in keys]
        return keys


# -- presets ---------------------------------------------------------------------------------
def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def preset_path(name: str) -> Path:
    found = presets()
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SpecError(f"preset {name!r} not found{hint}; accepted: {sorted(found)}")
    return found[name]


# -- parsing ---------------------------------------------------------------------------------
def load_spec(source: str | Path | dict[str, Any], name: str = "", check: bool = True) -> Spec:
    """Parse and check a spec's shape (a YAML path, or a dict), and (`check`) that its name
    is a safe folder name and its agents and tasks exist and can work together
    (`check_names`). Field values are checked later, against the configs, by
    `expand(..., check=True)`."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"spec file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SpecError(f"{path}: not valid YAML: {err}") from None
        name = name or path.stem
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: expected a mapping of {sorted(TOP_KEYS)}")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise SpecError(_unknown_msg("spec", unknown[0], list(TOP_KEYS)))
    for key in ("agent", "tasks", "seeds", "steps", "grid"):
        if key not in raw:
            raise SpecError(f"spec: missing {key!r}; accepted: {TOP_KEYS[key]}")

    agents = raw["agent"] if isinstance(raw["agent"], list) else [raw["agent"]]
    if not agents or not all(isinstance(a, str) and a for a in agents):
        raise SpecError(f"agent={raw['agent']!r}; accepted: {TOP_KEYS['agent']}")
    tasks = _tasks(raw["tasks"])
    seeds = _seeds(raw["seeds"])
    steps = raw["steps"]
    if not _is_int(steps) or steps < 1:
        raise SpecError(f"steps={steps!r}; accepted: {TOP_KEYS['steps']}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SpecError(f"overrides={overrides!r}; accepted: {TOP_KEYS['overrides']}")
    grid = _grid(raw["grid"])
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise SpecError(f"resources={resources!r}; accepted: a mapping of {RESOURCE_KEYS}")
    for k, v in resources.items():
        if k not in RESOURCE_KEYS:
            raise SpecError(_unknown_msg("resources", k, list(RESOURCE_KEYS)))
        ok = (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
              and (k != "threads" or (_is_int(v) and v >= 1)) and (k != "num_cpus" or v > 0))
        if not ok and not (k == "threads" and v is None):
            accepted = "an int >= 1" if k == "threads" else (
                "a number > 0" if k == "num_cpus" else "a number >= 0 (a GPU fraction)")
            raise SpecError(f"resources.{k}={v!r}; accepted: {accepted}")
    attempts = raw.get("max_attempts", 2)
    if not _is_int(attempts) or attempts < 1:
        raise SpecError(f"max_attempts={attempts!r}; accepted: {TOP_KEYS['max_attempts']}")
    spec_name = str(raw.get("name") or _slug(name) or "sweep")
    # the default sweep folder is sweeps/<name>: a new spec's name must not leave it (a stored
    # spec, read with check=False, is only read)
    if check and (not SAFE_NAME.fullmatch(spec_name) or set(spec_name) == {"."}):
        raise SpecError(f"name={spec_name!r}; accepted: letters, digits, '.', '_' and '-' "
                        "(not '.' or '..'), e.g. cartpole-sam")  # fmt: skip
    spec = Spec(name=spec_name, agents=agents, tasks=tasks, seeds=seeds, steps=steps,
                overrides=dict(overrides), grid=grid, resources=dict(resources),
                max_attempts=attempts, description=str(raw.get("description") or ""), raw=raw)
    if check:
        check_names(spec)
    return spec


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _unknown_msg(where: str, key: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(str(key), accepted, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{where}: unknown key {key!r}{hint}; accepted: {', '.join(accepted)}"


def _tasks(tasks: Any) -> list[str]:
    if isinstance(tasks, str):
        from flatworld.envs import ENV_SETS

        if tasks in ENV_SETS:
            return list(ENV_SETS[tasks])
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks:
        raise SpecError(f"tasks={tasks!r}; accepted: {TOP_KEYS['tasks']}")
    for t in tasks:
        if not isinstance(t, str) or "/" not in t:
            raise SpecError(f"tasks: {t!r} is not an env id; accepted: '<suite>/<task>', e.g. "
                            "'dmc/walker-walk' (flatworld envs)")  # fmt: skip
    if len(set(tasks)) != len(tasks):
        raise SpecError(f"tasks={tasks!r}: a task is listed twice")
    return list(tasks)


def _seeds(seeds: Any) -> list[int]:
    if _is_int(seeds) and seeds >= 1:
        return list(range(1, seeds + 1))
    if (not isinstance(seeds, list) or not seeds
            or not all(_is_int(s) and s >= 0 for s in seeds)):  # fmt: skip
        raise SpecError(f"seeds={seeds!r}; accepted: {TOP_KEYS['seeds']}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds={seeds!r}: a seed is listed twice")
    return list(seeds)


def _grid(grid: Any) -> list[dict[str, list[Any]]]:
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks or not all(isinstance(b, dict) for b in blocks):
        raise SpecError(f"grid={grid!r}; accepted: {TOP_KEYS['grid']}, e.g. "
                        "{wm_optim: [adam, sam], rho: [0.01, 0.05]}")  # fmt: skip
    out = []
    for b in blocks:
        if not b:
            raise SpecError("grid is empty; accepted: at least one field with one or more "
                            "values, e.g. {wm_optim: [adam, sam]}")  # fmt: skip
        block = {}
        for k, values in b.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise SpecError(f"grid.{k} is empty; accepted: a list of one or more values")
            block[str(k)] = values
        out.append(block)
    return out


# -- where a key lives -----------------------------------------------------------------------
def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def resolve_key(key: str, agent_cls: type | None) -> tuple[str, str]:
    """(place, field) for a spec key; place is wm_optim | sam | wm | run | agent."""
    from flatworld.optim import OptimSpec, SamSpec
    from flatworld.runs import RunConfig

    if key == "wm_optim":
        return "wm_optim", ""
    sam_f, wm_f = _fields(SamSpec), [f for f in _fields(OptimSpec) if f != "sam"]
    run_f = [f for f in _fields(RunConfig) if f not in SPEC_SET]
    agent_f = [f for f in _fields(agent_cls) if f != "wm_optim"] if agent_cls else []
    place, _, name = key.partition(".")
    if name:
        table = {"sam": sam_f, "wm": wm_f, "run": run_f, "agent": agent_f}
        if place not in table:
            raise SpecError(f"key {key!r}: unknown prefix {place!r}; accepted: sam., wm., run., "
                            "agent.")  # fmt: skip
        if agent_cls is None and place == "agent":
            return "agent", name  # checked once the agent is installed
        if name not in table[place]:
            raise SpecError(_unknown_msg(f"{place} fields", name, table[place]))
        return place, name
    if key in SPEC_SET:
        raise SpecError(f"key {key!r} is set by {SPEC_SET[key]}, not by overrides or grid")
    if key in sam_f:
        return "sam", key
    if key.startswith("wm_") and key[3:] in wm_f:
        return "wm", key[3:]
    if key in run_f:
        return "run", key
    if agent_cls is None:
        return "agent", key  # the agent is not installed: its fields cannot be checked here
    if key in agent_f:
        return "agent", key
    accepted = (["wm_optim"] + sam_f + [f"wm_{f}" for f in wm_f] + run_f + agent_f)
    raise SpecError(_unknown_msg("key", key, accepted))


# -- expansion -------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict | list):
        return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return str(v)


def _slug(text: str) -> str:
    """Only [A-Za-z0-9._-]: every other character becomes '-'."""
    return "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in text)


def _legacy_slug(text: str) -> str:
    """The run ids of sweeps written before ids were restricted to [A-Za-z0-9._-]."""
    return "".join(c if c.isalnum() or c in "=,.+-_" else "-" for c in text)


def point_id(point: dict[str, Any]) -> str:
    """A grid point as a folder name: values of wm_optim and agent bare, other fields as
    key-value, joined by '_' (``sam_rho-0.05``)."""
    parts = [_fmt(v) if k in ("wm_optim", "agent") else f"{k}-{_fmt(v)}"
             for k, v in point.items()]
    return _slug("_".join(parts)) or "default"


def run_ids(task: str, point: dict[str, Any], seed: int) -> tuple[str, str]:
    """(the run id, the id the same run had before ids were restricted)."""
    legacy = _legacy_slug(point_label(point).replace(", ", ","))
    return (f"{_slug(task.replace('/', '-'))}/{point_id(point)}-s{seed}",
            f"{_legacy_slug(task.replace('/', '-'))}/{legacy}-s{seed}")


def point_label(point: dict[str, Any]) -> str:
    parts = [_fmt(v) if k in ("wm_optim", "agent") else f"{k}={_fmt(v)}"
             for k, v in point.items()]
    return ", ".join(parts) or "default"


def points(spec: Spec) -> list[dict[str, Any]]:
    """Grid points in order, SAM-only fields dropped where wm_optim is adam, duplicates once."""
    from flatworld.optim import SamSpec

    sam_f = set(_fields(SamSpec))
    out: list[dict[str, Any]] = []
    for agent in spec.agents:
        for block in spec.grid:
            for combo in itertools.product(*block.values()):
                point = dict(zip(block, combo, strict=True))
                if "wm_optim" in point:  # first in names and labels, wherever it was written
                    point = {"wm_optim": point["wm_optim"], **point}
                wm = point.get("wm_optim", spec.overrides.get("wm_optim"))
                if wm == "adam":
                    point = {k: v for k, v in point.items()
                             if k.removeprefix("sam.") not in sam_f or k == "wm_optim"}
                if len(spec.agents) > 1:
                    point = {"agent": agent, **point}
                if point not in out:
                    out.append(point)
    return out


def _agent_of(spec: Spec, point: dict[str, Any]) -> str:
    return point.get("agent", spec.agents[0])


def expand(spec: Spec, out: Path | None = None, check: bool = True) -> list[Run]:
    """Every run of the spec (task x grid point x seed), with its configs built and validated
    (`check`): an error names the key and what is accepted. Agents that are not installed
    give runs without configs (their fields cannot be checked here)."""
    from flatworld.agents import AGENTS

    out = Path(out) if out is not None else Path(".")
    pts = points(spec)
    used_sam = any(p.get("wm_optim", spec.overrides.get("wm_optim")) == "sam" for p in pts)
    for key in [*spec.overrides, *spec.grid_keys]:
        if key == "agent":
            continue
        # With several agents, an agent field needs to be a field of one of them (it is set
        # on those that have it).
        errors = []
        for agent in spec.agents:
            entry = AGENTS.get(agent)
            try:
                place, _ = resolve_key(key, entry.config_cls if entry else None)
            except SpecError as err:
                errors.append(err)
                continue
            if place == "sam" and not used_sam:
                raise SpecError(f"key {key!r} is a SAM setting, but no grid point uses "
                                "wm_optim: sam; accepted: add sam to grid.wm_optim")  # fmt: skip
        if len(errors) == len(spec.agents):
            raise errors[0]
    for key, v in [*spec.overrides.items(),
                   *[(k, v) for b in spec.grid for k, vs in b.items() for v in vs]]:
        if key == "wm_optim" and v not in WM_OPTIMS:
            raise SpecError(f"wm_optim={v!r}; accepted: {', '.join(WM_OPTIMS)}")
        if key == "agent":
            raise SpecError("key 'agent' belongs at the top level (a list makes it an axis)")
    runs = []
    for task in spec.tasks:
        for point in pts:
            agent = _agent_of(spec, point)
            label = point_label(point)
            for seed in spec.seeds:
                run_id, legacy = run_ids(task, point, seed)
                # A sweep folder written before ids were restricted keeps its run folders:
                # the same runs, found under their old names (never run again under new ones).
                if legacy != run_id and (out / legacy).is_dir() and not (out / run_id).exists():
                    run_id = legacy
                run_cfg = agent_cfg = None
                if agent in AGENTS:
                    run_cfg, agent_cfg = build_configs(spec, agent, task, point, seed,
                                                       str((out / run_id).absolute()), check)
                runs.append(Run(run_id, task, seed, agent, {k: v for k, v in point.items()},
                                label, spec.steps, run_cfg, agent_cfg))
    seen: dict[str, str] = {}
    for r in runs:
        if r.run_id in seen:
            raise SpecError(f"grid points [{seen[r.run_id]}] and [{r.label}] give the same run "
                            f"folder {r.run_id!r}; accepted: values that differ in "
                            "[A-Za-z0-9._-]")  # fmt: skip
        seen[r.run_id] = r.label
    return runs


def build_configs(spec: Spec, agent: str, task: str, point: dict[str, Any], seed: int,
                  run_dir: str, check: bool = True) -> tuple[Any, Any]:
    """The RunConfig and the agent config of one run."""
    from flatworld.agents import AGENTS
    from flatworld.optim import SamSpec
    from flatworld.runs import RunConfig
    from flatworld.runs.config import from_dict
    from flatworld.runs.folder import config_dict

    cls = AGENTS[agent].config_cls
    values = {**spec.overrides, **{k: v for k, v in point.items() if k != "agent"}}
    where = f"task {task}, point [{point_label(point)}]"
    run_kw: dict[str, Any] = {}
    agent_kw: dict[str, Any] = {}
    sam_kw: dict[str, Any] = {}
    wm_kw: dict[str, Any] = {}
    wm_choice = None
    for key, v in values.items():
        try:
            place, name = resolve_key(key, cls)
        except SpecError:
            if len(spec.agents) > 1:
                continue  # a field of another agent of the spec (checked in expand)
            raise
        if place == "wm_optim":
            wm_choice = v
        else:
            {"run": run_kw, "agent": agent_kw, "sam": sam_kw, "wm": wm_kw}[place][name] = v
    try:
        run_cfg = from_dict(RunConfig, {**config_dict(RunConfig()), **run_kw, "env": task,
                                        "seed": seed, "steps": spec.steps, "run_dir": run_dir})
        base = config_dict(cls())
        wm = dict(base["wm_optim"])
        wm.update(wm_kw)
        if wm_choice is None:
            wm_choice = "sam" if wm.get("sam") else "adam"
        if wm_choice == "sam":
            wm["sam"] = {**(wm.get("sam") or config_dict(SamSpec())), **sam_kw}
        else:
            wm["sam"] = None
        make = getattr(cls, "from_dict", None)
        d = {**base, **agent_kw, "wm_optim": wm}
        agent_cfg = make(d) if make is not None else from_dict(cls, d)
        if check:
            run_cfg.validate()
            if hasattr(agent_cfg, "validate"):
                agent_cfg.validate()
    except (ValueError, TypeError) as err:
        raise SpecError(f"{where}: {err}") from None
    return run_cfg, agent_cfg


# -- what is installed -----------------------------------------------------------------------
def missing(spec: Spec) -> list[str]:
    """Why the spec cannot run here: agents not registered, suites not installed."""
    from flatworld.agents import AGENTS
    from flatworld.envs import list_envs

    why = []
    for a in spec.agents:
        if a not in AGENTS:
            why.append(f"agent {a!r} is not registered (registered agents: {sorted(AGENTS)})")
    suites = list_envs()
    for s in dict.fromkeys(t.split("/", 1)[0] for t in spec.tasks):
        if s not in suites:
            why.append(f"suite {s!r} is unknown; accepted: {sorted(suites)}")
        elif not suites[s].available:
            why.append(f"suite {s!r} is not installed: {suites[s].requires}")
    return why


def check_names(spec: Spec) -> None:
    """Unknown agents, unknown task ids (of installed suites) and agent/task pairs that
    cannot work (an agent of continuous actions on a discrete env) fail here, one line each,
    before anything is written."""
    from flatworld.agents import AGENTS

    for a in spec.agents:
        if a not in AGENTS:
            close = difflib.get_close_matches(a, list(AGENTS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SpecError(f"agent: unknown agent {a!r}{hint}; accepted: "
                            f"{', '.join(sorted(AGENTS))}")  # fmt: skip
    check_tasks(spec)
    for task in spec.tasks:
        kind = action_kind(task)
        for a in spec.agents:
            if kind is not None and kind not in AGENTS[a].action_kinds:
                able = sorted(n for n, e in AGENTS.items() if kind in e.action_kinds)
                raise SpecError(f"agent {a!r} cannot run {task!r}: it has {kind} actions and "
                                f"{a} supports {' and '.join(AGENTS[a].action_kinds)} actions "
                                f"only; accepted for {task}: {', '.join(able)}")  # fmt: skip


def action_kind(task: str) -> str | None:
    """'continuous' or 'discrete' for a task id, without building its env where the suite
    says (dmc and humanoidbench: continuous; atari: discrete); gym tasks are looked up in
    gymnasium's registry. None when it cannot be known here."""
    suite, name = task.split("/", 1)
    if suite in ("dmc", "humanoidbench"):
        return "continuous"
    if suite == "atari":
        return "discrete"
    if suite == "gym":
        import gymnasium as gym

        if name not in gym.envs.registry:
            return None
        env = gym.make(name)
        try:
            return "discrete" if isinstance(env.action_space, gym.spaces.Discrete) \
                else "continuous"
        finally:
            env.close()
    return None


def check_tasks(spec: Spec) -> None:
    """Unknown task ids fail here, with close matches, before any run starts (suites that
    are installed only)."""
    from flatworld.envs import list_envs

    suites = list_envs()
    for task in spec.tasks:
        suite, name = task.split("/", 1)
        if suite not in suites or not suites[suite].available:
            continue
        if not _known_task(suite, name, suites[suite].ids):
            close = difflib.get_close_matches(task, suites[suite].ids, n=3, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise SpecError(f"tasks: unknown env id {task!r}{hint} (flatworld envs lists them)")


def _known_task(suite: str, name: str, ids: tuple[str, ...]) -> bool:
    from flatworld.envs import atari, dmc

    if suite == "dmc":
        return dmc.resolve(name) is not None
    if suite == "atari":
        return atari.resolve(name) is not None
    if suite == "gym":
        import gymnasium as gym

        return name in gym.envs.registry
    return f"{suite}/{name}" in ids
