"""Hypothesis strategies for property-based tests of solvers, SDEs and score adapters.

Import explicitly (needs ``hypothesis``, in the ``test`` extra)::

    from hypothesis import given
    from sdegen.testing.strategies import affine_sdes, gaussian_mixtures, time_grids, batch_shapes

    @given(sde=affine_sdes(), data=st.data())
    def test_something(sde, data):
        times = data.draw(time_grids(sde))

* :func:`affine_sdes` — VP / VE / sub-VP / EDM SDEs with random valid parameters.
* :func:`gaussian_mixtures` — random :class:`~sdegen.testing.GaussianMixture` s with well-conditioned
  full, diagonal or isotropic covariances.
* :func:`time_grids` — strictly decreasing sampling grids from ``T`` to ``t_min`` of an SDE.
* :func:`batch_shapes` — ``(B, d)`` and image-like ``(B, C, H, W)`` state shapes.

Every strategy shrinks towards simple examples (small dimensions, few components, few steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hypothesis import strategies as st

from ..grids import GRIDS, make_grid
from ..sde import EDMSDE, VESDE, VPSDE, LinearSDE, SubVPSDE
from .mixture import GaussianMixture

__all__ = ["SDE_KINDS", "affine_sdes", "gaussian_mixtures", "time_grids", "batch_shapes"]

SDE_KINDS = ("vp", "subvp", "ve", "edm")


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def affine_sdes(draw, kinds: Sequence[str] = SDE_KINDS) -> LinearSDE:
    """A random affine SDE of one of ``kinds`` (``"vp"``, ``"subvp"``, ``"ve"``, ``"edm"``).

    Parameter ranges (covering the literature's defaults): VP / sub-VP ``β_min ∈ [0.01, 1]``,
    ``β_max ∈ [β_min, 30]``, ``T ∈ [0.5, 2]``, ``t_min ∈ [1e-5, 1e-2]·T``; VE ``σ_min ∈ [1e-3, 0.1]``,
    ``σ_max / σ_min ∈ [10, 1e5]``, ``marginal_std`` ``"exact"`` or ``"sigma"``; EDM
    ``σ_min ∈ [1e-3, 0.05]``, ``σ_max ∈ [1, 100]``.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in SDE_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {SDE_KINDS}, got {kinds}")
    kind = draw(st.sampled_from(kinds))
    if kind in ("vp", "subvp"):
        beta_min = draw(_log_uniform(0.01, 1.0))
        beta_max = beta_min + draw(st.floats(0.0, 30.0 - beta_min))
        T = draw(st.floats(0.5, 2.0))
        t_min = T * draw(_log_uniform(1e-5, 1e-2))
        cls = VPSDE if kind == "vp" else SubVPSDE
        return cls(beta_min, beta_max, T, t_min=t_min)
    if kind == "ve":
        sigma_min = draw(_log_uniform(1e-3, 0.1))
        sigma_max = sigma_min * draw(_log_uniform(10.0, 1e5))
        T = draw(st.floats(0.5, 2.0))
        t_min = T * draw(_log_uniform(1e-5, 1e-2))
        marginal_std = draw(st.sampled_from(("exact", "sigma")))
        return VESDE(sigma_min, sigma_max, T, t_min=t_min, marginal_std=marginal_std)
    sigma_min = draw(_log_uniform(1e-3, 0.05))
    sigma_max = draw(_log_uniform(1.0, 100.0))
    return EDMSDE(sigma_min, sigma_max)


def _orthogonal(draw, d: int) -> torch.Tensor:
    entries = draw(st.lists(st.floats(-1.0, 1.0), min_size=d * d, max_size=d * d))
    a = torch.tensor(entries, dtype=torch.float64).reshape(d, d) + 3.0 * torch.eye(d, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


@st.composite
def gaussian_mixtures(
    draw,
    dim: int | st.SearchStrategy[int] | None = None,
    max_components: int = 4,
    covariance: Sequence[str] = ("full", "diag", "iso"),
    min_variance: float = 0.05,
    max_variance: float = 2.0,
    mean_range: float = 3.0,
) -> GaussianMixture:
    """A random :class:`~sdegen.testing.GaussianMixture` (float64).

    Args:
        dim: the dimension, or a strategy for it (default ``st.integers(1, 4)``).
        max_components: components ``K ∈ [1, max_components]``.
        covariance: the covariance kinds to draw from: ``"full"`` (random rotation of random
            eigenvalues), ``"diag"`` or ``"iso"``.
        min_variance, max_variance: eigenvalue range — condition number at most
            ``max_variance / min_variance`` (40 by default), so scores are tame.
        mean_range: means uniform in ``[-mean_range, mean_range]^d``.

    Weights are bounded away from zero (each at least 0.1 before normalisation).
    """
    dim = st.integers(1, 4) if dim is None else dim
    d = draw(dim) if isinstance(dim, st.SearchStrategy) else int(dim)
    if d < 1:
        raise ValueError(f"dim must be >= 1, got {d}")
    k = draw(st.integers(1, max_components))
    kind = draw(st.sampled_from(tuple(covariance)))
    weights = draw(st.lists(st.floats(0.1, 1.0), min_size=k, max_size=k))
    means = draw(st.lists(st.floats(-mean_range, mean_range), min_size=k * d, max_size=k * d))
    var = st.floats(min_variance, max_variance)
    if kind == "iso":
        cov = torch.tensor(draw(st.lists(var, min_size=k, max_size=k)), dtype=torch.float64)
    elif kind == "diag":
        cov = torch.tensor(draw(st.lists(var, min_size=k * d, max_size=k * d)), dtype=torch.float64).reshape(k, d)
    elif kind == "full":
        mats = []
        for _ in range(k):
            q = _orthogonal(draw, d)
            lam = torch.tensor(draw(st.lists(var, min_size=d, max_size=d)), dtype=torch.float64)
            c = q @ torch.diag(lam) @ q.T
            mats.append(0.5 * (c + c.T))
        cov = torch.stack(mats)
    else:
        raise ValueError(f"covariance kinds must be 'full', 'diag' or 'iso', got {kind!r}")
    return GaussianMixture(weights, torch.tensor(means, dtype=torch.float64).reshape(k, d), cov)


@st.composite
def time_grids(draw, sde: LinearSDE, min_steps: int = 1, max_steps: int = 50, kinds: Sequence[str] | None = None):
    """A strictly decreasing float64 grid from ``sde.T`` to ``sde.t_min`` (what ``times=`` accepts).

    Either one of :data:`sdegen.grids.GRIDS` (``"uniform"``, ``"quadratic"``, ``"edm"``, ``"log_snr"``,
    ``"shift"`` with a random shift in ``[0.25, 4]``) with a random number of steps, or (``"random"``) random
    interior points, drawn uniformly in ``log t`` so both ends get points. ``kinds`` restricts the choice
    (default: all of them).
    """
    kinds = tuple(kinds) if kinds is not None else (*GRIDS, "random")
    kind = draw(st.sampled_from(kinds))
    steps = draw(st.integers(min_steps, max_steps))
    if kind == "shift":  # the SD3 / Flux time shift needs its shift
        return make_grid(kind, sde, steps, shift=draw(st.floats(0.25, 4.0)))
    if kind != "random":
        return make_grid(kind, sde, steps)
    lo, hi = math.log(sde.t_min), math.log(sde.T)
    unit = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
    inner = draw(st.lists(unit, min_size=steps - 1, max_size=steps - 1))
    pts = sorted({math.exp(hi + u * (lo - hi)) for u in inner}, reverse=True)
    pts = [p for p in pts if sde.t_min * (1 + 1e-9) < p < sde.T * (1 - 1e-9)]
    return torch.tensor([sde.T, *pts, sde.t_min], dtype=torch.float64)


def batch_shapes(
    max_batch: int = 6, max_dim: int = 4, image: bool = True, max_side: int = 3, max_channels: int = 3
) -> st.SearchStrategy[tuple[int, ...]]:
    """State shapes ``(B, d)`` and, with ``image=True``, image-like ``(B, C, H, W)``.

    Sizes are small (``B <= max_batch``, ``d <= max_dim``, ``H, W <= max_side``, ``C <= max_channels``)
    so a property test stays fast; ``B >= 1``.
    """
    flat = st.tuples(st.integers(1, max_batch), st.integers(1, max_dim))
    if not image:
        return flat
    img = st.tuples(
        st.integers(1, max_batch), st.integers(1, max_channels), st.integers(1, max_side), st.integers(1, max_side)
    )
    return st.one_of(flat, img)
