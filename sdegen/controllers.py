"""Step-size control for adaptive solvers: the per-sample PI controller.

Given the local error estimate ``e`` of an attempted step from ``x`` to ``x̃``, the controller forms the
scaled error norm (Hairer, Nørsett & Wanner, *Solving ODEs I*, 2nd ed., II.4, eq. 4.11)::

    ε = ‖ e / (atol + rtol · max(|x|, |x̃|)) ‖          (the equation's error_norm: RMS by default)

accepts the step when ``ε ≤ 1``, and proposes the next step with Gustafsson's PI rule as in Hairer's
``DOPRI5`` code (II.4, eq. 4.13; Söderlind 2002)::

    h_new = h · clip(safety · ε^{−α} · ε_old^{β}, factor_min, factor_max),    α = 1/(q + 1) − 0.75 β,

``q`` the order of the error estimate, ``ε_old`` the norm of the last accepted step; after a rejection
``h_new = h · clip(safety · ε^{−1/(q+1)}, factor_min, 1)`` and the next accepted step may not grow.

**Per sample.** Every quantity above is a ``(n,)`` tensor: each sample accepts or rejects its own step
and keeps its own step size, so one hard sample does not force small steps on the others, and a sample's
result does not depend on its batch-mates. With ``shared=True`` the controller behaves like the peers
(torchdiffeq, k-diffusion's ``sample_dpm_adaptive``): one norm for the whole batch (the RMS of the
per-sample norms, which equals torchdiffeq's RMS over all elements), one decision and one step size.
Shared steps cost fewer batched calls when samples are alike (no sample waits for the slowest), per-sample
steps fewer evaluations per sample when they differ (``docs/solvers.md``).

**Initial step** (``first_step=None``): Hairer et al. II.4, "Starting step size", per sample, clipped to
the interval; one extra evaluation.

The controller is solver-agnostic: :mod:`sdegen.solvers.embedded_rk` (Dormand–Prince, Tsitouras,
Bogacki–Shampine) uses it, and any adaptive solver with its own error estimate can.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["PIController", "ControllerState", "check_tolerances"]


def check_tolerances(rtol: Any, atol: Any) -> tuple[float, float]:
    """``rtol > 0`` and ``atol >= 0``, finite numbers; errors name the argument."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
    if rtol <= 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    return float(rtol), float(atol)


def _number(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _pow(x: Tensor, p: float) -> Tensor:
    """``x ** p`` as ``exp(p log x)``: on CPU ``Tensor.pow`` rounds a tensor's SIMD body and its scalar
    tail differently (last bit), which would make a sample's step sizes depend on its batch position."""
    return torch.exp(p * torch.log(x))


@dataclass
class ControllerState:
    """Per-sample memory of the controller: last accepted error norm and whether the last step failed."""

    err_old: Tensor
    rejected: Tensor

    def select(self, keep: Tensor) -> ControllerState:
        return ControllerState(self.err_old[keep], self.rejected[keep])


class PIController:
    """Per-sample PI step-size controller (see the module docstring).

    Args:
        rtol: relative tolerance (> 0), default 1e-5.
        atol: absolute tolerance (>= 0), default 1e-5.
        safety: safety factor in (0, 1], default 0.9.
        beta: PI memory exponent ``β`` in [0, 0.2] (Hairer's DOPRI5: 0.04; 0 is the integral controller).
        factor_min, factor_max: bounds of the step-size ratio (default 0.2 and 10).
        first_step: initial ``|h|`` (in the solver's time units), default Hairer's automatic choice.
        shared: one step size for the whole batch (as torchdiffeq) instead of one per sample.
    """

    def __init__(
        self,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        *,
        safety: float = 0.9,
        beta: float = 0.04,
        factor_min: float = 0.2,
        factor_max: float = 10.0,
        first_step: float | None = None,
        shared: bool = False,
    ):
        self.rtol, self.atol = check_tolerances(rtol, atol)
        self.safety = _number("safety", safety, 0.0, 1.0)
        self.beta = _number("beta", beta, 0.0, 0.2, lo_open=False)
        self.factor_min = _number("factor_min", factor_min, 0.0, 1.0)
        self.factor_max = _number("factor_max", factor_max, 1.0, math.inf)
        if first_step is not None:
            if isinstance(first_step, bool) or not isinstance(first_step, int | float) or not first_step > 0:
                raise ValueError(f"first_step must be a positive number or None, got {first_step!r}")
            if not math.isfinite(first_step):
                raise ValueError(f"first_step must be finite, got {first_step}")
            first_step = float(first_step)
        self.first_step = first_step
        if not isinstance(shared, bool):
            raise TypeError(f"shared must be a bool, got {shared!r}")
        self.shared = shared

    # -- the error norm -------------------------------------------------------------------------------
    def error_ratio(self, error: Tensor, x: Tensor, x_new: Tensor, norm: Callable[[Tensor], Tensor]) -> Tensor:
        """``ε`` per sample ``(n,)`` float64: ``norm(error / (atol + rtol · max(|x|, |x_new|)))``."""
        scale = self.atol + self.rtol * torch.maximum(x.abs(), x_new.abs())
        en = norm(error / scale).to(torch.float64)
        if self.shared and en.numel():
            en = en.pow(2).mean().sqrt().expand(en.shape[0])
        return en

    # -- decisions ----------------------------------------------------------------------------------
    def init(self, n: int, device: torch.device) -> ControllerState:
        return ControllerState(
            torch.full((n,), 1e-4, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.bool, device=device),
        )

    def adapt(
        self, h: Tensor, en: Tensor, finite: Tensor, error_order: float, state: ControllerState
    ) -> tuple[Tensor, Tensor, ControllerState]:
        """Accept or reject each sample's step and propose its next ``|h|``.

        Args:
            h: ``(n,)`` float64 magnitudes of the attempted steps.
            en: ``(n,)`` scaled error norms; finite: ``(n,)`` bool, False where the step produced NaN/Inf
                (always rejected, step shrunk by ``factor_min``).
            error_order: order ``q`` of the error estimate.

        Returns:
            ``(accept, h_next, state)``.
        """
        if self.shared:
            finite = finite.all().expand(finite.shape[0])
        en = torch.where(finite, en, torch.full_like(en, math.inf))
        accept = en <= 1.0
        expo = 1.0 / (error_order + 1.0)
        safe_en = torch.where(finite, en.clamp_min(1e-300), torch.ones_like(en))
        fac_acc = self.safety * _pow(safe_en, -(expo - 0.75 * self.beta)) * _pow(state.err_old, self.beta)
        fac_acc = fac_acc.clamp(self.factor_min, self.factor_max)
        fac_acc = torch.where(state.rejected, fac_acc.clamp_max(1.0), fac_acc)
        fac_rej = (self.safety * _pow(safe_en, -expo)).clamp(self.factor_min, 1.0)
        fac_rej = torch.where(finite, fac_rej, torch.full_like(fac_rej, self.factor_min))
        h_next = h * torch.where(accept, fac_acc, fac_rej)
        err_old = torch.where(accept, en.clamp_min(1e-4), state.err_old)
        return accept, h_next, ControllerState(err_old, ~accept)

    def initial_step(
        self,
        func: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        t: Tensor,
        f0: Tensor,
        direction: float,
        span: float,
        error_order: float,
        norm: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Per-sample starting ``|h|`` ``(n,)`` float64 (Hairer et al. II.4, "Starting step size").

        ``func(x, t)`` evaluates ``dx/dt`` at float64 times ``t`` ``(n,)``; ``f0 = func(x, t)``. Costs one
        evaluation of ``func`` unless ``first_step`` was given.
        """
        n = x.shape[0]
        if self.first_step is not None:
            return torch.full((n,), min(self.first_step, span), dtype=torch.float64, device=x.device)
        scale = self.atol + self.rtol * x.abs()
        d0 = norm(x / scale).to(torch.float64)
        d1 = norm(f0 / scale).to(torch.float64)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300)).clamp_max(span)
        if self.shared:
            h0 = h0.min().expand(n)
        x1 = x + (direction * h0).to(x.dtype).reshape(n, *([1] * (x.ndim - 1))) * f0
        f1 = func(x1, t + direction * h0)
        d2 = norm((f1 - f0) / scale).to(torch.float64) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(
            dmax <= 1e-15,
            torch.clamp_min(h0 * 1e-3, 1e-6),
            _pow(0.01 / dmax.clamp_min(1e-300), 1.0 / (error_order + 1.0)),
        )
        h = torch.minimum(100 * h0, h1).clamp_max(span)
        h = torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6).clamp_max(span))
        return h.min().expand(n).clone() if self.shared else h

    def __repr__(self) -> str:
        shared = ", shared=True" if self.shared else ""
        return f"PIController(rtol={self.rtol}, atol={self.atol}, safety={self.safety}, beta={self.beta}{shared})"
