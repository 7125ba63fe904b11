"""DDIM: the first-order exponential integrator in ``(x/m, s/m)`` coordinates (Song et al. 2021a, eq. 12).

For an affine SDE with kernel ``x_t = m(t) x_0 + s(t) z``, let ``x̂0 = E[x_0 | x_t]`` (Tweedie, from one
score evaluation) and ``ε̂ = (x − m x̂0)/s``. One step from ``t`` to ``t' < t`` (primes at ``t'``) is

    x' = m' x̂0 + √(s'² − σ_η²) ε̂ + σ_η z,        z ~ N(0, I),
    σ_η² = η² s'² (1 − r),    r = (m s')² / (m' s)² = exp(logsnr(t) − logsnr(t')) ∈ (0, 1),

``logsnr = log(m²/s²)`` the log-SNR. For the VP/DDPM kernel (``m² = ᾱ``, ``s² = 1 − ᾱ``) ``σ_η²`` is DDIM's
``η² (1−ᾱ')/(1−ᾱ) (1 − ᾱ/ᾱ')`` (eq. 16), so this *is* diffusers' ``DDIMScheduler.step`` for any ``(m, s)``.

* ``η = 0``: ``x'/m' = x/m + (σ' − σ) ε̂`` with ``σ = s/m`` — Euler in ``σ`` for the probability-flow
  ODE ``d(x/m)/dσ = ε̂``, i.e. DPM-Solver-1 (Lu et al. 2022a, §3.3: the exact solution when ``ε̂`` is
  frozen over the step). Order 1.
* General noise scale ``λ_n`` (the ``noise_scale`` of the reverse SDE; ``docs/concepts.md``): with ``x̂0`` frozen,
  ``u = x/m − x̂0`` obeys the linear SDE ``du = (1+λ_n²)/2 · u dτ/τ + λ_n dW_τ`` in ``τ = σ²``, whose
  exact solution over the step is the DDIM step with ``σ_η² = s'² (1 − r^{λ_n²})``, i.e.
  ``η² = (1 − r^{λ_n²}) / (1 − r)``. So ``λ_n = 0`` gives ``η = 0`` and ``λ_n = 1`` gives ``η = 1`` exactly
  (the DDPM posterior ``q(x_{t'} | x_t, x̂0)``, Ho et al. 2020, eq. 7 — "fixed_small" variance), and
  ``η → λ_n`` as steps shrink: DDIM's ``η`` *is* the noise scale of the reverse SDE it integrates.

Options:
    eta: ``None`` (default) — follow the equation's ``noise_scale`` as above (deterministic DDIM for
        ``noise_scale=0``). A number in ``[0, 1]`` — DDIM's ``η`` verbatim at every step (to reproduce
        ``DDIMScheduler(eta=...)``); it must then equal the equation's ``noise_scale`` (the two
        coincide for 0 and 1; for other values they agree as steps shrink), else ``ValueError``:
        pass ``noise_scale=eta`` too.

One score evaluation per step; ``noise`` is drawn only when ``σ_η > 0``. With ``noise=None`` (a
``final_step="noiseless"`` step) the step returns its mean. Needs an affine SDE (``eq.is_affine``).
"""

from __future__ import annotations

import torch

from ..equation import Equation, require_affine
from ..noise import normal_like
from .base import Solver

__all__ = ["DDIM"]


class DDIM(Solver):
    """DDIM / DPM-Solver-1 (ODE) and its stochastic ``η`` family (see the module docstring)."""

    name = "ddim"
    order = 1.0
    strong_order = 0.5
    weak_order = 1.0
    supports_sde = True
    supports_ode = True
    nfe_per_step = 1
    zero_signal_start = "denoise"  # steps with the kernel and the model's x̂0: finite from m = 0

    def __init__(self, eta: float | None = None):
        if eta is not None:
            if isinstance(eta, bool) or not isinstance(eta, int | float):
                raise TypeError(f"eta must be a number in [0, 1] or None, got {eta!r}")
            if not 0.0 <= float(eta) <= 1.0:
                raise ValueError(f"eta must lie in [0, 1], got {eta}")
            eta = float(eta)
        self.eta = eta

    default_noise_scale = 0.0  # DDIM's natural use is deterministic (η = 0)
    default_grid = "log_snr_cos"  # measured: docs/performance.md, "Time grids"
    default_steps = 50

    def check(self, eq: Equation) -> None:
        super().check(eq)
        lam = require_affine(eq, self.name).noise_scale
        if self.eta is not None and lam != self.eta:
            raise ValueError(
                f"solver 'ddim' got eta={self.eta} but noise_scale={lam}: DDIM's eta is the noise scale of "
                f"the reverse SDE it integrates; pass noise_scale={self.eta} as well, or leave eta unset to "
                "follow noise_scale"
            )

    def step(self, eq, x, t, t_next, noise, state):
        m, s = eq.marginal(t)
        m1, s1 = eq.marginal(t_next)
        x0 = eq.denoise(x, t)  # one evaluation: the model's x̂0 (finite also where m = 0)
        s_x, m_x, s1_x, m1_x = (v.to(x.dtype) for v in (s, m, s1, m1))
        eps = (x - m_x * x0) / s_x
        lam = eq.noise_scale
        eta = self.eta if self.eta is not None else lam
        if eta == 0.0:
            return m1_x * x0 + s1_x * eps, state
        # log r = logsnr(t) − logsnr(t') ≤ 0; 1 − r^k = −expm1(k log r), accurate for small steps
        log_r = 2.0 * (torch.log(m) + torch.log(s1) - torch.log(m1) - torch.log(s))
        if self.eta is not None:
            var = eta**2 * s1**2 * -torch.expm1(log_r)
        else:
            var = s1**2 * -torch.expm1(lam**2 * log_r)
        var = torch.minimum(var.clamp_min(0.0), s1**2)
        x_next = m1_x * x0 + torch.sqrt(s1**2 - var).to(x.dtype) * eps
        if noise is not None:
            x_next = x_next + torch.sqrt(var).to(x.dtype) * normal_like(noise, x)
        return x_next, state

    def __repr__(self) -> str:
        return f"DDIM(eta={self.eta})"
