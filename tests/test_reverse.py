"""Reverse-time dynamics: the λ family and the ∇·D term of state-dependent diffusions.

A stationary diffusion checks ∇·D exactly. With D(x) = 1 + x² and f = ½(D' + D (log π)') for
π = N(0, I), the forward SDE keeps x ~ π for all t, so p_t = π and the score is −x. Then the
probability-flow drift f − ½(∇·D + D ∇log π) vanishes identically, and the reverse SDE keeps π —
both only when ∇·D is included (without it the drift is +x, which contracts the distribution in reverse time).
"""

import math

import pytest
import torch

from sdegen import SDE, VPSDE, reverse_sample


def _stationary_sde(**kw):
    drift = lambda x, t: 0.5 * (2 * x - (1 + x**2) * x)
    diffusion = lambda x, t: torch.sqrt(1 + x**2)
    return SDE(drift, diffusion, T=1.0, t_min=1e-3, **kw)


def gaussian_score(x, t):
    return -x


def test_probability_flow_drift_vanishes_with_divergence_term():
    x = torch.randn(64, 3, dtype=torch.float64)
    t = torch.full((64,), 0.5, dtype=torch.float64)
    ode = _stationary_sde(state_dependent=True).probability_flow(gaussian_score)
    assert ode.drift(x, t).abs().max() < 1e-12
    # dropping ∇·D (state_dependent=False) leaves a drift of +x: the term matters
    wrong = _stationary_sde().probability_flow(gaussian_score)
    torch.testing.assert_close(wrong.drift(x, t), x)


def test_reverse_sde_with_state_dependent_noise_keeps_stationary_law():
    """Euler–Maruyama on the reverse SDE from π stays π: moments within 5 SE (false failure ~1e-5)."""
    n = 20000
    sde = _stationary_sde(state_dependent=True)
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = reverse_sample(sde, gaussian_score, x_T=x_T, steps=200, generator=torch.Generator().manual_seed(4))
    # EM bias at h = 5e-3 is O(h); the MC standard errors are 0.007 (mean) and 0.01 (variance)
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.var()) - 1) < 5 * math.sqrt(2 / n) + 0.01
    # without the ∇·D term the same run contracts the variance visibly
    g = torch.Generator().manual_seed(4)
    bad = reverse_sample(_stationary_sde(), gaussian_score, x_T=x_T, steps=200, generator=g)
    assert float(bad.var()) < 0.8


def test_lambda_family_drift_and_diffusion():
    sde = VPSDE()
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    score = lambda x, t: -x * (1 + t[:, None])
    for lam in (0.0, 0.3, 1.0):
        eq = sde.reverse(score, noise_scale=lam)
        beta = sde.beta(t)[:, None]
        expected = -0.5 * beta * x - 0.5 * (1 + lam**2) * beta * score(x, t)
        torch.testing.assert_close(eq.drift(x, t), expected)
        torch.testing.assert_close(eq.diffusion(x, t), lam * beta.sqrt())
        assert eq.is_ode == (lam == 0.0)
    assert not hasattr(eq, "marginal") or eq.is_affine
    assert not isinstance(eq, VPSDE), "reverse dynamics are plain objects, not subclasses of the SDE"


def test_nfe_counting_and_score_checks():
    sde = VPSDE()
    eq = sde.probability_flow(lambda x, t: -x)
    x = torch.randn(4, 2)
    eq.drift(x, torch.tensor(0.5))
    eq.drift(x, torch.full((4,), 0.5))
    assert eq.nfe == 2
    bad = sde.probability_flow(lambda x, t: x[:, :1])
    with pytest.raises(ValueError, match="shape"):
        bad.drift(x, torch.tensor(0.5))
    with pytest.raises(ValueError, match="noise_scale"):
        sde.reverse(lambda x, t: x, noise_scale=1.5)
    with pytest.raises(TypeError, match="score"):
        sde.reverse("not callable")
