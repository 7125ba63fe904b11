"""Predictor–corrector sampling (Song et al. 2021, *Score-Based Generative Modeling through SDEs*,
Alg. 1, with the Langevin corrector of Alg. 4/5).

Each step from ``t`` to ``t'`` (= ``t_next``):

1. **predictor**: one step of another registered solver (``"euler_maruyama"`` (default),
   ``"reverse_diffusion"``, ``"ancestral"``, ``"heun"``, …) on the reverse SDE — the solver object
   is composed, not copied;
2. **corrector**: ``n_corrector`` Langevin steps at the *new* time ``t'``, targeting ``p_{t'}``::

       x ← x + δ ∇log p_{t'}(x) + √(2δ) z,      δ = 2 (snr · s(t'))²,

   ``s(t')`` the std of the kernel's noise in x-space (``x_t = m x_0 + s z``; ``= σ`` for VE).

NFE = predictor NFE + ``n_corrector`` per step (Euler–Maruyama + one corrector: 2 NFE).

**The step size.** score_sde's ``LangevinCorrector`` uses ``δ = 2 α_i (snr ‖z‖/‖∇log p‖)²`` with the
norms averaged over the *batch* — so a sample's result depends on its batch-mates — and, used per
sample, it explodes in low dimension, where ``‖∇log p‖ → 0`` at a mode (in 2-D the per-sample ratio
reaches 10⁴–10⁷ ``s²`` on a mixture; ``tests/test_stochastic_solvers.py`` measures it). sdegen
replaces the norm ratio by the noise level ``s(t)``:

* the ratio estimates ``√(d / E‖∇log p_t‖²)``, and convolution with ``N(0, s² I)`` bounds the Fisher
  information, ``E‖∇log p_t‖² ≤ d/s²``: so score_sde's step is ``≳ 2 (snr s)²`` — the sdegen step is
  a lower bound of it;
* the bound is attained when the data are concentrated relative to ``s`` in almost every direction:
  then ``∇log p_t(x_t) ≈ −z/s``, ``‖z‖ ≈ √d``, ``‖∇log p_t‖ ≈ √d/s`` and the ratio is ``s``. That is the
  case at high noise levels, and in high dimension for data near a low-dimensional set (images): the
  two rules then agree (within 10 % in the tests, ``d = 64``). Where the data spread more than ``s`` in
  many directions (low noise on "thick" toy data) the sdegen step is smaller than score_sde's — more
  conservative, a weaker correction; raise ``snr`` there.

It depends on the noise level only — not on the samples — so sample ``i`` is the same whatever its
batch-mates, and it is stable in any dimension: for a Gaussian ``p_t`` of variance ``v ≥ s²`` the
Langevin map contracts iff ``δ < 2v``, and ``δ/v ≤ 2 snr² = 0.05`` at ``snr = 0.16``.

*VP.* score_sde also multiplies by ``α_i = 1 − β_i`` for VP, the discrete DDPM factor
``1 − β(t_i)/N ≈ m(t_i)²/m(t_{i−1})²``. It tends to 1 as the grid is refined (it is ≥ 0.98 at
``N = 1000``, ``β_max = 20``), so it is a property of the grid, not of ``p_t``: sdegen omits it and uses
``s(t)`` for every affine SDE (not ``σ = s/m``: the chain runs in x-space, where the noise std is ``s``).

The corrector does not vanish as the grid is refined (``δ`` does not shrink with the step), so PC has
no convergence order of its own: it trades an ``O(snr²)`` Langevin bias for the predictor's
discretisation error at coarse grids. It needs an affine SDE (for ``s(t)``) and ``noise_scale > 0``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..equation import Equation, require_affine
from .base import PathSolver, Solver
from .langevin import count_option, langevin_steps, noise_std, positive_option

__all__ = ["PredictorCorrector"]


class PredictorCorrector(Solver):
    """Predictor–corrector sampler (Song et al. 2021, Alg. 1 with the Langevin corrector).

    Args:
        predictor: name of a fixed-step solver (default ``"euler_maruyama"``; score_sde uses
            ``"reverse_diffusion"`` for VE and ``"euler_maruyama"``/``"ancestral"`` for VP) or a
            :class:`Solver` instance.
        n_corrector: Langevin corrector steps per step (``>= 0``, default 1; 0 is the predictor alone).
        snr: signal-to-noise ratio of the corrector (``> 0``, default 0.16 as score_sde's CIFAR-10 VE).
        predictor_options: keyword options for the predictor (e.g. ``{"variance": "posterior"}``).
    """

    name = "pc"
    order = 1.0
    strong_order = None
    weak_order = None
    supports_sde = True
    supports_ode = False
    nfe_per_step = 2
    default_grid = "edm"  # measured: docs/performance.md, "Time grids"
    default_steps = 100

    def __init__(
        self,
        predictor: str | Solver = "euler_maruyama",
        n_corrector: int = 1,
        snr: float = 0.16,
        predictor_options: dict[str, Any] | None = None,
    ):
        from . import get_solver

        self.n_corrector = count_option(self.name, "n_corrector", n_corrector, 0)
        self.snr = positive_option(self.name, "snr", snr)
        if predictor == self.name or isinstance(predictor, PredictorCorrector):
            raise ValueError("solver 'pc': the predictor cannot itself be 'pc'")
        try:
            self.predictor = get_solver(predictor, **(predictor_options or {}))
        except ValueError as err:
            raise ValueError(f"solver 'pc': bad predictor {predictor!r}: {err}") from None
        if isinstance(self.predictor, PathSolver):
            raise ValueError(f"solver 'pc': the predictor must be a fixed-step solver, got {predictor!r}")
        self.nfe_per_step = self.predictor.nfe_per_step + self.n_corrector
        self.zero_signal_start = self.predictor.zero_signal_start  # the corrector runs at the next time
        self.order = self.predictor.order

    def check(self, eq: Equation) -> None:
        if eq.is_ode:
            raise ValueError("solver 'pc' samples the reverse SDE: use noise_scale > 0 (its corrector is stochastic)")
        self.predictor.check(eq)
        if self.n_corrector > 0:
            require_affine(eq, self.name)

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> Any:
        return self.predictor.init_state(eq, x, times)

    def step(self, eq, x, t, t_next, noise, state):
        x, state = self.predictor.step(eq, x, t, t_next, noise, state)
        if self.n_corrector > 0:
            delta = 2.0 * (self.snr * noise_std(eq, t_next)) ** 2
            x = langevin_steps(eq, x, t_next, noise, self.n_corrector, delta)
        return x, state

    def __repr__(self) -> str:
        return f"PredictorCorrector(predictor={self.predictor!r}, n_corrector={self.n_corrector}, snr={self.snr})"
