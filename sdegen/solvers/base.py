"""What every solver is: a small object with a declared order and a ``step`` (or an ``attempt``).

A solver sees an :class:`~sdegen.equation.Equation` — ``drift(x, t)``, ``diffusion(x, t)``, ``is_ode``,
and, for exponential integrators, the affine part (:func:`~sdegen.equation.require_affine`) — never a
network or an SDE class, and it never writes its own loop: :func:`sdegen.integrate.integrate` drives it.

Three kinds:

* :class:`Solver` — fixed step: ``step(eq, x, t, t_next, noise, state)`` advances ``x`` over one interval
  of the time grid. ``t`` and ``t_next`` are 0-d tensors on the state's device (float32 or better); the
  step ``h = t_next − t`` is negative when sampling (time runs from ``T`` down to ``t_min``) and positive
  for the likelihood; Brownian increments are scaled by ``√|h|``. ``noise`` is a
  :class:`~sdegen.noise.NoiseSource`, or ``None`` for a deterministic step.
* :class:`AdaptiveSolver` — a step with an error estimate: ``attempt(eq, x, t, h, state)`` tries a step
  of per-sample size ``h`` from per-sample times ``t`` and returns the candidate state, its local error
  estimate and what dense output needs. The loop asks a step-size controller
  (:class:`sdegen.controllers.PIController`) whether each sample accepts and what its next step is.
* :class:`PathSolver` — solvers that own their whole path because another library runs it
  (``torchdiffeq:*``, ``torchsde:*``); they implement ``solve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..equation import Equation
from ..noise import NoiseSource, normal_like

__all__ = ["Solver", "AdaptiveSolver", "PathSolver", "Attempt", "brownian_increment", "Clock"]


class Solver:
    """Base class of all solvers.

    Class attributes:
        name: the name ``reverse_sample(solver=...)`` knows it by.
        order: deterministic (ODE) order of convergence.
        strong_order, weak_order: SDE orders (None when the solver does not integrate SDEs).
        supports_sde / supports_ode: what equations it accepts.
        needs_additive_noise: refuses state-dependent diffusions (it would converge to Stratonovich).
        nfe_per_step: network evaluations per step (per accepted step for adaptive solvers).
        default_grid: the time grid ``reverse_sample`` uses when none is given (the best measured one,
            see ``docs/performance.md``): a name of :data:`sdegen.grids.GRIDS`, or a sequence of them in
            order of preference for solvers that also integrate SDEs without a noise level ``σ(t)``.
        default_steps: the number of steps ``reverse_sample`` takes when ``steps`` is not given.
        adaptive: True for :class:`AdaptiveSolver` s (they choose their own steps; ``steps`` is unused).
        zero_signal_start: what a step evaluates at its start time, which decides whether the solver can
            start where the signal is gone (``m(t) = 0``: ``t = 1`` of a flow-matching path,
            :mod:`sdegen.interpolant`; checked by :meth:`sdegen.ReverseSDE.check_start`): ``"drift"``
            (default) — the drift and diffusion, finite there for the probability-flow ODE only (in velocity
            form); ``"denoise"`` — only the kernel ``(m, s)`` and the model's ``x̂0``, finite for every noise
            scale; ``"none"`` — nothing (e.g. Langevin steps at the next time); ``"refuse"`` — it cannot
            start there (e.g. it divides by ``m``).
    """

    name: ClassVar[str] = ""
    order: ClassVar[float] = 1.0
    strong_order: ClassVar[float | None] = None
    weak_order: ClassVar[float | None] = None
    supports_sde: ClassVar[bool] = True
    supports_ode: ClassVar[bool] = True
    needs_additive_noise: ClassVar[bool] = False
    nfe_per_step: ClassVar[int] = 1
    default_grid: ClassVar[str | tuple[str, ...]] = "uniform"
    default_steps: ClassVar[int] = 1000
    adaptive: ClassVar[bool] = False
    zero_signal_start: ClassVar[str] = "drift"

    @property
    def default_noise_scale(self) -> float:
        """The noise scale ``λ`` ``reverse_sample`` uses when none is given: 1 for solvers of the reverse
        SDE, 0 for ODE-only solvers (overridden by solvers whose natural use is deterministic, e.g. DDIM)."""
        return 1.0 if self.supports_sde else 0.0

    def check(self, eq: Equation) -> None:
        """Raise ``ValueError`` when this solver cannot integrate ``eq``."""
        if eq.is_ode and not self.supports_ode:
            raise ValueError(
                f"solver {self.name!r} integrates SDEs only; got a probability-flow ODE (noise_scale=0): "
                "use noise_scale > 0"
            )
        if not eq.is_ode and not self.supports_sde:
            raise ValueError(
                f"solver {self.name!r} integrates ODEs only: use noise_scale=0 (its default), or an SDE solver "
                f"such as 'euler_maruyama'"
            )
        if not eq.is_ode and self.needs_additive_noise and eq.state_dependent:
            raise ValueError(
                f"solver {self.name!r} needs additive noise (a diffusion independent of x); with "
                "state-dependent diffusion it would converge to the Stratonovich solution. "
                "Use 'euler_maruyama'."
            )

    def init_state(self, eq: Equation, x: Tensor, times: Tensor) -> Any:
        """Solver state carried between steps (multistep history, per-grid coefficients); default None."""
        return None

    def step(
        self, eq: Equation, x: Tensor, t: Tensor, t_next: Tensor, noise: NoiseSource | None, state: Any
    ) -> tuple[Tensor, Any]:
        """Advance ``x`` from ``t`` to ``t_next``; return the new state and solver state."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Clock:
    """How an adaptive solver turns the loop's float64 per-sample times into equation times.

    ``clock(t)`` clamps ``t`` to the integration interval (a stage is never evaluated outside it) and
    casts it to the time dtype next to the state (float32, or float64 for float64 states).
    """

    def __init__(self, lo: float, hi: float, dtype: Any):
        self.lo, self.hi, self.dtype = lo, hi, dtype

    def __call__(self, t: Tensor) -> Tensor:
        return t.clamp(self.lo, self.hi).to(self.dtype)


@dataclass
class Attempt:
    """The result of :meth:`AdaptiveSolver.attempt`, all per sample (leading dimension ``n``).

    Attributes:
        x: candidate state at ``t + h``.
        error: local error estimate in state units (shaped like ``x``); the loop scales it by
            ``atol + rtol · max(|x|, |x_new|)`` and takes the equation's :meth:`error_norm`.
        state: the solver state to carry on if the step is accepted (a tuple of per-sample tensors).
        dense: what :meth:`AdaptiveSolver.interpolate` needs for output times inside the step.
        derivative: ``dx/dt`` at the candidate state if the solver evaluated it (FSAL), else None; a
            non-finite value there is reported as a model NaN.
    """

    x: Tensor
    error: Tensor
    state: tuple[Tensor, ...]
    dense: Any
    derivative: Tensor | None = None


class AdaptiveSolver(Solver):
    """A solver with an embedded error estimate, driven with per-sample step-size control.

    Subclasses set ``error_order`` (the order ``q`` of the embedded estimate: the controller's exponent
    is ``1/(q + 1)``) and implement :meth:`init_state`, :meth:`attempt` and :meth:`interpolate`.
    ``controller`` (a :class:`sdegen.controllers.PIController`) holds the tolerances and the step-size
    rule; ``max_steps`` bounds the attempted steps per sample.
    """

    adaptive: ClassVar[bool] = True
    supports_sde: ClassVar[bool] = False
    error_order: ClassVar[float] = 1.0

    def __init__(self, controller: Any, *, max_steps: int = 10_000, return_partial: bool = False):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"solver {self.name!r}: max_steps must be a positive int, got {max_steps!r}")
        if not isinstance(return_partial, bool):
            raise TypeError(f"solver {self.name!r}: return_partial must be a bool, got {return_partial!r}")
        self.controller = controller
        self.max_steps = max_steps
        self.return_partial = return_partial

    def init_state(self, eq: Equation, x: Tensor, t: Tensor, clock: Clock) -> tuple[Tensor, ...]:  # type: ignore[override]
        """Per-sample state at the start (e.g. the FSAL derivative); ``t`` is ``(n,)`` float64."""
        raise NotImplementedError

    def derivative(self, state: tuple[Tensor, ...]) -> Tensor | None:
        """``dx/dt`` at the current state if the state holds it (for the initial step size), else None."""
        return None

    def attempt(
        self, eq: Equation, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor, state: tuple[Tensor, ...], clock: Clock
    ) -> Attempt:
        """Try a step of signed size ``h`` ``(n,)`` float64 from times ``t`` to ``t_next`` (``≈ t + h``, exactly
        the end time on a sample's last step; ``(n,)`` float64)."""
        raise NotImplementedError

    def interpolate(self, x: Tensor, h: Tensor, dense: Any, theta: Tensor, index: Tensor) -> Tensor:
        """The state at ``t + θ h`` for the samples at ``index`` (``θ`` ``(k,)`` in ``[0, 1]``)."""
        raise NotImplementedError

    def step(self, eq, x, t, t_next, noise, state):
        raise TypeError(f"solver {self.name!r} is adaptive: run it with sdegen.integrate (it picks its own steps)")


class PathSolver(Solver):
    """A solver that integrates a whole path itself (external backends)."""

    def solve(
        self, eq: Equation, x: Tensor, times: Tensor, noise: NoiseSource | None
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
