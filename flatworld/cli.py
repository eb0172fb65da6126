"""flatworld's command line: demo | study | train | eval | envs | sweep | report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

# Agent fields whose flag would clash with a SAM flag get another name.
_RENAMED = {"rho": "horizon-rho"}
_RUN_SKIP = {"env_options"}
_AGENT_SKIP = {"wm_optim"}


def _flag_type(tp: Any) -> Any:
    """The scalar type argparse should parse for a dataclass field type (X | None -> X)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        tp = args[0]
    return tp if tp in (int, float, str, bool) else None


def _add_dataclass_flags(group: Any, cls: type, prefix: str, dest_prefix: str,
                         skip: set[str], renamed: dict[str, str] | None = None) -> list[str]:
    """One --flag per scalar field of ``cls``; unset flags stay None (the default holds)."""
    added = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _flag_type(hints[f.name])
        if f.name in skip or tp is None:
            continue
        name = prefix + (renamed or {}).get(f.name, f.name).replace("_", "-")
        dest = dest_prefix + f.name
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        choices = f.metadata.get("choices")
        # The accepted values and the default, in --help; the configs validate them again.
        help_text = f.metadata.get("help") or f"default: {default}"
        if tp is bool:
            group.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        elif choices:
            group.add_argument(f"--{name}", dest=dest, type=tp, default=None,
                               choices=tuple(choices), help=help_text,
                               metavar="{" + ",".join(map(str, choices)) + "}")
        else:
            group.add_argument(f"--{name}", dest=dest, type=tp, default=None,
                               metavar=tp.__name__, help=help_text)
        added.append(f.name)
    return added


def _given(args: argparse.Namespace, prefix: str, names: list[str]) -> dict[str, Any]:
    out = {}
    for n in names:
        v = getattr(args, prefix + n, None)
        if v is not None:
            out[n] = v
    return out


def _demo(args: argparse.Namespace) -> None:
    from flatworld import demo

    if args.classifier:
        demo.classifier(Path(args.out), steps=args.steps or 1500, seed=args.seed)
    else:
        demo.flagship(Path(args.out), env=args.env, steps=args.steps or 2200, seed=args.seed)


def _study(args: argparse.Namespace) -> None:
    from flatworld.studies import STUDIES, run_study

    if args.name is None:
        for name, study in sorted(STUDIES.items()):
            print(f"{name:15s} {study.summary}")
        return
    report = run_study(args.name, Path(args.out) / args.name, full=args.full, seed=args.seed)
    print(f"report: {report}")


def _envs(args: argparse.Namespace) -> None:
    from flatworld.envs import ENV_SETS, list_envs

    if args.set is not None:
        if args.set not in ENV_SETS:
            raise ValueError(f"unknown env set {args.set!r}; accepted: {sorted(ENV_SETS)}")
        print("\n".join(ENV_SETS[args.set]))
        return
    for suite in list_envs().values():
        note = "" if suite.available else f"  [not installed: {suite.requires}]"
        print(f"{suite.name} ({len(suite.ids)} tasks){note}")
        for env_id in suite.ids:
            print(f"  {env_id}")


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from flatworld import runs
    from flatworld.agents import AGENTS
    from flatworld.runs.config import check_seeding, read_config_file

    if args.resume:
        try:
            print(f"run: {runs.resume(args.resume, agents=AGENTS, progress=not args.no_progress)}")
        except (ValueError, OSError) as err:  # a run-level problem: one line, no traceback
            parser.error(str(err))
        return
    try:
        doc = read_config_file(args.config) if args.config else {}
    except ValueError as err:
        parser.error(str(err))
    named = doc.get("agent", {}).get("name")
    agent = args.agent or named
    if agent is None:
        parser.error(f"train needs an agent (one of {sorted(AGENTS)}), --config FILE naming "
                     "one, or --resume RUN_DIR")
    if agent not in AGENTS:
        parser.error(f"agent={agent!r}; accepted: {sorted(AGENTS)}")
    if agent != args.agent_flags_of:
        parser.error(f"the agent comes first: flatworld train AGENT [options] (found {agent!r} "
                     "after an option, whose flags were read as another agent's)")
    if named is not None and named != agent:
        parser.error(f"{args.config} configures agent {named!r}, not {agent!r}")
    try:
        run_cfg, agent_cfg = _train_configs(args, doc, AGENTS[agent].config_cls)
        if not args.seeding_only:
            check_seeding(run_cfg.steps, _seed_steps(run_cfg, AGENTS[agent], agent_cfg))
    except (ValueError, TypeError, ImportError) as err:
        parser.error(str(err))
    try:
        run_dir = runs.train(run_cfg, agent, agent_cfg, agents=AGENTS,
                             progress=not args.no_progress)
        print(f"run: {run_dir}")
    except (ValueError, OSError, ImportError) as err:  # bad env, device, folder, missing suite
        parser.error(str(err))


def _train_configs(args: argparse.Namespace, doc: dict[str, Any], cls: type) -> tuple[Any, Any]:
    """The run and agent configs: the config file's values (if any), then the flags given."""
    from flatworld import optim, runs
    from flatworld.runs.config import from_dict

    where = f"{args.config}: " if args.config else ""
    try:
        run_cfg = from_dict(runs.RunConfig, {**doc.get("run", {}),
                                             **_given(args, "run_", args.run_fields)})
        raw = doc.get("agent", {}).get("config")
        make = getattr(cls, "from_dict", None) or (lambda d: from_dict(cls, d))
        base = cls() if raw is None else make(raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}{err}") from None
    run_cfg.validate()
    sam_fields = _given(args, "sam_", args.sam_fields)
    if args.rho is not None:
        sam_fields["rho"] = args.rho
    choice = args.wm_optim or ("sam" if base.wm_optim.sam is not None else "adam")
    if choice == "adam" and sam_fields:
        raise ValueError(f"SAM options {sorted(sam_fields)} given with --wm-optim adam; "
                         "use --wm-optim sam")
    sam = None
    if choice == "sam":
        sam = dataclasses.replace(base.wm_optim.sam or optim.SamSpec(), **sam_fields)
    spec_kwargs = {"lr": args.wm_lr} if args.wm_lr is not None else {}
    wm_optim = dataclasses.replace(base.wm_optim, sam=sam, **spec_kwargs)
    agent_cfg = dataclasses.replace(base, wm_optim=wm_optim,
                                    **_given(args, "agent_", args.agent_fields))
    agent_cfg.validate()
    return run_cfg, agent_cfg


def _seed_steps(run_cfg: Any, entry: Any, agent_cfg: Any) -> int:
    """The run's random-action steps: its own, else the agent's rule, which may need the
    env's episode length (the env is built and closed for it)."""
    if run_cfg.seed_steps is not None:
        return run_cfg.seed_steps
    from flatworld.envs import episode_length, make

    env = make(run_cfg.env, seed=run_cfg.seed, **run_cfg.env_options)
    try:
        return entry.seed_steps(agent_cfg, episode_length(env))
    finally:
        env.close()


def _eval(args: argparse.Namespace) -> None:
    from flatworld import runs
    from flatworld.agents import AGENTS

    try:
        result = runs.evaluate(args.run_dir, agents=AGENTS, episodes=args.episodes,
                               seed=args.seed, device=args.device, policy=args.policy,
                               video=args.video, progress=not args.no_progress)
    except (OSError, ImportError) as err:  # a missing folder or extra: one line
        raise ValueError(str(err)) from None
    print(json.dumps(result, indent=1))


def _sweep(args: argparse.Namespace) -> None:
    from flatworld import experiments as ex

    if (args.spec is None) == (args.preset is None):
        raise ValueError("sweep takes a spec file or --preset NAME (one of them); presets: "
                         + ", ".join(ex.presets()))
    spec = ex.load_spec(ex.preset_path(args.preset) if args.preset else args.spec)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers={args.workers}; accepted: an int >= 1")
    out = Path(args.out or Path("sweeps") / spec.name)
    if args.dry_run:
        from flatworld.experiments.costs import estimate

        why = ex.spec.missing(spec)
        runs = ex.expand(spec, out, check=not why)
        print(f"sweep {spec.name}: {len(runs)} runs into {out}/ ({spec.description})")
        for line in why:
            print(f"  NOT INSTALLED: {line}")
        for r in runs:
            print(f"  {r.run_id:58s} {r.task:28s} seed {r.seed}  {r.label}")
        print("\n".join(estimate(runs)))
        return
    result = ex.run_sweep(spec, out, workers=args.workers, ray_address=args.ray,
                          progress=not args.no_progress, retry_failed=args.retry_failed)
    print(f"sweep {out}: {len(result.skipped)} finished before, {len(result.finished)} "
          f"finished now, {len(result.failed)} failed")
    for run_id, why in result.failed.items():
        print(f"FAILED {run_id}: {why}", file=sys.stderr)
    if result.interrupted:
        raise SystemExit(130)
    if result.failed:
        raise SystemExit(1)
    print(f"report: flatworld report {out}")


def _report(args: argparse.Namespace) -> None:
    from flatworld import experiments as ex

    if args.reps < 10:
        raise ValueError(f"--reps={args.reps}; accepted: an int >= 10")
    for d in [args.sweep_dir, *args.run_dirs]:
        if not Path(d).is_dir():
            raise ValueError(f"{d} is not a folder: report takes a sweep folder and/or run "
                             "folders")
    export = None
    if args.export is not None:
        export = Path(args.export or Path(args.out or Path(args.sweep_dir) / "report")
                      / "results.parquet")
    path = ex.report([args.sweep_dir, *args.run_dirs], args.out, title=args.title,
                     reps=args.reps, export=export)
    print(f"report: {path}")
    if export is not None:
        print(f"table: {export}")


def build_parser(agent: str = "tdmpc2") -> argparse.ArgumentParser:
    """The parser; `train`'s agent flags are those of `agent`'s config."""
    parser = argparse.ArgumentParser(prog="flatworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="TD-MPC2 with Adam vs SAM on a small DMC task (~16 min); "
                                     "--classifier: AdamW vs SAM on digits (seconds)")
    p.add_argument("--classifier", action="store_true")
    p.add_argument("--env", default="dmc/cartpole-swingup")
    p.add_argument("--out", default="runs-demo")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_demo)

    p = sub.add_parser("study", help="run one of the flat-minima studies (no NAME: list them)")
    p.add_argument("name", nargs="?")
    p.add_argument("--full", action="store_true", help="the longer version")
    p.add_argument("--out", default="reports")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_study)

    p = sub.add_parser("envs", help="list every suite and task id (--set NAME: a named set)")
    p.add_argument("--set", default=None, metavar="NAME",
                   help="print the ids of a named set, one a line (atari100k, "
                        "humanoidbench-main)")
    p.set_defaults(func=_envs)

    p = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder",
                       description="Evaluate a run's last good checkpoint on fresh seeded "
                                   "episodes; prints the result as JSON.")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=None,
                   help="default: the suite's protocol (atari: 100, others: 10)")
    p.add_argument("--seed", type=int, default=None,
                   help="the episodes' seeds derive from it (default: the run's seed)")
    p.add_argument("--device", default=None, metavar="{cpu,cuda,cuda:N,mps}",
                   help="default: the run's device")
    p.add_argument("--policy", choices=("mode", "sample"), default=None,
                   help="the actor's mode or a sample (dreamer, twister; default: the run's "
                        "eval_policy)")
    p.add_argument("--video", metavar="PATH.mp4", default=None,
                   help="write the first episode as MP4 (needs the video extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "sweep", help="run a sweep spec (tasks x grid x seeds), locally or on Ray",
        usage="flatworld sweep SPEC.yaml | --preset NAME [--out DIR] [--workers N] "
              "[--ray ADDRESS|auto] [--dry-run]",
        description="Run every run of a sweep spec into one folder; started again it skips "
                    "finished runs and resumes interrupted ones.")
    p.add_argument("spec", nargs="?", help="a sweep spec (YAML)")
    p.add_argument("--preset", metavar="NAME", help="a built-in spec: paper-dmc, "
                   "paper-humanoidbench, paper-atari100k, and their -smoke variants")
    p.add_argument("--out", metavar="DIR", help="the sweep folder (default: sweeps/<name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="local runs at once (default: cores / threads per run)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on an existing Ray cluster: 'auto' or its address")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs and the estimated compute; run nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="try runs again that failed max_attempts times")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="report.md and figures for a sweep and/or run folders")
    p.add_argument("sweep_dir", help="a sweep folder (or a run folder)")
    p.add_argument("run_dirs", nargs="*", help="more run folders to include")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where to write (default: SWEEP_DIR/report)")
    p.add_argument("--export", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the result table as Parquet (default: "
                        "<out>/results.parquet)")
    p.add_argument("--title", default="")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    p.set_defaults(func=_report)

    _train_parser(sub, agent)
    return parser


def _train_parser(sub: Any, agent: str) -> None:
    from flatworld import optim, runs
    from flatworld.agents import AGENTS

    config_cls = AGENTS[agent].config_cls if agent in AGENTS else AGENTS["tdmpc2"].config_cls

    p = sub.add_parser(
        "train", help="train an agent online (or --resume RUN_DIR)",
        usage="flatworld train AGENT [--config FILE.yaml] [--env ID] [--steps N] [--seed S] "
              "[--wm-optim adam|sam] [--rho R] [options]  |  flatworld train --resume RUN_DIR",
        description="flatworld train tdmpc2 --env dmc/walker-walk --steps 100000 --seed 1 "
                    "--wm-optim sam --rho 0.05. The agent flags listed are those of "
                    f"{agent}; `flatworld train AGENT --help` lists another agent's.")
    p.add_argument("agent", nargs="?", help=f"agent name, one of {sorted(AGENTS)}")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="start from this config (the layout of a run folder's config.yaml, "
                        "every key optional); the flags given override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="go on from the run's last checkpoint")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a line every --log-every steps instead (for logs)")
    p.add_argument("--seeding-only", action="store_true",
                   help="allow --steps below the seeding phase (random actions only, no "
                        "update); refused otherwise")
    g = p.add_argument_group("world-model optimizer")
    g.add_argument("--wm-optim", choices=("adam", "sam"), default=None,
                   help="default: the config file's, else adam")
    g.add_argument("--wm-lr", type=float, default=None)
    g.add_argument("--rho", type=float, default=None, help="SAM radius (same as --sam-rho)")
    sam_fields = _add_dataclass_flags(g, optim.SamSpec, "sam-", "sam_", set())
    run_fields = _add_dataclass_flags(p.add_argument_group("run"), runs.RunConfig, "", "run_",
                                      _RUN_SKIP)
    agent_fields = _add_dataclass_flags(p.add_argument_group(f"agent ({agent})"), config_cls,
                                        "", "agent_", _AGENT_SKIP, _RENAMED)
    p.set_defaults(func=None, run_fields=run_fields, sam_fields=sam_fields,
                   agent_fields=agent_fields, train=p, agent_flags_of=agent)


def _train_agent(argv: list[str]) -> str:
    """The agent whose flags `train` parses: the first agent name after `train` (options may
    come before it), else the one a --config file names, else tdmpc2. An agent name given as
    the value of an option is caught after parsing (the agent found must be this one)."""
    from flatworld.agents import AGENTS

    if argv[:1] != ["train"]:
        return "tdmpc2"
    for word in argv[1:]:
        if word in AGENTS:
            return word
    for i, word in enumerate(argv[1:], 1):
        path = word.partition("=")[2] if word.startswith("--config=") else (
            argv[i + 1] if word == "--config" and i + 1 < len(argv) else None)
        if path:
            try:
                from flatworld.runs.config import read_config_file

                name = read_config_file(path).get("agent", {}).get("name")
            except ValueError:
                return "tdmpc2"  # reported with its reason once parsed
            return name if name in AGENTS else "tdmpc2"
    return "tdmpc2"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _main(argv)
    except BrokenPipeError:
        # The reader went away (`flatworld envs | head`): stop quietly, as Unix tools do.
        # stdout goes to devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def _main(argv: list[str]) -> None:
    parser = build_parser(_train_agent(argv))
    args = parser.parse_args(argv)
    if getattr(args, "train", None) is not None:
        _train(args, args.train)
        return
    try:
        args.func(args)
    except ValueError as err:  # bad input: one clear line, not a traceback
        print(f"flatworld: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
