"""Solvers, one per module, found by name.

Every module in this package that defines a :class:`~sdegen.solvers.base.Solver` subclass with a
``name`` is registered automatically: adding a solver means adding a file, nothing else.
Names of the form ``"torchdiffeq:<method>"`` and ``"torchsde:<method>"`` reach the external
backends in :mod:`sdegen.backends`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from .base import PathSolver, Solver

__all__ = ["Solver", "PathSolver", "get_solver", "available_solvers"]

_REGISTRY: dict[str, type[Solver]] = {}


def _discover() -> dict[str, type[Solver]]:
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base" or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, Solver) and obj.__module__ == module.__name__ and obj.name:
                    if obj.name in _REGISTRY:
                        raise RuntimeError(f"two solvers are named {obj.name!r}")
                    _REGISTRY[obj.name] = obj
    return _REGISTRY


def available_solvers() -> list[str]:
    """Names accepted by ``reverse_sample(solver=...)`` (plus ``torchdiffeq:*`` / ``torchsde:*``)."""
    return sorted(_discover())


def get_solver(solver: str | Solver, **options: Any) -> Solver:
    """Instantiate a solver by name with its options; a :class:`Solver` instance passes through.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for an option the solver lacks.
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(f"solver options {sorted(options)} given with a solver instance; set them on it")
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name or a Solver instance, got {type(solver).__name__}")
    if ":" in solver:
        from .. import backends

        return backends.get_backend(solver, **options)
    registry = _discover()
    if solver not in registry:
        raise ValueError(f"unknown solver {solver!r}; available: {', '.join(sorted(registry))}")
    cls = registry[solver]
    params = inspect.signature(cls).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params and not has_var_kw]
    if unknown:
        accepted = list(params)
        raise TypeError(f"solver {solver!r} got unknown option(s) {unknown}; it accepts {accepted}")
    return cls(**options)
