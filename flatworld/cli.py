"""flatworld's command line: demo | study | train | eval | envs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> None:
    from flatworld import demo

    demo.run(Path(args.out), steps=args.steps, seed=args.seed)


def _study(args: argparse.Namespace) -> None:
    from flatworld.studies import STUDIES, run_study

    if args.name is None:
        print("\n".join(sorted(STUDIES)))
        return
    report = run_study(args.name, Path(args.out) / args.name, full=args.full, seed=args.seed)
    print(f"report: {report}")


def _envs(args: argparse.Namespace) -> None:
    from flatworld.envs import list_envs

    for suite, ids in list_envs().items():
        print(f"{suite} ({len(ids)})")
        for env_id in ids:
            print(f"  {env_id}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatworld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="AdamW vs SAM on a small network: accuracy, sharpness, plot")
    p.add_argument("--out", default="runs-demo")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("study", help="run one of the flat-minima studies (no NAME: list them)")
    p.add_argument("name", nargs="?")
    p.add_argument("--full", action="store_true", help="the longer version")
    p.add_argument("--out", default="reports")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_study)

    p = sub.add_parser("envs", help="list every suite and task id")
    p.set_defaults(func=_envs)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:  # bad input: one clear line, not a traceback
        print(f"flatworld: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
