"""Reverse-time dynamics derived from a forward SDE and a score: the ``λ`` family.

For ``dx = f dt + G dw`` with ``D = G Gᵀ`` and noise scale ``λ ∈ [0, 1]`` (DESIGN.md §2)::

    dx = [f − (1 + λ²)/2 · (∇·D + D ∇log p_t)] dt + λ G dw̄        (integrated from T down to t_min)

``λ = 1`` is the reverse SDE of Anderson (1982) / Song et al. (2021, eq. 6); ``λ = 0`` is the
probability-flow ODE (eq. 13). All members share the marginals ``p_t`` of the forward SDE.

:class:`ReverseSDE` is a plain object holding that drift and diffusion — solvers only call
``drift(x, t)`` and ``diffusion(x, t)`` on it. It also counts network evaluations (``nfe``) and
records, without synchronising with the device, the first evaluation at which the score model
returned a non-finite value, so the integrator can report it after the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._utils import as_batch_time, bcast

if TYPE_CHECKING:
    from .sde import SDE

__all__ = ["ReverseSDE", "ScoreFn"]

ScoreFn = Callable[..., Tensor]
"""A score model: ``score(x, t) -> ∇_x log p_t(x)`` with ``x`` ``(batch, *dims)``, ``t`` ``(batch,)``."""


class ReverseSDE:
    """Reverse-time SDE (or probability-flow ODE when ``noise_scale == 0``) of ``sde`` under ``score``.

    Args:
        sde: the forward :class:`~sdegen.SDE`.
        score: ``score(x, t)`` returning ``∇ log p_t(x)`` shaped like ``x``; ``t`` is ``(batch,)``.
        noise_scale: ``λ ∈ [0, 1]``.
        model_kwargs: extra keyword arguments passed to every ``score`` call (conditioning).

    Attributes:
        nfe: number of score evaluations so far (a batched call counts once).
        T, t_min: the forward SDE's time range.
    """

    def __init__(self, sde: SDE, score: ScoreFn, noise_scale: float = 1.0, *, model_kwargs: dict | None = None):
        from .sde import SDE

        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
        if not callable(score):
            raise TypeError("score must be a callable score(x, t)")
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, int | float):
            raise TypeError(f"noise_scale must be a number in [0, 1], got {noise_scale!r}")
        if not 0.0 <= float(noise_scale) <= 1.0:
            raise ValueError(f"noise_scale must lie in [0, 1], got {noise_scale}")
        self.sde = sde
        self.score_fn = score
        self.noise_scale = float(noise_scale)
        self.model_kwargs = dict(model_kwargs or {})
        self.T = sde.T
        self.t_min = sde.t_min
        self.nfe = 0
        self._bad_eval: Tensor | None = None  # first NFE index with a non-finite score, on device

    # -- structure the solvers may use -------------------------------------------------------------
    @property
    def is_ode(self) -> bool:
        """True for the probability-flow ODE (``λ = 0``): no noise is drawn."""
        return self.noise_scale == 0.0

    @property
    def state_dependent(self) -> bool:
        """True when the diffusion depends on ``x`` (multiplicative noise)."""
        return self.sde.state_dependent

    @property
    def has_marginal(self) -> bool:
        """True when the forward SDE is affine with a Gaussian kernel ``(m(t), s(t))``."""
        return hasattr(self.sde, "marginal")

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel ``(m(t), s(t))`` of an affine forward SDE (for exponential integrators)."""
        if not self.has_marginal:
            raise TypeError(f"{type(self.sde).__name__} has no closed-form marginal (m, s)")
        return self.sde.marginal(t)

    # -- evaluations ----------------------------------------------------------------------------
    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Evaluate the score model once (counted in :attr:`nfe`), checked for shape and device."""
        tb = as_batch_time(t, x)
        out = self.score_fn(x, tb, **self.model_kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(f"score model must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"score model returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                "it must return the score with the shape of x"
            )
        if out.device != x.device:
            raise ValueError(f"score model returned a tensor on {out.device}, but x is on {x.device}")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)  # mixed precision: a bf16 network under an fp32 solver state
        bad = ~torch.isfinite(out).all()
        if self._bad_eval is None:
            self._bad_eval = torch.full((), -1, dtype=torch.long, device=x.device)
        self._bad_eval = torch.where(bad & (self._bad_eval < 0), self.nfe, self._bad_eval)
        self.nfe += 1
        return out

    def first_bad_eval(self) -> int:
        """Index of the first evaluation that returned NaN/Inf, or -1 (synchronises: call after a loop)."""
        return -1 if self._bad_eval is None else int(self._bad_eval.item())

    def drift_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Reverse drift given an already computed score (no network call)."""
        tb = as_batch_time(t, x)
        g = self.sde.diffusion(x, tb)
        coef = 0.5 * (1.0 + self.noise_scale**2)
        correction = g**2 * score
        div = self.sde.diffusion_divergence(x, tb)
        if div is not None:
            correction = correction + div
        return self.sde.drift(x, tb) - coef * correction

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f − (1+λ²)/2 (∇·D + D ∇log p_t)``, shaped like ``x`` (one network evaluation)."""
        return self.drift_from_score(x, t, self.score(x, t))

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        """``λ G(x, t)``, broadcastable to ``x``."""
        return self.noise_scale * self.sde.diffusion(x, as_batch_time(t, x))

    def denoise(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        """Tweedie's estimate ``E[x_0 | x_t] = (x + s² ∇log p_t) / m`` (affine SDEs only)."""
        tb = as_batch_time(t, x)
        m, s = self.marginal(tb)
        score = self.score(x, tb) if score is None else score
        return (x + bcast(s.to(x.dtype) ** 2, x) * score) / bcast(m.to(x.dtype), x)

    def __repr__(self) -> str:
        kind = "ProbabilityFlowODE" if self.is_ode else f"ReverseSDE(noise_scale={self.noise_scale})"
        return f"{kind} of {self.sde!r}"
