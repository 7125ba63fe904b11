"""The reverse-diffusion predictor (Song et al. 2021, *Score-Based Generative Modeling through SDEs*,
eq. 46-47 and App. E; score_sde's ``ReverseDiffusionPredictor``).

It discretises the *forward* SDE on the grid, ``x_t = x_{t'} + f_{t'} + G_{t'} ξ`` (``t' < t``), and
reverses that chain: ``x_{t'} = x_t − f + G² ∇log p_t(x_t) + G z``. For an affine SDE sdegen uses the
exact one-step forward kernel ``x_t = a x_{t'} + b ξ`` (``a = m(t)/m(t')``, ``b² = s(t)² − a² s(t')²``,
see :func:`sdegen.solvers.ancestral.transition`), i.e. ``f = (a − 1) x``, ``G = b``::

    x_{t'} = (2 − a) x_t + (1 + λ²)/2 · b² ∇log p_t(x_t) + λ b z.

* VE (``a = 1``): ``x_{t'} = x_t + (σ_t² − σ_{t'}²) s + √(σ_t² − σ_{t'}²) z`` — score_sde's VE form.
* VP (``a = √(1 − β)``, ``b² = β``): ``(2 − √(1 − β)) x + β s + √β z`` — score_sde's VP form (its
  ``discretize`` uses the same ``β_i``); ``2 − a`` is the first-order expansion of DDPM's ``1/a``.
* ``λ`` is the equation's noise scale (``λ = 0``: score_sde's ``probability_flow`` variant, drift
  ``f − ½ G² s`` and no noise).

For an SDE without a Gaussian kernel, score_sde's default discretisation ``f = f(x, t)|h|``,
``G = g(x, t)√|h|`` makes the predictor identical to Euler–Maruyama on the reverse SDE; sdegen then
delegates to :class:`~sdegen.solvers.euler_maruyama.EulerMaruyama`.

First order (weak order 1; additive noise). NFE = 1 per step.
"""

from __future__ import annotations

from ..noise import normal_like
from .ancestral import transition
from .base import Solver
from .euler_maruyama import EulerMaruyama

__all__ = ["ReverseDiffusion"]


class ReverseDiffusion(Solver):
    """Reverse-diffusion predictor (Song et al. 2021, eq. 47): the reversed discrete forward chain."""

    name = "reverse_diffusion"
    order = 1.0
    strong_order = 0.5
    weak_order = 1.0
    supports_sde = True
    supports_ode = True
    nfe_per_step = 1
    zero_signal_start = "refuse"  # its 2 − a ≈ 1/a fails at a = m(t)/m(t') = 0
    default_grid = ("edm", "uniform")  # measured: docs/performance.md, "Time grids"
    default_steps = 250

    def __init__(self) -> None:
        self._fallback = EulerMaruyama()

    def step(self, eq, x, t, t_next, noise, state):
        if not eq.is_affine:
            return self._fallback.step(eq, x, t, t_next, noise, state)
        lam = 0.0 if eq.is_ode else eq.noise_scale
        a, b2, _ = transition(eq, t, t_next)
        a, b2 = a.to(x.dtype), b2.to(x.dtype)
        x_next = (2.0 - a) * x + (0.5 * (1.0 + lam**2)) * b2 * eq.score(x, t)
        if lam > 0.0 and noise is not None:
            x_next = x_next + (lam * b2.sqrt()) * normal_like(noise, x)
        return x_next, state
