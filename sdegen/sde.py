"""Forward SDEs ``dx = f(x, t) dt + G(x, t) dw`` and the affine-drift family with Gaussian kernels.

Conventions (see ``docs/concepts.md``): every callable takes ``(x, t)`` with ``x`` of shape
``(batch, *dims)`` and ``t`` of shape ``(batch,)``; time runs from data (``t_min``) to noise
(``T``). The diffusion is *diagonal*: ``G(x, t)`` broadcasts against ``x`` (a per-sample scalar, a
per-dimension tensor, or a state-dependent tensor), and ``D = G Gᵀ = diag(G²)``.

Affine-drift SDEs (:class:`LinearSDE`) have ``f = a(t) x`` and ``G = g(t)``, so the perturbation
kernel is Gaussian, ``x_t = m(t) x_0 + s(t) z``, with ``m = exp(∫a)`` and ``s² = ∫ m(t)²/m(u)² g(u)² du``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._utils import as_batch_time, bcast, flat_sum
from .divergence import jacobian_diagonal
from .noise import NoiseSource, make_noise

if TYPE_CHECKING:
    from .reverse import ReverseSDE, ScoreFn

__all__ = ["SDE", "LinearSDE", "VPSDE", "VESDE", "SubVPSDE", "EDMSDE"]

Field = Callable[[Tensor, Tensor], Tensor]


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class SDE:
    """An Itô SDE ``dx = f(x, t) dt + G(x, t) dw`` on ``t ∈ [0, T]`` with diagonal noise.

    Args:
        drift: ``f(x, t) -> (batch, *dims)``.
        diffusion: ``G(x, t)`` returning a tensor broadcastable to ``x`` (``(batch,)`` scalars are
            broadcast per sample) — scalar in time, per-dimension, or state dependent.
        T: end time (noise end), default 1.0.
        t_min: default smallest time reached by samplers, default ``1e-3``.
        state_dependent: set True when ``G`` depends on ``x``: the reverse dynamics then compute
            ``∇·D`` (``D = diag(G²)``) by autograd, exactly (``D`` Jacobian-vector products).
        diffusion_divergence: optional closed form ``(∇·D)(x, t)``, shaped like ``x``, used instead
            of autograd (``(∇·D)_i = ∂(G_i²)/∂x_i`` for diagonal noise).
    """

    def __init__(
        self,
        drift: Field,
        diffusion: Field,
        T: float = 1.0,
        *,
        t_min: float = 1e-3,
        state_dependent: bool = False,
        diffusion_divergence: Field | None = None,
    ):
        if not callable(drift):
            raise TypeError("drift must be a callable drift(x, t)")
        if not callable(diffusion):
            raise TypeError("diffusion must be a callable diffusion(x, t)")
        self._drift = drift
        self._diffusion = diffusion
        self.T = _positive("T", T)
        self.t_min = _positive("t_min", t_min)
        if self.t_min >= self.T:
            raise ValueError(f"t_min must be < T, got t_min={t_min}, T={T}")
        self.state_dependent = bool(state_dependent) or diffusion_divergence is not None
        self._div_d = diffusion_divergence

    # -- coefficients ---------------------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t)``, shaped like ``x``."""
        return self._drift(x, as_batch_time(t, x))

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        """``G(x, t)`` broadcast to ``x``'s rank (a ``(batch,)`` result becomes ``(batch, 1, ...)``)."""
        g = self._diffusion(x, as_batch_time(t, x))
        if not isinstance(g, Tensor):
            g = torch.as_tensor(g, device=x.device, dtype=x.dtype)
        return bcast(g, x)

    def diffusion_divergence(self, x: Tensor, t: Tensor) -> Tensor | None:
        """``∇·D`` with ``D = diag(G²)``, shaped like ``x``; None when ``G`` does not depend on ``x``."""
        if not self.state_dependent:
            return None
        if self._div_d is not None:
            return self._div_d(x, as_batch_time(t, x))

        def g2(z: Tensor) -> Tensor:
            return torch.broadcast_to(self.diffusion(z, t) ** 2, z.shape)

        return jacobian_diagonal(g2, x)

    # -- derived dynamics -----------------------------------------------------------------------
    def reverse(self, score: ScoreFn, noise_scale: float = 1.0) -> ReverseSDE:
        """The reverse-time SDE with noise scale ``λ = noise_scale`` (``docs/concepts.md``)."""
        from .reverse import ReverseSDE

        return ReverseSDE(self, score, noise_scale=noise_scale)

    def probability_flow(self, score: ScoreFn) -> ReverseSDE:
        """The probability-flow ODE (``λ = 0``): same marginals as the SDE, deterministic."""
        return self.reverse(score, noise_scale=0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T}, t_min={self.t_min})"


class LinearSDE(SDE):
    """Affine-drift SDE ``dx = a(t) x dt + g(t) dw`` with Gaussian kernel ``x_t = m(t) x_0 + s(t) z``.

    Subclasses implement :meth:`drift_coef` ``a(t)``, :meth:`diffusion_coef` ``g(t)`` and
    :meth:`marginal` ``(m(t), s(t))``; everything else (noise level ``σ = s/m``, log-SNR,
    priors, exact forward sampling) follows. ``prior_std`` is the std of the isotropic Gaussian prior.
    """

    prior_std: float = 1.0

    def __init__(self, T: float = 1.0, *, t_min: float = 1e-3):
        super().__init__(self._linear_drift, self._linear_diffusion, T, t_min=t_min)

    # -- to implement ---------------------------------------------------------------------------
    def drift_coef(self, t: Tensor) -> Tensor:
        """``a(t)`` in ``f = a(t) x``; same shape as ``t``."""
        raise NotImplementedError

    def diffusion_coef(self, t: Tensor) -> Tensor:
        """``g(t)``; same shape as ``t``."""
        raise NotImplementedError

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Perturbation kernel ``(m(t), s(t))`` with ``x_t = m x_0 + s z``; tensors shaped like ``t``."""
        raise NotImplementedError

    # -- derived --------------------------------------------------------------------------------
    def _linear_drift(self, x: Tensor, t: Tensor) -> Tensor:
        return bcast(self.drift_coef(t).to(x.dtype), x) * x

    def _linear_diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        return self.diffusion_coef(t).to(x.dtype)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise-to-signal ratio ``σ(t) = s(t) / m(t)`` (the k-diffusion/EDM ``sigma``)."""
        m, s = self.marginal(t)
        return s / m

    def log_snr(self, t: Tensor | float) -> Tensor:
        """The log-SNR ``log(m² / s²) = −2 log σ(t)``, decreasing in ``t``."""
        return -2.0 * torch.log(self.sigma(t))

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`sigma` (bisection in float64; subclasses give closed forms)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        lo = torch.zeros_like(sigma)
        hi = torch.full_like(sigma, self.T)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            above = self.sigma(mid) > sigma
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        return 0.5 * (lo + hi)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`."""
        return self.t_from_sigma(torch.exp(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64)))

    def prior_std_at(self, t: float | None = None) -> float:
        """Std of the isotropic Gaussian prior at time ``t`` (default ``T``): ``prior_std · s(t) / s(T)``.

        At ``T`` this is the prior of the SDE (``N(0, I)`` for VP, ``N(0, σ_max² I)`` for VE and EDM). Below
        ``T`` (sampling or computing likelihoods from ``t_max < T``) it is the perturbation kernel of a point
        mass at the origin, ``N(0, s(t)²)``, rescaled to match the prior at ``T``: like the prior at ``T`` it
        neglects the data's spread ``m(t)² Var[x_0]``, so it is only as exact as that is small against
        ``s(t)²`` — least exact when ``t_max`` is far below ``T``.
        """
        if t is None or float(t) == self.T:
            return float(self.prior_std)
        t = float(t)
        if not 0.0 < t <= self.T * (1 + 1e-12):
            raise ValueError(f"the prior time must lie in (0, T={self.T}], got {t}")
        s_t = float(self.marginal(torch.tensor(t, dtype=torch.float64))[1])
        s_T = float(self.marginal(torch.tensor(self.T, dtype=torch.float64))[1])
        return float(self.prior_std) * s_t / s_T

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        t: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        noise: NoiseSource | None = None,
    ) -> Tensor:
        """Draw ``x ~ N(0, prior_std_at(t)² I)`` of ``shape`` (``shape[0]`` is the batch; ``t`` default ``T``)."""
        noise = noise or make_noise(generator)
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.device("cpu")
        return self.prior_std_at(t) * noise.normal(tuple(shape), device=device, dtype=dtype)

    def prior_log_prob(self, x: Tensor, t: float | None = None) -> Tensor:
        """Log-density of the prior at time ``t`` (default ``T``) at ``x``, per sample: ``(batch,)`` nats."""
        d = math.prod(x.shape[1:])
        var = self.prior_std_at(t) ** 2
        return -0.5 * flat_sum(x**2) / var - 0.5 * d * math.log(2 * math.pi * var)

    def forward_sample(
        self,
        x0: Tensor,
        t: Tensor | float,
        *,
        generator: torch.Generator | None = None,
        noise: NoiseSource | None = None,
        return_noise: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``x_t ~ p(x_t | x_0) = N(m x_0, s² I)`` exactly; ``t`` scalar or ``(batch,)``.

        With ``return_noise=True`` also returns the standard normal ``z`` used (``x_t = m x_0 + s z``).
        """
        noise = noise or make_noise(generator)
        tb = as_batch_time(t, x0)
        m, s = self.marginal(tb)
        z = noise.normal(tuple(x0.shape), device=x0.device, dtype=x0.dtype)
        xt = bcast(m.to(x0.dtype), x0) * x0 + bcast(s.to(x0.dtype), x0) * z
        return (xt, z) if return_noise else xt

    def _t(self, t: Tensor | float) -> Tensor:
        if isinstance(t, Tensor):
            return t if t.is_floating_point() else t.to(torch.get_default_dtype())
        return torch.tensor(float(t), dtype=torch.float64)


class VPSDE(LinearSDE):
    """Variance-preserving SDE (DDPM; Song et al. 2021, eq. 11).

    ``β(t) = β_min + t (β_max − β_min)``, ``f = −½ β x``, ``g = √β``, ``m = exp(−½ ∫β)``,
    ``s² = 1 − m²``; prior ``N(0, I)``. Default sampling ``t_min = 1e-3``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, *, t_min: float = 1e-3):
        self.beta_min = _positive("beta_min", beta_min)
        self.beta_max = _positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got {beta_max} < {beta_min}")
        super().__init__(T, t_min=t_min)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """``∫_0^t β(u) du``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coef(self, t):
        return -0.5 * self.beta(self._t(t))

    def diffusion_coef(self, t):
        return torch.sqrt(self.beta(self._t(t)))

    def marginal(self, t):
        b = self.integrated_beta(self._t(t))
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(self.integrated_beta(self._t(t))))

    def _t_from_integrated_beta(self, b: Tensor) -> Tensor:
        d = self.beta_max - self.beta_min
        return 2.0 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * b))

    def t_from_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self._t_from_integrated_beta(torch.log1p(sigma**2))

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T}, t_min={self.t_min})"


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 12): ``f = −½β x``, ``g = √(β (1 − e^{−2∫β}))``.

    ``m = exp(−½ ∫β)`` as VP and ``s = 1 − e^{−∫β}`` (a std, below VP's); prior ``N(0, I)``.
    """

    def diffusion_coef(self, t):
        t = self._t(t)
        return torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self.integrated_beta(t)))

    def marginal(self, t):
        b = self.integrated_beta(self._t(t))
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def sigma(self, t):
        # s/m = (1 − e^{−b}) e^{b/2} = 2 sinh(b/2)
        return 2.0 * torch.sinh(0.5 * self.integrated_beta(self._t(t)))

    def t_from_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self._t_from_integrated_beta(2.0 * torch.asinh(0.5 * sigma))

    def __repr__(self):
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T}, t_min={self.t_min})"


class VESDE(LinearSDE):
    """Variance-exploding SDE (SMLD/NCSN; Song et al. 2021, eq. 9).

    ``σ(t) = σ_min (σ_max/σ_min)^t``, ``f = 0``, ``g = σ(t) √(2 log(σ_max/σ_min))``, ``m = 1``;
    prior ``N(0, σ_max² I)``; default sampling ``t_min = 1e-5``.

    Args:
        marginal_std: ``"exact"`` (default) — the kernel of the SDE started at ``x(0) = x_0``:
            ``s(t)² = σ(t)² − σ_min²``. ``"sigma"`` — ``s(t) = σ(t)``, the convention score_sde
            trained its VE models with (it is the kernel of the same SDE started from
            ``x_0 + σ_min z``). Use ``"sigma"`` with such checkpoints so that ε/x̂0 conversions
            and likelihoods use the noise level the network saw.
    """

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        T: float = 1.0,
        *,
        t_min: float = 1e-5,
        marginal_std: str = "exact",
    ):
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min, got {sigma_max} <= {sigma_min}")
        if marginal_std not in ("exact", "sigma"):
            raise ValueError(f"marginal_std must be 'exact' or 'sigma', got {marginal_std!r}")
        self.marginal_std = marginal_std
        self.prior_std = self.sigma_max
        super().__init__(T, t_min=t_min)

    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma_t(self, t: Tensor | float) -> Tensor:
        """The schedule ``σ_min (σ_max/σ_min)^(t/T)``."""
        return self.sigma_min * torch.exp(self._t(t) / self.T * self._log_ratio())

    def drift_coef(self, t):
        return torch.zeros_like(self._t(t))

    def diffusion_coef(self, t):
        return self.sigma_t(t) * math.sqrt(2.0 * self._log_ratio() / self.T)

    def marginal(self, t):
        sig = self.sigma_t(t)
        if self.marginal_std == "sigma":
            return torch.ones_like(sig), sig
        # σ(t)² − σ_min² = σ_min² (e^{2 t L} − 1), accurate near t = 0
        s = self.sigma_min * torch.sqrt(torch.expm1(2.0 * self._t(t) / self.T * self._log_ratio()))
        return torch.ones_like(sig), s

    def sigma(self, t):
        return self.marginal(t)[1]

    def t_from_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.marginal_std == "exact":
            sigma = torch.sqrt(sigma**2 + self.sigma_min**2)
        return torch.log(sigma / self.sigma_min) / self._log_ratio() * self.T

    def __repr__(self):
        return (
            f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T}, "
            f"t_min={self.t_min}, marginal_std={self.marginal_std!r})"
        )


class EDMSDE(LinearSDE):
    """The EDM/Karras SDE with ``σ(t) = t`` (Karras et al. 2022, Table 1): ``f = 0``, ``g = √(2t)``.

    ``m = 1``, ``s = t``: time *is* the noise level. ``T = σ_max`` (default 80),
    ``t_min = σ_min`` (default 0.002); prior ``N(0, σ_max² I)``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        self.prior_std = self.sigma_max
        super().__init__(self.sigma_max, t_min=self.sigma_min)

    def drift_coef(self, t):
        return torch.zeros_like(self._t(t))

    def diffusion_coef(self, t):
        return torch.sqrt(2.0 * self._t(t))

    def marginal(self, t):
        t = self._t(t)
        return torch.ones_like(t), t.clone()

    def sigma(self, t):
        return self._t(t).clone()

    def t_from_sigma(self, sigma):
        return torch.as_tensor(sigma, dtype=torch.float64).clone()

    def __repr__(self):
        return f"EDMSDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"
