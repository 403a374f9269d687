"""``fastgenlabel`` command line: info, reproduce, demo, bench loader."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from . import _info

    described = [_info.describe_model(path) for path in args.model]  # a bad file fails before the report
    print(_info.report())
    for text in described:
        print()
        print(text)
    return 0


def _cmd_reproduce(args) -> int:
    from .experiments import reproduce

    return reproduce.main(args)


def _cmd_demo(args) -> int:
    from . import demo

    return demo.main(args)


def _cmd_fit(args) -> int:
    from .fit import command

    return command.main(args)


def _cmd_bench_loader(args) -> int:
    from .loader import bench

    return bench.main(args)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default (options without one, and flags, show none)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The command line's parser.

    Args:
        commands: the (sub)command path whose options are added, e.g. ``("bench", "loader")``
            (None: every command's). A command's options come from its module, which imports
            torch; :func:`main` adds only those of the command it was given, so
            ``fastgenlabel --help`` and a bad or missing command import none.
    """
    def wanted(*path: str) -> bool:
        return commands is None or tuple(commands[:len(path)]) == path

    parser = argparse.ArgumentParser(prog="fastgenlabel", description="GenLabel mixup relabeling, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, available backends, and model files")
    info.add_argument("model", nargs="*", help="model files (.npz) to describe")
    info.set_defaults(func=_cmd_info)
    rep = sub.add_parser("reproduce", help="the paper's synthetic and tabular results", formatter_class=_Help)
    if wanted("reproduce"):
        try:
            from .experiments.reproduce import add_arguments
        except ImportError:  # pragma: no cover - experiments need scikit-learn and matplotlib
            add_arguments = None
        if add_arguments is not None:
            add_arguments(rep)
    rep.set_defaults(func=_cmd_reproduce)
    demo = sub.add_parser("demo", help="real digits as JPEGs -> DALI loader -> CNN with mixup vs mixup + GenLabel",
                          formatter_class=_Help)
    if wanted("demo"):
        from .demo import add_arguments as add_demo_arguments

        add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
    fit = sub.add_parser("fit", help="fit a class model (and its PCA feature map) on a folder of images",
                         formatter_class=_Help)
    if wanted("fit"):
        from .fit.command import add_arguments as add_fit_arguments

        add_fit_arguments(fit)
    fit.set_defaults(func=_cmd_fit)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="{loader}")
    bench_loader = bench_sub.add_parser("loader", help="images/s of the loader against a torch DataLoader + mixup",
                                        formatter_class=_Help)
    if wanted("bench", "loader"):
        from .loader.bench import add_arguments as add_bench_arguments

        add_bench_arguments(bench_loader)
    bench_loader.set_defaults(func=_cmd_bench_loader)
    return parser


def _command_path(argv) -> tuple:
    """The (sub)command path of a command line: its leading positional arguments (at most two)."""
    return tuple(a for a in argv if not a.startswith("-"))[:2]


def main(argv=None) -> int:
    """Run a subcommand. A usage error (bad value, missing or unwritable file: ValueError or
    OSError) prints ``fastgenlabel <command>: error: <message>`` and returns 2, as argparse does
    for its own errors; ``FASTGENLABEL_DEBUG=1`` raises it with its traceback instead."""
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_path(argv)).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        if os.environ.get("FASTGENLABEL_DEBUG"):
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "bench", None))))
        print(f"fastgenlabel {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
