"""A small backend registry: every implementation says why it refuses an input.

An operation lists its implementations in order of preference. ``backend="auto"`` runs the
first that accepts the inputs; an explicit backend runs that one or raises
:class:`BackendError` with its reason. Refusals name the device, dtype, layout, contiguity or
missing package that stopped them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "reference", "numba-cpu", "numba-cuda")


class BackendError(ValueError):
    """No requested backend can run the given inputs; the message lists every reason."""


@dataclass(frozen=True)
class Impl:
    """One implementation of an operation.

    Attributes:
        name: one of ``BACKENDS`` (not "auto").
        refuse: called with the operation's arguments; returns why it cannot run them, or None.
        run: called with the same arguments when accepted.
    """

    name: str
    refuse: Callable[..., str | None]
    run: Callable[..., Any]


def dispatch(op: str, backend: str, impls: Sequence[Impl], *args, **kwargs):
    """Run ``op`` on the chosen backend (see module docstring)."""
    names = [impl.name for impl in impls]
    if backend != "auto" and backend not in names:
        raise ValueError(f"backend: expected 'auto' or one of {names} for {op}, got {backend!r}")
    chosen = impls if backend == "auto" else [impl for impl in impls if impl.name == backend]
    reasons = []
    for impl in chosen:
        why = impl.refuse(*args, **kwargs)
        if why is None:
            return impl.run(*args, **kwargs)
        reasons.append(f"{impl.name}: {why}")
    raise BackendError(f"{op}: no backend can run these inputs ({'; '.join(reasons)})")


def explain(impls: Sequence[Impl], *args, **kwargs) -> dict[str, str | None]:
    """Every backend's verdict on these inputs (None = would run)."""
    return {impl.name: impl.refuse(*args, **kwargs) for impl in impls}
