"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), written for any affine SDE through its kernel.

For an affine forward SDE with kernel ``x_t = m(t) x_0 + s(t) z``, the forward transition from the
lower time ``t'`` (= ``t_next``) to the higher time ``t`` is Gaussian::

    x_t = a x_{t'} + b ξ,     a = m(t)/m(t'),     b² = s(t)² − a² s(t')².

**Posterior.** ``q(x_{t'} | x_t, x_0) = N(μ̃, β̃ I)`` with ``μ̃ = (a s'²/s²) x_t + (m' b²/s²) x_0`` and
``β̃ = s'² b² / s²``. The step puts in the model's ``x̂_0`` (one network evaluation, ``eq.denoise``)::

    x_{t'} = (a s'²/s²) x_t + (m' b²/s²) x̂_0 + std · z,

which with Tweedie's ``x̂_0 = (x_t + s² ∇log p_t)/m`` and ``a² s'² + b² = s²`` is
``(x_t + b² ∇log p_t(x_t)) / a + std · z`` — but stays finite where ``a = 0`` (``m(t) = 0``).

For VP (``s² = 1 − m²``) write ``β = 1 − m(t)²/m(t')² = 1 − ᾱ_t/ᾱ_{t'}``: then ``a = √(1 − β)`` and
``b² = β``, so the step is exactly DDPM's ``x_{t−1} = (x_t + β_t s)/√(1 − β_t) + σ_t z``
(``s = −ε/√(1 − ᾱ_t)``). On the grid of a discrete DDPM schedule mapped to continuous VP time this
*is* DDPM's chain. For VE (``a = 1``) it is ``x + (σ_t² − σ_{t'}²) s + std · z``.

**Variance** (option ``variance``): ``"beta"`` (default) ``std² = b² = β_t`` — DDPM's ``σ_t² = β_t``
and score_sde's ``AncestralSamplingPredictor`` for VP; ``"posterior"`` ``std² = β̃_t = s'² b²/s²`` —
DDPM's other choice and score_sde's ancestral predictor for VE. (Ho et al. §3.2: ``β`` is optimal
for ``x_0 ~ N(0, I)``, ``β̃`` for a point mass.)

**Final step.** DDPM's Alg. 2 draws no noise on its last step (``z = 0`` at ``t = 1``). Here, as for
every solver, that is the integrator's ``final_step`` option, not a special case in the solver:
``final_step="noiseless"`` drops the noise of the step onto ``t_min``, and ``final_step="tweedie"``
adds DDPM's last step to ``ᾱ = 1`` (``x̂_0 = E[x_0 | x_{t_min}]``) — with a discrete schedule's grid
that reproduces ``diffusers.DDPMScheduler`` exactly.

Reverse SDE only (``noise_scale = 1``), affine SDEs only. It is a first-order (weak order 1)
discretisation of the reverse SDE. NFE = 1 per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..equation import AffineEquation, Equation, require_affine
from ..noise import normal_like
from .base import Solver

__all__ = ["Ancestral", "transition"]

VARIANCES = ("beta", "posterior")


def transition(eq: AffineEquation, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Forward transition ``x_t = a x_{t_next} + b ξ`` between two times of an affine SDE.

    Returns ``(a, b², s(t_next)²/s(t)²)`` as 0-d tensors in the times' dtype (``b² >= 0``).
    """
    m, s = eq.marginal(torch.stack([t, t_next]))
    a = m[0] / m[1]
    b2 = torch.clamp(s[0] ** 2 - a**2 * s[1] ** 2, min=0.0)
    return a, b2, (s[1] / s[0]) ** 2


class Ancestral(Solver):
    """DDPM ancestral sampling from the Gaussian posterior of an affine SDE's kernel (Ho et al. 2020, Alg. 2).

    Args:
        variance: ``"beta"`` (``b² = β_t``, default) or ``"posterior"`` (``β̃_t``); see the module docstring.
    """

    name = "ancestral"
    order = 1.0
    strong_order = None
    weak_order = 1.0
    supports_sde = True
    supports_ode = False
    nfe_per_step = 1
    zero_signal_start = "denoise"  # steps with the kernel and the model's x̂0: finite from m = 0
    default_grid = "edm"  # measured: docs/performance.md, "Time grids"
    default_steps = 250

    def __init__(self, variance: str = "beta"):
        if variance not in VARIANCES:
            raise ValueError(f"solver 'ancestral': variance must be one of {VARIANCES}, got {variance!r}")
        self.variance = variance

    def check(self, eq: Equation) -> None:
        super().check(eq)
        if require_affine(eq, self.name).noise_scale != 1.0:
            raise ValueError(
                "solver 'ancestral' samples the reverse SDE (noise_scale=1); for an interpolation towards the "
                "probability-flow ODE use 'ddim' (eta) or another solver"
            )

    def step(self, eq, x, t, t_next, noise, state):
        a, b2, ratio = transition(eq, t, t_next)
        m, s = eq.marginal(torch.stack([t, t_next]))
        x0 = eq.denoise(x, t)  # one evaluation: the model's x̂0
        x_next = torch.addcmul((a * ratio).to(x.dtype) * x, (m[1] * b2 / s[0] ** 2).to(x.dtype), x0)
        if noise is None:
            return x_next, state
        var = b2 if self.variance == "beta" else b2 * ratio
        return x_next + torch.sqrt(var).to(x.dtype) * normal_like(noise, x), state

    def __repr__(self) -> str:
        return f"Ancestral(variance={self.variance!r})"
