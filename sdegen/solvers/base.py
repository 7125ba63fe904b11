"""What every solver is: a small object with a declared order and a ``step``.

A solver sees an *equation* — an object with ``drift(x, t)``, ``diffusion(x, t)`` and ``is_ode``
(a :class:`~sdegen.reverse.ReverseSDE` or anything shaped like it) — never a network or an SDE
class, and it never writes its own loop: :func:`sdegen.integrate.integrate` drives it.

Times ``t`` and ``t_next`` are 0-d tensors on the state's device (float32 or better); the step
``h = t_next - t`` is negative when sampling (time runs from ``T`` down to ``t_min``), and Brownian
increments are scaled by ``√|h|``. ``noise`` is a :class:`~sdegen.noise.NoiseSource`, or ``None``
for a deterministic step (zero Brownian increment).

Solvers that own their whole path (adaptive, or wrapping another library) subclass
:class:`PathSolver` and implement ``solve`` instead of ``step``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..noise import NoiseSource, normal_like

__all__ = ["Solver", "PathSolver", "brownian_increment"]


class Solver:
    """Base class of fixed-step solvers.

    Class attributes:
        name: the name ``reverse_sample(solver=...)`` knows it by.
        order: deterministic (ODE) order of convergence.
        strong_order, weak_order: SDE orders (None when the solver does not integrate SDEs).
        supports_sde / supports_ode: what equations it accepts.
        nfe_per_step: network evaluations per step.
    """

    name: ClassVar[str] = ""
    order: ClassVar[float] = 1.0
    strong_order: ClassVar[float | None] = None
    weak_order: ClassVar[float | None] = None
    supports_sde: ClassVar[bool] = True
    supports_ode: ClassVar[bool] = True
    needs_additive_noise: ClassVar[bool] = False
    nfe_per_step: ClassVar[int] = 1

    def check(self, eq: Any) -> None:
        """Raise ``ValueError`` when this solver cannot integrate ``eq``."""
        if eq.is_ode and not self.supports_ode:
            raise ValueError(f"solver {self.name!r} integrates SDEs only; got a probability-flow ODE (noise_scale=0)")
        if not eq.is_ode and not self.supports_sde:
            raise ValueError(
                f"solver {self.name!r} integrates ODEs only: use noise_scale=0, or an SDE solver "
                f"such as 'euler_maruyama'"
            )
        if not eq.is_ode and self.needs_additive_noise and getattr(eq, "state_dependent", False):
            raise ValueError(
                f"solver {self.name!r} needs additive noise (a diffusion independent of x); with "
                "state-dependent diffusion it would converge to the Stratonovich solution. "
                "Use 'euler_maruyama'."
            )

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> Any:
        """Solver state carried between steps (multistep history, FSAL stage); default None."""
        return None

    def step(
        self, eq: Any, x: Tensor, t: Tensor, t_next: Tensor, noise: NoiseSource | None, state: Any
    ) -> tuple[Tensor, Any]:
        """Advance ``x`` from ``t`` to ``t_next``; return the new state and solver state."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PathSolver(Solver):
    """A solver that integrates a whole path itself (adaptive step control, external backends)."""

    def solve(
        self, eq: Any, x: Tensor, times: Tensor, noise: NoiseSource | None
    ) -> tuple[Tensor, dict[str, Any]]:
        """Integrate from ``times[0]`` through every time in ``times``.

        Returns ``(states, stats)`` with ``states`` of shape ``(len(times), *x.shape)``
        (``states[0]`` is ``x``) and ``stats`` a dict of counters (e.g. accepted/rejected steps).
        """
        raise NotImplementedError


def brownian_increment(noise: NoiseSource | None, x: Tensor, h: Tensor) -> Tensor | None:
    """``ΔW ~ N(0, |h| I)`` shaped like ``x``, or None for a deterministic step."""
    if noise is None:
        return None
    return normal_like(noise, x) * h.abs().sqrt().to(x.dtype)
