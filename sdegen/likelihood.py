"""Exact log-likelihood through the instantaneous change of variables, in nats and bits/dim.

Along the probability-flow ODE ``dx/dt = F(x, t) = f(x, t) − ½ g(t)² ∇log p_t(x)`` (Song et al.
2021, eq. 13), the density obeys ``d log p_t(x(t)) / dt = −∇·F(x(t), t)`` (Chen et al. 2018,
"Neural ODEs", Thm. 1). Integrating the augmented state ``[x, Δ]`` with ``dΔ/dt = ∇·F`` from
``t_min`` up to ``t_max`` gives (Song et al. 2021, eq. 39 / App. D.2)::

    log p_{t_min}(x) = log p_{t_max}(x(t_max)) + ∫_{t_min}^{t_max} ∇·F(x(t), t) dt

:class:`AugmentedFlow` is that augmented ODE as an :class:`~sdegen.equation.Equation`; it is integrated by
:func:`sdegen.integrate.integrate` with any ODE solver — the built-in adaptive ones (``rk45``, ``tsit5``,
``bosh3``: per-sample step control), fixed-step ones given ``steps=`` (``heun``, ``euler_maruyama``), or
``torchdiffeq:<method>`` — in a time variable of choice: :class:`TimeChange` integrates
``d[x, Δ]/du = [F, ∇·F] · dt/du`` in ``u = u(t)`` (:class:`TimeVariable`; by default ``"vp_t"``, the
clock of the standard VP SDE, which needed the fewest evaluations at equal error). The divergence is
computed *exactly* (``trace="exact"``: ``D`` vector–Jacobian products, batched and chunked,
:func:`sdegen.divergence.divergence_exact`) or estimated: Hutchinson's estimator (``trace="hutchinson"``:
``E[εᵀ (∂F/∂x) ε]`` with ``probes`` Rademacher or Gaussian vectors drawn once per solve and held fixed along
the path, Grathwohl et al. 2019, "FFJORD", eq. 7) or Hutch++ (``trace="hutch++"``, Meyer et al. 2021), each
probe integrated in its own column so that the spread of the columns gives every sample a standard error.

The ODE runs under ``torch.no_grad``; gradients are taken only inside each divergence evaluation and
never kept across steps, so memory does not grow with the number of steps. The score must be
differentiable in ``x``: a model run under ``torch.no_grad``/``inference_mode`` or detaching its input
raises instead of returning a wrong value. Defaults follow Song et al. (2021), App. D.2: ``t_min = 1e-5``,
``rtol = atol = 1e-5``, an adaptive RK45.

See ``docs/likelihood.md`` for the derivations, including the bits/dim conventions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._batching import batch_noise, chunk_noise, chunks, select_model
from ._utils import bcast
from .divergence import divergence_exact, hutchinson_estimates, hutchpp_estimates
from .divergence import exact_mode as resolve_exact_mode
from .equation import EquationBase, rms_norm
from .errors import NotDifferentiableError
from .grids import make_grid
from .integrate import Solution, integrate
from .noise import NoiseSource, normal_like, rademacher_like
from .reverse import ReverseSDE, ScoreFn
from .sample import check_state
from .sde import SDE, LinearSDE
from .solvers import AdaptiveSolver, PathSolver, Solver, resolve_solver

__all__ = [
    "log_likelihood",
    "bits_per_dim",
    "dequantization_offset",
    "encode",
    "decode",
    "LikelihoodInfo",
    "AugmentedFlow",
    "TimeVariable",
    "TimeChange",
    "resolve_time_variable",
    "NotDifferentiableError",
]

TRACES = ("exact", "hutchinson", "hutch++")
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")
TIME_VARIABLES = ("auto", "t", "vp_t", "sigma", "log_sigma", "logsnr")
AUTO_TIME_VARIABLE = "vp_t"
_REF_BETA = (0.1, 20.0)  # the reference VP schedule of time_variable="vp_t" (Song et al. 2021)
HUTCHPP_DEFAULT_PROBES = 9
DEFAULT_SOLVER = "rk45"


@dataclass
class LikelihoodInfo:
    """Diagnostics of a likelihood / encode / decode solve (chunks merged).

    Attributes:
        nfe: network evaluations along the longest sample path (batched evaluations of the
            probability-flow drift, a batched call counting once; the largest chunk's count, summed over
            dequantisation repeats) — the same meaning as :attr:`sdegen.integrate.Solution.nfe`. With
            ``trace="exact"`` each evaluation also costs ``ceil(D / chunk_size)`` batched backward passes;
            with Hutchinson one.
        network_calls: batched model calls in total, over all ``max_batch`` chunks and repeats.
        accepted_steps, rejected_steps: ``(batch,)`` int64 steps of each sample (adaptive solvers), else None.
        latent: the probability-flow latent ``x(t_max)`` ``(batch, *dims)`` (for bits/dim: of the last draw).
        prior_logp: ``log p_{t_max}(x(t_max))`` ``(batch,)`` nats (None for encode/decode).
        delta_logp: ``∫ ∇·F dt`` ``(batch,)`` nats (None for encode/decode).
        solver: the solver's name.
        bpd_draws: ``(repeats, batch)`` bits/dim of each dequantisation draw (bits_per_dim only).
        trace_se: ``(batch,)`` standard error (nats) of each sample's log-likelihood from the stochastic trace:
            the spread of the per-probe (Hutch++: per-residual-probe) integrals over ``sqrt(K)``; zeros for
            the exact trace, None with a single probe (no spread to measure). For bits/dim: of the mean over
            the draws.
        bpd_se: ``trace_se`` in bits/dim (bits_per_dim only).
        time_variable: the variable the ODE was integrated in (``"t"``, ``"log_sigma"``, ...).
        seconds: wall time of the solves (all chunks and draws); per sample ``seconds / batch``.
    """

    nfe: int
    network_calls: int
    accepted_steps: Tensor | None
    rejected_steps: Tensor | None
    latent: Tensor
    prior_logp: Tensor | None
    delta_logp: Tensor | None
    solver: str
    bpd_draws: Tensor | None = None
    trace_se: Tensor | None = None
    bpd_se: Tensor | None = None
    time_variable: str = "t"
    seconds: float = 0.0


class TimeVariable:
    """A monotone change of integration variable ``u = u(t)`` for the probability-flow ODE.

    The ODE ``dy/dt = G(y, t)`` (``y = [x, Δ]``) becomes ``dy/du = G(y, t(u)) · dt/du``: the Δ column
    transforms with the state, so ``Δ(u_end)`` is the same integral ``∫ ∇·F dt``. The variables of an affine
    SDE (:class:`~sdegen.LinearSDE` with kernel ``(m, s)``, ``σ = s/m``, ``dσ²/dt = g²/m²``):

    * ``"t"``: ``u = t``, ``dt/du = 1``;
    * ``"vp_t"``: ``u = τ(σ)``, the time at which the reference VP SDE (``β`` linear from 0.1 to 20, Song
      et al. 2021) reaches the noise level ``σ``: ``τ = (√(β₀² + 2(β₁ − β₀) log(1 + σ²)) − β₀)/(β₁ − β₀)``,
      ``dt/du = (m² + s²) β_ref(τ) / g²``. It is ``t`` itself for ``VPSDE(0.1, 20)``; for other SDEs it runs
      every SDE on that clock — about ``10 σ²`` for ``σ < 0.02``, ``σ/√10`` up to ``σ ≈ 1``, ``√(log σ²/10)``
      beyond — and needed the fewest evaluations at equal error on the benchmark problems
      (``docs/likelihood.md``);
    * ``"sigma"``: ``u = σ``, ``dt/du = 2 s m / g²`` (k-diffusion's variable);
    * ``"log_sigma"``: ``u = log σ``, ``dt/du = 2 s² / g²`` (then ``F dt/du = −s² (x + ∇log p)`` for VP:
      the schedule drops out);
    * ``"logsnr"``: ``u = −2 log σ``, ``dt/du = −s² / g²`` (decreasing; the same steps as ``"log_sigma"``).

    ``t(u)`` comes from the SDE's :meth:`~sdegen.LinearSDE.t_from_sigma`; at the two ends the exact
    ``t_min``/``t_max`` are used and ``t`` is clamped to them, so the model never sees a time outside the interval.

    Args:
        name: one of ``"t"``, ``"vp_t"``, ``"sigma"``, ``"log_sigma"``, ``"logsnr"``.
        sde: the forward SDE (a :class:`~sdegen.LinearSDE` for all but ``"t"``).
        t0, t1: the integration interval in ``t`` (``t0 < t1``).

    Raises ``ValueError`` when ``σ`` is not finite, positive and increasing on ``[t0, t1]`` (e.g. ``m = 0`` at
    ``t1``, as for rectified flow at ``t = 1``), when ``g(t) = 0`` inside, or when the SDE's ``g`` is not
    consistent with its ``marginal`` (``d log σ/dt ≠ g²/(2 s²)``); :func:`resolve_time_variable` falls back to
    ``"t"`` in those cases for ``"auto"``.
    """

    def __init__(self, name: str, sde: SDE | None, t0: float, t1: float):
        if name not in TIME_VARIABLES or name == "auto":
            raise ValueError(f"time_variable must be one of {TIME_VARIABLES}, got {name!r}")
        self.name, self.sde, self.t0, self.t1 = name, sde, float(t0), float(t1)
        if name != "t":
            problem = _variable_problem(sde, name, self.t0, self.t1)
            if problem:
                raise ValueError(f"time_variable={name!r} cannot be used here: {problem}; use time_variable='t'")
        self._same_as_t = name == "t"
        ends = self.of_t(torch.tensor([self.t0, self.t1], dtype=torch.float64))
        self.u0, self.u1 = float(ends[0]), float(ends[1])
        if not self._same_as_t:  # e.g. vp_t of VPSDE(0.1, 20): integrate in t itself, with no change of variable
            ts = self.t0 + (self.t1 - self.t0) * torch.linspace(0.0, 1.0, 17, dtype=torch.float64)
            us = self.of_t(ts)
            back, rate = self.time_and_rate(us)
            self._same_as_t = bool(
                (us - ts).abs().max() <= 1e-12 * (1.0 + ts.abs().max())
                and (back.to(torch.float64) - ts).abs().max() <= 1e-12 * (1.0 + ts.abs().max())
                and (rate - 1.0).abs().max() <= 1e-10  # type: ignore[operator]  # not yet "t": a rate
            )
            if self._same_as_t:
                self.u0, self.u1 = self.t0, self.t1

    @property
    def identity(self) -> bool:
        """``u = t`` (``"t"``, or a variable that is ``t`` for this SDE: no :class:`TimeChange` is needed)."""
        return self._same_as_t

    def of_t(self, t: Tensor) -> Tensor:
        """``u(t)`` (float64, shaped like ``t``)."""
        t = t.to(torch.float64)
        if self._same_as_t:
            return t
        return self._u_of_sigma(self.sde.sigma(t).to(torch.float64))  # type: ignore[union-attr]

    def _u_of_sigma(self, sigma: Tensor) -> Tensor:
        if self.name == "sigma":
            return sigma
        if self.name == "log_sigma":
            return torch.log(sigma)
        if self.name == "logsnr":
            return -2.0 * torch.log(sigma)
        b0, b1 = _REF_BETA  # vp_t: solve b0 τ + (b1 − b0) τ²/2 = log(1 + σ²) for τ (stable form)
        big = torch.log1p(sigma * sigma)
        return 2.0 * big / (b0 + torch.sqrt(b0 * b0 + 2.0 * (b1 - b0) * big))

    def _sigma_of_u(self, u: Tensor) -> Tensor:
        if self.name == "sigma":
            return u
        if self.name == "log_sigma":
            return torch.exp(u)
        if self.name == "logsnr":
            return torch.exp(-0.5 * u)
        b0, b1 = _REF_BETA
        return torch.sqrt(torch.expm1(b0 * u + 0.5 * (b1 - b0) * u * u))

    def time_and_rate(self, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """The model time ``t(u)`` (dtype of ``u``) and ``dt/du`` (float64, float32 on MPS; None for ``"t"``)."""
        if self._same_as_t:
            return u, None
        wide = torch.float32 if u.device.type == "mps" else torch.float64  # MPS has no float64
        uu = u.to(wide)
        t = self.sde.t_from_sigma(self._sigma_of_u(uu)).to(device=u.device, dtype=wide)  # type: ignore[union-attr]
        # the exact interval ends (u arrives clamped to them and cast to the time dtype), and never outside
        t = torch.where(u == torch.tensor(self.u1, dtype=u.dtype), self.t1, t)
        t = torch.where(u == torch.tensor(self.u0, dtype=u.dtype), self.t0, t).clamp(self.t0, self.t1)
        m, s = (v.to(wide) for v in self.sde.marginal(t))  # type: ignore[union-attr]
        g2 = self.sde.diffusion_coef(t).to(wide) ** 2  # type: ignore[union-attr]
        if self.name == "log_sigma":
            rate = 2.0 * s * s / g2
        elif self.name == "logsnr":
            rate = -s * s / g2
        elif self.name == "sigma":
            rate = 2.0 * s * m / g2
        else:  # vp_t, at the τ of the (clamped) t
            b0, b1 = _REF_BETA
            tau = self._u_of_sigma(s / m)
            rate = (m * m + s * s) * (b0 + (b1 - b0) * tau) / g2
        return t.to(u.dtype), rate

    def __repr__(self) -> str:
        return f"TimeVariable({self.name!r}, u in [{self.u0:.6g}, {self.u1:.6g}])"


def _variable_problem(sde: Any, name: str, t0: float, t1: float) -> str:
    """Why ``name`` cannot be the integration variable of ``sde`` on ``[t0, t1]`` ('' when it can)."""
    if not isinstance(sde, LinearSDE) or sde.state_dependent:
        return f"it needs an affine SDE (a LinearSDE with additive noise), got {type(sde).__name__}"
    # interior check points (golden-ratio fractions: away from the nodes of a discrete schedule)
    frac = torch.tensor([0.0, 0.2360679775, 0.3819660113, 0.6180339887, 0.8541019662, 1.0], dtype=torch.float64)
    ts = t0 + (t1 - t0) * frac
    try:
        with torch.enable_grad():
            tg = ts.clone().requires_grad_(True)
            sigma = sde.sigma(tg).to(torch.float64)
            (dlog,) = torch.autograd.grad(torch.log(sigma).sum(), tg)
        sigma = sigma.detach()
        m, s = sde.marginal(ts)
        g2 = sde.diffusion_coef(ts).to(torch.float64) ** 2
        back = sde.t_from_sigma(sigma)
    except Exception as err:  # noqa: BLE001 - any failure means: not usable, say why
        return f"evaluating sigma/t_from_sigma/marginal failed ({type(err).__name__}: {err})"
    if not (torch.isfinite(sigma).all() and (sigma > 0).all()):
        return (
            f"sigma = s/m is not finite and positive on [t_min, t_max] = [{t0:g}, {t1:g}] (m = 0 at an end, "
            "e.g. an interpolant at t = 1); lower t_max"
        )
    if not (sigma[1:] > sigma[:-1]).all():
        return "sigma(t) is not increasing on [t_min, t_max]"
    inner = slice(1, -1)
    if not (torch.isfinite(g2[inner]).all() and (g2[inner] > 0).all()):
        return "g(t) is zero or not finite inside the interval"
    want = g2[inner] / (2.0 * s.to(torch.float64)[inner] ** 2)
    if not torch.allclose(dlog[inner], want, rtol=1e-4, atol=0.0):
        return "the SDE's diffusion g(t) is not consistent with its marginal (d log sigma/dt != g^2 / (2 s^2))"
    if not torch.allclose(back.to(torch.float64), ts, rtol=1e-6, atol=1e-9 * max(1.0, abs(t1))):
        return "t_from_sigma is not the inverse of sigma"
    return ""


def resolve_time_variable(name: str, sde: SDE, t0: float, t1: float, *, adaptive: bool = True) -> TimeVariable:
    """The :class:`TimeVariable` for the option ``time_variable=name``.

    ``"auto"``: ``"vp_t"`` for adaptive solvers when the SDE allows it (measured to need the fewest
    evaluations at equal error on the benchmark problems, ``docs/likelihood.md``), else ``"t"`` — for SDEs
    that are not affine, for ``m = 0`` at an end, where ``vp_t`` makes the linear drift more than
    :data:`MAX_STIFFNESS_GAIN` times stiffer than ``t`` at ``t_min`` (sub-VP, interpolants: :func:`_stiffness`),
    and for fixed-step solvers (whose grid is chosen in ``t``).
    """
    if name not in TIME_VARIABLES:
        raise ValueError(f"time_variable must be one of {TIME_VARIABLES}, got {name!r}")
    if name == "auto":
        if adaptive:
            try:  # the constructor runs _variable_problem once and raises ValueError when vp_t cannot be used
                variable = TimeVariable(AUTO_TIME_VARIABLE, sde, t0, t1)
            except ValueError:
                variable = None
            if variable is not None:
                gain = _stiffness(variable) / max(_stiffness(TimeVariable("t", sde, t0, t1)), 1.0)
                if gain <= MAX_STIFFNESS_GAIN:  # (NaN: not measurable, keep t)
                    return variable
        name = "t"
    return TimeVariable(name, sde, t0, t1)


MAX_STIFFNESS_GAIN = 10.0  # time_variable="auto" keeps "t" where vp_t makes the drift this much stiffer at t_min


def _stiffness(variable: TimeVariable) -> float:
    """``max |d log m/du| · (u1 − u0)`` near the data end (``t`` in ``[t0, 10 t0]``): the rate of the linear drift
    ``a(t) = d log m/dt`` in ``u``, per interval length, where ``vp_t`` can squeeze the interval.

    Where ``σ → 0`` faster than ``√t`` while ``m`` still moves (sub-VP: ``σ ≈ β₀ t``; interpolants:
    ``σ ≈ t``), ``vp_t`` squeezes the start (``u ∝ t²``) and ``d log m/du`` grows like ``1/t``: there ``vp_t``
    needed 2–3x the steps of ``t`` for 10–200x the error (``docs/likelihood.md``).
    """
    t0, t1 = variable.t0, variable.t1
    frac = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    ts = t0 * min(10.0, t1 / t0) ** frac if t0 > 0 else torch.full((1,), t0, dtype=torch.float64)
    try:
        dlogm = torch.as_tensor(variable.sde.drift_coef(ts), dtype=torch.float64).reshape(-1).expand_as(ts)  # type: ignore[union-attr]
        _, rate = variable.time_and_rate(variable.of_t(ts))
    except Exception:  # noqa: BLE001 - an SDE whose a(t) cannot be evaluated here: not measurable
        return math.nan
    rate = torch.ones_like(ts) if rate is None else rate
    value = (dlogm * rate).abs().max() * abs(variable.u1 - variable.u0)
    return float(value) if bool(torch.isfinite(value)) else math.inf


class TimeChange(EquationBase):
    """An ODE ``dy/dt = G(y, t)`` integrated in ``u``: ``dy/du = G(y, t(u)) · dt/du`` (:class:`TimeVariable`).

    Wraps any ODE :class:`~sdegen.equation.Equation` (the likelihood's :class:`AugmentedFlow`, the
    probability-flow ODE of :func:`encode`/:func:`decode`); counting, non-finite tracking, the error norm and
    the sample selection are the wrapped equation's.
    """

    is_ode = True

    def __init__(self, eq: Any, variable: TimeVariable):
        super().__init__()
        self.eq, self.variable = eq, variable

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.eq.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:  # EquationBase.__init__ sets it; the count is the wrapped equation's
        pass

    def nonfinite_evaluation(self) -> Tensor | None:
        return self.eq.nonfinite_evaluation()

    def select_samples(self, index: Tensor | None, batch: int) -> None:
        self.eq.select_samples(index, batch)

    def error_norm(self, e: Tensor) -> Tensor:
        return self.eq.error_norm(e)

    def check_start(self, solver: Any, t_start: Tensor) -> None:
        """The wrapped equation's check, at the model time of the start ``u``."""
        self.eq.check_start(solver, self.variable.time_and_rate(t_start.to(torch.float64))[0])

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros((), device=x.device, dtype=x.dtype)

    def drift(self, y: Tensor, u: Tensor) -> Tensor:
        return self._scaled(self.eq.drift, y, u)

    def passive_drift(self, y: Tensor, u: Tensor) -> Tensor:
        return self._scaled(self.eq.passive_drift, y, u)

    def _scaled(self, fn: Callable[[Tensor, Tensor], Tensor], y: Tensor, u: Tensor) -> Tensor:
        t, rate = self.variable.time_and_rate(u)
        out = fn(y, t)
        return out if rate is None else out * bcast(rate.to(out.dtype), out)

    def __repr__(self) -> str:
        return f"TimeChange({self.eq!r}, {self.variable!r})"


class AugmentedFlow(EquationBase):
    """The probability-flow ODE augmented with the log-density change, as an :class:`~sdegen.equation.Equation`.

    The state is ``(batch, D + C)``: the flattened ``x`` and ``C`` columns of ``Δ``; the drift is
    ``[F(x, t), ∇·F(x, t)]`` with the divergence exact (``C = 1``), or one column per Hutchinson probe, or one
    per Hutch++ residual probe (their mean is the estimate, their spread its standard error).

    Args:
        flow: the probability-flow ODE (a :class:`~sdegen.ReverseSDE` with ``noise_scale=0``).
        dims: the per-sample shape of ``x``.
        probes: ``(batch, K, *dims)`` Hutchinson probes (Hutch++: residual probes), or None for the exact trace.
        chunk_size: products per batched backward pass (exact trace: basis vectors; else probes).
        sketch: ``(batch, m, *dims)`` Hutch++ sketch vectors (with ``probes``), or None.
        exact_mode: how the exact trace takes its products (:func:`sdegen.divergence.exact_mode`).

    Its error norm is ``max(RMS over x, RMS over the Δ columns)``: adaptive solvers hold the log-density to
    the tolerance too. ``nfe`` counts its evaluations (one network evaluation and its products each).
    """

    is_ode = True

    def __init__(
        self,
        flow: ReverseSDE,
        dims: tuple[int, ...],
        probes: Tensor | None = None,
        chunk_size: int | None = None,
        *,
        sketch: Tensor | None = None,
        exact_mode: str = "auto",
    ):
        super().__init__()
        if not flow.is_ode:
            raise ValueError("AugmentedFlow needs the probability-flow ODE (noise_scale=0)")
        if sketch is not None and probes is None:
            raise ValueError("a Hutch++ sketch needs residual probes too")
        self.flow = flow
        self.dims = tuple(dims)
        self.d = math.prod(self.dims)
        self._all = (probes, sketch)
        self.probes, self.sketch = probes, sketch
        self.chunk_size = chunk_size
        self.exact_mode = exact_mode
        self.columns = 1 if probes is None else probes.shape[1]
        self._checked = False  # forward mode: the model's autograd graph to x was checked once
        self._memo: dict = {}  # what the model's autograd supports (vmap over the backward, forward mode)

    def select_samples(self, index: Tensor | None, batch: int) -> None:
        self.flow.select_samples(index, batch)
        self.probes, self.sketch = (v if index is None or v is None else v[index] for v in self._all)

    def error_norm(self, e: Tensor) -> Tensor:
        return torch.maximum(rms_norm(e[:, : self.d]), rms_norm(e[:, self.d :]))

    def check_start(self, solver: Any, t_start: Tensor) -> None:
        self.flow.check_start(solver, t_start)

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros((), device=x.device, dtype=x.dtype)

    def passive_drift(self, y: Tensor, t: Tensor) -> Tensor:
        """``[F(x, t), 0]``: at a passive stage the divergence is never used, so only ``F`` is evaluated."""
        n = y.shape[0]
        fx = self.flow.drift(y[:, : self.d].reshape(n, *self.dims), t)
        out = torch.cat([fx.reshape(n, self.d), fx.new_zeros(n, self.columns)], dim=1)
        self.record_evaluation(out)
        return out

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        n = y.shape[0]
        xs = y[:, : self.d].reshape(n, *self.dims)

        def field(z: Tensor) -> Tensor:
            return self.flow.drift(z, t, differentiable=True)

        if self.probes is None:
            mode = resolve_exact_mode(self.exact_mode, xs.device)
            if mode == "jvp":  # torch.func transforms hide requires_grad: check the graph to x once, then go
                if not self._checked:
                    with torch.enable_grad():
                        field(xs.detach().requires_grad_(True))
                    self._checked = True

                def field(z: Tensor) -> Tensor:  # noqa: F811 - the forward-mode field
                    return self.flow.drift(z, t)

            div, fx = divergence_exact(field, xs, chunk_size=self.chunk_size, mode=mode, memo=self._memo)
            cols = div.reshape(n, 1)
        elif self.sketch is None:
            est, fx = hutchinson_estimates(
                field, xs, self.probes.transpose(0, 1), chunk_size=self.chunk_size, memo=self._memo
            )
            cols = est.T
        else:
            est, fx = hutchpp_estimates(
                field,
                xs,
                self.sketch.transpose(0, 1),
                self.probes.transpose(0, 1),
                chunk_size=self.chunk_size,
                memo=self._memo,
            )
            cols = est.T
        out = torch.cat([fx.reshape(n, self.d), cols.to(fx.dtype)], dim=1)
        self.record_evaluation(out)
        return out

    def __repr__(self) -> str:
        if self.probes is None:
            trace = "exact"
        elif self.sketch is None:
            trace = f"hutchinson({self.probes.shape[1]})"
        else:
            trace = f"hutch++(sketch {self.sketch.shape[1]}, probes {self.probes.shape[1]})"
        return f"AugmentedFlow({self.flow!r}, trace={trace})"


# -- validation -------------------------------------------------------------------------------------
def _interval(sde: SDE, t_min: Any, t_max: Any) -> tuple[float, float]:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    hi = sde.T if t_max is None else t_max
    for name, v in (("t_min", t_min), ("t_max", hi)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
    if not 0 < t_min < hi <= sde.T * (1 + 1e-12):
        raise ValueError(f"need 0 < t_min < t_max <= T={sde.T}, got t_min={t_min}, t_max={hi}")
    return float(t_min), float(hi)


def _check_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise NotDifferentiableError(
            "log_likelihood/bits_per_dim need autograd for the divergence: call them outside torch.inference_mode()"
        )


def _is_adaptive(solver: Solver) -> bool:
    return isinstance(solver, AdaptiveSolver) or (isinstance(solver, PathSolver) and getattr(solver, "adaptive", False))


def _times(sde: SDE, solver: Solver, t_from: float, t_to: float, steps: Any, grid: Any, entry: str) -> Tensor:
    """The times to integrate over, in ``t``: the two ends (adaptive), or a grid of ``steps`` (fixed-step)."""
    fixed_backend = isinstance(solver, PathSolver) and not getattr(solver, "adaptive", True)
    needs_grid = not isinstance(solver, AdaptiveSolver | PathSolver) or fixed_backend
    if steps is None:
        if needs_grid and not (fixed_backend and getattr(solver, "step_size", None)):
            raise ValueError(
                f"{entry}: solver {solver.name!r} takes fixed steps: give steps= (e.g. steps=200), or use an "
                "adaptive solver such as 'rk45' (the default), 'tsit5' or 'bosh3'"
            )
        return torch.tensor([t_from, t_to], dtype=torch.float64)
    if not needs_grid:
        raise ValueError(f"{entry}: solver {solver.name!r} is adaptive and chooses its own steps: drop steps=")
    lo, hi = min(t_from, t_to), max(t_from, t_to)
    kind = grid if grid is not None else ("uniform" if isinstance(solver, PathSolver) else solver.default_grid)
    t = make_grid(kind, sde, steps, t_min=lo, t_max=hi)  # decreasing
    return t if t_from > t_to else t.flip(0)


def _check_solver_on(solver: Solver, eq: Any, entry: str) -> None:
    try:
        solver.check(eq)
    except ValueError as err:
        raise ValueError(
            f"{entry}: {err}. It integrates the probability-flow ODE (of [x, Δ] for likelihoods), so it needs an "
            "ODE solver that sees only the drift: 'rk45', 'tsit5', 'bosh3', 'heun' or 'euler_maruyama' with "
            "steps=, or 'torchdiffeq:<method>'"
        ) from None


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _options(
    sde,
    score,
    x,
    trace,
    probes,
    probe_distribution,
    t_min,
    t_max,
    prior_log_prob,
    chunk_size,
    solver,
    solver_options,
    steps,
    grid,
    time_variable,
    exact_mode_,
    entry,
) -> dict[str, Any]:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    check_state(x, "x")
    if not callable(score):
        raise TypeError("score must be a callable score(x, t)")
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if probe_distribution not in PROBE_DISTRIBUTIONS:
        raise ValueError(f"probe_distribution must be one of {PROBE_DISTRIBUTIONS}, got {probe_distribution!r}")
    if probes is None:
        probes = HUTCHPP_DEFAULT_PROBES if trace == "hutch++" else 1
    probes = _positive_int("probes", probes)
    d = math.prod(x.shape[1:])
    sketch = 0
    if trace == "hutch++":
        if probes < 3:
            raise ValueError(
                f"trace='hutch++' needs probes >= 3 (products per evaluation: a sketch of probes // 3 vectors, "
                f"as many for its basis, the rest residual probes), got probes={probes}"
            )
        sketch = min(probes // 3, d)
        # a sketch spanning all D directions makes the trace exact: one residual column (exactly zero) suffices
        probes = 1 if sketch == d else probes - 2 * sketch
    if chunk_size is not None:
        _positive_int("chunk_size", chunk_size)
    resolve_exact_mode(exact_mode_, x.device)  # validates the name
    t0, t1 = _interval(sde, t_min, t_max)
    if prior_log_prob is None:
        if not isinstance(sde, LinearSDE):
            raise ValueError(f"{type(sde).__name__} has no prior: pass prior_log_prob=")
        prior_t = None if t1 == sde.T else t1

        def prior_log_prob(z: Tensor) -> Tensor:
            return sde.prior_log_prob(z, t=prior_t)
    elif not callable(prior_log_prob):
        raise TypeError("prior_log_prob must be a callable z -> (batch,) log-density")
    slv = resolve_solver(solver, solver_options, entry, _LIKELIHOOD_PARAMS)
    times = _times(sde, slv, t0, t1, steps, grid, entry)
    variable = resolve_time_variable(time_variable, sde, t0, t1, adaptive=_is_adaptive(slv))
    return dict(
        trace=trace,
        probes=probes,
        sketch=sketch,
        probe_distribution=probe_distribution,
        prior=prior_log_prob,
        chunk_size=chunk_size,
        solver=slv,
        times=variable.of_t(times),
        variable=variable,
        exact_mode=exact_mode_,
    )


_LIKELIHOOD_PARAMS = (
    "trace",
    "probes",
    "probe_distribution",
    "solver",
    "steps",
    "grid",
    "time_variable",
    "exact_mode",
    "t_min",
    "t_max",
    "prior_log_prob",
    "generator",
    "seed",
    "sample_ids",
    "max_batch",
    "model_kwargs",
    "chunk_size",
    "progress",
    "return_latent",
    "return_info",
    "n_bins",
    "data_range",
    "dequantize",
    "repeats",
)


# -- one chunk --------------------------------------------------------------------------------------
def _ll_chunk(
    sde: SDE,
    score: ScoreFn,
    model_kwargs: dict,
    x: Tensor,
    noise: NoiseSource,
    *,
    trace: str,
    probes: int,
    sketch: int,
    probe_distribution: str,
    prior: Callable[[Tensor], Tensor],
    chunk_size: int | None,
    solver: Solver,
    times: Tensor,
    variable: TimeVariable,
    exact_mode: str,
    progress: bool | None,
) -> tuple[Tensor, LikelihoodInfo]:
    """Log-likelihood of one chunk (validated arguments)."""
    start = time.perf_counter()
    batch, dims = x.shape[0], tuple(x.shape[1:])
    d = math.prod(dims)
    with torch.no_grad():
        x = x.clone() if x.is_inference() else x.detach()
        eps = sk = None
        if trace != "exact":
            draw = rademacher_like if probe_distribution == "rademacher" else normal_like
            # batch first: per-sample noise keys on dim 0; the sketch is drawn before the probes
            if trace == "hutch++":
                sk = draw(noise, x.new_empty((batch, sketch, *dims)))
            eps = draw(noise, x.new_empty((batch, probes, *dims)))
        flow = ReverseSDE(sde, score, 0.0, model_kwargs=model_kwargs)
        aug = AugmentedFlow(flow, dims, eps, chunk_size, sketch=sk, exact_mode=exact_mode)
        eq: Any = aug if variable.identity else TimeChange(aug, variable)
        _check_solver_on(solver, eq, "log_likelihood")
        y0 = torch.cat([x.reshape(batch, d), x.new_zeros(batch, aug.columns)], dim=1)
        sol = integrate(eq, y0, times, solver, None, progress=progress)
        latent = sol.x[:, :d].reshape(x.shape)
        cols = sol.x[:, d:]
        delta = cols.mean(1)
        if trace == "exact" or (trace == "hutch++" and sketch == d):
            se = torch.zeros_like(delta)
        else:
            se = cols.std(1) / math.sqrt(cols.shape[1]) if cols.shape[1] > 1 else None
        prior_logp = prior(latent)
        if not isinstance(prior_logp, Tensor) or prior_logp.shape != (batch,):
            raise ValueError(f"prior_log_prob must return a tensor of shape (batch,)={(batch,)}")
        ll = prior_logp.to(delta.dtype) + delta
    info = _info(sol, latent, prior_logp, delta, solver, variable)
    info.trace_se = se
    info.seconds = time.perf_counter() - start
    return ll, info


def _info(sol: Solution, latent, prior_logp, delta, solver: Solver, variable: TimeVariable) -> LikelihoodInfo:
    return LikelihoodInfo(
        nfe=sol.nfe,
        network_calls=sol.network_calls,
        accepted_steps=sol.stats.get("accepted_steps"),
        rejected_steps=sol.stats.get("rejected_steps"),
        latent=latent,
        prior_logp=prior_logp,
        delta_logp=delta,
        solver=solver.name,
        time_variable=variable.name,
    )


def _merge(infos: list[LikelihoodInfo]) -> LikelihoodInfo:
    if len(infos) == 1:
        return infos[0]

    def cat(name):
        vals = [getattr(i, name) for i in infos]
        if any(not isinstance(v, Tensor) for v in vals):
            return None
        return torch.cat(vals, dim=-1 if name == "bpd_draws" else 0)

    return LikelihoodInfo(
        nfe=max(i.nfe for i in infos),
        network_calls=sum(i.network_calls for i in infos),
        accepted_steps=cat("accepted_steps"),
        rejected_steps=cat("rejected_steps"),
        latent=cat("latent"),
        prior_logp=cat("prior_logp"),
        delta_logp=cat("delta_logp"),
        solver=infos[0].solver,
        bpd_draws=cat("bpd_draws"),
        trace_se=cat("trace_se"),
        bpd_se=cat("bpd_se"),
        time_variable=infos[0].time_variable,
        seconds=sum(i.seconds for i in infos),
    )


def _empty(x: Tensor, solver: Solver, variable: str = "t") -> LikelihoodInfo:
    z = torch.zeros(0, dtype=x.dtype, device=x.device)
    return LikelihoodInfo(
        nfe=0,
        network_calls=0,
        accepted_steps=None,
        rejected_steps=None,
        latent=x.clone(),
        prior_logp=z,
        delta_logp=z,
        solver=solver.name,
        time_variable=variable,
    )


# -- public API ---------------------------------------------------------------------------------------
def log_likelihood(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    *,
    trace: str = "exact",
    probes: int | None = None,
    probe_distribution: str = "rademacher",
    solver: str | Solver = DEFAULT_SOLVER,
    steps: int | None = None,
    grid: str | None = None,
    time_variable: str = "auto",
    exact_mode: str = "auto",
    t_min: float = 1e-5,
    t_max: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    return_latent: bool = False,
    return_info: bool = False,
    **solver_options: Any,
) -> Tensor | tuple:
    """``log p_{t_min}(x)`` per sample, in nats, by the probability-flow ODE.

    Integrates ``[x, Δ]`` with ``dx/dt = F(x, t)`` (the probability-flow drift of ``sde`` under
    ``score``) and ``dΔ/dt = ∇·F`` from ``t_min`` to ``t_max`` — in the variable ``time_variable`` — and
    returns ``prior_log_prob(x(t_max)) + Δ(t_max)`` (Song et al. 2021, eq. 39).

    Args:
        sde: the forward SDE (any :class:`~sdegen.SDE`; without ``prior_log_prob`` it needs a prior).
        score: ``score(x, t) -> ∇ log p_t(x)``; must be differentiable in ``x`` (autograd), else
            :class:`NotDifferentiableError`.
        x: data ``(batch, *dims)``, finite, floating point (float64 for tight checks).
        trace: ``"exact"`` (default: ``D`` vector–Jacobian products per evaluation, chunked by
            ``chunk_size``; no variance), ``"hutchinson"`` (``probes`` products, default 1) or
            ``"hutch++"`` (Hutch++, ``probes`` products per evaluation, default 9: a sketch of
            ``probes // 3`` vectors, as many for its basis, the rest residual probes). The stochastic
            traces are unbiased; with two or more (residual) probes ``info.trace_se`` holds each sample's
            standard error.
        probes: products per evaluation of a stochastic trace (``>= 1``; Hutch++ ``>= 3``); drawn once per
            solve and held fixed along the path.
        probe_distribution: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        solver: a name or a :class:`~sdegen.solvers.Solver` instance. ``"rk45"`` (default), ``"tsit5"``,
            ``"bosh3"``: adaptive, each sample on its own steps, so its value does not depend on its
            batch-mates (``rtol``, ``atol`` default 1e-5, Song et al. 2021; ``shared_steps=True`` for one step
            size per batch). Fixed-step solvers (``"heun"``, ``"euler_maruyama"``) need ``steps=``.
            ``"torchdiffeq:<method>"``: torchdiffeq's loop (fixed-grid methods need ``steps=`` or
            ``step_size=``, in units of the time variable).
        steps, grid: the time grid of a fixed-step solver (``grid`` default the solver's; uniform for
            torchdiffeq), chosen in ``t``; adaptive solvers take neither.
        time_variable: the variable the ODE is integrated in (:class:`TimeVariable`): ``"auto"`` (default:
            ``"vp_t"`` for adaptive solvers on affine SDEs with ``σ`` finite on the interval, unless it stiffens
            the drift at ``t_min`` as for sub-VP and interpolants (:func:`resolve_time_variable`), else ``"t"``),
            ``"t"``, ``"vp_t"``, ``"sigma"``, ``"log_sigma"``, ``"logsnr"``. The result is the same integral;
            the number of steps differs (``docs/likelihood.md``).
        exact_mode: how the exact trace takes its ``D`` products: ``"auto"`` (the fastest measured for the
            device), ``"vjp"``, ``"vjp_loop"``, ``"jvp"`` (:func:`sdegen.divergence.exact_mode`).
        t_min: start time (default 1e-5, as Song et al. 2021 for likelihoods); ``0 < t_min < t_max``.
        t_max: end time (default ``sde.T``); below ``T`` the default prior is
            :meth:`~sdegen.LinearSDE.prior_std_at` ``(t_max)`` (exact only at ``T``).
        prior_log_prob: ``z -> log p(z)`` ``(batch,)`` nats at ``t_max`` (default the SDE's prior there);
            pass the exact ``p_T`` to isolate the solver error.
        max_batch: solve at most this many samples at once (memory: with ``chunk_size`` it bounds the rows of
            every backward pass to ``max_batch · chunk_size``). With ``trace="exact"`` or ``seed=`` the result
            equals the unchunked one; with ``generator=`` the probes differ.
        model_kwargs: keyword arguments for ``score`` (tensors with a leading batch dimension follow
            the chunks and the active set).
        chunk_size: products per batched backward pass (exact trace: basis vectors; else probes): the memory
            bound of one evaluation. Default: the exact trace keeps about ``2**17`` elements per pass on CPU
            (measured fastest there) and ``2**22`` elsewhere, the stochastic traces take all probes at once.
        progress: a tqdm progress bar over each solve (percent of the interval of the time variable), per
            chunk and dequantisation draw: True always, None (default) once a solve has run 2 s (if ``tqdm`` is
            installed), False never.
        generator, seed, sample_ids: source of the Hutchinson probes (see :func:`sdegen.noise.make_noise`);
            with ``seed=`` each sample's probes depend only on ``(seed, sample_id)``.
        return_latent: also return the latent ``x(t_max)``.
        return_info: also return a :class:`LikelihoodInfo` (NFE, steps, latent, prior and Δ terms, the
            standard error of a stochastic trace, wall time).
        **solver_options: options of a named solver (``rtol=``, ``atol=``, ``max_steps=``,
            ``shared_steps=``, ...).

    Returns:
        ``ll`` ``(batch,)`` in nats (dtype of ``x``), then ``latent`` if ``return_latent``, then
        ``info`` if ``return_info`` (a tuple when either is set).
    """
    _check_autograd()
    opts = _options(
        sde,
        score,
        x,
        trace,
        probes,
        probe_distribution,
        t_min,
        t_max,
        prior_log_prob,
        chunk_size,
        solver,
        solver_options,
        steps,
        grid,
        time_variable,
        exact_mode,
        "log_likelihood",
    )
    batch = x.shape[0]
    src = batch_noise(generator, seed, sample_ids, batch, x.device)
    model_kwargs = dict(model_kwargs or {})
    lls, infos = [], []
    for sl in chunks(batch, max_batch):
        part_score, part_kwargs = select_model(score, model_kwargs, batch, sl)
        ll, info = _ll_chunk(
            sde, part_score, part_kwargs, x[sl], chunk_noise(src, sl, batch), progress=progress, **opts
        )
        lls.append(ll)
        infos.append(info)
    if not lls:
        ll, info = x.new_zeros(0), _empty(x, opts["solver"], opts["variable"].name)
    else:
        ll, info = torch.cat(lls), _merge(infos)
    out: tuple = (ll,)
    if return_latent:
        out += (info.latent,)
    if return_info:
        out += (info,)
    return out if len(out) > 1 else ll


def dequantization_offset(n_bins: int, data_range: Sequence[float] = (-1.0, 1.0)) -> float:
    """Bits/dim added to ``−log p / (D ln 2)`` for data on an ``n_bins`` grid scaled to ``[a, b]``.

    ``log2(n_bins) − log2(b − a)``: 7 for 8-bit data on ``[-1, 1]``, 8 on ``[0, 1]`` (derivation in
    :func:`bits_per_dim`).
    """
    a, b = _check_range(data_range)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    return math.log2(n_bins) - math.log2(b - a)


def _check_range(data_range) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (a, b), got {data_range!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"data_range must be finite with a < b, got {data_range!r}")
    return a, b


def bits_per_dim(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    *,
    n_bins: int = 256,
    data_range: Sequence[float] = (-1.0, 1.0),
    dequantize: bool = True,
    repeats: int = 1,
    trace: str = "exact",
    probes: int | None = None,
    probe_distribution: str = "rademacher",
    solver: str | Solver = DEFAULT_SOLVER,
    steps: int | None = None,
    grid: str | None = None,
    time_variable: str = "auto",
    exact_mode: str = "auto",
    t_min: float = 1e-5,
    t_max: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    return_info: bool = False,
    **solver_options: Any,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Bits per dimension of discrete data under the model, with uniform dequantisation.

    **Conventions.** ``x`` holds discrete data already scaled to ``data_range = (a, b)``: level
    ``k ∈ {0, …, n_bins−1}`` is stored as ``x = a + (b − a) k / (n_bins − 1)`` — the usual ``k / 255``
    (``[0, 1]``) or ``2k / 255 − 1`` (``[-1, 1]``) for 8-bit images, ``n_bins = 17`` for
    scikit-learn's digits. Values off this grid (e.g. a wrong ``data_range``) raise ``ValueError``.
    Each level is dequantised to ``v = k + u``, ``u ~ U[0, 1)^D`` (the ``(255 x + u) / 256`` rule for
    ``[0, 1]`` data), and mapped back to the data scale, ``y = a + (b − a) v / n_bins ∈ [a, b)^D``,
    where the model density ``p = p_{t_min}`` is evaluated.

    **Derivation.** The discrete model is ``P(k) = ∫_{[0,1)^D} q(k + u) du`` with ``q`` the model
    density in ``v`` space. The change of variables ``y = a + (b − a) v / n`` gives
    ``q(v) = p(y) · ((b − a)/n)^D``, and Jensen's inequality gives
    ``log P(k) ≥ E_u[log p(y)] + D log((b − a)/n)`` (Theis et al. 2016, "A note on the evaluation
    of generative models", §3.1; Ho et al. 2019, "Flow++", §3.1). Hence the bound, in bits/dim::

        bpd(k) = −log2 P(k) / D ≤ E_u[−log p(y)] / (D ln 2) + log2(n) − log2(b − a)

    The offset ``log2(n) − log2(b − a)`` (:func:`dequantization_offset`) is 7 for ``n = 256`` on
    ``[-1, 1]`` and 8 on ``[0, 1]``; it is derived here for any ``n`` and range instead of being
    hard-coded (score_sde's ``7 − inverse_scaler(−1)``).

    **Repeats.** ``repeats`` independent draws of ``u``; the result is the *mean of the per-draw
    bits/dim* (i.e. the average of log-likelihoods, an unbiased estimate of the bound above), not
    the bits/dim of the averaged likelihood (a log-mean-exp, tighter but biased). All draws are in
    ``info.bpd_draws``. ``dequantize=False`` evaluates at the bin centres (``u = 1/2``): a
    deterministic midpoint approximation, *not* a bound.

    **Image scale.** For ``(B, 3, 32, 32)`` data (``D = 3072``) the exact trace costs 3,072 products per
    evaluation; use ``trace="hutchinson"`` with ``probes >= 4`` (or ``"hutch++"`` for Jacobians with a fast
    decaying spectrum) and read the error bar ``info.bpd_se``; bound memory with ``max_batch`` and
    ``chunk_size``, watch ``progress=True``, and read the time per image as ``info.seconds / B`` (recipe and
    measurements in ``docs/likelihood.md``).

    Args:
        x: ``(batch, *dims)`` discrete data scaled to ``data_range``.
        n_bins: number of discrete levels per dimension (256 for 8-bit data).
        data_range: ``(a, b)`` the data were scaled to.
        dequantize: draw ``u ~ U[0, 1)`` (True) or use ``u = 1/2``.
        repeats: dequantisation draws averaged (``>= 1``).
        generator, seed, sample_ids: source of the dequantisation noise and Hutchinson probes; per
            chunk and repeat, ``u`` is drawn before the probes. ``seed=`` makes each sample's result
            independent of the batch and of ``max_batch``.
        return_info: also return a :class:`LikelihoodInfo` (``bpd_draws``; ``bpd_se``, the standard error of
            each sample's bits/dim from the stochastic trace; ``seconds``).
        other arguments: as :func:`log_likelihood`.

    Returns:
        ``(batch,)`` bits/dim (mean over draws), and a :class:`LikelihoodInfo` with ``return_info``.
    """
    _check_autograd()
    opts = _options(
        sde,
        score,
        x,
        trace,
        probes,
        probe_distribution,
        t_min,
        t_max,
        prior_log_prob,
        chunk_size,
        solver,
        solver_options,
        steps,
        grid,
        time_variable,
        exact_mode,
        "bits_per_dim",
    )
    offset = dequantization_offset(n_bins, data_range)
    a, b = _check_range(data_range)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(dequantize, bool):
        raise TypeError(f"dequantize must be a bool, got {dequantize!r}")
    level = (x.to(torch.float64) - a) / (b - a) * (n_bins - 1)
    k = level.round()
    if k.numel() and ((level - k).abs().max() > 1e-3 or k.min() < 0 or k.max() > n_bins - 1):
        raise ValueError(
            f"x is not on the grid a + (b - a) k / (n_bins - 1), k in 0..{n_bins - 1}, with data_range={data_range} "
            f"and n_bins={n_bins}: check data_range and n_bins (data must be scaled, not dequantised)"
        )
    batch, d = x.shape[0], math.prod(x.shape[1:])
    to_bits = 1.0 / (d * math.log(2.0))
    src = batch_noise(generator, seed, sample_ids, batch, x.device)
    model_kwargs = dict(model_kwargs or {})
    bpds, infos = [], []
    for sl in chunks(batch, max_batch):
        part_noise = chunk_noise(src, sl, batch)
        part_score, part_kwargs = select_model(score, model_kwargs, batch, sl)
        draws, chunk_infos = [], []
        for _ in range(repeats):
            kk = k[sl]
            u = part_noise.uniform(tuple(kk.shape), device=x.device, dtype=torch.float64) if dequantize else 0.5
            y = (a + (b - a) * (kk + u) / n_bins).to(x.dtype)
            ll, info = _ll_chunk(sde, part_score, part_kwargs, y, part_noise, progress=progress, **opts)
            draws.append(-ll * to_bits + offset)
            chunk_infos.append(info)
        draws_t = torch.stack(draws)
        info = chunk_infos[-1]
        info.nfe = sum(i.nfe for i in chunk_infos)
        info.network_calls = sum(i.network_calls for i in chunk_infos)
        info.seconds = sum(i.seconds for i in chunk_infos)
        if info.accepted_steps is not None:
            info.accepted_steps = sum(i.accepted_steps for i in chunk_infos)
            info.rejected_steps = sum(i.rejected_steps for i in chunk_infos)
        ses = [i.trace_se for i in chunk_infos]
        if all(isinstance(v, Tensor) for v in ses):  # the mean over draws: sqrt(Σ se²) / R
            info.trace_se = torch.stack(ses).pow(2).sum(0).sqrt() / repeats
            info.bpd_se = info.trace_se * to_bits
        else:
            info.trace_se = info.bpd_se = None
        info.bpd_draws = draws_t
        bpds.append(draws_t.mean(0))
        infos.append(info)
    if not bpds:
        empty = _empty(x, opts["solver"], opts["variable"].name)
        empty.bpd_draws = x.new_zeros(repeats, 0)
        return (x.new_zeros(0), empty) if return_info else x.new_zeros(0)
    bpd = torch.cat(bpds)
    return (bpd, _merge(infos)) if return_info else bpd


def _flow(
    sde,
    score,
    x,
    t_from,
    t_to,
    *,
    solver,
    steps,
    grid,
    time_variable,
    max_batch,
    model_kwargs,
    progress,
    solver_options,
    return_info,
    entry,
    name,
):
    """Integrate the probability-flow ODE from ``t_from`` to ``t_to`` (either direction)."""
    check_state(x, name)
    if not callable(score):
        raise TypeError("score must be a callable score(x, t)")
    slv = resolve_solver(solver, solver_options, entry, _FLOW_PARAMS)
    times = _times(sde, slv, t_from, t_to, steps, grid, entry)
    lo, hi = min(t_from, t_to), max(t_from, t_to)
    variable = resolve_time_variable(time_variable, sde, lo, hi, adaptive=_is_adaptive(slv))
    times = variable.of_t(times)
    model_kwargs = dict(model_kwargs or {})
    batch = x.shape[0]
    outs, infos = [], []
    with torch.no_grad():
        for sl in chunks(batch, max_batch):
            start = time.perf_counter()
            part_score, part_kwargs = select_model(score, model_kwargs, batch, sl)
            flow = ReverseSDE(sde, part_score, 0.0, model_kwargs=part_kwargs)
            eq: Any = flow if variable.identity else TimeChange(flow, variable)
            _check_solver_on(slv, eq, entry)
            sol = integrate(eq, x[sl].detach(), times, slv, None, progress=progress)
            outs.append(sol.x)
            infos.append(_info(sol, sol.x, None, None, slv, variable))
            infos[-1].seconds = time.perf_counter() - start
    if not outs:
        return (x.clone(), _empty(x, slv, variable.name)) if return_info else x.clone()
    out = torch.cat(outs)
    return (out, _merge(infos)) if return_info else out


_FLOW_PARAMS = (
    "solver",
    "steps",
    "grid",
    "time_variable",
    "t_min",
    "t_max",
    "max_batch",
    "model_kwargs",
    "progress",
    "return_info",
)


def encode(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    *,
    solver: str | Solver = DEFAULT_SOLVER,
    steps: int | None = None,
    grid: str | None = None,
    time_variable: str = "auto",
    t_min: float = 1e-5,
    t_max: float | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool | None = None,
    return_info: bool = False,
    **solver_options: Any,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Probability-flow latent: integrate ``dx/dt = F(x, t)`` from ``t_min`` up to ``t_max`` (default ``T``).

    ``x`` ``(batch, *dims)`` data at ``t_min``; returns ``x(t_max)`` of the same shape (and info).
    Options as :func:`log_likelihood` (``time_variable`` too); :func:`decode` is its inverse up to the ODE
    tolerance. The latent is ill-conditioned near the data: the ODE expands early errors by up to about
    ``1/σ(t_min)``, so check it at a tighter ``rtol`` before using it quantitatively (``docs/likelihood.md``).
    """
    t0, t1 = _interval(sde, t_min, t_max)
    return _flow(
        sde,
        score,
        x,
        t0,
        t1,
        solver=solver,
        steps=steps,
        grid=grid,
        time_variable=time_variable,
        max_batch=max_batch,
        model_kwargs=model_kwargs,
        progress=progress,
        solver_options=solver_options,
        return_info=return_info,
        entry="encode",
        name="x",
    )


def decode(
    sde: SDE,
    score: ScoreFn,
    z: Tensor,
    *,
    solver: str | Solver = DEFAULT_SOLVER,
    steps: int | None = None,
    grid: str | None = None,
    time_variable: str = "auto",
    t_min: float = 1e-5,
    t_max: float | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool | None = None,
    return_info: bool = False,
    **solver_options: Any,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Data from a probability-flow latent: integrate from ``t_max`` (default ``T``) down to ``t_min``.

    With ``time_variable="t"`` this is the same computation as ``reverse_sample(sde, score, x_T=z,
    solver="rk45", noise_scale=0, t_min=t_min)`` with these tolerances; the inverse of :func:`encode`.
    """
    t0, t1 = _interval(sde, t_min, t_max)
    return _flow(
        sde,
        score,
        z,
        t1,
        t0,
        solver=solver,
        steps=steps,
        grid=grid,
        time_variable=time_variable,
        max_batch=max_batch,
        model_kwargs=model_kwargs,
        progress=progress,
        solver_options=solver_options,
        return_info=return_info,
        entry="decode",
        name="z",
    )
