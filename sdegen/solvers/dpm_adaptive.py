"""``"dpm_adaptive"``: DPM-Solver-12/23 with an embedded error estimate, per-sample step sizes in log-SNR.

Lu et al. (2022a), *DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
10 Steps*, NeurIPS, §4 ("adaptive step size"; Alg. 4–5), in the data-prediction form of Lu et al. (2022b,
DPM-Solver++). k-diffusion's ``sample_dpm_adaptive`` is the same pair in noise-prediction form with one
step size for the whole batch.

**The step.** With ``ℓ = log(m/s)`` and a step ``h = ℓ(t_next) − ℓ(t)`` the exact solution of the
probability-flow ODE is ``x_next = (s_next/s) x + m_next ∫_0^h e^{v−h} x̂0(ℓ + v) dv``
(:mod:`sdegen.solvers.dpmpp`). ``order=3`` (DPM-Solver-23) evaluates ``x̂0`` at the start (``D0``, kept
from the previous step), at ``ℓ + r1 h`` (``r1 ≈ 1/3``; first-order stage from ``D0``) and at ``ℓ + r2 h``
(``r2 ≈ 2/3``; second-order stage from ``D0, D1``), and integrates the interpolating polynomial of
``x̂0`` exactly with the φ functions (``D(u) = D0 + a u + b u²`` over ``u = v/h ∈ [0, 1]``)::

    x_high = (s_next/s) x + m_next [φ1 D0 + φ2 a − 2 φ3 b]          (third order, propagated)
    x_low  = (s_next/s) x + m_next [φ1 D0 + φ2 (D1 − D0)/r1]        (second order)

and ``x_high − x_low`` is the error estimate (order ``q = 2``). ``order=2`` (DPM-Solver-12): one stage at
``r1 = 1/2``, ``x_high`` second order, ``x_low`` the DDIM step, ``q = 1``. The stage ratios ``r1, r2`` are
those of the stage times actually used, so the formulas are exact for whatever the inner time
inversion returns. After each attempt ``x̂0`` is evaluated at ``x_high`` (first stage of the next step,
FSAL), so an attempt costs ``order`` network evaluations, as in k-diffusion, plus one at the start.
Dense output (``save_at`` times inside a step) integrates the linear interpolant of ``x̂0`` between the
step's ends exactly (second order).

**Step-size control in log-SNR.** The controller is the per-sample PI rule of
:class:`sdegen.controllers.PIController` (``β = 0.1``, growth at most 3× per step), applied to the step
in ``ℓ`` (``step_control="log_snr"``, default), where the local error of an exponential integrator is
smooth: the proposed factor scales the ``ℓ``-length of the step and the next time is found by inverting
``ℓ(t)`` (bracketed secant iterations on ``eq.marginal``, on the device). With the loop's own time
(``step_control="time"``) the same rule sees errors that grow like ``(h_t/t)^{q+1}`` towards ``t_min``
(``ℓ ≈ −½ log t`` for VP, ``−log σ`` for EDM) and rejects more steps (``docs/performance.md``). The first
step is ``first_step`` in ``ℓ`` (no evaluation): at the noise end ``x̂0`` is nearly the data mean and a
step of 1 is safe where k-diffusion's 0.05 spends four or five steps ramping up.

Args:
    order: 3 (default, DPM-Solver-23) or 2 (DPM-Solver-12).
    rtol, atol: tolerances on the state ``x`` (``atol + rtol · max(|x|, |x_new|)``, RMS per sample);
        default 0.01 and 0.01. At these defaults the path error is that of k-diffusion's
        ``sample_dpm_adaptive`` at rtol 1e-2 / atol 1e-3 (which measures ``x/m``) with 0.6–0.7× its
        evaluations per sample (``docs/performance.md``).
    first_step: first ``|Δℓ|`` (default 1.0).
    safety: step-size safety factor (default 0.8).
    shared_steps: one step size for the whole batch (as k-diffusion) instead of one per sample.
    step_control: ``"log_snr"`` (default) or ``"time"`` (see above).
    max_steps: bound on attempted steps per sample (default 10 000); return_partial: see
        :class:`~sdegen.solvers.embedded_rk.EmbeddedRungeKutta`.

Probability-flow ODE only (``noise_scale = 0``), affine SDEs only. A solver instance holds the
controller's per-integration memory: do not run one instance in two integrations at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import bcast
from ..controllers import ControllerState, PIController, _pow
from ..equation import Equation, require_affine
from ._expint import phis
from .base import AdaptiveSolver, Attempt, Clock

__all__ = ["DPMAdaptive", "time_of_log_snr"]

STEP_CONTROLS = ("log_snr", "time")
_BETA = 0.1  # PI memory (Gustafsson; Hairer's DOPRI5 uses 0.04): measured fewer rejections on sampling paths
_FACTOR_MAX = 3.0  # bound on the growth of the ℓ-step per accepted step
_SECANT_ITERATIONS = 10


def _half_log_snr(eq: Any, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, s = eq.marginal(t)
    return m, s, torch.log(m) - torch.log(s)


def time_of_log_snr(eq: Any, target: Tensor, t_a: Tensor, t_b: Tensor, ell_a: Tensor, ell_b: Tensor) -> Tensor:
    """The time ``t`` between ``t_a`` and ``t_b`` (per sample, float64, both ``> 0``) where ``ℓ(t) = target``.

    ``ℓ`` is monotone; ``ell_a``/``ell_b`` are its values at the ends and ``target`` lies between them
    (clamped). Illinois-safeguarded regula falsi in ``log t`` (``ℓ`` is nearly linear there: exactly
    for EDM, asymptotically for VP), ``_SECANT_ITERATIONS`` rounds, all on the device.
    """
    lo_is_a = ell_a <= ell_b
    e_lo = torch.where(lo_is_a, ell_a, ell_b)
    e_hi = torch.where(lo_is_a, ell_b, ell_a)
    target = torch.minimum(torch.maximum(target, e_lo), e_hi)
    u_a, u_b = torch.log(t_a), torch.log(t_b)
    f_a, f_b = ell_a - target, ell_b - target
    side = torch.zeros_like(target)  # Illinois: which end was kept last (+1 a, −1 b)
    for _ in range(_SECANT_ITERATIONS):
        den = f_b - f_a
        w = torch.where(den != 0, f_b / torch.where(den != 0, den, torch.ones_like(den)), torch.full_like(den, 0.5))
        u = u_b - w * (u_b - u_a)
        u = torch.where(torch.isfinite(u), u, 0.5 * (u_a + u_b))
        f = _half_log_snr(eq, torch.exp(u))[2] - target
        same_as_a = torch.sign(f) == torch.sign(f_a)
        # replace the end with the same sign; halve the other end's value if it is kept twice in a row
        u_a, f_a = torch.where(same_as_a, u, u_a), torch.where(same_as_a, f, torch.where(side < 0, 0.5 * f_a, f_a))
        u_b, f_b = torch.where(same_as_a, u_b, u), torch.where(same_as_a, torch.where(side > 0, 0.5 * f_b, f_b), f)
        side = torch.where(same_as_a, torch.ones_like(side), -torch.ones_like(side))
    return torch.exp(torch.where(f_a.abs() < f_b.abs(), u_a, u_b))


@dataclass
class _LogSNRState(ControllerState):
    """The PI memory plus each sample's current time (to convert ``ℓ``-steps into time steps)."""

    t: Tensor | None = None

    def select(self, keep: Tensor) -> _LogSNRState:
        return _LogSNRState(self.err_old[keep], self.rejected[keep], None if self.t is None else self.t[keep])


class LogSNRController(PIController):
    """:class:`~sdegen.controllers.PIController` whose step-size rule acts on the step in ``ℓ = log(m/s)``.

    The loop still steps in its own time: every proposal ``h_ℓ · factor`` is converted into the time step
    that has that ``ℓ``-length from where the sample stands (:func:`time_of_log_snr`). ``bind`` gives it
    the equation and the integration interval (:meth:`DPMAdaptive.init_state` does).

    Args: those of :class:`~sdegen.controllers.PIController`, and
        first_step_log_snr: the first step's ``|Δℓ|`` (default 0.05) when ``first_step`` (time units) is None;
        accept_max: accept steps whose scaled error is at most this (default 1; k-diffusion accepts up to
            ``0.81^{−3} ≈ 1.9``).
    """

    def __init__(self, *args: Any, first_step_log_snr: float = 0.05, accept_max: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if isinstance(accept_max, bool) or not isinstance(accept_max, int | float) or not 1.0 <= accept_max < math.inf:
            raise ValueError(f"accept_max must be a number >= 1, got {accept_max!r}")
        self.accept_max = float(accept_max)
        if isinstance(first_step_log_snr, bool) or not isinstance(first_step_log_snr, int | float):
            raise TypeError(f"first_step must be a positive number, got {first_step_log_snr!r}")
        if not first_step_log_snr > 0 or first_step_log_snr == float("inf"):
            raise ValueError(f"first_step must be a positive finite number, got {first_step_log_snr}")
        self.first_step_log_snr = float(first_step_log_snr)
        self._eq: Any = None
        self._t0: Tensor | None = None
        self._lo = self._hi = self._tiny = 0.0
        self._dir = -1.0

    def bind(self, eq: Any, lo: float, hi: float) -> None:
        self._eq, self._lo, self._hi = eq, lo, hi
        self._tiny = 64 * torch.finfo(torch.float64).eps * max(abs(lo), abs(hi), hi - lo)

    def _target_time(self, t_from: Tensor, ell_from: Tensor, dell: Tensor) -> Tensor:
        """Time steps ``|Δt|`` from ``t_from`` whose ``ℓ``-length is ``dell`` (clipped at the interval's end)."""
        t_end = torch.full_like(t_from, self._lo if self._dir < 0 else self._hi)
        ell_end = _half_log_snr(self._eq, t_end)[2]
        sgn = torch.sign(ell_end - ell_from)
        target = ell_from + sgn * dell
        t_new = time_of_log_snr(self._eq, target, t_from, t_end, ell_from, ell_end)
        h = (t_new - t_from).abs()
        # a step that reaches the end of the interval must cover it whatever the rounding of t: the loop clips it
        beyond = sgn * (target - ell_end) >= 0
        return torch.where(beyond, 2.0 * (t_end - t_from).abs() + self._tiny, h)

    def initial_step(self, func, x, t, f0, direction, span, error_order, norm) -> Tensor:  # type: ignore[override]
        self._dir = float(direction)
        self._t0 = t.clone()
        if self.first_step is not None:
            h = torch.full_like(t, min(self.first_step, span))
        else:
            ell = _half_log_snr(self._eq, t)[2]
            h = self._target_time(t, ell, torch.full_like(t, self.first_step_log_snr))
        h = h.clamp(min=self._tiny, max=span)
        return h.min().expand(h.shape[0]).clone() if self.shared else h

    def init(self, n: int, device: torch.device) -> _LogSNRState:
        base = super().init(n, device)
        t = self._t0 if self._t0 is not None else torch.full((n,), self._hi, dtype=torch.float64, device=device)
        return _LogSNRState(base.err_old, base.rejected, t)

    def adapt(self, h, en, finite, error_order, state):  # type: ignore[override]
        if self.shared:
            finite = finite.all().expand(finite.shape[0])
        en = torch.where(finite, en, torch.full_like(en, math.inf))
        accept = en <= self.accept_max
        expo = 1.0 / (error_order + 1.0)
        safe_en = torch.where(finite, en.clamp_min(1e-300), torch.ones_like(en))
        fac = self.safety * _pow(safe_en, -(expo - 0.75 * self.beta)) * _pow(state.err_old, self.beta)
        fac = fac.clamp(self.factor_min, self.factor_max)
        fac = torch.where(state.rejected | ~accept, fac.clamp_max(1.0), fac)
        fac = torch.where(finite, fac, torch.full_like(fac, self.factor_min))
        err_old = torch.where(accept, en.clamp_min(1e-4), state.err_old)
        t = state.t
        t_to = (t + self._dir * h).clamp(self._lo, self._hi)
        ell_t = _half_log_snr(self._eq, t)[2]
        ell_to = _half_log_snr(self._eq, t_to)[2]
        t_from = torch.where(accept, t_to, t)
        ell_from = torch.where(accept, ell_to, ell_t)
        dell = (ell_to - ell_t).abs() * fac
        h_next = self._target_time(t_from, ell_from, dell)
        # at the end of the interval the loop drops the sample; keep a positive placeholder step
        h_next = torch.where(h_next > 0, h_next, h * fac)
        return accept, h_next, _LogSNRState(err_old, ~accept, t_from)


@dataclass
class _Dense:
    eq: Any
    t: Tensor
    ell: Tensor
    s: Tensor
    h: Tensor  # ℓ-length of the step
    d0: Tensor
    d_end: Tensor


class DPMAdaptive(AdaptiveSolver):
    """DPM-Solver-12/23 (data prediction) with per-sample step sizes controlled in log-SNR (module docstring)."""

    name = "dpm_adaptive"
    zero_signal_start = "refuse"  # its step control in log-SNR cannot start at log-SNR = −∞ (m = 0)
    order = 3.0
    error_order = 2.0
    nfe_per_step = 3
    supports_sde: ClassVar[bool] = False
    supports_ode: ClassVar[bool] = True

    def __init__(
        self,
        order: int = 3,
        rtol: float = 0.01,
        atol: float = 0.01,
        first_step: float = 1.0,
        safety: float = 0.8,
        shared_steps: bool = False,
        step_control: str = "log_snr",
        max_steps: int = 10_000,
        return_partial: bool = False,
    ):
        if order not in (2, 3) or isinstance(order, bool):
            raise ValueError(f"solver 'dpm_adaptive': order must be 2 or 3, got {order!r}")
        if step_control not in STEP_CONTROLS:
            raise ValueError(
                f"solver 'dpm_adaptive': step_control must be one of {STEP_CONTROLS}, got {step_control!r}"
            )
        if step_control == "log_snr":
            controller: PIController = LogSNRController(
                rtol, atol, safety=safety, beta=_BETA, factor_max=_FACTOR_MAX, shared=shared_steps,
                first_step_log_snr=first_step,
            )
        else:
            controller = PIController(
                rtol, atol, safety=safety, beta=_BETA, factor_max=_FACTOR_MAX, shared=shared_steps
            )
        super().__init__(controller, max_steps=max_steps, return_partial=return_partial)
        self.p = int(order)
        self.order = float(order)  # type: ignore[misc]
        self.error_order = float(order - 1)  # type: ignore[misc]
        self.nfe_per_step = int(order)  # type: ignore[misc]
        self.step_control = step_control

    def check(self, eq: Equation) -> None:
        super().check(eq)
        require_affine(eq, self.name)

    # -- the step ---------------------------------------------------------------------------------------
    def init_state(self, eq: Equation, x: Tensor, t: Tensor, clock: Clock) -> tuple[Tensor, ...]:  # type: ignore[override]
        if isinstance(self.controller, LogSNRController):
            self.controller.bind(eq, clock.lo, clock.hi)
        d0 = eq.denoise(x, clock(t))  # type: ignore[attr-defined]
        self._f0 = self._drift(eq, x, t, d0, clock)
        return (d0,)

    def _drift(self, eq: Any, x: Tensor, t: Tensor, d0: Tensor, clock: Clock) -> Tensor:
        """``dx/dt`` from ``x̂0`` (no evaluation): the score is ``(m x̂0 − x)/s²``."""
        m, s = eq.marginal(t)
        score = (bcast(m.to(x.dtype), x) * d0 - x) / bcast((s * s).to(x.dtype), x)
        return eq.drift_from_score(x, clock(t), score)

    def derivative(self, state: tuple[Tensor, ...]) -> Tensor | None:
        return getattr(self, "_f0", None)

    def attempt(
        self, eq: Equation, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor, state: tuple[Tensor, ...], clock: Clock
    ) -> Attempt:
        (d0,) = state
        dt = x.dtype
        m0, s0, ell0 = _half_log_snr(eq, t)
        m1, s1, ell1 = _half_log_snr(eq, t_next)
        hl = ell1 - ell0  # > 0 when sampling
        ratios = (1 / 3, 2 / 3) if self.p == 3 else (1 / 2,)
        stage_t, stage_r = [], []
        for r in ratios:
            ts = time_of_log_snr(eq, ell0 + r * hl, t, t_next, ell0, ell1)
            stage_t.append(ts)
            stage_r.append(torch.where(hl != 0, (_half_log_snr(eq, ts)[2] - ell0) / hl, torch.full_like(hl, r)))

        def c(v: Tensor) -> Tensor:
            return bcast(v.to(dt), x)

        # first stage (DDIM from D0) at r1
        ms, ss, els = _half_log_snr(eq, stage_t[0])
        p1 = phis(els - ell0)[0]
        x1 = c(ss / s0) * x + c(ms * p1) * d0
        d1 = eq.denoise(x1, clock(stage_t[0]))  # type: ignore[attr-defined]
        r1 = stage_r[0]
        f1, f2, f3 = phis(hl)
        base = c(s1 / s0) * x + c(m1 * f1) * d0
        slope1 = (d1 - d0) / c(r1)  # a of the linear interpolant (per unit u)
        x_low = base + c(m1 * f2) * slope1
        if self.p == 2:
            x_high, x_low = x_low, base
        else:
            # second stage at r2: linear interpolant through D0, D1 integrated exactly over [0, r2 h]
            r2 = stage_r[1]
            ms2, ss2, els2 = _half_log_snr(eq, stage_t[1])
            v2 = els2 - ell0
            q1, q2, _ = phis(v2)
            x2 = c(ss2 / s0) * x + c(ms2 * q1) * d0 + c(ms2 * q2 * r2) * slope1
            d2 = eq.denoise(x2, clock(stage_t[1]))  # type: ignore[attr-defined]
            slope2 = (d2 - d0) / c(r2)
            b = (slope2 - slope1) / c(r2 - r1)
            a = slope1 - b * c(r1)
            x_high = base + c(m1 * f2) * a + c(-2.0 * m1 * f3) * b
        d_end = eq.denoise(x_high, clock(t_next))  # type: ignore[attr-defined]
        dense = _Dense(eq, t, ell0, s0, hl, d0, d_end)
        return Attempt(x=x_high, error=x_high - x_low, state=(d_end,), dense=dense, derivative=d_end)

    def interpolate(self, x: Tensor, h: Tensor, dense: Any, theta: Tensor, index: Tensor) -> Tensor:
        """Second order: the exponential integrator of the linear interpolant of ``x̂0`` between the step's ends."""
        y = x[index]
        tau = dense.t[index] + theta.to(torch.float64) * h[index]
        m, s, ell = _half_log_snr(dense.eq, tau)
        v = ell - dense.ell[index]
        f1, f2, _ = phis(v)
        hl = dense.h[index]
        frac = torch.where(hl != 0, v / torch.where(hl != 0, hl, torch.ones_like(hl)), torch.zeros_like(hl))
        d0, d1 = dense.d0[index], dense.d_end[index]

        def c(w: Tensor) -> Tensor:
            return bcast(w.to(y.dtype), y)

        return c(s / dense.s[index]) * y + c(m * f1) * d0 + c(m * f2 * frac) * (d1 - d0)

    def __repr__(self) -> str:
        c = self.controller
        shared = ", shared_steps=True" if c.shared else ""
        return (f"DPMAdaptive(order={self.p}, rtol={c.rtol}, atol={c.atol}, step_control={self.step_control!r}"
                f"{shared})")
