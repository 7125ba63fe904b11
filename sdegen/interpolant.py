"""Interpolant SDEs: flow-matching and rectified-flow paths ``x_t = α(t) x_0 + σ(t) ε`` as affine SDEs.

A flow-matching model (Lipman et al. 2023, *Flow Matching for Generative Modeling*; Liu et al. 2023,
*Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow*; Albergo &
Vanden-Eijnden 2023, *Building Normalizing Flows with Stochastic Interpolants*) is trained on a path
``x_t = α(t) x_0 + σ(t) ε`` between the data (``t = 0``) and Gaussian noise (``t = T``, usually 1). That
path is the Gaussian kernel ``(m, s) = (α, σ)`` of the affine SDE ``dx = a(t) x dt + g(t) dw`` with::

    a = α̇/α,        g² = 2 σ σ̇ − 2 (α̇/α) σ² = 2 σ² (σ̇/σ − α̇/α)

(from ``dm/dt = a m`` and ``d(s²)/dt = 2 a s² + g²``), so the reverse SDE, the λ family, the
probability-flow ODE, priors, exact forward sampling, likelihoods and every solver of sdegen apply
unchanged (:class:`InterpolantSDE` is a :class:`~sdegen.LinearSDE`). The probability-flow drift is the
flow-matching velocity::

    a x − ½ g² ∇log p_t = α̇ x̂0 + σ̇ ε̂ = E[α̇ x_0 + σ̇ ε | x_t]

(``x̂0 = E[x_0 | x_t]``, ``ε̂ = E[ε | x_t] = −σ ∇log p_t``), the quantity a flow-matching network
predicts (:func:`sdegen.from_flow`).

**The noise end.** At ``t = T`` of a flow-matching path ``α = 0``: the forward drift ``α̇/α`` and ``g²``
are infinite and the noise level ``σ/α`` too, but the velocity ``α̇ x̂0 + σ̇ ε̂`` is finite. sdegen's
:class:`~sdegen.ReverseSDE` evaluates the probability-flow ODE in that velocity form (one network
evaluation, from the model's own ``x̂0``), so ODE solvers start at exactly ``t = T``; exponential
integrators (``ddim``, ``ancestral``, ``dpmpp_*``) step from there with the Gaussian kernel for every
noise scale. The reverse SDE with ``noise_scale > 0`` is singular at ``t = T`` (its drift and diffusion
are infinite): solvers that evaluate them there refuse with an error that says to start below ``T``
(``t_max=1 - 1e-3``) or to use a kernel solver. See ``docs/flow-matching.md``.

Ready paths: :class:`FlowMatchingSDE` (rectified flow / conditional OT, ``α = 1 − t``, ``σ = t``) and
:class:`CosineInterpolantSDE` (``α = cos(πt/2)``, ``σ = sin(πt/2)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .sde import LinearSDE, _positive

__all__ = ["InterpolantSDE", "FlowMatchingSDE", "CosineInterpolantSDE", "kernel_rates"]

Schedule = Callable[[Tensor], Tensor]

_PROBES = 257  # points of the float64 grid the schedules are validated on


def _derivative(f: Schedule, t: Tensor) -> Tensor:
    """``df/dt`` elementwise by autograd (works under ``torch.no_grad`` and for inference tensors)."""
    with torch.inference_mode(False), torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        y = f(tt)
        if not isinstance(y, Tensor) or not y.requires_grad:
            return torch.zeros_like(t)  # a constant schedule
        (d,) = torch.autograd.grad(torch.broadcast_to(y, tt.shape).sum(), tt, allow_unused=True)
    return torch.zeros_like(t) if d is None else d.detach()


class InterpolantSDE(LinearSDE):
    """The affine SDE whose kernel is the interpolation ``x_t = α(t) x_0 + σ(t) ε``.

    Args:
        alpha: ``α(t)``, the signal coefficient: a callable mapping a float tensor of times to a tensor of
            the same shape (elementwise, differentiable by autograd unless ``alpha_dot`` is given). It must be
            positive on ``[t_min, T)`` and may vanish at ``T`` (the prior is then exactly ``N(0, σ(T)² I)``).
        sigma: ``σ(t)``, the noise coefficient, positive on ``(0, T]``; ``σ/α`` must increase with ``t``
            (the log-SNR decreases: ``g² ≥ 0``).
        alpha_dot, sigma_dot: optional closed forms of ``dα/dt`` and ``dσ/dt`` (default: autograd).
        T: noise end, default 1. t_min: smallest sampling time, default ``1e-3``.
        name: shown in ``repr``.

    ``marginal(t) = (α, σ)``, ``drift_coef = α̇/α``, ``diffusion_coef = √(2σσ̇ − 2(α̇/α)σ²)``;
    :meth:`rates` gives ``(α, σ, α̇, σ̇)``. Both coefficients are infinite where ``α = 0`` (see the module
    docstring). The schedules are validated once, on a float64 grid of ``[t_min, T]``.
    """

    def __init__(
        self,
        alpha: Schedule,
        sigma: Schedule,
        *,
        alpha_dot: Schedule | None = None,
        sigma_dot: Schedule | None = None,
        T: float = 1.0,
        t_min: float = 1e-3,
        name: str | None = None,
    ):
        for arg, f in (("alpha", alpha), ("sigma", sigma), ("alpha_dot", alpha_dot), ("sigma_dot", sigma_dot)):
            if f is not None and not callable(f):
                raise TypeError(f"{arg} must be a callable of a time tensor, got {type(f).__name__}")
        self._alpha, self._sigma = alpha, sigma
        self._alpha_dot, self._sigma_dot = alpha_dot, sigma_dot
        self.name = name
        super().__init__(_positive("T", T), t_min=t_min)
        self._validate()
        a_T, s_T = (float(v) for v in self.marginal(torch.tensor(self.T, dtype=torch.float64)))
        self.prior_std = s_T
        self.signal_vanishes_at_T = a_T == 0.0

    # -- schedules ---------------------------------------------------------------------------------
    def _eval(self, f: Schedule, t: Tensor, arg: str) -> Tensor:
        out = f(t)
        if not isinstance(out, Tensor):
            out = torch.as_tensor(out, dtype=t.dtype, device=t.device)
        if out.shape != t.shape:
            try:
                out = torch.broadcast_to(out, t.shape)
            except RuntimeError:
                got = tuple(out.shape)
                raise ValueError(f"{arg}(t) must return the shape of t {tuple(t.shape)}, got {got}") from None
        return out.to(t.dtype)

    def rates(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(α, σ, α̇, σ̇)`` at ``t``, tensors shaped like ``t``."""
        t = self._t(t)
        a, s = self._eval(self._alpha, t, "alpha"), self._eval(self._sigma, t, "sigma")
        da = self._eval(self._alpha_dot, t, "alpha_dot") if self._alpha_dot is not None else _derivative(self._alpha, t)
        ds = self._eval(self._sigma_dot, t, "sigma_dot") if self._sigma_dot is not None else _derivative(self._sigma, t)
        return a, s, da.to(t.dtype), ds.to(t.dtype)

    def marginal(self, t):
        t = self._t(t)
        return self._eval(self._alpha, t, "alpha"), self._eval(self._sigma, t, "sigma")

    def drift_coef(self, t):
        a, _, da, _ = self.rates(t)
        return da / a  # -inf where α = 0

    def diffusion_coef(self, t):
        a, s, da, ds = self.rates(t)
        return torch.sqrt(torch.clamp(2.0 * s * ds - 2.0 * (da / a) * s**2, min=0.0))  # +inf where α = 0

    def flow_coefficients(self, t: Tensor, noise_scale: float) -> tuple[Tensor, Tensor]:
        """``(α̇, c)`` with the reverse drift of noise scale ``λ`` equal to ``α̇ x̂0 − c ∇log p_t``.

        ``c = (1 + λ²) σ σ̇ − λ² (α̇/α) σ²``; for ``λ = 0`` (the probability-flow ODE) ``c = σσ̇`` is finite also
        where ``α = 0``: the drift is then the velocity ``α̇ x̂0 + σ̇ ε̂``.
        """
        a, s, da, ds = self.rates(t)
        c = s * ds
        if noise_scale != 0.0:
            lam2 = noise_scale**2
            c = (1.0 + lam2) * c - lam2 * (da / a) * s**2
        return da, c

    def _validate(self) -> None:
        t = torch.linspace(self.t_min, self.T, _PROBES, dtype=torch.float64)
        try:
            a, s, da, ds = self.rates(t)
        except (TypeError, RuntimeError) as err:
            raise TypeError(f"alpha and sigma must map a float64 tensor of times elementwise: {err}") from None
        for arg, v in (("alpha", a), ("sigma", s), ("alpha_dot", da), ("sigma_dot", ds)):
            if not torch.isfinite(v).all():
                bad = float(t[~torch.isfinite(v)][0])
                span = f"[t_min, T] = [{self.t_min}, {self.T}]"
                raise ValueError(f"{arg}(t) must be finite on {span}, got NaN/Inf at t={bad}")
        if (s <= 0).any():
            bad = float(t[s <= 0][0])
            raise ValueError(f"sigma(t) must be > 0 on [t_min, T]; it is not at t={bad}")
        if (a[:-1] <= 0).any() or a[-1] < 0:
            bad = a[:-1] <= 0
            where = float(t[:-1][bad][0]) if bad.any() else self.T
            raise ValueError(f"alpha(t) must be > 0 on [t_min, T) and >= 0 at T; it is not at t={where}")
        ratio = s[:-1] / a[:-1]
        if not (ratio[1:] > ratio[:-1]).all():
            raise ValueError(
                "sigma(t)/alpha(t) must increase with t (the noise level grows towards T; otherwise g(t)² < 0)"
            )

    # -- closed forms subclasses may override -----------------------------------------------------------
    def __repr__(self) -> str:
        name = self.name or "InterpolantSDE"
        return f"{name}(T={self.T}, t_min={self.t_min})"


class FlowMatchingSDE(InterpolantSDE):
    """The rectified-flow / conditional optimal-transport path ``x_t = (1 − t) x_0 + t ε`` (``T = 1``).

    Liu et al. (2023) and Lipman et al. (2023, with ``σ_min = 0``); the path of Stable Diffusion 3 and Flux
    (Esser et al. 2024), where diffusers calls ``t`` the ``sigma``. Its velocity is ``v = ε − x_0``; the
    prior at ``t = 1`` is exactly ``N(0, I)``. ``a = −1/(1 − t)``, ``g² = 2t/(1 − t)``, ``σ(t)/α(t) = t/(1 − t)``.

    Args:
        t_min: smallest sampling time, default ``1e-3``.
    """

    def __init__(self, *, t_min: float = 1e-3):
        super().__init__(
            lambda t: 1.0 - t,
            lambda t: t,
            alpha_dot=lambda t: torch.full_like(t, -1.0),
            sigma_dot=torch.ones_like,
            T=1.0,
            t_min=t_min,
            name="FlowMatchingSDE",
        )

    def sigma(self, t):
        t = self._t(t)
        return t / (1.0 - t)

    def t_from_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1.0 + sigma))


class CosineInterpolantSDE(InterpolantSDE):
    """The trigonometric path ``x_t = cos(πt/2) x_0 + sin(πt/2) ε`` (``T = 1``; variance preserving).

    Albergo & Vanden-Eijnden (2023); the cosine schedule of Nichol & Dhariwal (2021) without its offset. It is
    written ``α = sin(π(1 − t)/2)`` so that ``α(1) = 0`` exactly. ``σ(t)/α(t) = tan(πt/2)``.

    Args:
        t_min: smallest sampling time, default ``1e-3``.
    """

    def __init__(self, *, t_min: float = 1e-3):
        h = 0.5 * math.pi
        super().__init__(
            lambda t: torch.sin(h * (1.0 - t)),
            lambda t: torch.sin(h * t),
            alpha_dot=lambda t: -h * torch.cos(h * (1.0 - t)),
            sigma_dot=lambda t: h * torch.cos(h * t),
            T=1.0,
            t_min=t_min,
            name="CosineInterpolantSDE",
        )

    def sigma(self, t):
        t = self._t(t)
        return torch.sin(0.5 * math.pi * t) / torch.sin(0.5 * math.pi * (1.0 - t))

    def t_from_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.atan(sigma) * (2.0 / math.pi)


def kernel_rates(sde: LinearSDE, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m, s, dm/dt, ds/dt)`` of any affine SDE's kernel at ``t`` (tensors shaped like ``t``).

    Interpolant SDEs give them directly (:meth:`InterpolantSDE.rates`); for another
    :class:`~sdegen.LinearSDE` they follow from ``dm/dt = a m`` and ``d(s²)/dt = 2 a s² + g²``:
    ``ds/dt = (g² + 2 a s²)/(2 s)`` (which divides by ``s``: not at ``t = 0``).
    """
    if isinstance(sde, InterpolantSDE):
        return sde.rates(t)
    if not hasattr(sde, "marginal"):
        raise TypeError(f"an affine SDE with marginal(t) is needed, got {type(sde).__name__}")
    m, s = sde.marginal(t)
    a = sde.drift_coef(t).to(m.dtype)
    g = sde.diffusion_coef(t).to(m.dtype)
    return m, s, a * m, (g**2 + 2.0 * a * s**2) / (2.0 * s)
