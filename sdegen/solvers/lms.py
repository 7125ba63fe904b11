"""Linear multistep samplers: LMS (Adams–Bashforth with variable steps) and iPNDM, in σ or in log-SNR.

The probability-flow ODE of an affine SDE (``x_t = m x_0 + s z``, ``σ = s/m``, ``ℓ = log(m/s) = −log σ``)
has two linear forms in which the network output is the only nonlinear term (``docs/concepts.md``):

* in ``σ`` with the noise prediction ``ε̂ = (x − m x̂0)/s``: ``d(x/m)/dσ = ε̂`` — Karras et al. (2022, eq. 4);
  k-diffusion's ``sample_lms`` and DEIS's ``ρAB`` (Zhang & Chen 2023, *Fast Sampling of Diffusion Models
  with Exponential Integrator*, ICLR, eq. 15);
* in ``ℓ`` with the data prediction ``x̂0``: ``d(x/s)/dℓ = e^{ℓ} x̂0`` — the form of DPM-Solver++
  (Lu et al. 2022b; :mod:`sdegen.solvers.dpmpp`);
* in ``t`` with ``ε̂``: ``d(x/m)/dt = σ'(t) ε̂`` — DEIS's ``tAB`` (Zhang & Chen 2023, eq. 14).

A ``k``-step Adams–Bashforth method replaces the network output over a step ``[u_i, u_{i+1}]`` by its
Lagrange interpolant through the last ``k`` evaluations ``u_i, u_{i−1}, …, u_{i−k+1}`` and integrates
exactly::

    variable="sigma":    x_{i+1} = (m_{i+1}/m_i) x_i + m_{i+1} Σ_j [∫_{σ_i}^{σ_{i+1}} L_j(σ) dσ] ε̂_{i−j}
    variable="log_snr":  x_{i+1} = (s_{i+1}/s_i) x_i + m_{i+1} Σ_j [∫_{−h}^{0} e^{u} L_j(ℓ_{i+1} + u) du] x̂0_{i−j}
    variable="t":        x_{i+1} = (m_{i+1}/m_i) x_i + m_{i+1} Σ_j [∫_{t_i}^{t_{i+1}} L_j(τ) σ'(τ) dτ] ε̂_{i−j}

(``h = ℓ_{i+1} − ℓ_i``). ``"sigma"`` is k-diffusion's ``sample_lms`` (reproduced to float64 rounding in
``tests/test_samplers.py``); ``"log_snr"`` with ``order`` 2 and 3 is DPM-Solver++(2M) ``variant="heun"``
and (3M), and with ``order=4`` its fourth-order extension; ``"t"`` is DEIS's tAB, its weights integrated by parts
(``[L_j σ] − ∫ L_j' σ dτ``) so that only ``σ(t)`` is needed. The weights are computed once per grid on
the device by Gauss–Legendre quadrature (exact for the polynomials of ``"sigma"``; 16 nodes, exact to
rounding for the exponential weight of steps of ``h`` up to ~10 and for smooth ``σ(t)``). Measured
(``docs/performance.md``, path error at 5 / 10 / 20 / 50 NFE, geometric mean of four problems, each variable
on its best grid): ``"t"`` 0.32 / 0.070 / 0.012 / 0.0007, ``"sigma"`` 0.38 / 0.11 / 0.024 / 0.0016, ``"log_snr"``
1.5 / 0.11 / 0.0095 / 0.0002 — DEIS tAB is the best below 20 NFE, log-SNR above; ``ipndm`` beats all three
below 20 NFE. The default stays ``"sigma"``, k-diffusion's LMS.

``ipndm`` (Zhang & Chen 2023, §4, "improved PNDM"; Zhou et al. 2024 found it the strongest fixed-step
ODE sampler at 5-10 NFE) uses the *fixed-step* Adams–Bashforth weights ``[1]``, ``[3, −1]/2``,
``[23, −16, 5]/12``, ``[55, −59, 37, −9]/24`` times the step ``σ_{i+1} − σ_i`` whatever the past step
sizes — exact only on a uniform σ grid, yet often better on the steeply graded grids of few-step sampling.

Options: ``order`` 1–4 (default 4, as k-diffusion); the first steps use ``min(order, i + 1)``;
``lower_order_final`` (default False, as k-diffusion; True: grids of fewer than 15 steps lower the
order of their last steps as DPM-Solver++ does). One network evaluation per step. ODE only; affine
SDEs with ``m > 0`` on the grid (``"sigma"`` needs finite ``σ``). A grid may end at ``σ = 0``
(``sdegen.integrate`` with a last time where ``s = 0``: k-diffusion's final step) — the network is never
evaluated there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..equation import Equation, require_affine
from ._expint import grid_kernel, multistep_orders, per_step
from .base import Solver

__all__ = ["LMS", "IPNDM", "LMS_VARIABLES", "lms_weights"]

LMS_VARIABLES = ("sigma", "log_snr", "t")
_GL_NODES = 16
_LEGGAUSS = tuple(v.tolist() for v in np.polynomial.legendre.leggauss(_GL_NODES))
_AB = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


@dataclass
class _LMSState:
    a: list  # x_{i+1} = a_i x_i + Σ_j w[j]_i P_{i−j}   (P = ε̂ or x̂0)
    w: list
    em: list | None  # "sigma": ε̂ = em_x[i] x − em_d[i] x̂0
    ex: list | None
    step: int = 0
    history: list[Tensor] = field(default_factory=list)


def _lagrange_integrals(u: Tensor, order: int, weight: str) -> Tensor:
    """``(order, order, N)``: ``I[k−1, j, i] = ∫_{u_i}^{u_{i+1}} ω L^{(k)}_j`` for the order-``k`` interpolant
    through ``u_i, u_{i−1}, …, u_{i−k+1}`` (clamped at the start; unused there), ``ω = 1`` (``"one"``) or
    ``e^{u − u_{i+1}}`` (``"exp"``).

    The interpolatory weights are exact for polynomials of degree ``< k``: with ``r_j = (u_{i−j} − u_i)/h``
    they solve ``Σ_j I_j r_j^q = M_q = ∫ ω ((u − u_i)/h)^q du``, ``q < k`` — one small batched solve per
    order (moments exact for ``ω = 1``, 16-node Gauss–Legendre for the exponential weight).
    """
    n = u.shape[0] - 1
    a, b = u[:-1], u[1:]
    h = b - a
    safe_h = torch.where(h == 0, torch.ones_like(h), h)
    idx = torch.arange(n, device=u.device)
    prev = u[(idx[:, None] - torch.arange(order, device=u.device)[None, :]).clamp_min(0)]  # (N, order)
    r = (prev - a[:, None]) / safe_h[:, None]
    # the clamped start repeats a node: replace by −j (a regular system; those rows are never used)
    missing = idx[:, None] < torch.arange(order, device=u.device)[None, :]
    r = torch.where(missing, -torch.arange(order, device=u.device, dtype=u.dtype)[None, :].expand_as(r), r)
    qs = torch.arange(order, device=u.device, dtype=u.dtype)
    if weight == "one":
        moments = h[:, None] / (qs[None, :] + 1.0)  # (N, order)
    else:
        xi, wq = (torch.as_tensor(v, dtype=u.dtype, device=u.device) for v in _LEGGAUSS)
        v = 0.5 * (1.0 + xi)  # nodes in (0, 1): (u − u_i)/h
        w = 0.5 * h[:, None] * wq[None, :] * torch.exp((v[None, :] - 1.0) * h[:, None])  # (N, Q)
        moments = (w[:, :, None] * v[None, :, None] ** qs[None, None, :]).sum(dim=1)
    out = torch.zeros(order, order, n, dtype=u.dtype, device=u.device)
    for k in range(1, order + 1):
        vander = r[:, None, :k] ** qs[None, :k, None]  # (N, q, j)
        sol, _ = torch.linalg.solve_ex(vander, moments[:, :k])
        out[k - 1, :k] = sol.T
    return out


def _lagrange_integrals_t(eq: Any, t: Tensor, sigma: Tensor, order: int) -> Tensor:
    """DEIS tAB: ``∫_{t_i}^{t_{i+1}} L_j(τ) σ'(τ) dτ`` for the interpolants in ``t``, by parts —
    ``[L_j σ]_{t_i}^{t_{i+1}} − ∫ L_j'(τ) σ(τ) dτ`` — so only ``σ(t)`` is needed (16-node Gauss–Legendre)."""
    n = t.shape[0] - 1
    xi, wq = (torch.as_tensor(v, dtype=t.dtype, device=t.device) for v in _LEGGAUSS)
    a, b = t[:-1], t[1:]
    half = 0.5 * (b - a)
    g = (0.5 * (a + b))[:, None] + half[:, None] * xi[None, :]  # (N, Q)
    m_g, s_g = eq.marginal(g.reshape(-1))
    sig_g = (s_g / m_g).to(t.dtype).reshape(g.shape)
    quad = half[:, None] * wq[None, :]
    idx = torch.arange(n, device=t.device)
    out = torch.zeros(order, order, n, dtype=t.dtype, device=t.device)
    for k in range(1, order + 1):
        nodes = [t[(idx - j).clamp_min(0)] for j in range(k)]
        for j in range(k):
            dens = {}
            for m in range(k):
                if m != j:
                    den = nodes[j] - nodes[m]
                    dens[m] = torch.where(den == 0, torch.ones_like(den), den)
            at_end = torch.ones_like(b)
            deriv = torch.zeros_like(g)
            for m in dens:
                at_end = at_end * (b - nodes[m]) / dens[m]
                term = torch.ones_like(g) / dens[m][:, None]
                for l_ in dens:
                    if l_ != m:
                        term = term * (g - nodes[l_][:, None]) / dens[l_][:, None]
                deriv = deriv + term
            start = sigma[:-1] if j == 0 else torch.zeros_like(b)
            out[k - 1, j] = at_end * sigma[1:] - start - (deriv * sig_g * quad).sum(dim=1)
    return out


def lms_weights(
    eq: Any, times: Tensor, order: int, variable: str, orders: list[int], fixed: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, w, ex, em)`` on the grid: ``x_{i+1} = a_i x_i + Σ_j w[j, i] P_{i−j}``; for ``"sigma"``
    ``ε̂_i = ex_i x_i − em_i x̂0_i`` (``ex = 1/s``, ``em = m/s``). ``fixed``: iPNDM's fixed-step weights."""
    m, s, ell = grid_kernel(eq, times)
    n = times.shape[0] - 1
    ords = torch.tensor(orders, device=times.device)
    w = torch.zeros(order, n, dtype=m.dtype, device=m.device)
    if variable in ("sigma", "t"):
        sigma = s / m
        a = m[1:] / m[:-1]
        if fixed:
            ints = torch.zeros(order, order, n, dtype=m.dtype, device=m.device)
            for k in range(1, order + 1):
                for j, beta in enumerate(_AB[k]):
                    ints[k - 1, j] = beta * (sigma[1:] - sigma[:-1])
        elif variable == "t":
            ints = _lagrange_integrals_t(eq, times.to(m.dtype), sigma, order)
        else:
            ints = _lagrange_integrals(sigma, order, "one")
        scale = m[1:]
    else:
        a = s[1:] / s[:-1]
        ints = _lagrange_integrals(torch.where(torch.isinf(ell), torch.zeros_like(ell), ell), order, "exp")
        scale = m[1:]
        # a step from or to ℓ = ±∞ (m = 0 or s = 0 at one end) is the first-order step: φ1 = 1
        h = ell[1:] - ell[:-1]
        inf = torch.isinf(h)
        ords = torch.where(inf, torch.ones_like(ords), ords)
        ints[0, 0] = torch.where(inf, torch.ones_like(h), ints[0, 0])
    for j in range(order):
        sel = torch.zeros_like(w[0])
        for k in range(max(j + 1, 1), order + 1):
            sel = torch.where(ords == k, ints[k - 1, j], sel)
        w[j] = scale * sel
    return a, w, 1.0 / s, m / s


class LMS(Solver):
    """Linear multistep (Adams–Bashforth) in ``σ`` on ``ε̂`` or in log-SNR on ``x̂0`` (module docstring).

    Args:
        order: 1–4 (default 4).
        variable: ``"sigma"`` (default; k-diffusion's ``sample_lms``), ``"log_snr"`` or ``"t"`` (DEIS tAB).
        lower_order_final: see the module docstring (default False).
    """

    name = "lms"
    supports_sde: ClassVar[bool] = False
    supports_ode: ClassVar[bool] = True
    nfe_per_step: ClassVar[int] = 1
    default_grid: ClassVar[str] = "log_snr_cos"  # measured: docs/performance.md, "Time grids"
    default_steps: ClassVar[int] = 20
    # its polynomial in σ or log-SNR has a node at σ = ∞ (m = 0): not defined from there
    zero_signal_start: ClassVar[str] = "refuse"
    order = 4.0
    _fixed: ClassVar[bool] = False

    def __init__(self, order: int = 4, variable: str = "sigma", lower_order_final: bool = False):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
            raise ValueError(f"solver {self.name!r}: order must be an int in 1..4, got {order!r}")
        if variable not in LMS_VARIABLES:
            raise ValueError(f"solver {self.name!r}: variable must be one of {LMS_VARIABLES}, got {variable!r}")
        if self._fixed and variable != "sigma":
            raise ValueError(f"solver {self.name!r}: iPNDM's fixed-step weights are defined in σ (variable='sigma')")
        if not isinstance(lower_order_final, bool):
            raise TypeError(f"solver {self.name!r}: lower_order_final must be a bool, got {lower_order_final!r}")
        self.p = order
        # iPNDM's fixed weights are exact on uniform σ steps only: on a smooth non-uniform grid the step ratios
        # differ from 1 by O(h) and the method is second order (measured in tests/test_orders.py)
        self.order = float(min(order, 2) if self._fixed else order)  # type: ignore[misc]
        self.variable = variable
        self.lower_order_final = lower_order_final

    def check(self, eq: Equation) -> None:
        super().check(eq)
        require_affine(eq, self.name)

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> _LMSState:
        n = times.shape[0] - 1
        orders = multistep_orders(self.p, n, self.lower_order_final)
        a, w, ex, em = lms_weights(eq, times, self.p, self.variable, orders, self._fixed)
        dt = x.dtype
        sig = self.variable in ("sigma", "t")
        return _LMSState(
            a=per_step(a, dt), w=[per_step(wj, dt) for wj in w],
            ex=per_step(ex[:-1], dt) if sig else None, em=per_step(em[:-1], dt) if sig else None,
        )

    def step(self, eq, x, t, t_next, noise, state):
        if state is None:  # called outside integrate: a one-step grid
            state = self.init_state(eq, x, torch.stack([t, t_next]))
        i = state.step
        d = eq.denoise(x, t)  # one network evaluation
        if state.ex is not None:
            d = torch.addcmul(state.ex[i] * x, state.em[i], d, value=-1.0)  # ε̂ = (x − m x̂0)/s
        hist = [d, *state.history]
        x_next = state.a[i] * x
        for j, dj in enumerate(hist):
            x_next = torch.addcmul(x_next, state.w[j][i], dj)
        state.history = hist[: self.p - 1]
        state.step = i + 1
        return x_next, state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(order={self.p}, variable={self.variable!r}, "
                f"lower_order_final={self.lower_order_final})")


class IPNDM(LMS):
    """iPNDM: Adams–Bashforth with fixed-step weights in ``σ`` on ``ε̂`` (module docstring).

    Args:
        order: 1–4 (default 4).
        variable: ``"sigma"`` only.
        lower_order_final: as for :class:`LMS`.
    """

    name = "ipndm"
    order = 2.0
    _fixed = True
