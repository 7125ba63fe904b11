"""Annealed Langevin dynamics (Song & Ermon 2019, *Generative Modeling by Estimating Gradients of the
Data Distribution*, Alg. 1) and the Langevin step shared with the predictor–corrector sampler.

One Langevin step at a fixed time ``t`` targets ``p_t``::

    x ← x + δ ∇log p_t(x) + √(2δ) z,      z ~ N(0, I)                       (unadjusted Langevin)

which is Alg. 1's ``x + (α/2) s + √α z`` with ``δ = α/2``.

**Annealing over the grid.** :class:`AnnealedLangevin` is a fixed-step solver: the step from ``t_i``
to ``t_{i+1}`` runs ``n_steps_each`` Langevin steps *at the new time* ``t_{i+1}`` (noise level
``σ_{i+1}``). The prior sample at ``T`` is already a sample of ``p_T``, so the levels visited are
``t_1 > … > t_N = t_min``, and the returned state is a sample of ``p_{t_min}`` — the last level is the
smallest noise level of the grid, ``σ_L = s(t_min)``. NFE = ``n_steps_each`` per grid step.

**Noise level.** ``σ_i = s(t_i)``, the standard deviation of the Gaussian noise *in x-space*
(``x_t = m x_0 + s z``; for VE ``s = σ``). The score is at most of size ``1/s``
(``E‖∇log p_t‖² ≤ d/s²`` in ``d`` dimensions, nearly attained for data concentrated relative to ``s``),
so ``s`` — not ``σ = s/m`` — sets the Langevin step in every affine SDE. For VP this is ``s² = 1 − m²``;
score_sde's extra VP factor ``α_i = 1 − β_i`` (→ 1 as the grid is refined) is omitted, see
:mod:`sdegen.solvers.pc`.

**Step size**, one of (the two are the same rule, ``δ_i ∝ σ_i²``):

* ``step_size=ε`` (NCSN's ε): ``α_i = ε σ_i² / σ_L²``, ``δ_i = α_i / 2`` — Alg. 1 verbatim, so the
  paper's ε (2e-5 on CIFAR-10 with ``σ_L = 0.01``) carries over. ε is relative to the smallest level
  of *the grid*: on ``VESDE()`` (exact kernel, ``s(t)² = σ(t)² − σ_min²``) with ``t_min = 1e-5`` that level
  is ``s(t_min) ≈ 1.3e-4``, not ``σ_min``; use ``VESDE(marginal_std="sigma")`` (NCSN's convention) to
  reproduce the paper, or ``snr``, which needs no such care;
* ``snr=r`` (default 0.16): ``δ_i = 2 (r σ_i)²``, the predictor–corrector rule (:mod:`sdegen.solvers.pc`).
  ``ε`` and ``r`` are related by ``r² = ε / (4 σ_L²)`` (NCSN's setting is ``r ≈ 0.22``).

With ``noise=None`` (e.g. the last step under ``final_step="noiseless"``) the steps add no noise
(gradient ascent on ``log p_t``). Needs an affine SDE (``eq.is_affine``) for ``s(t)``; the noise
scale ``λ`` of the equation is not used (but must be ``> 0``: this is a stochastic sampler).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..equation import AffineEquation, Equation, require_affine
from ..noise import NoiseSource, normal_like
from .base import Solver

__all__ = ["AnnealedLangevin", "langevin_steps", "noise_std", "positive_option"]


def positive_option(solver: str, name: str, value: Any) -> float:
    """Validate a finite ``> 0`` float option, raising TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"solver {solver!r}: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"solver {solver!r}: {name} must be finite and > 0, got {value}")
    return float(value)


def count_option(solver: str, name: str, value: Any, minimum: int) -> int:
    """Validate an integer option ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"solver {solver!r}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"solver {solver!r}: {name} must be >= {minimum}, got {value}")
    return value


def noise_std(eq: AffineEquation, t: Tensor) -> Tensor:
    """``s(t)``, the std of the kernel's noise in x-space (0-d or ``(batch,)`` like ``t``)."""
    return eq.marginal(t)[1]


def langevin_steps(
    eq: AffineEquation, x: Tensor, t: Tensor, noise: NoiseSource | None, n: int, delta: Tensor
) -> Tensor:
    """``n`` unadjusted Langevin steps ``x ← x + δ ∇log p_t(x) + √(2δ) z`` at the fixed time ``t``.

    Args:
        eq: the equation (only ``eq.score`` is used: ``n`` network evaluations).
        x: state ``(batch, *dims)``.
        t: 0-d time tensor.
        noise: source of ``z``; None for noiseless (gradient) steps.
        n: number of steps.
        delta: step ``δ`` (0-d tensor, in squared x units).
    """
    delta = delta.to(x.dtype)
    scale = torch.sqrt(2.0 * delta)
    for _ in range(n):
        x = x + delta * eq.score(x, t)
        if noise is not None:
            x = x + scale * normal_like(noise, x)
    return x


class AnnealedLangevin(Solver):
    """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, Alg. 1) over the time grid.

    Args:
        n_steps_each: Langevin steps per noise level (``>= 1``, default 100 as in the paper).
        step_size: NCSN's ε (``α_i = ε σ_i²/σ_L²``); give this or ``snr``, not both.
        snr: signal-to-noise ratio ``r`` (``δ_i = 2 (r σ_i)²``); default 0.16 when neither is given.

    Not a discretisation of the reverse SDE (no order): each grid step samples ``p_{t_{i+1}}`` by
    Markov chain Monte Carlo started from the previous level. NFE = ``n_steps_each`` per step.
    """

    name = "langevin"
    order = 0.0
    strong_order = None
    weak_order = None
    supports_sde = True
    supports_ode = False
    nfe_per_step = 100
    zero_signal_start = "none"  # evaluates only at the next time: finite from m = 0
    default_grid = "log_snr"  # geometric noise levels (NCSN's); measured: docs/performance.md, "Time grids"
    default_steps = 100  # noise levels; × n_steps_each (default 100) network evaluations

    def __init__(self, n_steps_each: int = 100, step_size: float | None = None, snr: float | None = None):
        self.n_steps_each = count_option(self.name, "n_steps_each", n_steps_each, 1)
        if step_size is not None and snr is not None:
            raise ValueError("solver 'langevin': give step_size (NCSN's epsilon) or snr, not both")
        self.step_size = None if step_size is None else positive_option(self.name, "step_size", step_size)
        self.snr = None if snr is None else positive_option(self.name, "snr", snr)
        if self.step_size is None and self.snr is None:
            self.snr = 0.16
        self.nfe_per_step = self.n_steps_each

    def check(self, eq: Equation) -> None:
        if eq.is_ode:
            raise ValueError("solver 'langevin' is a stochastic sampler: use noise_scale > 0 (it ignores λ otherwise)")
        require_affine(eq, self.name)

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> Tensor:
        """``σ_L = s(t_N)``, the smallest noise level of the grid (0-d tensor)."""
        return noise_std(eq, times[-1])

    def step(self, eq, x, t, t_next, noise, state):
        sigma = noise_std(eq, t_next)
        if self.snr is not None:
            delta = 2.0 * (self.snr * sigma) ** 2
        else:
            sigma_l = state if state is not None else noise_std(eq, torch.full_like(t, eq.t_min))
            delta = 0.5 * self.step_size * (sigma / sigma_l) ** 2
        return langevin_steps(eq, x, t_next, noise, self.n_steps_each, delta), state

    def __repr__(self) -> str:
        rule = f"snr={self.snr}" if self.snr is not None else f"step_size={self.step_size}"
        return f"AnnealedLangevin(n_steps_each={self.n_steps_each}, {rule})"
