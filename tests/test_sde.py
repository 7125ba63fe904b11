"""Forward SDEs: kernels against sampling and against the moment ODEs, inverses, validation."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from sdegen import EDMSDE, SDE, VESDE, VPSDE, SubVPSDE, forward_sample

SDES = [
    VPSDE(0.1, 20.0),
    SubVPSDE(0.1, 20.0),
    VESDE(0.01, 50.0),
    VESDE(0.01, 50.0, marginal_std="sigma"),
    EDMSDE(0.002, 80.0),
]
IDS = ["vp", "subvp", "ve", "ve-sigma", "edm"]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_matches_moment_odes(sde):
    """m' = a m and (s²)' = 2 a s² + g², integrated by SciPy from the kernel at a small t0."""
    t0 = 1e-3 * sde.T
    m0, s0 = (float(v) for v in sde.marginal(t0))

    def rhs(t, y):
        tt = torch.tensor(t, dtype=torch.float64)
        a, g = float(sde.drift_coef(tt)), float(sde.diffusion_coef(tt))
        return [a * y[0], 2 * a * y[1] + g * g]

    ts = np.array([0.1, 0.3, 0.6, 1.0]) * sde.T
    sol = solve_ivp(rhs, (t0, sde.T), [m0, s0**2], t_eval=ts, rtol=1e-11, atol=1e-12, method="DOP853")
    m, s = sde.marginal(torch.tensor(ts, dtype=torch.float64))
    np.testing.assert_allclose(m.numpy(), sol.y[0], rtol=1e-7)
    np.testing.assert_allclose(s.numpy() ** 2, sol.y[1], rtol=1e-6)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_forward_sample_moments(sde):
    """x_t = m x0 + s z: mean and std per sample point within 5 standard errors (false-failure ~1e-5)."""
    n = 20000
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64).expand(n, 2)
    t = torch.tensor(0.4 * sde.T, dtype=torch.float64)
    xt = forward_sample(sde, x0, t, generator=torch.Generator().manual_seed(1))
    m, s = (float(v) for v in sde.marginal(t))
    se_mean = s / math.sqrt(n)
    assert torch.all((xt.mean(0) - m * x0[0]).abs() < 5 * se_mean)
    se_std = s / math.sqrt(2 * n)
    assert torch.all((xt.std(0) - s).abs() < 5 * se_std)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_sigma_inverse_and_log_snr(sde):
    t = torch.linspace(0.05, 1.0, 9, dtype=torch.float64) * sde.T
    sig = sde.sigma(t)
    assert torch.all(sig[1:] > sig[:-1]), "sigma(t) must increase"
    torch.testing.assert_close(sde.t_from_sigma(sig), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    m, s = sde.marginal(t)
    torch.testing.assert_close(sde.log_snr(t), torch.log(m**2 / s**2))


def test_generic_bisection_inverse_matches_closed_form():
    from sdegen.sde import LinearSDE

    vp = VPSDE()
    sig = vp.sigma(torch.tensor([0.01, 0.5, 0.9], dtype=torch.float64))
    torch.testing.assert_close(LinearSDE.t_from_sigma(vp, sig), vp.t_from_sigma(sig), rtol=1e-10, atol=1e-12)


def test_known_closed_forms():
    vp = VPSDE(0.1, 20.0)
    t = torch.tensor(0.5, dtype=torch.float64)
    ib = 0.1 * 0.5 + 0.5 * 19.9 * 0.25
    m, s = vp.marginal(t)
    assert float(m) == pytest.approx(math.exp(-0.5 * ib), rel=1e-12)
    assert float(s) == pytest.approx(math.sqrt(1 - math.exp(-ib)), rel=1e-12)
    ve = VESDE(0.01, 50.0)
    sig_t = 0.01 * (50 / 0.01) ** 0.5
    assert float(ve.marginal(t)[1]) == pytest.approx(math.sqrt(sig_t**2 - 0.01**2), rel=1e-12)
    assert float(VESDE(0.01, 50.0, marginal_std="sigma").marginal(t)[1]) == pytest.approx(sig_t, rel=1e-12)
    svp = SubVPSDE(0.1, 20.0)
    assert float(svp.marginal(t)[1]) == pytest.approx(1 - math.exp(-ib), rel=1e-12)
    edm = EDMSDE()
    assert (edm.T, edm.t_min) == (80.0, 0.002)
    assert float(edm.marginal(torch.tensor(3.0))[1]) == 3.0


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior(sde):
    x = sde.prior_sample((50000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (50000, 3) and x.dtype == torch.float64
    assert abs(float(x.std()) / sde.prior_std - 1) < 0.01
    lp = sde.prior_log_prob(x[:4])
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(x[:4]).sum(1)
    torch.testing.assert_close(lp, ref)


def test_generic_sde_coefficients_and_broadcast():
    sde = SDE(lambda x, t: -x, lambda x, t: 2.0 * t, T=1.0)
    x = torch.ones(3, 2, 4)
    t = torch.tensor([0.1, 0.2, 0.3])
    assert sde.diffusion(x, t).shape == (3, 1, 1)
    torch.testing.assert_close(sde.diffusion(x, t).flatten(), 2 * t)
    assert sde.diffusion_divergence(x, t) is None


def test_state_dependent_divergence_by_autograd_matches_closed_form():
    g = lambda x, t: torch.sqrt(1.0 + x**2) * (1 + t[:, None])
    auto = SDE(lambda x, t: 0 * x, g, state_dependent=True)
    closed = SDE(lambda x, t: 0 * x, g, diffusion_divergence=lambda x, t: 2 * x * (1 + t[:, None]) ** 2)
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(auto.diffusion_divergence(x, t), closed.diffusion_divergence(x, t))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VPSDE(beta_min=-1.0), "beta_min"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: VESDE(marginal_std="bogus"), "marginal_std"),
        (lambda: SDE(lambda x, t: x, lambda x, t: t, T=1.0, t_min=2.0), "t_min"),
        (lambda: SDE("drift", lambda x, t: t), "drift"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
