"""UniPC: the unified predictor–corrector multistep exponential integrator (Zhao et al. 2023).

Zhao, Bai, Rao, Zhou & Lu (2023), *UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models*, NeurIPS — Alg. 2 and 3 (UniP-p, UniC-p, "B(h)" variants), in data-prediction form.
It is diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``), reproduced to float64 rounding in
``tests/test_samplers.py``.

With ``ℓ = log(m/s)``, ``h = ℓ_{i+1} − ℓ_i``, the data predictions ``D_j = x̂0(x_j, t_j)`` and
``r_k = (ℓ_{i−k} − ℓ_i)/h`` (negative: earlier points), one step of order ``p`` from the corrected
state ``x^c_i`` is the predictor::

    x_{i+1} = (s_{i+1}/s_i) x^c_i + m_{i+1} φ1(h) D_i − m_{i+1} B(h) Σ_{k<p} ρ^p_k (D_{i−k} − D_i)/r_k

with ``B(h) = −h`` (``variant="bh1"``) or ``expm1(−h)`` (``"bh2"``), and ``ρ^p`` solving the order
conditions ``Σ_k r_k^{j−1} ρ_k = b_j`` (``j < p``; ``ρ = ½`` for ``p = 2``),
``b_j = j! φ_{j+1}(h)/B(h)`` in the paper's φ functions. After the network is evaluated at
``x_{i+1}`` (the step's one evaluation) the corrector UniC-p recomputes the same step with the new
point included (``r_p = 1``, ``p + 1`` terms; ``ρ = ½`` for ``p = 1``)::

    x^c_{i+1} = (s_{i+1}/s_i) x^c_i + m_{i+1} φ1 D_i − m_{i+1} B (Σ_{k<p} ρ^c_k (D_{i−k} − D_i)/r_k
                + ρ^c_p (D_{i+1} − D_i)),

raising the order to ``p + 1`` at no extra evaluation. The model output ``D_{i+1}`` is the one evaluated
at the *uncorrected* ``x_{i+1}`` (that is what makes the corrector free). The state the loop sees (and
returns) after each step is the predictor's ``x_{i+1}``; the last step is not corrected (its correction
would need one more evaluation). With ``final_step="tweedie"`` the output is ``D`` at the last
(uncorrected) state: diffusers' last step to ``σ = 0``.

Options:
    order: ``p`` of UniP-p / UniC-p, 1–3 (default 3; the measured ODE order is ``p + 1``).
    variant: ``"bh2"`` (default; the paper recommends it above 10 steps) or ``"bh1"``.
    lower_order_final: ``True`` (default): on grids of fewer than 15 steps the order of step ``i`` of ``N`` is
        at most ``N − i`` (the last step is first order), as DPM-Solver++; ``"diffusers"``: on every grid at
        most ``N + 1 − i``, counting the step to ``σ = 0`` that ``final_step="tweedie"`` adds — diffusers'
        ``UniPCMultistepScheduler`` loop (``final_sigmas_type="zero"``, its default); ``False``: never.
        The last step is never corrected, so a first-order last step limits the global order to 2: on fine
        grids (≥ 15 steps) ``True`` does not lower it.
    disable_corrector: steps whose output is not corrected (diffusers' option of the same name).
    predictor: another multistep solver (name or instance: ``"dpmpp_2m"``, ``"dpmpp_3m"``, ``"ddim"``,
        ``"lms"``, ...) used in place of UniP — UniC after any one-evaluation predictor (diffusers'
        ``solver_p``). It must take its one evaluation through ``eq.denoise``: it then receives the
        evaluation at the uncorrected state, so the cost stays one evaluation per step.

Orders of the first steps are lowered while the history fills (``min(p, i + 1)``). Every coefficient
(including the small linear systems) is computed once per grid in :meth:`init_state` on the device,
in float64 where available; a step is one network evaluation and ``2p + 3`` fused tensor operations.
ODE only (``noise_scale = 0``), affine SDEs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..equation import Equation, require_affine
from ._expint import CachedDenoise, grid_kernel, multistep_orders, per_step
from .base import AdaptiveSolver, PathSolver, Solver

__all__ = ["UniPC", "unipc_coefficients"]

UNIPC_VARIANTS = ("bh1", "bh2")


@dataclass
class _UniPCState:
    ap: list  # predictor: x_{i+1} = ap[i] x^c_i + Σ_j wp[j][i] D_{i−j}
    wp: list
    ac: list  # corrector of step i: x^c_{i+1} = ac[i] x^c_i + Σ_j wc[j][i] D_{i+1−j}
    wc: list
    correct: list[bool]  # correct the output of step i (at the start of step i + 1)
    pstate: Any = None  # state of a foreign predictor
    step: int = 0
    x_c: Tensor | None = None  # corrected state of the previous step's start
    history: list[Tensor] = field(default_factory=list)  # D_{i−1}, D_{i−2}, ...


def _b_vector(hh: Tensor, big_b: Tensor, order: int) -> Tensor:
    """``b_j = j! h_phi_j / B(h)``, ``j = 1..order`` with diffusers' recursion ``h_phi_{j+1} = h_phi_j/hh − 1/(j+1)!``
    (``hh = −h``; ``h_phi_1 = expm1(hh)/hh − 1``). Shape ``(order, N)``."""
    hphi = torch.expm1(hh) / hh - 1.0
    hphi = torch.where(torch.isinf(hh), torch.full_like(hh, -1.0), hphi)
    out, fact = [], 1.0
    for j in range(1, order + 1):
        out.append(hphi * fact / big_b)
        fact *= j + 1
        hphi = hphi / hh - 1.0 / fact
    return torch.stack(out)


def unipc_coefficients(
    eq: Any, times: Tensor, order: int, variant: str, orders: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ap, wp, ac, wc)`` of every step: predictor ``ap (N,)``, ``wp (order, N)``; corrector ``ac (N,)``,
    ``wc (order + 1, N)`` (``wc[0]`` weights ``D_{i+1}``, ``wc[1]`` ``D_i``, ...). ``orders``: order of each step."""
    m, s, ell = grid_kernel(eq, times)
    n = times.shape[0] - 1
    h = ell[1:] - ell[:-1]
    inf = torch.isinf(h)
    hh = -h
    hphi1 = torch.expm1(hh)  # = −φ1
    big_b = hh if variant == "bh1" else hphi1
    big_b = torch.where(inf, torch.full_like(h, -1.0), big_b)
    b = _b_vector(hh, big_b, max(order, 1))  # (order, N)
    # r_k = (ℓ_{i−k} − ℓ_i)/h_i for k = 1..order−1 (−k where the history does not reach: unused, kept regular)
    ks = torch.arange(1, max(order, 2), device=h.device)
    idx = torch.arange(n, device=h.device)[:, None] - ks[None, :]  # (N, K)
    prev = ell[idx.clamp_min(0)]
    r = torch.where(idx >= 0, (prev - ell[:n, None]) / h[:, None], -ks[None, :].to(h.dtype))  # (N, K)
    r = torch.where(inf[:, None], -ks[None, :].to(h.dtype), r)
    ords = torch.tensor(list(orders), device=h.device)
    m1, a = m[1:], s[1:] / s[:-1]
    zero = torch.zeros_like(h)

    def system(p: int, with_one: bool) -> Tensor:
        """``ρ`` ``(N, k)`` of the order conditions with nodes ``r_1..r_{p−1}`` (``k = p − 1``), plus the node 1
        (``k = p``) for the corrector: ``Σ_k node_k^{j−1} ρ_k = b_j``, ``j = 1..k``."""
        nodes = r[:, : p - 1]
        if with_one:
            nodes = torch.cat([nodes, torch.ones_like(h)[:, None]], dim=1)
        k = nodes.shape[1]
        mat = torch.stack([nodes**j for j in range(k)], dim=1)  # (N, k rows j, k cols)
        rhs = b[:k].T  # (N, k)
        sol, _ = torch.linalg.solve_ex(mat, rhs)
        return sol

    # predictor weights on D_i, D_{i-1}, ... for each order
    wp = torch.zeros(order, n, dtype=h.dtype, device=h.device)
    wc = torch.zeros(order + 1, n, dtype=h.dtype, device=h.device)
    for p in range(1, order + 1):
        sel = ords == p
        # predictor: −m hphi1 D_i − m B Σ_k ρ_k (D_{i−k} − D_i)/r_k
        w = [-m1 * hphi1] + [zero] * (order - 1)
        if p >= 2:
            rho = torch.full((n, 1), 0.5, dtype=h.dtype, device=h.device) if p == 2 else system(p, False)
            for k in range(1, p):
                c = -m1 * big_b * rho[:, k - 1] / r[:, k - 1]
                w[k] = w[k] + c
                w[0] = w[0] - c
        for j in range(order):
            wp[j] = torch.where(sel, w[j], wp[j])
        # corrector (order p): adds ρ_p (D_{i+1} − D_i); weights on D_{i+1}, D_i, D_{i−1}, ...
        rho = torch.full((n, 1), 0.5, dtype=h.dtype, device=h.device) if p == 1 else system(p, True)
        wcs = [zero, -m1 * hphi1] + [zero] * (order - 1)
        for k in range(1, p):
            c = -m1 * big_b * rho[:, k - 1] / r[:, k - 1]
            wcs[k + 1] = wcs[k + 1] + c
            wcs[1] = wcs[1] - c
        c = -m1 * big_b * rho[:, p - 1]
        wcs[0] = wcs[0] + c
        wcs[1] = wcs[1] - c
        for j in range(order + 1):
            wc[j] = torch.where(sel, wcs[j], wc[j])
    # a step to or from h = ∞ (m = 0 or s = 0 at one end) is the first-order step D (predictor), uncorrected
    wp = torch.where(inf[None], torch.cat([(-m1 * hphi1)[None], torch.zeros_like(wp[1:])]), wp)
    return a, wp, a, wc


class UniPC(Solver):
    """UniPC (Zhao et al. 2023): multistep UniP-p predictor with the UniC-p corrector (module docstring)."""

    name = "unipc"
    order = 4.0  # p + 1 for the default p = 3 (set per instance)
    supports_sde: ClassVar[bool] = False
    supports_ode: ClassVar[bool] = True
    nfe_per_step: ClassVar[int] = 1
    default_grid: ClassVar[str] = "log_snr_cos"  # measured: docs/performance.md, "Time grids"
    default_steps: ClassVar[int] = 20
    # its higher-order steps extrapolate x̂0 in log-SNR through a point at ℓ = −∞: not defined from m = 0
    zero_signal_start: ClassVar[str] = "refuse"

    def __init__(
        self,
        order: int = 3,
        variant: str = "bh2",
        lower_order_final: bool | str = True,
        disable_corrector: Sequence[int] = (),
        predictor: str | Solver | None = None,
    ):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"solver 'unipc': order must be 1, 2 or 3, got {order!r}")
        if variant not in UNIPC_VARIANTS:
            raise ValueError(f"solver 'unipc': variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
        if lower_order_final not in (True, False, "diffusers"):
            raise ValueError(
                f"solver 'unipc': lower_order_final must be True, False or 'diffusers', got {lower_order_final!r}"
            )
        try:
            disabled = frozenset(int(i) for i in disable_corrector)
        except (TypeError, ValueError):
            raise TypeError(
                f"solver 'unipc': disable_corrector must be a sequence of step indices, got {disable_corrector!r}"
            ) from None
        if predictor is not None:
            from . import get_solver

            predictor = get_solver(predictor)
            if isinstance(predictor, AdaptiveSolver | PathSolver) or isinstance(predictor, UniPC):
                raise ValueError(f"solver 'unipc': predictor must be a fixed-step solver, got {predictor.name!r}")
            if predictor.nfe_per_step != 1:
                raise ValueError(
                    f"solver 'unipc': predictor {predictor.name!r} takes {predictor.nfe_per_step} evaluations per "
                    "step; UniC needs a one-evaluation multistep predictor (e.g. 'dpmpp_2m', 'dpmpp_3m', 'ddim')"
                )
        self.p = order
        self.order = float(order + 1)  # type: ignore[misc]
        self.variant = variant
        self.lower_order_final = lower_order_final
        self.disable_corrector = disabled
        self.predictor = predictor

    def check(self, eq: Equation) -> None:
        super().check(eq)
        require_affine(eq, self.name)
        if self.predictor is not None:
            self.predictor.check(eq)

    def _orders(self, n: int) -> list[int]:
        return multistep_orders(self.p, n, self.lower_order_final)

    def init_state(self, eq: Any, x: Tensor, times: Tensor) -> _UniPCState:
        n = times.shape[0] - 1
        ap, wp, ac, wc = unipc_coefficients(eq, times, self.p, self.variant, self._orders(n))
        dt = x.dtype
        pstate = self.predictor.init_state(eq, x, times) if self.predictor is not None else None
        return _UniPCState(
            ap=per_step(ap, dt), wp=[per_step(w, dt) for w in wp], ac=per_step(ac, dt),
            wc=[per_step(w, dt) for w in wc], correct=[i not in self.disable_corrector for i in range(n)],
            pstate=pstate,
        )

    def step(self, eq, x, t, t_next, noise, state):
        if state is None:  # called outside integrate: a one-step grid
            state = self.init_state(eq, x, torch.stack([t, t_next]))
        i = state.step
        d = eq.denoise(x, t)  # the one evaluation, at the predicted (uncorrected) state
        if i > 0 and state.correct[i - 1]:
            j = i - 1
            xc = state.ac[j] * state.x_c
            for k, dk in enumerate([d, *state.history]):
                xc = torch.addcmul(xc, state.wc[k][j], dk)
        else:
            xc = x
        hist = [d, *state.history]
        if self.predictor is None:
            x_next = state.ap[i] * xc
            for k, dk in enumerate(hist[: self.p]):
                x_next = torch.addcmul(x_next, state.wp[k][i], dk)
        else:
            before = eq.nfe
            x_next, state.pstate = self.predictor.step(CachedDenoise(eq, d), xc, t, t_next, None, state.pstate)
            if eq.nfe != before:
                raise TypeError(
                    f"solver 'unipc': predictor {self.predictor.name!r} evaluated the model itself; UniC needs a "
                    "predictor that takes its one evaluation through eq.denoise (e.g. 'dpmpp_2m', 'ddim')"
                )
        state.x_c = xc
        state.history = hist[: self.p]
        state.step = i + 1
        return x_next, state

    def __repr__(self) -> str:
        pred = "" if self.predictor is None else f", predictor={self.predictor!r}"
        return f"UniPC(order={self.p}, variant={self.variant!r}, lower_order_final={self.lower_order_final}{pred})"
