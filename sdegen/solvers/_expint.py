"""Shared pieces of the exponential integrators (private): grid quantities and the φ functions.

For an affine SDE with kernel ``x_t = m(t) x_0 + s(t) z``, ``ℓ = log(m/s)`` is half the log-SNR
(increasing towards the data) and ``σ = s/m = e^{−ℓ}`` the noise level. The multistep solvers
(``dpmpp``, ``dpmpp_sde``, ``unipc``, ``lms``) compute every per-step coefficient once per grid, in
:meth:`~sdegen.solvers.Solver.init_state`, in float64 where the device has it (the φ functions and
UniPC's linear systems lose digits to cancellation in float32), and hand the loop lists of 0-d
tensors in the state's dtype: a step does no arithmetic on times and no host-device synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["coefficient_dtype", "grid_kernel", "phis", "per_step", "multistep_orders", "CachedDenoise"]

LOWER_ORDER_FINAL_BELOW = 15  # diffusers: lower_order_final applies to grids of < 15 steps


def coefficient_dtype(device: torch.device) -> torch.dtype:
    """float64 for per-grid coefficients, except on devices without it (Apple MPS: float32)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def grid_kernel(eq: Any, times: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, s, ℓ)`` at the grid ``times`` in :func:`coefficient_dtype`; ``ℓ = log m − log s`` (±∞ where
    ``m = 0`` or ``s = 0``)."""
    t = times.to(coefficient_dtype(times.device))
    m, s = eq.marginal(t)
    m, s = m.to(t.dtype), s.to(t.dtype)
    return m, s, torch.log(m) - torch.log(s)


def phis(h: Tensor, count: int = 3) -> tuple[Tensor, ...]:
    """``φ1 = −expm1(−h)``, ``φ2 = expm1(−h)/h + 1``, ``φ3 = (expm1(−h) + h)/h² − ½`` (the first ``count`` of
    them); series for small ``h``; ``h = ∞`` (a step from ``m = 0``) gives ``(1, 1, −½)``.

    With ``u`` the distance from the start of a step of length ``h`` in ``ℓ``: ``∫_0^h e^{u−h} du = φ1``,
    ``∫_0^h e^{u−h} u du = h φ2`` and ``∫_0^h e^{u−h} u² du = −2 h² φ3``.
    """
    em1 = torch.expm1(-h)
    if count == 1:
        return (-em1,)
    small = h.abs() < 0.1
    inf = torch.isinf(h)
    hs = torch.where(small | inf, torch.ones_like(h), h)  # avoid 0/0 and ∞/∞ in the branches not taken
    phi2 = torch.where(small, h / 2 - h**2 / 6 + h**3 / 24 - h**4 / 120, em1 / hs + 1)
    phi2 = torch.where(inf, torch.ones_like(h), phi2)
    if count == 2:
        return -em1, phi2
    phi3 = torch.where(small, -h / 6 + h**2 / 24 - h**3 / 120 + h**4 / 720, (em1 + hs) / hs**2 - 0.5)
    phi3 = torch.where(inf, torch.full_like(h, -0.5), phi3)
    return -em1, phi2, phi3


def multistep_orders(p: int, n: int, lower_order_final: bool | str) -> list[int]:
    """The order of each of the ``n`` steps of a ``p``-step multistep method: warm-up ``1, 2, …, p``; with
    ``lower_order_final`` the last steps of a grid under :data:`LOWER_ORDER_FINAL_BELOW` steps lower it again
    (``min(p, n − i)``), and ``"diffusers"`` does so on every grid, counting the final Tweedie step to
    ``σ = 0`` as one more step (``min(p, n + 1 − i)``)."""
    orders = [min(p, i + 1) for i in range(n)]
    if lower_order_final == "diffusers":
        return [min(o, n + 1 - i) for i, o in enumerate(orders)]
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        return [min(o, n - i) for i, o in enumerate(orders)]
    return orders


def per_step(v: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """A ``(N,)`` coefficient as a list of ``N`` 0-d tensors in ``dtype`` (one per step, indexed without ops)."""
    return list(v.to(dtype).unbind())


class CachedDenoise:
    """An affine equation whose next ``denoise`` returns a given ``x̂0`` (no network call).

    UniPC evaluates the model once per step, at the *predicted* state, and corrects that state with the
    result; a predictor of another family then advances the corrected state with the same evaluation
    (diffusers' ``solver_p``). Everything else is forwarded to the wrapped equation.
    """

    def __init__(self, eq: Any, x0: Tensor):
        self._eq, self._x0 = eq, x0

    def denoise(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        if score is not None:
            return self._eq.denoise(x, t, score)
        return self._x0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._eq, name)
