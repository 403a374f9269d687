"""argparse value types shared by the subcommands: a bad value is refused when the command line is
read, naming the flag, not after a pass over the data."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def check_writable(flag: str, path) -> None:
    """Refuse an output path that cannot be written, before any work (its folder is made)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}: cannot create the folder {str(path.parent)!r} ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{flag}: the folder {str(path.parent)!r} is not writable")
