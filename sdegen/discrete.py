"""Discrete-time VP schedules (DDPM) as continuous-time VP SDEs.

A DDPM-style model is trained on ``N`` integer timesteps ``i ∈ {0, …, N−1}`` with cumulative
products ``ᾱ_i = Π_{j≤i} (1 − β_j)`` (Ho et al. 2020, eq. 4): ``x_i = √ᾱ_i x_0 + √(1 − ᾱ_i) ε``.
:class:`DiscreteVPSDE` is the variance-preserving SDE on ``t ∈ (0, 1]`` whose kernel passes through
every one of those points.

**Timestep ↔ time map.** Timestep ``i`` sits at ``t_i = (i + 1) / N`` (so ``t_{N−1} = T = 1``), and a
continuous time maps back to the fractional timestep ``i(t) = N t − 1``
(:meth:`~DiscreteVPSDE.timesteps_to_times`, :meth:`~DiscreteVPSDE.times_to_timesteps`). The default
``t_min`` is ``t_0 = 1/N``, the least noisy level the network was trained on.

**Interpolation.** ``log ᾱ(t)`` is piecewise linear in ``t`` through the points ``(t_i, log ᾱ_i)`` and
the extra point ``(0, 0)`` (``ᾱ_{−1} = 1``: no noise at ``t = 0``), and is extended linearly beyond
``t = 1``. Then ``m(t) = √ᾱ(t)``, ``s(t)² = 1 − ᾱ(t)``, and the SDE ``dx = a(t) x dt + g(t) dw`` with

    a(t) = ½ d log ᾱ/dt,    g(t)² = −d log ᾱ/dt      (both piecewise constant)

has exactly this kernel: ``dm/dt = a m`` and ``ds²/dt = 2 a s² + g²`` hold on every segment (for
``s² = 1 − ᾱ``: ``2a s² + g² = (log ᾱ)'(1 − ᾱ) − (log ᾱ)' = −ᾱ'``). On the segment
``(t_{i−1}, t_i]`` the slope is ``N log(1 − β_i)``, so ``g² = −N log(1 − β_i) ≈ N β_i``: the familiar
``β(t) = N β_{⌈Nt⌉−1}`` of Song et al. (2021, §3.4) up to the ``log(1 − β) ≈ −β`` approximation, which
this class does not make (it would break the exact match with ``ᾱ_i`` at the nodes).

At a node the slope of the segment *below* it (towards the data) is used — the segment a sampling
step leaving that node traverses. Times are compared with a tolerance of ``1e-4`` timesteps there,
so float32 rounding of ``t_i`` does not flip the segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .sde import LinearSDE

__all__ = ["DiscreteVPSDE"]

_NODE_TOL = 1e-4  # in timestep units: how close to a node counts as the node (slope side)


def _as_schedule(name: str, values) -> Tensor:
    if isinstance(values, Tensor):
        v = values.detach().to("cpu", torch.float64)
    else:
        try:
            v = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError):
            msg = f"{name} must be a 1-D tensor or sequence of numbers, got {type(values).__name__}"
            raise TypeError(msg) from None
    if v.ndim != 1 or v.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with at least one entry, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite")
    return v.reshape(-1)


class DiscreteVPSDE(LinearSDE):
    """The VP SDE through a discrete DDPM schedule ``ᾱ_0 > ᾱ_1 > … > ᾱ_{N−1}`` (see the module doc).

    Args:
        alphas_cumprod: ``(N,)`` cumulative products ``ᾱ_i`` in ``(0, 1)``, strictly decreasing
            (``scheduler.alphas_cumprod`` of a diffusers scheduler). Give this or ``betas``.
        betas: ``(N,)`` per-step variances ``β_i ∈ (0, 1)``; ``ᾱ_i = Π_{j≤i} (1 − β_j)``.
        t_min: smallest sampling time, default ``t_0 = 1/N`` (timestep 0).

    Attributes:
        num_timesteps: ``N``.
        alphas_cumprod: ``(N,)`` float64 CPU tensor.
        T: ``1.0`` (timestep ``N − 1``). Prior ``N(0, I)``.

    The schedule is kept in float64; coefficients are computed in the time tensor's dtype and on
    its device (tables are cached per device and dtype, so no transfer happens per step).
    """

    def __init__(
        self,
        alphas_cumprod: Tensor | Sequence[float] | None = None,
        *,
        betas: Tensor | Sequence[float] | None = None,
        t_min: float | None = None,
    ):
        if (alphas_cumprod is None) == (betas is None):
            raise ValueError("give exactly one of alphas_cumprod= and betas=")
        if betas is not None:
            b = _as_schedule("betas", betas)
            if ((b <= 0) | (b >= 1)).any():
                raise ValueError("betas must lie in (0, 1)")
            log_abar = torch.cumsum(torch.log1p(-b), 0)
        else:
            a = _as_schedule("alphas_cumprod", alphas_cumprod)
            if ((a <= 0) | (a >= 1)).any():
                raise ValueError("alphas_cumprod must lie in (0, 1) (zero-terminal-SNR schedules: clip the last value)")
            log_abar = torch.log(a)
        if not (log_abar[1:] < log_abar[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (every beta > 0)")
        self.num_timesteps = int(log_abar.shape[0])
        self.alphas_cumprod = torch.exp(log_abar)
        # log ᾱ at the extended nodes e = 0..N (e = N t = timestep + 1), with ᾱ = 1 at e = 0
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar])
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        t0 = 1.0 / self.num_timesteps
        super().__init__(1.0, t_min=t0 if t_min is None else t_min)

    # -- the timestep <-> time map ------------------------------------------------------------------
    def timesteps_to_times(self, timesteps: Tensor | Sequence[int] | int) -> Tensor:
        """Continuous times ``t_i = (i + 1) / N`` of integer (or fractional) timesteps ``i``.

        Returns a float64 tensor (on the input's device when a tensor is given), shaped like the input.
        """
        ts = torch.as_tensor(timesteps)
        dt = torch.float64 if ts.device.type != "mps" else torch.float32
        return (ts.to(dt) + 1.0) / self.num_timesteps

    def times_to_timesteps(self, t: Tensor | float) -> Tensor:
        """Fractional timesteps ``i(t) = N t − 1`` (not rounded, not clamped), shaped like ``t``."""
        t = self._t(t)
        return t * self.num_timesteps - 1.0

    # -- interpolation ------------------------------------------------------------------------------
    def _table(self, t: Tensor) -> tuple[Tensor, Tensor]:
        key = (t.device, t.dtype)
        tab = self._tables.get(key)
        if tab is None:
            la = self._log_abar
            # node values (N+1,) and segment increments (N,), differenced in float64 before the cast
            tab = (la.to(device=t.device, dtype=t.dtype), (la[1:] - la[:-1]).to(device=t.device, dtype=t.dtype))
            self._tables[key] = tab
        return tab

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        """``log ᾱ(t)``: piecewise linear through ``(0, 0)`` and ``(t_i, log ᾱ_i)``; shaped like ``t``."""
        t = self._t(t)
        la, dla = self._table(t)
        e = t * self.num_timesteps
        k = torch.floor(e).clamp(0, self.num_timesteps - 1).long()
        return la[k] + (e - k.to(e.dtype)) * dla[k]

    def _slope(self, t: Tensor) -> Tensor:
        """``d log ᾱ / dt`` on the segment below ``t`` (towards the data)."""
        _, dla = self._table(t)
        e = t * self.num_timesteps
        k = (torch.ceil(e - _NODE_TOL) - 1).clamp(0, self.num_timesteps - 1).long()
        return dla[k] * self.num_timesteps

    # -- LinearSDE interface ------------------------------------------------------------------------
    def drift_coef(self, t):
        return 0.5 * self._slope(self._t(t))

    def diffusion_coef(self, t):
        return torch.sqrt(-self._slope(self._t(t)))

    def marginal(self, t):
        la = self.log_alpha_bar(t)
        return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(-self.log_alpha_bar(t)))

    def t_from_sigma(self, sigma):
        """Exact inverse of :meth:`sigma` (float64): ``−log ᾱ(t) = log(1 + σ²)`` solved on its segment."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        y = torch.log1p(sigma**2)
        neg = -self._log_abar.to(sigma.device)  # increasing from 0
        k = (torch.searchsorted(neg, y.reshape(-1)).reshape(y.shape) - 1).clamp(0, self.num_timesteps - 1)
        e = k.to(torch.float64) + (y - neg[k]) / (neg[k + 1] - neg[k])
        return e / self.num_timesteps

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return (
            f"DiscreteVPSDE(N={self.num_timesteps}, alphas_cumprod=[{float(a[0]):.6g} … {float(a[-1]):.6g}], "
            f"t_min={self.t_min:.6g})"
        )

    @property
    def betas(self) -> Tensor:
        """``β_i = 1 − ᾱ_i / ᾱ_{i−1}`` (``ᾱ_{−1} = 1``), float64 ``(N,)``."""
        return -torch.expm1(self._log_abar[1:] - self._log_abar[:-1])
