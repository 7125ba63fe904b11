"""Time grids for fixed-step samplers: decreasing 1-D tensors from ``t_max`` (noise) to ``t_min``.

Grids are built in float64 on the CPU once, before the step loop, and moved to the device by the
integrator. Every grid has ``steps + 1`` points, starts exactly at ``t_max`` and ends exactly at
``t_min``.

* ``"uniform"``: uniform in ``t`` (score_sde's samplers).
* ``"quadratic"``: uniform in ``√t`` — denser near the data (DDIM's "quad" spacing, Song et al. 2021a).
* ``"edm"``: the Karras et al. (2022, eq. 5) ρ-schedule on the noise level ``σ = s/m``,
  ``σ_i = (σ_max^{1/ρ} + i/N (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, mapped back to ``t``; ``ρ = 7``.
* ``"log_snr"``: uniform in the log-SNR ``log(m²/s²)`` (DPM-Solver's recommended spacing, Lu et al. 2022).
* ``"shift"``: the resolution-dependent time shift of Stable Diffusion 3 (Esser et al. 2024, §5.3.2) and
  Flux's dynamic shifting — a uniform grid mapped through :func:`shift_time`, which multiplies the noise
  level ``σ = s/m`` by ``shift`` (on the rectified-flow path ``t' = shift·t / (1 + (shift − 1) t)``).
  ``make_grid("shift", sde, steps, shift=3.0)`` (SD3), or ``mu=`` (Flux: ``shift = e^μ``, ``μ`` from
  :func:`dynamic_shift`); a grid for any solver (``reverse_sample(..., times=grid)``).

Where the signal is gone at ``t_max`` (``m = 0``: ``t = 1`` of a flow-matching path, where ``σ = ∞``), the
``"edm"`` and ``"log_snr"`` grids, whose spacing is defined by a finite ``σ_max``, take their first step from
``t_max`` to the second point of the uniform grid, ``t_max − (t_max − t_min)/N``, and space the remaining
``N − 1`` steps from there (see :func:`make_grid`).

* ``"log_snr_cos"``: log-SNR with endpoint corrections (:func:`log_snr_cos_fraction`): the step in
  ``ℓ = −log σ`` has the density ``1 + a cos(2πu)`` over the grid index ``u ∈ [0, 1]`` (``a = 0.3``), so the
  first and last steps are ``1 + a`` times, the middle ones ``1 − a`` times the uniform log-SNR step. At both
  ends ``x̂0`` varies slowly in ``ℓ`` (it is the data mean where the noise dominates every data scale, and
  ``≈ x`` below the finest one), so steps are moved to the middle of the range. Measured for every solver
  in ``docs/performance.md``: 1.2–2× lower error than ``"log_snr"`` at 10–50 NFE; the default grid of the
  exponential integrators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .sde import SDE

__all__ = ["GRIDS", "make_grid", "check_times", "log_snr_cos_fraction", "shift_time", "dynamic_shift"]

GRIDS = ("uniform", "quadratic", "edm", "log_snr", "log_snr_cos", "shift")
LOG_SNR_COS_AMPLITUDE = 0.3  # measured best for ipndm, unipc, dpmpp_2m/3m at 6-50 NFE (docs/performance.md)


def log_snr_cos_fraction(u: Tensor, amplitude: float = LOG_SNR_COS_AMPLITUDE) -> Tensor:
    """``w(u) = u + a sin(2πu)/(2π)``: the fraction of the log-SNR range covered after a fraction ``u`` of the
    steps (``w(0) = 0``, ``w(1) = 1``, ``w' = 1 + a cos(2πu) > 0`` for ``|a| < 1``)."""
    return u + amplitude * torch.sin(2 * math.pi * u) / (2 * math.pi)


def _pin_ends(t: Tensor, t_max: float, t_min: float) -> Tensor:
    t = t.clone()
    t[0], t[-1] = t_max, t_min
    return t


def make_grid(
    kind: str | Sequence[str],
    sde: SDE,
    steps: int,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    rho: float = 7.0,
    shift: float | None = None,
    mu: float | None = None,
) -> Tensor:
    """A decreasing float64 CPU tensor of ``steps + 1`` times from ``t_max`` to ``t_min``.

    Args:
        kind: one of :data:`GRIDS`, or a sequence of them in order of preference: the first that applies to
            ``sde`` (the grids in ``σ`` and log-SNR need an affine SDE with ``sigma(t)``). Solvers that also
            integrate general SDEs declare their ``default_grid`` this way, e.g. ``("edm", "uniform")``.
        sde: the forward SDE (``"edm"``, ``"log_snr"``, ``"log_snr_cos"`` and ``"shift"`` need an affine SDE with
            ``sigma(t)``).
        steps: number of steps ``N >= 1``.
        t_min: end time, default ``sde.t_min``. t_max: start time, default ``sde.T``.
        rho: exponent of the ``"edm"`` schedule.
        shift, mu: the time shift of ``"shift"`` (give one): ``shift > 0`` (SD3: 3.0 at 1024²), or Flux's
            ``mu`` with ``shift = e^mu`` (diffusers' ``time_shift_type="linear"`` uses ``shift = mu``: pass
            that as ``shift``). Default: the sde's own ``shift`` (e.g. from :func:`sdegen.from_diffusers`).

    When ``m(t_max) = 0`` (``σ(t_max) = ∞``: the noise end of a flow-matching path), ``"edm"``, ``"log_snr"``
    and ``"log_snr_cos"`` grids go from ``t_max`` to ``t_1 = t_max − (t_max − t_min)/N`` and are spaced from ``t_1``
    on: no spacing in ``σ`` or the log-SNR reaches ``σ = ∞`` in finitely many steps. The step from
    ``t_max`` is a jump from pure noise that the solvers able to start there take exactly or in closed
    form (DDIM, DPM-Solver++: the first-order step from ``h = ∞``).
    """
    if not isinstance(kind, str) and isinstance(kind, Sequence):
        kinds = list(kind)
        if not kinds or not all(isinstance(k, str) for k in kinds):
            raise ValueError(f"grid must be one of {GRIDS} or a non-empty sequence of them, got {kind!r}")
        bad = [k for k in kinds if k not in GRIDS]
        if bad:
            raise ValueError(f"grid must be one of {GRIDS}, got {bad[0]!r} in {kind!r}")
        usable = [k for k in kinds if k in ("uniform", "quadratic") or hasattr(sde, "sigma")]
        if not usable:
            raise ValueError(f"none of the grids {kind!r} applies to {type(sde).__name__} (no noise level sigma(t))")
        kind = usable[0]
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_min = sde.t_min if t_min is None else float(t_min)
    t_max = sde.T if t_max is None else float(t_max)
    if not 0.0 < t_min < t_max <= sde.T * (1 + 1e-12):
        raise ValueError(f"need 0 < t_min < t_max <= T={sde.T}, got t_min={t_min}, t_max={t_max}")
    if kind != "shift" and (shift is not None or mu is not None):
        raise ValueError(f"shift= and mu= apply to grid='shift', not grid={kind!r}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        t = t_max + u * (t_min - t_max)
    elif kind == "quadratic":
        t = (t_max**0.5 + u * (t_min**0.5 - t_max**0.5)) ** 2
    elif kind in ("edm", "log_snr", "log_snr_cos"):
        if not hasattr(sde, "sigma"):
            raise ValueError(f"grid={kind!r} needs an affine SDE with a noise level sigma(t)")
        s_max = float(sde.sigma(torch.tensor(t_max, dtype=torch.float64)))
        s_min = float(sde.sigma(torch.tensor(t_min, dtype=torch.float64)))
        if math.isinf(s_max):  # m(t_max) = 0: the noise end of a flow-matching path
            return _from_zero_signal(kind, sde, steps, t_min, t_max, rho)
        if kind == "edm":
            if rho <= 0:
                raise ValueError(f"rho must be > 0, got {rho}")
            sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        elif kind == "log_snr":
            lam = -2 * torch.log(torch.tensor([s_max, s_min], dtype=torch.float64))
            sig = torch.exp(-0.5 * (lam[0] + u * (lam[1] - lam[0])))
        else:  # log_snr_cos: log-SNR with endpoint corrections
            lam = -2 * torch.log(torch.tensor([s_max, s_min], dtype=torch.float64))
            sig = torch.exp(-0.5 * (lam[0] + log_snr_cos_fraction(u) * (lam[1] - lam[0])))
        t = sde.t_from_sigma(sig).to(torch.float64)
    elif kind == "shift":
        t = _shift_grid(sde, u, t_min, t_max, shift, mu)
    else:
        raise ValueError(f"grid must be one of {GRIDS}, got {kind!r}")
    return _pin_ends(t, t_max, t_min)


def check_times(times: Tensor | list, sde: SDE) -> Tensor:
    """Validate a user grid: 1-D, at least 2 points, strictly decreasing, inside ``(0, T]``.

    Returns it as a float64 CPU tensor (validated once, before any step loop).
    """
    t = torch.as_tensor(times).detach().to("cpu", torch.float64)
    if t.ndim != 1 or t.shape[0] < 2:
        raise ValueError(f"times must be a 1-D tensor with at least 2 entries, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("times must be finite")
    if not (t[1:] < t[:-1]).all():
        raise ValueError("times must be strictly decreasing (sampling runs from T down to t_min)")
    if t[-1] <= 0 or t[0] > sde.T * (1 + 1e-12):
        raise ValueError(f"times must lie in (0, T={sde.T}], got [{float(t[-1])}, {float(t[0])}]")
    return t


# -- flow matching: time shifts and grids from the noise end (sdegen.interpolant) ---------------------------
def _from_zero_signal(kind: str, sde: SDE, steps: int, t_min: float, t_max: float, rho: float) -> Tensor:
    """An ``"edm"``/``"log_snr"`` grid from a ``t_max`` where ``σ = ∞``: ``t_max``, then the grid from ``t_1``."""
    if steps == 1:
        return torch.tensor([t_max, t_min], dtype=torch.float64)
    t1 = t_max - (t_max - t_min) / steps
    return torch.cat([torch.tensor([t_max], dtype=torch.float64), make_grid(kind, sde, steps - 1, t_min=t_min,
                                                                            t_max=t1, rho=rho)])


def _shift_value(shift: float | None, mu: float | None, sde: SDE) -> float:
    if shift is not None and mu is not None:
        raise ValueError("give shift= or mu= (Flux: shift = e^mu), not both")
    if mu is not None:
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu):
            raise TypeError(f"mu must be a finite number, got {mu!r}")
        return math.exp(mu)
    if shift is None:
        shift = getattr(sde, "shift", None)
        if shift is None:
            raise ValueError(
                "grid='shift' needs shift= (SD3: 3.0) or mu= (Flux's dynamic shifting: mu=sdegen.grids."
                "dynamic_shift(image_seq_len)); this sde has no shift of its own"
            )
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    return float(shift)


def shift_time(t: Tensor | float, shift: float, sde: SDE | None = None) -> Tensor:
    """The time ``t'`` whose noise level is ``shift`` times that of ``t``: ``σ(t') = shift · σ(t)``, ``σ = s/m``.

    On the rectified-flow path (``sde`` None or :class:`~sdegen.FlowMatchingSDE`, ``σ(t) = t/(1 − t)``) this
    is Stable Diffusion 3's shift ``t' = shift·t / (1 + (shift − 1) t)`` (Esser et al. 2024, §5.3.2; diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=...)``), and Flux's exponential ``time_shift(mu, 1, t)`` with
    ``shift = e^mu``. ``shift > 1`` moves every time towards the noise end. Returns a float64 tensor.
    """
    from .interpolant import FlowMatchingSDE

    t = torch.as_tensor(t, dtype=torch.float64)
    if sde is None or isinstance(sde, FlowMatchingSDE):
        return shift * t / (1.0 + (shift - 1.0) * t)
    if not hasattr(sde, "sigma"):
        raise ValueError("shift_time needs an affine SDE with a noise level sigma(t)")
    return sde.t_from_sigma(shift * sde.sigma(t)).to(torch.float64)


def dynamic_shift(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent ``mu``: linear in the number of latent tokens (diffusers' ``calculate_shift``).

    ``mu = base_shift + (max_shift − base_shift)(image_seq_len − base_seq_len)/(max_seq_len − base_seq_len)``;
    the grid is then ``make_grid("shift", sde, steps, mu=mu)`` (``shift = e^mu``). Defaults: Flux.1's.
    """
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


def _shift_grid(sde: SDE, u: Tensor, t_min: float, t_max: float, shift: float | None, mu: float | None) -> Tensor:
    """``shift_time`` of a grid uniform between the unshifted ends (so the shifted grid ends at t_max, t_min)."""
    k = _shift_value(shift, mu, sde)
    ends = shift_time(torch.tensor([t_max, t_min], dtype=torch.float64), 1.0 / k, sde)
    base = ends[0] + u * (ends[1] - ends[0])
    return shift_time(base, k, sde)
