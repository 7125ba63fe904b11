"""The EDM sampler: Heun on the probability-flow ODE in the noise level σ, with optional churn.

Karras et al. (2022), *Elucidating the Design Space of Diffusion-Based Generative Models*,
Alg. 1 (deterministic, ``S_churn = 0``) and Alg. 2 (stochastic). Any affine SDE works through
their eq. 4 with a scale ``m(t)``: with ``σ = s/m`` and ``y = x/m`` the probability-flow ODE is
``dy/dσ = (y − D(y; σ))/σ``, where ``D = x̂0`` is Tweedie's denoiser (``eq.denoise``). Step ``i``:

1. churn (Alg. 2, lines 4-6): ``γ_i = min(S_churn/N, √2 − 1)`` if ``S_tmin ≤ σ_i ≤ S_tmax`` else 0;
   ``σ̂ = σ_i (1 + γ_i)``; ``ŷ = y_i + √(σ̂² − σ_i²) S_noise ε`` with ``ε ~ N(0, I)``;
2. Heun (lines 7-10): ``d = (ŷ − D(ŷ; σ̂))/σ̂``, ``y' = ŷ + (σ_{i+1} − σ̂) d``,
   ``y_{i+1} = ŷ + (σ_{i+1} − σ̂)(d + (y' − D(y'; σ_{i+1}))/σ_{i+1})/2``.

Choices where sdegen differs from Alg. 2, and why:

* sdegen's grids end at ``t_min > 0`` (``σ_min``), never at ``σ = 0``, so **every step is a Heun
  step** (2 evaluations; ``2N`` NFE for ``N`` steps). Alg. 2's last Euler step to ``σ = 0`` is
  exactly ``x̂0 = D(y_N; σ_N)``: ask for it with ``final_step="tweedie"`` (one more evaluation), so
  EDM's "18 steps, 35 NFE" is ``steps=17, grid="edm", final_step="tweedie"`` (2·17 + 1 NFE).
* ``σ̂`` is capped at ``σ(T)``: the network is never evaluated outside the time range of its SDE
  (k-diffusion's default ``S_tmax = inf`` evaluates it above ``σ_max``). The time ``t̂`` with
  ``σ(t̂) = σ̂`` is found by bisection on ``eq.marginal`` once per grid, on the device.
* with ``S_churn = 0`` the step is Alg. 1; on ``EDMSDE`` (``m = 1``, ``σ = t``) it coincides with
  ``solver="heun"`` on the same grid up to rounding.
* ``D`` is never formed: in ``y`` Tweedie's formula gives ``(y − D(y; σ))/σ = −s ∇log p_t(x)``, so a
  step is two score evaluations and five fused tensor operations; every per-step coefficient is
  computed once per grid in :meth:`init_state` (no per-step arithmetic on times, no sync).

Noise comes from the integrator's :class:`~sdegen.noise.NoiseSource`; a ``noise=None`` step (e.g.
``final_step="noiseless"``) adds no churn. When ``S_churn > 0`` one normal draw is made on every
step (multiplied by zero outside ``[S_tmin, S_tmax]``), so no step needs a host-device sync.
ODE only (``noise_scale=0``): the churn is the sampler's own stochasticity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..equation import Equation, require_affine
from ..noise import normal_like
from .base import Solver

__all__ = ["EDMSampler"]

_BISECTIONS = 60


@dataclass
class _EDMState:
    """Per-step coefficients (lists of 0-d tensors in the state's dtype, one per step) and a counter.

    With ``ŷ = x/m_i + churn_i ε`` (``y = x/m``), ``d = −ŝ score(m̂ ŷ, t̂)`` and ``Δ = σ_{i+1} − σ̂``:
    ``y' = ŷ + Δ d``, ``x' = m_{i+1} y'``, ``x_{i+1} = m_{i+1} (ŷ + Δ (d + d')/2)`` with
    ``d' = −s_{i+1} score(x', t_{i+1})``.  (In ``y``, Tweedie's ``D = y + σ s ∇log p`` gives
    ``(y − D)/σ = −s ∇log p``: Karras et al.'s ``dy/dσ`` without forming ``D``.)
    """

    inv_m: list  # 1/m_i
    m_hat: list  # m(t̂_i)
    t_hat: list | None  # t̂_i (None: no churn, t̂ = t_i)
    churn: list | None  # S_noise √(σ̂² − σ_i²) (None: no churn)
    c_pred: list  # −Δ ŝ
    c1: list  # −Δ ŝ / 2
    c2: list  # −Δ s_{i+1} / 2
    m_next: list  # m_{i+1}
    step: int = 0


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


class EDMSampler(Solver):
    """Karras et al. (2022) Alg. 2: Heun in σ with churn ``(S_churn, S_tmin, S_tmax, S_noise)``.

    Args:
        S_churn: total churn ``≥ 0`` (``γ_i = min(S_churn/N, √2 − 1)``); 0 (default) is Alg. 1.
        S_tmin, S_tmax: churn only where ``S_tmin ≤ σ_i ≤ S_tmax`` (noise-level units, ``σ = s/m``);
            defaults 0 and ``inf``.
        S_noise: scale of the added noise (``≥ 0``, default 1; EDM used 1.003-1.007 on ImageNet).
    """

    name = "edm"
    order = 2.0
    strong_order = None
    weak_order = None
    supports_sde = False
    supports_ode = True
    nfe_per_step = 2
    zero_signal_start = "refuse"  # σ = s/m is infinite where m = 0
    default_grid = "edm"  # measured: docs/performance.md, "Time grids"
    default_steps = 25

    def __init__(self, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0):
        self.S_churn = _number("S_churn", S_churn)
        self.S_tmin = _number("S_tmin", S_tmin)
        self.S_tmax = _number("S_tmax", S_tmax)
        self.S_noise = _number("S_noise", S_noise)
        if self.S_churn < 0 or math.isinf(self.S_churn):
            raise ValueError(f"S_churn must be finite and >= 0, got {S_churn}")
        if self.S_tmin < 0:
            raise ValueError(f"S_tmin must be >= 0, got {S_tmin}")
        if self.S_tmax < self.S_tmin:
            raise ValueError(f"S_tmax must be >= S_tmin, got S_tmax={S_tmax} < S_tmin={S_tmin}")
        if self.S_noise < 0 or math.isinf(self.S_noise):
            raise ValueError(f"S_noise must be finite and >= 0, got {S_noise}")

    def check(self, eq: Equation) -> None:
        if not eq.is_ode:
            raise ValueError(
                "solver 'edm' integrates the probability-flow ODE: use noise_scale=0, its default "
                "(its stochasticity comes from S_churn)"
            )
        require_affine(eq, self.name)

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> _EDMState:
        """σ, m at the grid and the churned ``t̂, σ̂`` of every step (bisection on the device)."""
        m, s = eq.marginal(times)
        sigma = s / m
        sig, n = sigma[:-1], times.shape[0] - 1
        gamma = min(self.S_churn / n, math.sqrt(2.0) - 1.0)
        t_hat, m_hat, s_hat, churn = times[:-1], m[:-1], s[:-1], None
        if gamma > 0.0:
            in_range = (sig >= self.S_tmin) & (sig <= self.S_tmax)
            t_top = torch.full_like(sig, float(eq.T))
            m_top, s_top = eq.marginal(t_top)
            target = torch.minimum(sig * (1.0 + gamma), s_top / m_top)
            lo, hi = times[:-1].clone(), t_top
            for _ in range(_BISECTIONS):  # σ(t) increases in t: keep σ(lo) <= target <= σ(hi)
                mid = 0.5 * (lo + hi)
                mm, sm = eq.marginal(mid)
                above = sm / mm > target
                hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
            t_hat = torch.where(in_range, hi, times[:-1])
            m_c, s_c = eq.marginal(t_hat)
            m_hat, s_hat = torch.where(in_range, m_c, m[:-1]), torch.where(in_range, s_c, s[:-1])
            churn = self.S_noise * torch.sqrt(torch.clamp((s_hat / m_hat) ** 2 - sig**2, min=0.0))
        delta = sigma[1:] - s_hat / m_hat
        dt = x.dtype

        def per_step(v: Tensor) -> list:
            return list(v.to(dt).unbind())

        return _EDMState(
            inv_m=per_step(1.0 / m[:-1]), m_hat=per_step(m_hat),
            t_hat=None if churn is None else list(t_hat.unbind()), churn=None if churn is None else per_step(churn),
            c_pred=per_step(-delta * s_hat), c1=per_step(-0.5 * delta * s_hat), c2=per_step(-0.5 * delta * s[1:]),
            m_next=per_step(m[1:]),
        )

    def step(self, eq, x, t, t_next, noise, state):
        if state is None:  # called outside integrate: a one-step grid
            state = self.init_state(eq, x, torch.stack([t, t_next]))
        i = state.step
        state.step = i + 1
        y = x * state.inv_m[i]
        t_hat = t
        if state.churn is not None:
            t_hat = state.t_hat[i]
            if noise is not None:
                y = torch.addcmul(y, state.churn[i], normal_like(noise, x))
        k1 = eq.score(state.m_hat[i] * y, t_hat)
        y_pred = torch.addcmul(y, state.c_pred[i], k1)
        k2 = eq.score(state.m_next[i] * y_pred, t_next)
        y_next = torch.addcmul(torch.addcmul(y, state.c1[i], k1), state.c2[i], k2)
        return state.m_next[i] * y_next, state

    def __repr__(self) -> str:
        return (
            f"EDMSampler(S_churn={self.S_churn}, S_tmin={self.S_tmin}, S_tmax={self.S_tmax}, S_noise={self.S_noise})"
        )
