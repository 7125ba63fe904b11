"""Statistical checks for tests, each with a stated false-failure rate instead of a magic tolerance.

* :func:`energy_test` — two-sample energy-distance permutation test (Székely & Rizzo 2004;
  2013, *J. Stat. Plann. Inference* 143, §4): does a sampler's output have the law of exact samples?
* :func:`moment_check` — sample mean and covariance against known values, z-scores from explicit
  standard errors, Bonferroni-corrected over all entries.
* :func:`mixture_weight_check` — the mass a sampler puts on each component of a
  :class:`~sdegen.testing.GaussianMixture` (the mode-collapse / mode-dropping check).

Each returns a small report whose ``passed`` attribute (also its truth value) says whether the
check passed at level ``alpha``: when the samples do come from the reference law, a check fails with
probability at most ``alpha`` (exactly so for the permutation test, asymptotically for the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

from .mixture import GaussianMixture, PerturbedMixture

__all__ = [
    "energy_distance",
    "energy_test",
    "EnergyTestResult",
    "moment_check",
    "MomentReport",
    "mixture_weight_check",
    "WeightReport",
    "responsibilities",
]

_MAX_POOLED = 12_000  # the pooled distance matrix is (n + m)² numbers


def _flat2(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n, *dims) with n >= 2, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _z_crit(alpha: float, tests: int) -> float:
    """Two-sided normal critical value with a Bonferroni correction over ``tests`` z-scores."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return -NormalDist().inv_cdf(alpha / (2 * tests))  # stdlib: importing scipy.stats costs seconds


# -- energy distance ------------------------------------------------------------------------------
def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Energy distance ``2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖`` between two samples (V-statistic).

    Args:
        x: ``(n, *dims)`` samples. y: ``(m, *dims)`` samples (same ``dims``).

    Returns:
        A 0-d float64 tensor, ``>= 0``; zero in the population iff the laws are equal.
    """
    a, b = _flat2("x", x).to(torch.float64), _flat2("y", y).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same sample shape, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    b = b.to(a.device)
    return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()


@dataclass
class EnergyTestResult:
    """Outcome of :func:`energy_test`.

    Attributes:
        statistic: energy distance of the two samples (V-statistic, float).
        p_value: permutation p-value ``(1 + #{permuted >= observed}) / (1 + permutations)``.
        threshold: the ``1 − alpha`` quantile of the permuted statistics (reject above it).
        passed: ``p_value > alpha`` — no evidence that the laws differ.
        alpha, permutations, n, m: the settings and sample sizes.
    """

    statistic: float
    p_value: float
    threshold: float
    passed: bool
    alpha: float
    permutations: int
    n: int
    m: int

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"energy test {verdict}: distance {self.statistic:.4g} (threshold {self.threshold:.4g}), "
            f"p = {self.p_value:.4g} vs alpha = {self.alpha:g}; n = {self.n}, m = {self.m}, "
            f"{self.permutations} permutations"
        )


def energy_test(
    x: Tensor,
    y: Tensor,
    alpha: float = 1e-3,
    *,
    permutations: int | None = None,
    generator: torch.Generator | None = None,
) -> EnergyTestResult:
    """Two-sample permutation test of ``law(x) = law(y)`` with the energy distance.

    The pooled pairwise-distance matrix ``D`` is computed once; the statistic of a labelling ``c``
    (``1/n`` on one sample, ``−1/m`` on the other) is ``−cᵀ D c``, so all permutations cost one
    matrix product (Székely & Rizzo 2004, *InterStat*; permutation test of Rizzo & Székely 2010).

    Args:
        x: ``(n, *dims)``; y: ``(m, *dims)``; ``n + m <= 12000`` (``D`` has ``(n + m)²`` entries):
            subsample larger sets.
        alpha: test level: the **false-failure rate**. When ``x`` and ``y`` are independent samples of
            one law, ``P(passed is False) <= alpha`` exactly (finite-sample validity of permutation
            tests; equality up to ties), whatever the dimension or the law.
        permutations: number of random relabellings; default ``ceil(2 / alpha) − 1`` (1999 for
            ``alpha = 1e-3``). Must be ``>= ceil(1 / alpha) − 1`` or the test could never fail.
        generator: CPU ``torch.Generator`` for the relabellings (default: torch's global RNG).

    Returns:
        :class:`EnergyTestResult`; ``bool(result)`` is ``result.passed``.

    Power (measured, 2-D standard normals, ``n = m = 1000``, ``alpha = 1e-3``): a mean shift of 0.3
    standard deviations is detected in 8 runs of 8, one of 0.2 in 3 of 8; with ``n = m = 500``, 0.4 in
    8 of 8. Cost: about a second for ``n + m = 2000`` on one CPU core.
    """
    a, b = _flat2("x", x).to(torch.float64), _flat2("y", y).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same sample shape, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    n, m = a.shape[0], b.shape[0]
    if n + m > _MAX_POOLED:
        raise ValueError(f"n + m = {n + m} exceeds {_MAX_POOLED}: subsample x and y (the test is O((n + m)²))")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    least = math.ceil(1.0 / alpha) - 1
    if permutations is None:
        permutations = math.ceil(2.0 / alpha) - 1
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < least:
        raise ValueError(f"permutations must be an int >= ceil(1/alpha) - 1 = {least}, got {permutations!r}")
    z = torch.cat([a, b.to(a.device)])
    d = torch.cdist(z, z)
    c = torch.cat([torch.full((n,), 1.0 / n, dtype=z.dtype), torch.full((m,), -1.0 / m, dtype=z.dtype)]).to(z.device)
    observed = -(c @ (d @ c))
    gdev = generator.device if generator is not None else torch.device("cpu")
    null = []
    for start in range(0, permutations, 512):
        k = min(512, permutations - start)
        perms = torch.rand(k, n + m, generator=generator, device=gdev).argsort(dim=1).to(z.device)
        cols = c[perms].T  # (n + m, k)
        null.append(-(cols * (d @ cols)).sum(0))
    null_t = torch.cat(null)
    exceed = int((null_t >= observed).sum())
    p_value = (1 + exceed) / (1 + permutations)
    threshold = float(torch.quantile(null_t, 1.0 - alpha))
    return EnergyTestResult(
        statistic=float(observed),
        p_value=p_value,
        threshold=threshold,
        passed=p_value > alpha,
        alpha=alpha,
        permutations=permutations,
        n=n,
        m=m,
    )


# -- moments --------------------------------------------------------------------------------------
@dataclass
class MomentReport:
    """Outcome of :func:`moment_check`.

    Attributes:
        passed: every z-score within ``z_crit``.
        z_mean: ``(d,)`` z-scores of the sample mean.
        z_cov: ``(d, d)`` z-scores of the sample covariance (None when no covariance was given).
        z_crit: the Bonferroni-corrected two-sided critical value.
        worst: a description of the largest z-score.
        n, alpha: sample size and level.
    """

    passed: bool
    z_mean: Tensor
    z_cov: Tensor | None
    z_crit: float
    worst: str
    n: int
    alpha: float

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"moment check {verdict} (n = {self.n}, alpha = {self.alpha:g}, |z| <= {self.z_crit:.3f}): {self.worst}"


def moment_check(
    samples: Tensor,
    mean: Tensor,
    cov: Tensor | None = None,
    *,
    alpha: float = 1e-3,
    atol: float = 0.0,
    se: str = "empirical",
) -> MomentReport:
    """Check a sample's mean (and covariance) against known values with explicit standard errors.

    Args:
        samples: ``(n, *dims)``; flattened to ``d = prod(dims)`` coordinates.
        mean: ``(d,)`` (or ``dims``-shaped) expected mean.
        cov: ``(d, d)`` expected covariance, ``(d,)`` variances (checked as a diagonal covariance), or
            None to check the mean only.
        alpha: family-wise **false-failure rate**: Bonferroni over the ``d`` mean entries and the
            ``d (d + 1) / 2`` covariance entries, so a sample from the stated law fails with
            probability ``<= alpha`` up to the normal approximation of the sample moments (CLT; the
            empirical standard errors need ``n`` in the hundreds or more).
        atol: an allowed systematic bias (e.g. a known discretisation error) subtracted from each
            absolute deviation before dividing by its standard error.
        se: covariance standard errors: ``"empirical"`` (default) — from the sample's fourth moments,
            ``Var[(x_i − x̄_i)(x_j − x̄_j)] / n``, valid for any law with finite fourth moments (mixtures);
            ``"gaussian"`` — ``(Σ_ii Σ_jj + Σ_ij²) / n``, exact for Gaussian samples.

    Mean z-scores are ``(x̄_i − μ_i) / √(Σ_ii / n)`` with the expected ``Σ`` when given, else the sample
    variance.
    """
    x = _flat2("samples", samples).to(torch.float64)
    n, d = x.shape
    mu = torch.as_tensor(mean, dtype=torch.float64, device=x.device).reshape(-1)
    if mu.shape != (d,):
        raise ValueError(f"mean must have {d} entries (one per coordinate), got {tuple(torch.as_tensor(mean).shape)}")
    if se not in ("empirical", "gaussian"):
        raise ValueError(f"se must be 'empirical' or 'gaussian', got {se!r}")
    sigma = None
    if cov is not None:
        sigma = torch.as_tensor(cov, dtype=torch.float64, device=x.device)
        if sigma.shape == (d,):
            sigma = torch.diag(sigma)
        if sigma.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) or ({d},), got {tuple(sigma.shape)}")
    tests = d + (d * (d + 1) // 2 if sigma is not None else 0)
    z_crit = _z_crit(alpha, tests)

    xbar = x.mean(0)
    var = torch.diagonal(sigma) if sigma is not None else x.var(0)
    se_mean = torch.sqrt(var / n).clamp_min(1e-300)
    z_mean = ((xbar - mu).abs() - atol).clamp_min(0.0) / se_mean * torch.sign(xbar - mu)
    worst_val, worst = float(z_mean.abs().max()), f"mean[{int(z_mean.abs().argmax())}]"
    z_cov = None
    if sigma is not None:
        xc = x - xbar
        s_hat = xc.T @ xc / (n - 1)
        if se == "empirical":
            prod = xc[:, :, None] * xc[:, None, :]  # (n, d, d)
            se_cov = torch.sqrt(prod.var(0) / n)
        else:
            dv = torch.diagonal(sigma)
            se_cov = torch.sqrt((dv[:, None] * dv[None, :] + sigma**2) / n)
        dev = s_hat - sigma
        z_cov = (dev.abs() - atol).clamp_min(0.0) / se_cov.clamp_min(1e-300) * torch.sign(dev)
        zc = torch.triu(z_cov.abs())
        if float(zc.max()) > worst_val:
            i, j = divmod(int(zc.argmax()), d)
            worst_val, worst = float(zc.max()), f"cov[{i}, {j}]"
    if worst.startswith("mean"):
        i = int(worst[5:-1])
        detail = f"mean[{i}] = {float(xbar[i]):.5g} vs {float(mu[i]):.5g} (se {float(se_mean[i]):.3g})"
    else:
        i, j = (int(v) for v in worst[4:-1].split(","))
        detail = f"cov[{i}, {j}] = {float(s_hat[i, j]):.5g} vs {float(sigma[i, j]):.5g} (se {float(se_cov[i, j]):.3g})"
    return MomentReport(
        passed=worst_val <= z_crit,
        z_mean=z_mean,
        z_cov=z_cov,
        z_crit=z_crit,
        worst=f"largest |z| = {worst_val:.3f} at {detail}",
        n=n,
        alpha=alpha,
    )


# -- mixture weights ------------------------------------------------------------------------------
@dataclass
class WeightReport:
    """Outcome of :func:`mixture_weight_check`.

    Attributes:
        passed: every component's z-score within ``z_crit``.
        observed: ``(K,)`` mean responsibility of each component over the samples.
        expected: ``(K,)`` mixture weights.
        z: ``(K,)`` z-scores ``(observed − expected) / √(w (1 − w) / n)``.
        z_crit, n, alpha: critical value, sample size, level.
    """

    passed: bool
    observed: Tensor
    expected: Tensor
    z: Tensor
    z_crit: float
    n: int
    alpha: float

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        k = int(self.z.abs().argmax())
        return (
            f"mixture weight check {verdict} (n = {self.n}, alpha = {self.alpha:g}): component {k} holds "
            f"{float(self.observed[k]):.4f} of the mass, expected {float(self.expected[k]):.4f} "
            f"(z = {float(self.z[k]):.2f}, |z| <= {self.z_crit:.3f})"
        )


def responsibilities(samples: Tensor, mixture: GaussianMixture | PerturbedMixture, t=None) -> Tensor:
    """Posterior component probabilities ``P(k | x)`` under ``mixture`` (at time ``t``): ``(n, K)``."""
    if isinstance(mixture, PerturbedMixture):
        if t is None:
            raise ValueError("a PerturbedMixture needs the time t of the samples")
        m, s = mixture._ms(samples, t)
        mix = mixture.mixture
    elif isinstance(mixture, GaussianMixture):
        if t is not None:
            raise ValueError("t is only meaningful with a PerturbedMixture (mixture.perturbed(sde))")
        mix = mixture
        m = torch.ones(samples.shape[0], dtype=mix.means.dtype, device=samples.device)
        s = torch.zeros_like(m)
    else:
        raise TypeError(f"mixture must be a GaussianMixture or PerturbedMixture, got {type(mixture).__name__}")
    y = mix._flat(samples)
    logp_k, _ = mix._components(y, m.to(y), s.to(y))
    joint = logp_k + torch.log(mix.weights)[None]
    return torch.exp(joint - torch.logsumexp(joint, dim=1, keepdim=True))  # softmax, without its thread pool


def mixture_weight_check(
    samples: Tensor,
    mixture: GaussianMixture | PerturbedMixture,
    t=None,
    *,
    alpha: float = 1e-3,
) -> WeightReport:
    """Check how much mass the samples put on each mixture component.

    Each sample is assigned softly: ``r_k(x) = P(k | x)``, the component's posterior probability. For
    ``x`` drawn from the mixture, ``E[r_k(x)] = w_k`` exactly (for overlapping components too, unlike a
    hard nearest-component assignment), and ``Var[r_k] <= w_k (1 − w_k)`` since ``r_k ∈ [0, 1]`` — the
    binomial standard error, attained for well-separated components.

    Args:
        samples: ``(n, *dims)`` with ``prod(dims) = mixture dimension``.
        mixture: the reference :class:`GaussianMixture`, or ``mixture.perturbed(sde)`` with ``t``.
        t: the time of the samples (scalar or ``(n,)``) when ``mixture`` is perturbed.
        alpha: **false-failure rate**, Bonferroni over the ``K`` components, ``<= alpha`` up to the
            normal approximation of the binomial (the binomial SE is conservative for soft
            assignments).
    """
    x = samples
    if not isinstance(x, Tensor):
        raise TypeError(f"samples must be a tensor, got {type(x).__name__}")
    r = responsibilities(x, mixture, t)
    n, k = r.shape
    w = (mixture.mixture if isinstance(mixture, PerturbedMixture) else mixture).weights.to(r)
    observed = r.mean(0)
    se = torch.sqrt(w * (1 - w) / n).clamp_min(1e-300)
    z = (observed - w) / se
    z = torch.where(w > 0, z, torch.where(observed > 0, torch.inf, 0.0))
    z_crit = _z_crit(alpha, k)
    return WeightReport(
        passed=bool((z.abs() <= z_crit).all()), observed=observed, expected=w, z=z, z_crit=z_crit, n=n, alpha=alpha
    )
