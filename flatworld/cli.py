"""flatworld's command line: demo | study | train | eval | envs."""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    from flatworld import optim, runs
    from flatworld.agents import AGENTS

    if args.resume:
        try:
            print(f"run: {runs.resume(args.resume, progress=not args.no_progress)}")
        except (ValueError, OSError) as err:  # a run-level problem: one line, no traceback
            parser.error(str(err))
        return
    if args.agent is None:
        parser.error(f"train needs an agent (one of {sorted(AGENTS)}) or --resume RUN_DIR")
    if args.agent not in AGENTS:
        parser.error(f"agent={args.agent!r}; accepted: {sorted(AGENTS)}")
    entry = AGENTS[args.agent]
    try:
        run_cfg = runs.RunConfig(**_given(args, "run_", args.run_fields)).validate()
        sam_fields = _given(args, "sam_", args.sam_fields)
        if args.rho is not None:
            sam_fields["rho"] = args.rho
        if args.wm_optim == "adam" and sam_fields:
            raise ValueError(f"SAM options {sorted(sam_fields)} given with --wm-optim adam; "
                             "use --wm-optim sam")
        sam = optim.SamSpec(**sam_fields) if args.wm_optim == "sam" else None
        base = entry.config_cls()
        spec_kwargs = {"lr": args.wm_lr} if args.wm_lr is not None else {}
        wm_optim = dataclasses.replace(base.wm_optim, sam=sam, **spec_kwargs)
        agent_cfg = dataclasses.replace(base, wm_optim=wm_optim,
                                        **_given(args, "agent_", args.agent_fields))
        agent_cfg.validate()
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    try:
        print(f"run: {runs.train(run_cfg, args.agent, agent_cfg, progress=not args.no_progress)}")
    except (ValueError, OSError, ImportError) as err:  # bad env, device, folder, missing suite
        parser.error(str(err))


def _eval(args: argparse.Namespace) -> None:
    from flatworld import runs

    print(json.dumps(runs.evaluate(args.run_dir, episodes=args.episodes), indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="TD-MPC2 with Adam vs SAM on a small DMC task (~10 min); "
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

    p = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder")
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=10)
    p.set_defaults(func=_eval)

    _train_parser(sub)
    return parser


def _train_parser(sub: Any) -> None:
    from flatworld import optim, runs
    from flatworld.agents.tdmpc2.config import TDMPC2Config

    p = sub.add_parser(
        "train", help="train an agent online (or --resume RUN_DIR)",
        usage="flatworld train AGENT [--env ID] [--steps N] [--seed S] [--wm-optim adam|sam] "
              "[--rho R] [options]  |  flatworld train --resume RUN_DIR",
        description="flatworld train tdmpc2 --env dmc/walker-walk --steps 100000 --seed 1 "
                    "--wm-optim sam --rho 0.05")
    p.add_argument("agent", nargs="?", help="agent name, e.g. tdmpc2")
    p.add_argument("--resume", metavar="RUN_DIR", help="go on from the run's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("world-model optimizer")
    g.add_argument("--wm-optim", choices=("adam", "sam"), default="adam")
    g.add_argument("--wm-lr", type=float, default=None)
    g.add_argument("--rho", type=float, default=None, help="SAM radius (same as --sam-rho)")
    sam_fields = _add_dataclass_flags(g, optim.SamSpec, "sam-", "sam_", set())
    run_fields = _add_dataclass_flags(p.add_argument_group("run"), runs.RunConfig, "", "run_",
                                      _RUN_SKIP)
    agent_fields = _add_dataclass_flags(p.add_argument_group("agent (tdmpc2)"), TDMPC2Config,
                                        "", "agent_", _AGENT_SKIP, _RENAMED)
    p.set_defaults(func=None, run_fields=run_fields, sam_fields=sam_fields,
                   agent_fields=agent_fields, train=p)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
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
