"""Shared pieces of the benchmarks: problems, metrics, timing and the peers' adapters.

Every benchmark runs sdegen and its peers in the same process on the same inputs and reports
ratios. Problems are Gaussian mixtures with exact scores (:mod:`sdegen.testing`), so accuracy is
measured against exact samples and exact log-densities, never against another solver.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdegen import EDMSDE, VPSDE
from sdegen.sde import LinearSDE
from sdegen.testing import GaussianMixture, PerturbedMixture

RESULTS = Path(__file__).resolve().parent / "results"


# -- problems ------------------------------------------------------------------------------------
def ring8() -> GaussianMixture:
    """d = 2: eight components on a circle of radius 2, std 0.15, unequal weights 1..2."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture(torch.linspace(1.0, 2.0, 8), means, torch.full((8,), 0.15**2))


def aniso16() -> GaussianMixture:
    """d = 16: four components, random means (std 1.5), rotated covariances with eigenvalues 1e-2..1."""
    g = torch.Generator().manual_seed(16)
    d, k = 16, 4
    means = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(k):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        lam = torch.logspace(-2, 0, d, dtype=torch.float64)
        covs.append(q @ torch.diag(lam) @ q.T)
    covs = torch.stack(covs)
    return GaussianMixture([0.1, 0.2, 0.3, 0.4], means, 0.5 * (covs + covs.transpose(1, 2)))


MIXTURES: dict[str, Callable[[], GaussianMixture]] = {"ring8": ring8, "aniso16": aniso16}


def make_sde(kind: str) -> LinearSDE:
    """``"vp"``: VPSDE(0.1, 20), sampling t_min 1e-3. ``"edm"``: EDMSDE(0.002, 80)."""
    if kind == "vp":
        return VPSDE(0.1, 20.0)
    if kind == "edm":
        return EDMSDE(0.002, 80.0)
    raise ValueError(kind)


@dataclass
class Problem:
    """A mixture under an SDE, with everything a sampler or a peer needs."""

    name: str
    mixture: GaussianMixture
    sde: LinearSDE
    pm: PerturbedMixture

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def sigma(self, t: float) -> float:
        return float(self.sde.sigma(torch.tensor(t, dtype=torch.float64)))

    def m(self, t: float) -> float:
        return float(self.sde.marginal(torch.tensor(t, dtype=torch.float64))[0])


def problem(mix: str, sde: str) -> Problem:
    mixture = MIXTURES[mix]()
    s = make_sde(sde)
    return Problem(f"{mix}-{sde}", mixture, s, mixture.perturbed(s))


# -- counting the network ------------------------------------------------------------------------
class Counted:
    """Wrap a callable to count calls and the samples evaluated (``work``)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls = 0
        self.work = 0

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.work += x.shape[0]
        return self.fn(x, *args, **kwargs)


# -- metrics -------------------------------------------------------------------------------------
def sliced_w2(x: Tensor, y: Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples (sorted 1-D projections)."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    n = min(x.shape[0], y.shape[0])
    x, y = x[:n], y[:n]
    dirs = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def weight_error(x: Tensor, mixture: GaussianMixture) -> float:
    """Total-variation distance between the mixture weights and the samples' mean responsibilities.

    For exact samples ``E[responsibility_k] = w_k`` exactly, so this is 0 up to Monte-Carlo noise.
    """
    x = x.reshape(x.shape[0], -1).double()
    comps = torch.distributions.MultivariateNormal(mixture.means, mixture._full_cov())
    logp = comps.log_prob(x[:, None, :]) + torch.log(mixture.weights)
    resp = torch.softmax(logp, dim=1).mean(0)
    return float(0.5 * (resp - mixture.weights).abs().sum())


# -- timing --------------------------------------------------------------------------------------
def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (the least disturbed run on a shared machine)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# -- peers ---------------------------------------------------------------------------------------
def k_diffusion():
    """k-diffusion's ``sampling`` module (its own code, through :func:`sdegen.testing.peers.load_k_diffusion_sampling`),
    or None when it is not installed."""
    from sdegen.testing.peers import load_k_diffusion_sampling

    try:
        return load_k_diffusion_sampling()
    except ImportError:
        return None


def kd_denoiser(p: Problem) -> Callable[[Tensor, Tensor], Tensor]:
    """The problem's exact denoiser in k-diffusion's convention ``D(y, σ)`` with ``y = x/m``, ``σ = s/m``.

    For VP this is Karras et al. (2022) eq. 4's change of variables (what k-diffusion's ``VDenoiser``
    does for VP networks): the network is evaluated at ``x = m(t(σ)) y`` and time ``t(σ)``.
    """
    sde, pm = p.sde, p.pm

    def denoise(y: Tensor, sigma: Tensor) -> Tensor:
        t = sde.t_from_sigma(sigma.to(torch.float64)).to(sigma.dtype)
        m = sde.marginal(t.to(torch.float64))[0].to(y.dtype)
        mb = m.reshape(-1, *([1] * (y.ndim - 1)))
        return pm.denoiser(mb * y, t)

    return denoise


def optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
