"""Linear SDEs with closed-form solutions, and the plumbing to drive solvers along one Brownian path.

Oracles for convergence orders (Kloeden & Platen 1992, §4.4; Higham 2001, *SIAM Review* 43(3)):

* :class:`OrnsteinUhlenbeck` — ``dx = −θ x dt + σ dw``: additive noise, an affine
  :class:`~sdegen.LinearSDE` (so ``marginal``, ``forward_sample`` and ``GaussianMixture.perturbed``
  work with it). Euler–Maruyama has strong order 1 on it.
* :class:`GeometricBrownianMotion` — ``dx = μ x dt + σ x dw``: multiplicative (diagonal) noise with
  the closed form ``x_t = x_0 exp((μ − σ²/2) t + σ W_t)``. Euler–Maruyama has strong order ½ on it.

Both give ``exact_solution(x0, times, brownian_increments)`` pathwise, and exact ``mean`` /
``variance`` / ``second_moment`` for weak orders.

Solvers integrate *equations* (see :mod:`sdegen.solvers.base`); :class:`ForwardEquation` turns a
forward SDE into one, to be integrated on an *increasing* grid (``h > 0``: the solvers' code is the
same in both directions). :class:`BrownianPath` draws one fine Brownian path and
:class:`ReplayNoise` feeds its increments, summed onto any coarser sub-grid, to a solver as its
noise source — the shared-path set-up a strong-order measurement needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._utils import as_batch_time, bcast
from ..equation import EquationBase
from ..sde import SDE, LinearSDE, _positive

__all__ = [
    "OrnsteinUhlenbeck",
    "GeometricBrownianMotion",
    "ForwardEquation",
    "BrownianPath",
    "ReplayNoise",
    "PredrawnNoise",
]


def _grid(times: Tensor | Sequence[float]) -> Tensor:
    t = torch.as_tensor(times).detach().to("cpu", torch.float64).reshape(-1)
    if t.shape[0] < 2:
        raise ValueError(f"times must have at least 2 entries, got {t.shape[0]}")
    d = t[1:] - t[:-1]
    if not ((d > 0).all() or (d < 0).all()):
        raise ValueError("times must be strictly monotone")
    return t


def _check_increments(times: Tensor, increments: Tensor, x0: Tensor) -> None:
    if increments.shape != (times.shape[0] - 1, *x0.shape):
        raise ValueError(
            f"brownian_increments must have shape (len(times) - 1, *x0.shape) = "
            f"{(times.shape[0] - 1, *x0.shape)}, got {tuple(increments.shape)}"
        )


class OrnsteinUhlenbeck(LinearSDE):
    """Ornstein–Uhlenbeck process ``dx = −θ x dt + σ dw`` (additive noise, every coordinate i.i.d.).

    Args:
        theta: mean-reversion rate ``θ > 0`` (1/time).
        sigma: noise amplitude ``σ > 0``.
        T: end time (default 1.0). t_min: smallest time for reverse sampling (default 1e-3).

    Kernel: ``m(t) = e^{−θt}``, ``s(t)² = σ² (1 − e^{−2θt}) / (2θ)``. The prior (``prior_std``) is the
    stationary law ``N(0, σ²/(2θ) I)``, which ``p_T`` approaches only as ``θT → ∞``.
    """

    def __init__(self, theta: float = 1.0, sigma: float = 1.0, T: float = 1.0, *, t_min: float = 1e-3):
        self.theta = _positive("theta", theta)
        self.sigma_ou = _positive("sigma", sigma)
        self.prior_std = self.sigma_ou / math.sqrt(2.0 * self.theta)
        super().__init__(T, t_min=t_min)

    def drift_coef(self, t):
        return torch.full_like(self._t(t), -self.theta)

    def diffusion_coef(self, t):
        return torch.full_like(self._t(t), self.sigma_ou)

    def marginal(self, t):
        t = self._t(t)
        var = self.sigma_ou**2 * -torch.expm1(-2.0 * self.theta * t) / (2.0 * self.theta)
        return torch.exp(-self.theta * t), torch.sqrt(var)

    # -- exact answers ----------------------------------------------------------------------------
    def mean(self, x0: Tensor | float, t: Tensor | float) -> Tensor:
        """``E[x_t | x_0] = x_0 e^{−θt}`` (``t`` elapsed since ``x_0``)."""
        return torch.as_tensor(x0, dtype=torch.float64) * self.marginal(t)[0]

    def variance(self, x0: Tensor | float, t: Tensor | float) -> Tensor:
        """``Var[x_t | x_0] = σ² (1 − e^{−2θt}) / (2θ)`` per coordinate."""
        return torch.zeros_like(torch.as_tensor(x0, dtype=torch.float64)) + self.marginal(t)[1] ** 2

    def second_moment(self, x0: Tensor | float, t: Tensor | float) -> Tensor:
        """``E[x_t² | x_0]`` per coordinate."""
        return self.variance(x0, t) + self.mean(x0, t) ** 2

    def exact_solution(
        self, x0: Tensor, times: Tensor | Sequence[float], brownian_increments: Tensor
    ) -> Tensor:
        """The solution at every point of an increasing grid, given the Brownian increments on it.

        Args:
            x0: ``(batch, *dims)`` state at ``times[0]``.
            times: increasing 1-D grid ``t_0 < … < t_N``.
            brownian_increments: ``(N, batch, *dims)``, ``ΔW_k = W(t_{k+1}) − W(t_k)``.

        Returns:
            ``(N + 1, batch, *dims)`` states, in float64 or ``x0``'s dtype if wider.

        ``x(t_{k+1}) = e^{−θh} x(t_k) + σ ∫ e^{−θ(t_{k+1}−u)} dW_u`` depends on the path *inside* each
        interval, not only on ``ΔW_k``. The integral is replaced by its conditional expectation given
        ``ΔW_k``, ``ΔW_k (1 − e^{−θh}) / (θh)`` (the Brownian bridge is linear in mean). This is the
        best estimate of the true solution given the increments; its L² error is
        ``σ θ h √((1 − e^{−2θt}) / (24 θ))`` for a uniform step ``h``: use a grid several times finer
        than the one measured (``measure_order`` uses 16x). The mean of the result is exact; its
        variance is low by that same squared error.
        """
        t = _grid(times)
        if not (t[1:] > t[:-1]).all():
            raise ValueError("times must be increasing (the forward SDE runs from t_0 up)")
        _check_increments(t, brownian_increments, x0)
        dt = torch.promote_types(x0.dtype, torch.float64)
        h = (t[1:] - t[:-1]).to(x0.device, dt)
        decay = torch.exp(-self.theta * h)
        gain = self.sigma_ou * -torch.expm1(-self.theta * h) / (self.theta * h)
        out = [x0.to(dt)]
        for k in range(h.shape[0]):
            out.append(decay[k] * out[-1] + gain[k] * brownian_increments[k].to(dt))
        return torch.stack(out)

    def __repr__(self):
        return f"OrnsteinUhlenbeck(theta={self.theta}, sigma={self.sigma_ou}, T={self.T})"


class GeometricBrownianMotion(SDE):
    """Geometric Brownian motion ``dx = μ x dt + σ x dw`` with diagonal (per-coordinate) noise.

    Args:
        mu: drift rate ``μ`` (a float, or a tensor broadcastable to one sample's shape ``dims``).
        sigma: volatility ``σ`` (same rules, non-negative).
        T: end time (default 1.0).

    The diffusion ``G = σ x`` depends on the state, so the SDE carries the closed-form
    ``∇·D = ∂(σ² x²)/∂x = 2 σ² x`` for its reverse-time dynamics. Itô solution (Kloeden & Platen
    1992, §4.4, eq. 4.6): ``x_t = x_0 exp((μ − σ²/2) t + σ W_t)``.
    """

    def __init__(self, mu: float | Tensor = 1.0, sigma: float | Tensor = 1.0, T: float = 1.0, *, t_min: float = 1e-3):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.sigma_gbm = torch.as_tensor(sigma, dtype=torch.float64)
        if not torch.isfinite(self.mu).all():
            raise ValueError("mu must be finite")
        if not torch.isfinite(self.sigma_gbm).all() or (self.sigma_gbm < 0).any():
            raise ValueError("sigma must be finite and non-negative")
        super().__init__(
            self._gbm_drift, self._gbm_diffusion, T, t_min=t_min, diffusion_divergence=self._gbm_divergence
        )

    def _coef(self, v: Tensor, x: Tensor) -> Tensor:
        return v.to(device=x.device, dtype=x.dtype)

    def _gbm_drift(self, x, t):
        return self._coef(self.mu, x) * x

    def _gbm_diffusion(self, x, t):
        return self._coef(self.sigma_gbm, x) * x

    def _gbm_divergence(self, x, t):
        return 2.0 * self._coef(self.sigma_gbm, x) ** 2 * x

    # -- exact answers ----------------------------------------------------------------------------
    def mean(self, x0: Tensor | float, t: Tensor | float) -> Tensor:
        """``E[x_t | x_0] = x_0 e^{μt}``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.as_tensor(x0, dtype=torch.float64) * torch.exp(self.mu * t)

    def second_moment(self, x0: Tensor | float, t: Tensor | float) -> Tensor:
        """``E[x_t² | x_0] = x_0² e^{(2μ + σ²) t}``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.as_tensor(x0, dtype=torch.float64) ** 2 * torch.exp((2 * self.mu + self.sigma_gbm**2) * t)

    def variance(self, x0: Tensor | float, t: Tensor | float) -> Tensor:
        """``Var[x_t | x_0] = x_0² e^{2μt} (e^{σ²t} − 1)``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.mean(x0, t) ** 2 * torch.expm1(self.sigma_gbm**2 * t)

    def exact_solution(
        self, x0: Tensor, times: Tensor | Sequence[float], brownian_increments: Tensor
    ) -> Tensor:
        """Exact ``x(t_k) = x_0 exp((μ − σ²/2)(t_k − t_0) + σ (W(t_k) − W(t_0)))`` on the grid.

        Args:
            x0: ``(batch, *dims)`` state at ``times[0]``.
            times: increasing 1-D grid ``t_0 < … < t_N``.
            brownian_increments: ``(N, batch, *dims)``.

        Returns:
            ``(N + 1, batch, *dims)``, exact (it depends on the path only through ``W(t_k)``).
        """
        t = _grid(times)
        if not (t[1:] > t[:-1]).all():
            raise ValueError("times must be increasing (the forward SDE runs from t_0 up)")
        _check_increments(t, brownian_increments, x0)
        dt = torch.promote_types(x0.dtype, torch.float64)
        w = torch.cat([torch.zeros_like(brownian_increments[:1]), brownian_increments], 0).to(dt).cumsum(0)
        el = (t - t[0]).to(x0.device, dt).reshape(-1, *([1] * x0.ndim))
        mu, sig = self._coef(self.mu, w), self._coef(self.sigma_gbm, w)
        return x0.to(dt)[None] * torch.exp((mu - 0.5 * sig**2) * el + sig * w)

    def __repr__(self):
        return f"GeometricBrownianMotion(mu={self.mu.tolist()}, sigma={self.sigma_gbm.tolist()}, T={self.T})"


class ForwardEquation(EquationBase):
    """A forward SDE seen as an :class:`~sdegen.equation.Equation` that sdegen's solvers integrate.

    ``integrate(ForwardEquation(sde), x0, times, solver, noise)`` with increasing ``times`` solves
    ``dx = f dt + G dw`` forward in time (``h > 0``). Drift evaluations are counted in :attr:`nfe` and
    checked for NaN/Inf like network evaluations. Not affine (exponential integrators refuse it).

    Args:
        sde: any :class:`~sdegen.SDE`.
        ode: integrate only the drift, ``dx = f dt`` (a deterministic equation).
    """

    def __init__(self, sde: SDE, *, ode: bool = False):
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
        super().__init__()
        self.sde = sde
        self._ode = bool(ode)
        self.T, self.t_min = sde.T, sde.t_min

    @property
    def is_ode(self) -> bool:
        return self._ode

    @property
    def state_dependent(self) -> bool:
        return self.sde.state_dependent and not self._ode

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t)`` (counted in :attr:`nfe`)."""
        out = self.sde.drift(x, as_batch_time(t, x))
        self.record_evaluation(out)
        return out

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        """``G(x, t)`` broadcastable to ``x`` (zero for ``ode=True``)."""
        if self._ode:
            return torch.zeros((), device=x.device, dtype=x.dtype)
        return self.sde.diffusion(x, as_batch_time(t, x))

    def __repr__(self) -> str:
        return f"ForwardEquation({self.sde!r}, ode={self._ode})"


class PredrawnNoise:
    """A :class:`~sdegen.noise.NoiseSource` serving given standard-normal tensors in order, one per ``normal`` call.

    For cross-checks against another implementation with **identical noise**: draw the ``z`` tensors once,
    feed them to the reference sampler, and give the same list to sdegen (unlike :class:`ReplayNoise`, the
    draws are served as they are, not as Brownian increments of a grid). A draw of another shape, one
    beyond the list, or a ``uniform`` draw raises ``AssertionError`` naming the draw; :attr:`used` counts the
    draws so far.

    Args:
        draws: the tensors, in the order the solver will draw them.
    """

    def __init__(self, draws: Sequence[Tensor]):
        self.draws, self.used = list(draws), 0

    def normal(self, shape, *, device, dtype):
        assert self.used < len(self.draws), f"draw {self.used + 1} requested, only {len(self.draws)} were given"
        z = self.draws[self.used]
        assert tuple(z.shape) == tuple(shape), f"draw {self.used + 1} has shape {tuple(z.shape)}, asked {tuple(shape)}"
        self.used += 1
        return z.to(device=device, dtype=dtype)

    def uniform(self, shape, *, device, dtype):
        raise AssertionError("PredrawnNoise serves normal draws only; the solver asked for a uniform draw")

    def select(self, index):
        return self


class ReplayNoise:
    """A :class:`~sdegen.noise.NoiseSource` that replays given Brownian increments, one per step.

    Solvers draw ``ΔW = z √|h|`` with ``z = noise.normal(...)`` (:func:`~sdegen.solvers.base.brownian_increment`);
    the ``k``-th ``normal`` call here returns ``ΔW_k / √|h_k|``, so step ``k`` sees exactly ``ΔW_k``.

    Args:
        increments: ``(N, batch, *dims)`` Brownian increments over the ``N`` intervals of ``times``.
        times: the grid (``N + 1`` points, monotone) the solver will step on.

    Only solvers that draw **one** normal of the state's shape per step can be replayed (Euler–
    Maruyama, stochastic Heun, any solver calling ``brownian_increment`` once per step). A further
    draw raises ``RuntimeError``; :attr:`draws` counts the draws so far. ``uniform`` draws raise
    ``TypeError``.
    """

    def __init__(self, increments: Tensor, times: Tensor | Sequence[float], *, _counter: list[int] | None = None):
        t = _grid(times)
        if increments.ndim < 2 or increments.shape[0] != t.shape[0] - 1:
            raise ValueError(
                f"increments must have shape (len(times) - 1, batch, *dims) = ({t.shape[0] - 1}, ...), "
                f"got {tuple(increments.shape)}"
            )
        self.increments = increments
        self.times = t
        self._scale = (t[1:] - t[:-1]).abs().rsqrt()
        self._counter = _counter if _counter is not None else [0]

    @property
    def draws(self) -> int:
        """Number of ``normal`` draws made so far."""
        return self._counter[0]

    def normal(self, shape, *, device, dtype):
        k = self._counter[0]
        if k >= self.increments.shape[0]:
            raise RuntimeError(
                f"ReplayNoise holds {self.increments.shape[0]} increments, one per step, and the solver asked "
                "for more: it draws several normals per step and cannot be replayed pathwise"
            )
        if tuple(shape) != tuple(self.increments.shape[1:]):
            have = tuple(self.increments.shape[1:])
            raise ValueError(f"asked for noise of shape {tuple(shape)}, the replayed path has {have}")
        self._counter[0] += 1
        z = self.increments[k].to(torch.float64) * float(self._scale[k])
        return z.to(device=device, dtype=dtype)

    def uniform(self, shape, *, device, dtype):
        raise TypeError("ReplayNoise replays Brownian increments only; this solver draws uniform numbers")

    def select(self, index: Tensor) -> ReplayNoise:
        return ReplayNoise(self.increments[:, index], self.times, _counter=self._counter)


class BrownianPath:
    """One Brownian path per sample on a fine grid, summed onto any coarser sub-grid on demand.

    Args:
        times: the fine grid (monotone, ``N + 1`` points).
        shape: ``(batch, *dims)`` of the state.
        generator: ``torch.Generator`` on ``device`` (default: torch's global RNG).
        device: where the increments live (default CPU).

    Attributes:
        times: ``(N + 1,)`` float64 CPU grid.
        increments: ``(N, batch, *dims)`` float64, independent ``ΔW_k ~ N(0, |t_{k+1} − t_k| I)``.
    """

    def __init__(
        self,
        times: Tensor | Sequence[float],
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ):
        self.times = _grid(times)
        self.shape = tuple(int(s) for s in shape)
        device = torch.device(device) if device is not None else torch.device("cpu")
        n = self.times.shape[0] - 1
        h = (self.times[1:] - self.times[:-1]).abs().to(device)
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=torch.float64)
        self.increments = z * bcast(h.sqrt(), z)
        self._w = torch.cat([torch.zeros_like(z[:1]), self.increments]).cumsum(0)

    def _indices(self, times: Tensor) -> Tensor:
        idx = (times[:, None] - self.times[None, :]).abs().argmin(1)
        span = float((self.times[-1] - self.times[0]).abs())
        if ((self.times[idx] - times).abs() > 1e-9 * span).any():
            raise ValueError("times must be a sub-grid of the Brownian path's grid (every time a point of it)")
        if (torch.sign(times[1:] - times[:-1]) != torch.sign(self.times[1] - self.times[0])).any():
            raise ValueError("times must run in the same direction as the Brownian path's grid")
        return idx

    def values(self) -> Tensor:
        """``W(t_k) − W(t_0)`` at every fine time: ``(N + 1, batch, *dims)``."""
        return self._w

    def increments_on(self, times: Tensor | Sequence[float]) -> Tensor:
        """Increments of this path over the intervals of a sub-grid: ``(len(times) - 1, batch, *dims)``."""
        t = _grid(times)
        idx = self._indices(t).to(self._w.device)
        w = self._w[idx]
        return w[1:] - w[:-1]

    def noise(self, times: Tensor | Sequence[float]) -> ReplayNoise:
        """A :class:`ReplayNoise` that feeds this path to a solver stepping on the sub-grid ``times``."""
        return ReplayNoise(self.increments_on(times), times)

    def __repr__(self) -> str:
        return f"BrownianPath(steps={self.times.shape[0] - 1}, shape={self.shape})"
