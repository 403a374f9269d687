"""``fastgenlabel`` command line: info, reproduce."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from . import _info

    print(_info.report())
    for path in args.model:
        print()
        print(_info.describe_model(path))
    return 0


def _cmd_reproduce(args) -> int:
    from .experiments import reproduce

    return reproduce.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgenlabel", description="GenLabel mixup relabeling, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, available backends, and model files")
    info.add_argument("model", nargs="*", help="model files (.npz) to describe")
    info.set_defaults(func=_cmd_info)
    rep = sub.add_parser("reproduce", help="the paper's synthetic and tabular results")
    try:
        from .experiments.reproduce import add_arguments
    except ImportError:  # pragma: no cover - experiments need scikit-learn and matplotlib
        add_arguments = None
    if add_arguments is not None:
        add_arguments(rep)
    rep.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
