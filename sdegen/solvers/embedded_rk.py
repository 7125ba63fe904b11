"""The generic embedded Runge–Kutta stepper: any :class:`~sdegen.solvers.tableaux.ButcherTableau`,
per-sample step sizes from a :class:`~sdegen.controllers.PIController`, dense output.

One attempted step of size ``h`` (per sample) from ``(t, y)`` with stages
``k_i = f(t + c_i h, y + h Σ_{j<i} a_ij k_j)`` gives ``y_new = y + h Σ b_i k_i`` (local extrapolation:
the higher-order solution is propagated) and the error estimate ``h Σ (b_i − b̂_i) k_i``. FSAL tableaux
evaluate their last stage at ``y_new``, so an accepted step costs ``s − 1`` evaluations. Output times
inside a step are filled from the tableau's continuous extension; requested end points are hit exactly.

The stepper never evaluates the equation outside the closed integration interval: the last step of a
sample is clipped to land on the end time and stage times are clamped to it (torchdiffeq's ``dopri5``
instead steps past the end and interpolates back). The loop — acceptance, the active set of samples that
have not finished, output times, ``max_steps``, NaN checks — is :func:`sdegen.integrate.integrate`'s.
Concrete solvers (``rk45``, ``tsit5``, ``bosh3``) are a tableau plus this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import bcast
from ..controllers import PIController
from ..equation import Equation
from .base import AdaptiveSolver, Attempt, Clock
from .tableaux import ButcherTableau

__all__ = ["EmbeddedRungeKutta"]


def _combine(y: Tensor, h: Tensor, ks: Sequence[Tensor], coefs: Sequence[float]) -> Tensor:
    """``y + h Σ c_i k_i`` skipping zero coefficients; ``h`` is ``(n,)`` (``y`` may be None: no ``y``)."""
    acc = None
    for c, k in zip(coefs, ks, strict=False):
        if c != 0.0:
            acc = c * k if acc is None else acc.add(k, alpha=c)
    if acc is None:
        return y if y is not None else torch.zeros_like(ks[0])
    step = bcast(h.to(acc.dtype), acc) * acc
    return step if y is None else y + step


class EmbeddedRungeKutta(AdaptiveSolver):
    """Adaptive explicit Runge–Kutta with an embedded error estimate (subclasses set ``tableau``).

    Args:
        rtol: relative tolerance (> 0), default 1e-5.
        atol: absolute tolerance (>= 0), default 1e-5.
        first_step: initial ``|h|``; default Hairer's automatic choice (one extra evaluation).
        max_steps: bound on attempted steps per sample (default 10 000), then
            :class:`~sdegen.errors.MaxStepsExceeded`.
        safety: step-size safety factor in (0, 1], default 0.9.
        shared_steps: one step size for the whole batch (as torchdiffeq) instead of one per sample.
        controller: a :class:`~sdegen.controllers.PIController` to use instead (then ``rtol``, ``atol``,
            ``first_step``, ``safety`` and ``shared_steps`` must be left at their defaults).
        return_partial: on ``max_steps`` return the partial result (``stats["success"]`` per sample)
            instead of raising.

    ODEs only (the probability-flow ODE, ``noise_scale=0``; the likelihood's augmented flow).
    """

    tableau: ClassVar[ButcherTableau]
    supports_sde: ClassVar[bool] = False

    def __init__(
        self,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        first_step: float | None = None,
        max_steps: int = 10_000,
        safety: float = 0.9,
        shared_steps: bool = False,
        controller: PIController | None = None,
        return_partial: bool = False,
    ):
        if controller is None:
            controller = PIController(rtol, atol, safety=safety, first_step=first_step, shared=shared_steps)
        else:
            if not isinstance(controller, PIController):
                raise TypeError(f"controller must be a PIController, got {type(controller).__name__}")
            given = dict(rtol=rtol, atol=atol, first_step=first_step, safety=safety, shared_steps=shared_steps)
            defaults = dict(rtol=1e-5, atol=1e-5, first_step=None, safety=0.9, shared_steps=False)
            clash = [k for k in given if given[k] != defaults[k]]
            if clash:
                raise ValueError(f"solver {self.name!r}: give {clash} on the controller, not beside it")
        super().__init__(controller, max_steps=max_steps, return_partial=return_partial)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tab = cls.__dict__.get("tableau")
        if tab is not None:  # the declared orders and cost follow from the tableau
            cls.order = float(tab.order)
            cls.error_order = float(tab.error_order)
            cls.nfe_per_step = tab.stages - (1 if tab.fsal else 0)

    @property
    def rtol(self) -> float:
        return self.controller.rtol

    @property
    def atol(self) -> float:
        return self.controller.atol

    # -- the step ---------------------------------------------------------------------------------------
    def init_state(self, eq: Equation, x: Tensor, t: Tensor, clock: Clock) -> tuple[Tensor, ...]:  # type: ignore[override]
        return (eq.drift(x, clock(t)),)

    def derivative(self, state: tuple[Tensor, ...]) -> Tensor | None:
        return state[0]

    def attempt(
        self, eq: Equation, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor, state: tuple[Tensor, ...], clock: Clock
    ) -> Attempt:
        tab = self.tableau
        passive = tab.passive_stages
        ks = [state[0] if tab.fsal else eq.drift(x, clock(t))]
        for i in range(1, tab.stages):
            yi = _combine(x, h, ks, tab.a[i])
            ti = clock(t_next if tab.c[i] == 1.0 else t + tab.c[i] * h)
            ks.append(eq.passive_drift(yi, ti) if i in passive else eq.drift(yi, ti))
        x_new = yi if tab.fsal else _combine(x, h, ks, tab.b)
        error = _combine(None, h, ks, tab.b_error)
        new_state = (ks[-1],) if tab.fsal else (ks[0],)
        return Attempt(x=x_new, error=error, state=new_state, dense=ks, derivative=ks[-1] if tab.fsal else None)

    def interpolate(self, x: Tensor, h: Tensor, dense: Any, theta: Tensor, index: Tensor) -> Tensor:
        y = x[index]
        th = theta.to(y.dtype)
        acc = None
        for row, k in zip(self.tableau.dense, dense, strict=True):
            if not any(row):
                continue
            poly = torch.full_like(th, row[-1])
            for c in reversed(row[:-1]):
                poly = poly * th + c
            term = bcast(poly * th, y) * k[index]
            acc = term if acc is None else acc + term
        return y + bcast(h[index].to(y.dtype), y) * acc

    def __repr__(self) -> str:
        c = self.controller
        shared = ", shared_steps=True" if c.shared else ""
        return f"{type(self).__name__}(rtol={c.rtol}, atol={c.atol}, max_steps={self.max_steps}{shared})"
