"""External backends reached by ``solver="torchdiffeq:<method>"`` / ``"torchsde:<method>"``."""

from __future__ import annotations

from typing import Any

from .solvers.base import PathSolver

__all__ = ["get_backend"]


def get_backend(name: str, **options: Any) -> PathSolver:
    """Instantiate the backend solver ``name`` (``"library:method"``)."""
    raise ValueError(f"unknown solver backend {name!r}")
