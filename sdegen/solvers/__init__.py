"""Solvers, one per module, found by name.

Every module in this package that defines a :class:`~sdegen.solvers.base.Solver` subclass with a
``name`` is registered automatically: adding a solver means adding a file, nothing else.
Names of the form ``"torchdiffeq:<method>"`` and ``"torchsde:<method>"`` reach the external
backends in :mod:`sdegen.backends`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pkgutil
import threading
from typing import Any

from .base import AdaptiveSolver, PathSolver, Solver

__all__ = [
    "Solver",
    "AdaptiveSolver",
    "PathSolver",
    "get_solver",
    "available_solvers",
    "did_you_mean",
    "resolve_solver",
]

_REGISTRY: dict[str, type[Solver]] = {}
_LOCK = threading.Lock()


def _discover() -> dict[str, type[Solver]]:
    if _REGISTRY:
        return _REGISTRY
    with _LOCK:  # two threads sampling first must not see a half-filled registry
        if _REGISTRY:
            return _REGISTRY
        found: dict[str, type[Solver]] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base" or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, Solver) and obj.__module__ == module.__name__ and obj.name:
                    if obj.name in found:
                        raise RuntimeError(f"two solvers are named {obj.name!r}")
                    found[obj.name] = obj
        _REGISTRY.update(found)
    return _REGISTRY


@functools.cache
def _parameters(cls: type) -> Any:
    """The constructor's parameters (cached: ``inspect.signature`` costs ~0.1 ms, paid once per class)."""
    return inspect.signature(cls).parameters


def available_solvers() -> list[str]:
    """Names accepted by ``reverse_sample(solver=...)`` (plus ``torchdiffeq:*`` / ``torchsde:*``)."""
    return sorted(_discover())


def did_you_mean(word: str, choices: Any) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_solver(solver: str | Solver, **options: Any) -> Solver:
    """Instantiate a solver by name with its options; a :class:`Solver` instance passes through.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for an option the solver lacks (both
    suggest the closest valid word).
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(
                f"solver options {sorted(options)} given with a solver instance {solver!r}: set them on the "
                f"instance (get_solver({solver.name!r}, ...)), or pass the solver by name"
            )
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name or a Solver instance, got {type(solver).__name__}")
    if ":" in solver:
        from .. import backends

        return backends.get_backend(solver, **options)
    registry = _discover()
    if solver not in registry:
        raise ValueError(
            f"unknown solver {solver!r}{did_you_mean(solver, registry)}; available: {', '.join(sorted(registry))}"
        )
    cls = registry[solver]
    params = _parameters(cls)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params and not has_var_kw]
    if unknown:
        hint = did_you_mean(unknown[0], params)
        raise TypeError(f"solver {solver!r} got unknown option {unknown[0]!r}{hint}; it accepts {list(params)}")
    return cls(**options)


def resolve_solver(solver: str | Solver, options: dict[str, Any], entry: str, entry_params: Any = ()) -> Solver:
    """:func:`get_solver` for an entry point that forwards its unknown keywords as solver options.

    A keyword that is neither a parameter of ``entry`` nor an option of the solver raises ``TypeError``
    naming the closest word among both (``stpes`` → ``steps``).
    """
    try:
        return get_solver(solver, **options)
    except TypeError as err:
        unknown = [k for k in options if k in str(err)]
        if not unknown or not isinstance(solver, str | Solver):
            raise
        key = unknown[0]
        accepted = list(entry_params)
        if isinstance(solver, str) and ":" not in solver and solver in _discover():
            accepted += list(_parameters(_discover()[solver]))
        elif isinstance(solver, str) and ":" in solver:
            from ..backends import backend_options

            accepted += list(backend_options(solver))
        hint = did_you_mean(key, accepted)
        if isinstance(solver, Solver) and not hint:
            raise  # options given beside a solver instance: get_solver's message says what to do
        name = solver if isinstance(solver, str) else solver.name
        own = [p for p in accepted if p not in entry_params]
        raise TypeError(f"{entry}() got an unknown option {key!r}{hint}: it is neither an argument of {entry} nor "
                        f"an option of solver {name!r} (whose options are {own})") from None
