"""The run config, and dict <-> dataclass conversion for configs stored in config.yaml."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Rebuild dataclass `cls` from `dataclasses.asdict` output (e.g. read back from YAML).

    Nested dataclass fields, `X | None` of a dataclass, and tuples (YAML gives lists) are
    rebuilt from their type hints. Unknown keys are an error: they mean the config changed.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; accepted: {sorted(names)}")
    return cls(**{k: _convert(hints[k], v) for k, v in d.items()})


def pos_int(x: Any) -> bool:
    """An int >= 1 (and not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # Optional[Dataclass] (or a union holding one): rebuild the dataclass from a dict.
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(value, dict):
            for a in args:
                if dataclasses.is_dataclass(a):
                    return from_dict(a, value)
        for a in args:
            if typing.get_origin(a) is tuple and isinstance(value, list | tuple):
                return _convert(a, value)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if origin is list and isinstance(value, list | tuple):
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
WANDB_PIP = "pip install 'flatworld[wandb]'"
# Evaluation and diagnostics every this many steps unless set, rounded up to a multiple of
# log_every so that each lands on a metrics row.
EVERY = 10_000


@dataclass
class RunConfig:
    """One online training run. Step counts are agent steps (env steps / action repeat)."""

    env: str = "dmc/walker-walk"
    env_options: dict[str, Any] = field(default_factory=dict)  # passed to flatworld.envs.make
    seed: int = 1
    steps: int = 100_000
    # random-action steps; None: the agent's rule (TD-MPC2: max(1000, 5 * episode length))
    seed_steps: int | None = None
    # When seeding ends, run as many updates as there were seed steps, in one burst (the
    # published TD-MPC2 trainer does). None: the agent's published default (agent.seed_burst).
    seed_burst: bool | None = field(default=None, metadata={
        "help": "default: the agent's published schedule (tdmpc2: on)"})
    buffer_size: int | None = None  # replay capacity in steps; None: all steps of the run
    eval_every: int | None = field(default=None, metadata={
        "help": f"default: {EVERY}, rounded up to a multiple of --log-every"})
    eval_episodes: int = 10  # 0: no evaluation
    final_eval_episodes: int | None = field(default=None, metadata={
        "help": "episodes of the evaluation at the last step, the run's score. Default: the "
                "suite's published protocol (atari: 100, others: 10)"})
    video_every: int = field(default=0, metadata={
        "help": "write the first evaluation episode as run_dir/videos/step-N.mp4 every this "
                "many steps, a multiple of --eval-every (needs the video extra). Default: 0, "
                "no video"})
    diag_every: int | None = field(default=None, metadata={
        "help": "world-model sharpness and the SAM bound on windows of the latest evaluation's "
                f"episodes (held out: never in the replay). Default: {EVERY}, rounded up to a "
                "multiple of --log-every"})
    diag_rho: float = field(default=0.05, metadata={
        "help": "the radius at which diagnostics measure world-model sharpness and the SAM "
                "bound, the same for every arm whatever its own --rho. Default: 0.05"})
    lambda_max: bool = False  # also log lambda_max of the world-model Hessian (slow)
    checkpoint_every: int = 50_000  # rounded up to the next episode end
    time_limit_s: float | None = field(default=None, metadata={
        "help": "stop at the first episode end after this many seconds of this invocation, "
                "with a checkpoint; `flatworld train --resume RUN` goes on (for job time "
                "limits on clusters). Default: none"})
    log_every: int = 1_000
    run_dir: str = field(default="", metadata={
        "help": "default: runs/<agent>-<optimizer>-<env>-s<seed>"})
    device: str = "cpu"
    tensorboard: bool = True
    wandb_project: str = field(default="", metadata={
        "help": "also log to this Weights & Biases project (needs the wandb extra; "
                "WANDB_MODE=offline logs without an account). Default: off"})

    def __post_init__(self) -> None:
        # Only defaults are rounded: a value the user set is checked by validate().
        log_every = self.log_every if pos_int(self.log_every) else 1
        for name in ("eval_every", "diag_every"):
            if getattr(self, name) is None:
                setattr(self, name, -(-EVERY // log_every) * log_every)

    def validate(self) -> RunConfig:
        def need(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                raise ValueError(f"RunConfig.{name}={getattr(self, name)!r}: expected {accepted}")

        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
            need(ok, name, f"an int >= {minimum}")

        need(
            isinstance(self.env, str) and "/" in self.env,
            "env",
            "'<suite>/<task>', e.g. 'dmc/walker-walk' (flatworld.envs.list_envs())",
        )
        need(isinstance(self.env_options, dict), "env_options", "a dict of make() options")
        pos_int("seed", 0)
        for name in ("steps", "eval_every", "diag_every", "checkpoint_every", "log_every"):
            pos_int(name)
        pos_int("eval_episodes", 0)
        if self.final_eval_episodes is not None:
            pos_int("final_eval_episodes")
        pos_int("video_every", 0)
        need(self.video_every % self.eval_every == 0, "video_every",
             f"0 or a multiple of eval_every={self.eval_every} (videos are of evaluation "
             "episodes)")
        if self.video_every:
            import importlib.util

            from flatworld.envs.video import VIDEO_PIP

            need(all(importlib.util.find_spec(m) for m in ("imageio", "imageio_ffmpeg")),
                 "video_every", f"0 here: writing video needs imageio-ffmpeg ({VIDEO_PIP})")
        if self.seed_steps is not None:
            pos_int("seed_steps", 0)
        if self.buffer_size is not None:
            pos_int("buffer_size")
        for name in ("eval_every", "diag_every"):
            need(
                getattr(self, name) % self.log_every == 0,
                name,
                f"a multiple of log_every={self.log_every} (each lands on a metrics row)",
            )
        limit = self.time_limit_s
        need(limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool)
                               and math.isfinite(limit) and limit > 0),
             "time_limit_s", "None or a number of seconds > 0")  # fmt: skip
        need(isinstance(self.diag_rho, (int, float)) and not isinstance(self.diag_rho, bool)
             and math.isfinite(self.diag_rho) and self.diag_rho > 0, "diag_rho",
             "a finite number > 0")  # fmt: skip
        need(isinstance(self.lambda_max, bool), "lambda_max", "True or False")
        need(self.seed_burst in (None, True, False), "seed_burst",
             "None (the agent's default), True or False")  # fmt: skip
        need(isinstance(self.tensorboard, bool), "tensorboard", "True or False")
        need(isinstance(self.run_dir, str), "run_dir", "a path string ('' for the default)")
        need(isinstance(self.wandb_project, str), "wandb_project",
             "a project name ('' for no Weights & Biases logging)")
        if self.wandb_project:
            import importlib.util

            need(importlib.util.find_spec("wandb") is not None, "wandb_project",
                 f"'' here: wandb is not installed ({WANDB_PIP})")
        check_device_name(self.device, "RunConfig.device")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return from_dict(cls, d)


def check_device_name(device: Any, name: str = "device") -> None:
    """A device string torch would take: 'cpu', 'cuda', 'cuda:<n>' or 'mps'."""
    if not (isinstance(device, str) and _DEVICE.match(device)):
        raise ValueError(f"{name}={device!r}: expected 'cpu', 'cuda', 'cuda:<n>' or 'mps'")


def default_run_dir(cfg: RunConfig, agent_name: str, agent_cfg: Any) -> Path:
    """runs/<agent>-<optimizer>-<env>-s<seed>, so the runs of an Adam/SAM pair (or of two
    agents) on one task and seed get folders of their own."""
    wm_optim = getattr(agent_cfg, "wm_optim", None)
    optimizer = "sam" if getattr(wm_optim, "sam", None) else getattr(wm_optim, "base", "adam")
    env = _UNSAFE.sub("-", cfg.env).strip("-")
    return Path("runs") / f"{agent_name}-{optimizer}-{env}-s{cfg.seed}"


def check_seeding(steps: int, seed_steps: int) -> None:
    """Refuse a run that ends before its seeding phase does: it would only take random
    actions and never update the agent."""
    if steps < seed_steps:
        raise ValueError(
            f"steps={steps} is shorter than the seeding phase (seed_steps={seed_steps} random "
            "actions before the first update): the run would never train. Give more --steps, "
            "fewer --seed-steps, or --seeding-only to run it anyway")


CONFIG_KEYS = ("flatworld_version", "run", "agent")
AGENT_KEYS = ("name", "config")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The document of a config file laid out as a run folder's config.yaml
    (``run: {...}``, ``agent: {name, config: {...}}``), every key optional; read with
    yaml.safe_load, so a tag that would build a Python object is refused. Errors are one line
    naming the file and, for YAML errors, the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"config file {path}: {err.strerror or err}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not a valid config file ({problem})") from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with keys {', '.join(CONFIG_KEYS)}, "
                         f"found {type(doc).__name__}")
    _known_keys(doc, CONFIG_KEYS, str(path))
    for key in ("run", "agent"):
        if not isinstance(doc.get(key, {}), dict):
            raise ValueError(f"{path}: {key!r} must be a mapping, found "
                             f"{type(doc[key]).__name__}")
    _known_keys(doc.get("agent", {}), AGENT_KEYS, f"{path}: agent")
    _known_keys(doc.get("run", {}), tuple(f.name for f in dataclasses.fields(RunConfig)),
                f"{path}: run")
    return doc


def _known_keys(d: dict[str, Any], accepted: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in accepted:
            raise ValueError(f"{where}: unknown key {key!r}; accepted: {', '.join(accepted)}")
