"""DPM-Solver++ multistep (2M, 3M): exponential integrators for the probability-flow ODE.

Lu et al. (2022b), *DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models*, Alg. 1 (2M) and App. B (3M, the third-order multistep of DPM-Solver, Lu et al. 2022a,
§3.3, in data-prediction form). k-diffusion's ``sample_dpmpp_2m`` is 2M; its ``sample_dpmpp_3m_sde`` with
``eta=0`` is 3M with ``variant="heun", d2_weight="halved", lower_order_final=False`` (reproduced to
rounding in ``tests/test_samplers.py``). The stochastic forms are :mod:`sdegen.solvers.dpmpp_sde`.

For an affine SDE with kernel ``x_t = m(t) x_0 + s(t) z`` write ``ℓ = log(m/s)`` (half the log-SNR,
increasing towards the data). The probability-flow ODE in data-prediction form is
``dx/dℓ = (d log s/dℓ) x + m x̂0(x, ℓ)``, whose variation-of-constants solution from ``t_i`` to
``t_{i+1}`` (``h = ℓ_{i+1} − ℓ_i > 0``) is exactly::

    x_{i+1} = (s_{i+1}/s_i) x_i + s_{i+1} ∫_{ℓ_i}^{ℓ_{i+1}} e^{ℓ} x̂0(ℓ) dℓ.

Replacing ``x̂0(ℓ)`` by its Taylor polynomial about ``ℓ_i``, whose derivatives are estimated by divided
differences of the previous ``x̂0`` (multistep), gives with ``φ1 = −expm1(−h)``,
``φ2 = expm1(−h)/h + 1``, ``φ3 = (expm1(−h) + h)/h² − ½`` (the ``e^{-ℓ}``-weighted moments of the
polynomial terms) and ``D_j = x̂0`` at step ``i − j``, ``r_j = h_{i−j}/h``::

    order 1 (DDIM):  x_{i+1} = (s_{i+1}/s_i) x_i + m_{i+1} φ1 D_0
    order 2 (2M):    ... + m_{i+1} φ1 [(1 + 1/(2 r_1)) D_0 − 1/(2 r_1) D_1]            (Alg. 1, "midpoint")
                     ... + m_{i+1} [φ1 D_0 + φ2 (D_0 − D_1)/r_1]                         ("heun": exact weight)
    order 3 (3M):    ... + m_{i+1} [φ1 D_0 + φ2 D1 − 2 φ3 D2],
                     D1_0 = (D_0 − D_1)/r_1, D1_1 = (D_1 − D_2)/r_2,
                     D1 = D1_0 + r_1/(r_1 + r_2) (D1_0 − D1_1),  D2 = (D1_0 − D1_1)/(r_1 + r_2).

``D1 ≈ h x̂0'`` and ``D2 ≈ h² x̂0''/2``, and the exact weight of ``x̂0''/2`` is
``∫_0^h e^{u−h} u² du = h² (1 − 2φ2/h) = −2 h² φ3``, hence the factor 2 on ``D2``. The reference
implementation of the 3M update (``dpm_solver_pytorch``, diffusers' ``DPMSolverMultistepScheduler``
and k-diffusion's ``sample_dpmpp_3m_sde``) weights ``D2`` by ``−φ3``, half of that: its local error
is then ``O(h³)`` and it converges with order 2 only (measured in ``tests/test_fast_solvers.py``:
slope ≈ 2.0 with ``−φ3``, ≈ 3.1 with ``−2φ3``). The local error is ``O(h^{p+1})``, so the global
order is ``p`` (2 or 3) in the step of ``ℓ``.
Each step costs one network evaluation (``x̂0 = (x + s² ∇log p)/m`` by Tweedie's formula from the score).

The first steps use lower orders while the history fills (order ``min(p, i + 1)``). With
``lower_order_final=True`` (default; diffusers' ``lower_order_final``) grids of fewer than 15 steps
also lower the order at the end — the last step is first order and, for 3M, the one before is at
most second order — which keeps very low-NFE sampling stable where ``h`` grows large near the data.

The coefficients of every step are computed once per grid in :meth:`init_state`, on the device
(no host-device synchronisation); a step is one evaluation of ``x̂0`` (``eq.denoise``: the model's own
data prediction, or Tweedie's formula from its score) and ``p + 1`` fused tensor operations. A step from
``m = 0`` (``h = ∞``: e.g. ``t = 1`` on a flow-matching path) is the first-order step ``s_{i+1} x_i +
m_{i+1} x̂0``, finite.
ODE only (``noise_scale=0``). Default grid ``"log_snr_cos"`` (log-SNR with endpoint corrections), the best
measured for both (``docs/performance.md``); ``"log_snr"`` (uniform ``h``) is next.

Options: ``lower_order_final`` (default True), ``variant`` (``"midpoint"`` default, ``"heun"``: the weight of
the first divided difference), ``d2_weight`` (3M: ``"exact"`` default, ``"halved"`` the reference
implementations' weight).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..equation import Equation, require_affine
from ..noise import normal_like
from ._expint import grid_kernel, multistep_orders, per_step, phis
from .base import Solver

__all__ = ["DPMSolverPP2M", "DPMSolverPP3M", "multistep_coefficients", "VARIANTS", "D2_WEIGHTS"]

VARIANTS = ("midpoint", "heun")
D2_WEIGHTS = ("exact", "halved")


@dataclass
class _MultistepState:
    """Per-step coefficients and the history of data predictions ``x̂0``.

    The update ``x_{i+1} = a_i x_i + Σ_j w[j]_i x̂0_{i−j} (+ c_i z)`` costs ``p + 1`` fused operations after
    the network evaluation. Every coefficient is a list of 0-d tensors in the state's dtype (one per step),
    so a step does no arithmetic on times.
    """

    a: list  # a[i] = (s_{i+1}/s_i) e^{−η h_i}
    w: list  # w[j][i]
    c: list | None = None  # c[i]: std of the noise added by step i (None: deterministic)
    step: int = 0
    history: list[Tensor] = field(default_factory=list)


def multistep_coefficients(
    eq: Any, times: Tensor, order: int, *, eta: float = 0.0, variant: str = "midpoint",
    d2_weight: str = "exact", orders: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(a, w, c)`` of DPM-Solver++ multistep on the grid ``times`` (float64 where available).

    ``a`` ``(N,)``, ``w`` ``(order, N)`` (weights on ``x̂0_i, x̂0_{i−1}, ...``), ``c`` ``(N,)`` the noise std of
    each step (None when ``eta = 0``); ``eta = λ²`` (see :mod:`sdegen.solvers.dpmpp_sde`); ``orders`` the
    order of every step (default: warm-up only).
    """
    m, s, ell = grid_kernel(eq, times)
    n = times.shape[0] - 1
    h = ell[1:] - ell[:-1]  # (N,) > 0 when sampling
    big_h = (1.0 + eta) * h
    if orders is None:
        orders = multistep_orders(order, n, False)
    top = max(orders, default=1)  # the highest order any step uses: only its coefficients are computed
    phi = phis(big_h, 3 if top >= 3 else 2 if top == 2 and variant != "midpoint" else 1)
    phi1 = phi[0]
    m_next = m[1:]
    if eta == 0.0:
        a = s[1:] / s[:-1]
        c = None
    else:
        a = s[1:] / s[:-1] * torch.exp(-eta * h)
        c = s[1:] * torch.sqrt(-torch.expm1(-2.0 * eta * h))
    zero = torch.zeros_like(h)
    rows = [[m_next * phi1, zero, zero]]  # order 1 (DDIM / DPM-Solver-1)
    if top >= 2:
        # r_j = h_{i-j} / h_i, shifted so index i reads the previous steps (1 where undefined)
        r1 = torch.cat([h[:1], h[:-1]]) / h
        # order 2: D = D_0 + c (D_0 − D_1) / r_1, c = φ1/2 (midpoint, Alg. 1) or φ2 (heun: the exact weight)
        c2 = 0.5 * phi1 if variant == "midpoint" else phi[1]
        rows.append([m_next * (phi1 + c2 / r1), -m_next * c2 / r1, zero])
    if top >= 3:
        phi2, phi3 = phi[1], phi[2]
        r2 = torch.cat([h[:2], h[:-2]])[:n] / h
        # order 3: m φ1 D_0 + m φ2 D1 − k m φ3 D2 (k = 2 exact, 1 halved) expanded into weights on D_0, D_1, D_2
        k = 2.0 if d2_weight == "exact" else 1.0
        q = r1 / (r1 + r2)
        big_a = m_next * (phi2 * (1 + q) - k * phi3 / (r1 + r2))  # coefficient of D1_0
        big_b = m_next * (-phi2 * q + k * phi3 / (r1 + r2))  # coefficient of D1_1
        rows.append([m_next * phi1 + big_a / r1, -big_a / r1 + big_b / r2, -big_b / r2])
    if top == 1:
        w = torch.stack([rows[0][j] for j in range(order)])
    else:
        ords = torch.tensor(orders, device=times.device)
        w = torch.stack([
            functools.reduce(lambda acc, o: torch.where(ords == o, rows[o - 1][j], acc), range(top - 1, 0, -1),
                             rows[top - 1][j])
            for j in range(order)
        ])
    return a, w, c


class _DPMSolverPPMultistep(Solver):
    """Shared implementation; subclasses set ``name`` and ``order``."""

    supports_sde: ClassVar[bool] = False
    supports_ode: ClassVar[bool] = True
    nfe_per_step: ClassVar[int] = 1
    zero_signal_start: ClassVar[str] = "denoise"  # steps with the kernel and the model's x̂0: finite from m = 0
    default_grid: ClassVar[str] = "log_snr_cos"  # measured: docs/performance.md, "Time grids"
    default_steps: ClassVar[int] = 20

    def __init__(self, lower_order_final: bool = True, variant: str = "midpoint", d2_weight: str = "exact"):
        if not isinstance(lower_order_final, bool):
            raise TypeError(f"lower_order_final must be a bool, got {lower_order_final!r}")
        if variant not in VARIANTS:
            raise ValueError(f"solver {self.name!r}: variant must be one of {VARIANTS}, got {variant!r}")
        if d2_weight not in D2_WEIGHTS:
            raise ValueError(f"solver {self.name!r}: d2_weight must be one of {D2_WEIGHTS}, got {d2_weight!r}")
        self.lower_order_final = lower_order_final
        self.variant = variant
        self.d2_weight = d2_weight

    def check(self, eq: Equation) -> None:
        super().check(eq)
        require_affine(eq, self.name)

    def _orders(self, n: int) -> list[int]:
        return multistep_orders(int(self.order), n, self.lower_order_final)

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> _MultistepState:
        """Coefficients of every step of the grid ``times`` (decreasing, on ``x``'s device)."""
        eta = float(eq.noise_scale) ** 2
        n = times.shape[0] - 1
        a, w, c = multistep_coefficients(
            eq, times, int(self.order), eta=eta, variant=self.variant, d2_weight=self.d2_weight,
            orders=self._orders(n),
        )
        dt = x.dtype
        return _MultistepState(
            a=per_step(a, dt), w=[per_step(wj, dt) for wj in w], c=None if c is None else per_step(c, dt)
        )

    def step(self, eq, x, t, t_next, noise, state):
        if state is None:  # called outside integrate: a one-step grid
            state = self.init_state(eq, x, torch.stack([t, t_next]))
        i = state.step
        hist = [eq.denoise(x, t), *state.history]  # one network evaluation
        x_next = state.a[i] * x
        for j, d in enumerate(hist):
            x_next = torch.addcmul(x_next, state.w[j][i], d)
        if state.c is not None and noise is not None:
            x_next = torch.addcmul(x_next, state.c[i], normal_like(noise, x))
        state.history = hist[: int(self.order) - 1]
        state.step = i + 1
        return x_next, state

    def __repr__(self) -> str:
        extra = f", d2_weight={self.d2_weight!r}" if self.order >= 3 else ""
        return (f"{type(self).__name__}(lower_order_final={self.lower_order_final}, variant={self.variant!r}"
                f"{extra})")


class DPMSolverPP2M(_DPMSolverPPMultistep):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 1): second order, one evaluation per step.

    Args:
        lower_order_final: lower the order of the last steps of grids of fewer than 15 steps (default True).
        variant: ``"midpoint"`` (Alg. 1, default; k-diffusion's ``sample_dpmpp_2m``) or ``"heun"`` (the
            exact weight ``φ2`` of the first divided difference; diffusers' ``solver_type="heun"``).
        d2_weight: unused by 2M (accepted so that 2M and 3M take the same options).
    """

    name = "dpmpp_2m"
    order = 2.0
    default_steps = 25


class DPMSolverPP3M(_DPMSolverPPMultistep):
    """DPM-Solver++(3M) (Lu et al. 2022b, App. B): third order, one evaluation per step.

    Args:
        lower_order_final: as for 2M.
        variant: the second-order formula of the warm-up and final steps (``"midpoint"``, default, as diffusers'
            ``DPMSolverMultistepScheduler``; ``"heun"`` as k-diffusion's ``sample_dpmpp_3m_sde``).
        d2_weight: ``"exact"`` (default: ``−2 φ3``, order 3) or ``"halved"`` (``−φ3``, the reference
            implementations' weight, order 2; reproduces them).
    """

    name = "dpmpp_3m"
    order = 3.0
