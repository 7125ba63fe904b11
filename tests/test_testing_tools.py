"""The testing toolkit tests itself: oracles against autograd and closed forms, the statistical checks
at their stated false-failure rates and against clear differences, order fits on known slopes.

Statistical assertions state their false-failure probability; hypothesis runs are derandomized in CI
(tests/conftest.py), so each one either always passes or always fails for a given code version.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdegen import SDE, VPSDE, integrate
from sdegen.grids import check_times
from sdegen.solvers import Solver, get_solver
from sdegen.testing import (
    BrownianPath,
    ForwardEquation,
    GaussianMixture,
    GeometricBrownianMotion,
    OrnsteinUhlenbeck,
    ReplayNoise,
    energy_distance,
    energy_test,
    fit_order,
    measure_order,
    mixture_weight_check,
    moment_check,
)
from sdegen.testing.strategies import affine_sdes, batch_shapes, gaussian_mixtures, time_grids

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


MIX2 = GaussianMixture(
    [0.3, 0.7],
    [[-2.0, 0.0], [2.0, 1.0]],
    [[[0.4, 0.1], [0.1, 0.3]], [[0.2, -0.05], [-0.05, 0.5]]],
)


# -- GaussianMixture oracle ---------------------------------------------------------------------------
@given(mix=gaussian_mixtures(), sde=affine_sdes(), u=st.floats(0.0, 1.0))
def test_mixture_score_is_gradient_of_log_prob(mix, sde, u):
    """The closed-form score equals autograd of the closed-form log-density, at any t (float64)."""
    t = sde.t_min + u * (sde.T - sde.t_min)
    pm = mix.perturbed(sde)
    x = pm.sample(6, t, generator=gen(0)).requires_grad_(True)
    (grad,) = torch.autograd.grad(pm.log_prob(x, t).sum(), x)
    scale = 1.0 + grad.abs().max()
    torch.testing.assert_close(pm.score(x.detach(), t), grad, rtol=1e-9, atol=1e-9 * float(scale))


@given(mix=gaussian_mixtures(dim=1))
def test_mixture_density_integrates_to_one(mix):
    """1-D: trapezoidal integral of exp(log_prob) over ±12 std is 1 to 1e-6."""
    sd = float(mix.covariance().sqrt())
    mu = float(mix.mean())
    x = torch.linspace(mu - 12 * sd - 4, mu + 12 * sd + 4, 40001, dtype=F64)[:, None]
    mass = torch.trapezoid(mix.log_prob(x).exp(), x[:, 0])
    assert abs(float(mass) - 1.0) < 1e-6


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), OrnsteinUhlenbeck(1.5, 0.7)], ids=["vp", "ou"])
def test_perturbed_samples_have_closed_form_moments(sde):
    """Samples of p_t: mean m·μ and covariance m²Σ + s²I; Bonferroni moment check at alpha 1e-3."""
    t = 0.3
    pm = MIX2.perturbed(sde)
    x = pm.sample(8000, t, generator=gen(1))
    m, s = (float(v) for v in sde.marginal(torch.tensor(t, dtype=F64)))
    cov = m**2 * MIX2.covariance() + s**2 * torch.eye(2, dtype=F64)
    report = moment_check(x, m * MIX2.mean(), cov, alpha=1e-3)
    assert report.passed, report


# -- distances --------------------------------------------------------------------------------------------
def test_energy_distance_closed_form():
    """Point masses at 0 and 1: 2·1 − 0 − 0 = 2; identical samples: 0."""
    x, y = torch.zeros(5, 1), torch.ones(7, 1)
    assert float(energy_distance(x, y)) == pytest.approx(2.0)
    assert float(energy_distance(x, x)) == pytest.approx(0.0)


def test_energy_test_false_failure_rate_matches_alpha():
    """300 null tests (two samples of one law) at alpha = 0.05 with 99 permutations: the permutation
    p-value gives P(fail) = 5/100 exactly, so failures ~ Binomial(300, 0.05) (mean 15, sd 3.8).
    Accept 4..30: the false-failure probability of this assertion is about 3e-4."""
    g = gen(2)
    fails = 0
    for _ in range(300):
        z = torch.randn(80, 2, generator=g, dtype=F64)
        fails += not energy_test(z[:40], z[40:], alpha=0.05, permutations=99, generator=g).passed
    assert 4 <= fails <= 30, fails


def test_energy_test_accepts_same_law_and_rejects_different():
    g = gen(3)
    x = MIX2.sample(600, generator=g)
    same = energy_test(x, MIX2.sample(600, generator=g), generator=g)
    assert same.passed, same  # false failure 1e-3
    half_std = torch.tensor([0.0, 0.4], dtype=F64)
    shifted = energy_test(x, MIX2.sample(600, generator=g) + half_std, generator=g)
    assert not shifted.passed, shifted
    wrong_weights = GaussianMixture([0.45, 0.55], MIX2.means, MIX2.covariances)
    reweighted = energy_test(x, wrong_weights.sample(600, generator=g), generator=g)
    assert not reweighted.passed, reweighted
    assert "FAILED" in str(reweighted)


def test_energy_test_validates_arguments():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="permutations"):
        energy_test(x, x, alpha=1e-3, permutations=100)
    with pytest.raises(ValueError, match="alpha"):
        energy_test(x, x, alpha=0.0)
    with pytest.raises(ValueError, match="sample shape"):
        energy_test(x, torch.randn(10, 3))


@pytest.mark.parametrize("se", ["empirical", "gaussian"])
def test_moment_check_accepts_exact_and_rejects_biased(se):
    g = gen(4)
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, -0.1], [0.0, -0.1, 2.0]], dtype=F64)
    chol = torch.linalg.cholesky(cov)
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    x = torch.randn(6000, 3, generator=g, dtype=F64) @ chol.T + mean
    assert moment_check(x, mean, cov, se=se).passed  # false failure <= 1e-3
    assert not moment_check(x + torch.tensor([0.0, 0.1, 0.0], dtype=F64), mean, cov, se=se).passed
    assert not moment_check(x * torch.tensor([1.0, 1.0, 1.15], dtype=F64), mean, cov, se=se).passed
    # a stated bias tolerance absorbs a known systematic error
    assert moment_check(x + torch.tensor([0.0, 0.1, 0.0], dtype=F64), mean, cov, se=se, atol=0.1).passed
    # mean only, image-shaped samples
    assert moment_check(x.reshape(6000, 3, 1, 1), mean).passed


def test_mixture_weight_check():
    g = gen(5)
    exact = MIX2.sample(4000, generator=g)
    assert mixture_weight_check(exact, MIX2).passed  # false failure <= 1e-3
    tilted = GaussianMixture([0.36, 0.64], MIX2.means, MIX2.covariances).sample(4000, generator=g)
    report = mixture_weight_check(tilted, MIX2)
    assert not report.passed and "FAILED" in str(report)
    collapsed = MIX2.sample(4000, generator=g)
    collapsed = collapsed[collapsed[:, 0] > 0]  # one mode dropped
    assert not mixture_weight_check(collapsed, MIX2).passed
    # perturbed marginals need the time
    sde = VPSDE()
    pm = MIX2.perturbed(sde)
    assert mixture_weight_check(pm.sample(4000, 0.2, generator=g), pm, 0.2).passed
    with pytest.raises(ValueError, match="time t"):
        mixture_weight_check(exact, pm)


# -- linear SDE oracles and Brownian paths ------------------------------------------------------------
def test_brownian_path_sums_onto_sub_grids():
    path = BrownianPath(torch.linspace(0, 1, 65, dtype=F64), (3, 2), generator=gen(6))
    coarse = path.increments_on(torch.linspace(0, 1, 9, dtype=F64))
    torch.testing.assert_close(coarse, path.increments.reshape(8, 8, 3, 2).sum(1), rtol=0, atol=1e-14)
    torch.testing.assert_close(coarse.sum(0), path.values()[-1], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="sub-grid"):
        path.increments_on(torch.tensor([0.0, 0.3, 1.0], dtype=F64))


def test_brownian_increments_have_the_right_law():
    """ΔW over [0, 1] from a 64-step path: N(0, 1) per coordinate (moment check, alpha 1e-3)."""
    path = BrownianPath(torch.linspace(0, 1, 65, dtype=F64), (4000, 2), generator=gen(7))
    w1 = path.values()[-1]
    assert moment_check(w1, torch.zeros(2), torch.eye(2, dtype=F64), se="gaussian").passed


def test_replay_noise_feeds_the_exact_increments():
    """One Euler–Maruyama step on OU replayed from given increments is x − θ x h + σ ΔW exactly."""
    sde = OrnsteinUhlenbeck(theta=2.0, sigma=0.5)
    x0 = torch.tensor([[1.0], [-0.5]], dtype=F64)
    times = torch.tensor([0.0, 0.25], dtype=F64)
    dw = torch.tensor([[[0.3], [-0.1]]], dtype=F64)  # (steps, batch, dim)
    x1 = integrate(ForwardEquation(sde), x0, times, get_solver("euler_maruyama"), ReplayNoise(dw, times)).x
    torch.testing.assert_close(x1, x0 - 2.0 * x0 * 0.25 + 0.5 * dw[0], rtol=0, atol=1e-15)
    noise = ReplayNoise(dw, times)
    noise.normal((2, 1), device=torch.device("cpu"), dtype=F64)
    with pytest.raises(RuntimeError, match="one per step"):
        noise.normal((2, 1), device=torch.device("cpu"), dtype=F64)
    with pytest.raises(TypeError):
        noise.uniform((2, 1), device=torch.device("cpu"), dtype=F64)


@pytest.mark.parametrize(
    "sde", [OrnsteinUhlenbeck(theta=1.5, sigma=0.8), GeometricBrownianMotion(mu=0.5, sigma=0.4)], ids=["ou", "gbm"]
)
def test_exact_solutions_have_the_closed_form_moments(sde):
    """exact_solution on 20000 paths against mean/variance at t = 1 (alpha 1e-3, Gaussian-free SEs)."""
    n = 20000
    times = torch.linspace(0, 1, 33, dtype=F64)
    path = BrownianPath(times, (n, 1), generator=gen(8))
    x0 = torch.full((n, 1), 1.3, dtype=F64)
    x1 = sde.exact_solution(x0, times, path.increments)[-1]
    mean, var = sde.mean(1.3, 1.0), sde.variance(1.3, 1.0)
    report = moment_check(x1, mean.reshape(1), var.reshape(1, 1), se="empirical")
    assert report.passed, report
    torch.testing.assert_close(sde.second_moment(1.3, 1.0), var + mean**2)


def test_ou_is_an_affine_sde_with_the_right_kernel():
    """OU's (m, s) satisfy m' = −θ m and (s²)' = −2θ s² + σ² (autograd), so GaussianMixture.perturbed works."""
    sde = OrnsteinUhlenbeck(theta=1.7, sigma=0.6)
    t = torch.linspace(0.05, 1.0, 7, dtype=F64).requires_grad_(True)
    m, s = sde.marginal(t)
    (dm,) = torch.autograd.grad(m.sum(), t)
    (ds2,) = torch.autograd.grad((s**2).sum(), t)
    torch.testing.assert_close(dm, -1.7 * m.detach())
    torch.testing.assert_close(ds2, -2 * 1.7 * s.detach() ** 2 + 0.36)
    assert sde.prior_std == pytest.approx(0.6 / math.sqrt(2 * 1.7))


def test_gbm_closed_form_divergence_matches_autograd():
    gbm = GeometricBrownianMotion(mu=torch.tensor([0.3, -0.2]), sigma=torch.tensor([0.5, 1.2]))
    auto = SDE(gbm.drift, gbm.diffusion, state_dependent=True)
    x = torch.randn(5, 2, dtype=F64, generator=gen(9))
    t = torch.full((5,), 0.4, dtype=F64)
    torch.testing.assert_close(gbm.diffusion_divergence(x, t), auto.diffusion_divergence(x, t))


# -- order measurement --------------------------------------------------------------------------------
def test_fit_order_recovers_an_exact_power_law():
    h = [0.1, 0.05, 0.025, 0.0125]
    slope, intercept, r2 = fit_order(h, [3.0 * v**1.5 for v in h])
    assert slope == pytest.approx(1.5, abs=1e-12)
    assert intercept == pytest.approx(math.log(3.0), abs=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        fit_order(h, [0.0, 1.0, 1.0, 1.0])


class Midpoint(Solver):
    """Explicit midpoint rule (order 2), a user-written solver."""

    name = ""  # not registered
    order = 2.0
    supports_sde = False

    def step(self, eq, x, t, t_next, noise, state):
        h = t_next - t
        k1 = eq.drift(x, t)
        return x + h * eq.drift(x + 0.5 * h * k1, t + 0.5 * h), state


class DoubleDraw(Solver):
    """Draws two normals per step: cannot be replayed pathwise."""

    name = ""
    supports_ode = False

    def step(self, eq, x, t, t_next, noise, state):
        h = (t_next - t).abs()
        z = noise.normal(tuple(x.shape), device=x.device, dtype=x.dtype)
        z2 = noise.normal(tuple(x.shape), device=x.device, dtype=x.dtype)
        return x + (t_next - t) * eq.drift(x, t) + eq.diffusion(x, t) * (z + z2) * (h / 2).sqrt(), state


def test_measure_order_recovers_known_orders():
    """Euler 1 and a user's midpoint rule 2 on dx/dt = A x (exact reference)."""
    euler = measure_order("euler_maruyama", "linear_ode", steps=[16, 32, 64, 128])
    assert abs(euler.slope - 1.0) < 0.1 and euler.r2 > 0.99, euler
    mid = measure_order(Midpoint(), "linear_ode", steps=[16, 32, 64, 128])
    assert abs(mid.slope - 2.0) < 0.1 and mid.r2 > 0.99, mid
    assert len(mid.errors) == 4 and mid.errors[0] > mid.errors[-1]


def test_measure_order_refuses_solvers_it_cannot_replay():
    with pytest.raises(RuntimeError, match="cannot be replayed"):
        measure_order(DoubleDraw(), "ou", steps=[4, 8], n_paths=10)
    with pytest.raises(ValueError, match="deterministic"):
        measure_order("heun", "linear_ode", kind="strong")
    with pytest.raises(ValueError, match="needs additive noise"):
        measure_order("heun", "gbm", steps=[4, 8], n_paths=10)


# -- strategies ---------------------------------------------------------------------------------------
@given(sde=affine_sdes(), data=st.data())
def test_strategies_build_valid_objects(sde, data):
    assert 0 < sde.t_min < sde.T
    grid = data.draw(time_grids(sde))
    check_times(grid, sde)  # raises unless strictly decreasing inside (0, T]
    assert float(grid[0]) == pytest.approx(sde.T) and float(grid[-1]) == pytest.approx(sde.t_min)
    m, s = sde.marginal(grid)
    assert torch.isfinite(m).all() and torch.isfinite(s).all() and (s[:-1] > 0).all()
    shape = data.draw(batch_shapes())
    assert len(shape) in (2, 4) and all(v >= 1 for v in shape)
    mix = data.draw(gaussian_mixtures(dim=math.prod(shape[1:]) if len(shape) == 2 else 2))
    full = mix._full_cov()
    assert torch.linalg.eigvalsh(full).min() > 0.04
    assert torch.isclose(mix.weights.sum(), torch.tensor(1.0, dtype=F64))


@settings(max_examples=5)
@given(shape=batch_shapes(image=True, max_side=2, max_channels=2))
def test_image_shaped_states_work_with_the_oracle(shape):
    d = math.prod(shape[1:])
    mix = GaussianMixture([1.0], torch.zeros(1, d), torch.ones(1))
    x = torch.randn(shape, dtype=F64, generator=gen(10))
    torch.testing.assert_close(mix.perturbed(VPSDE()).score(x, 0.5), -x)  # N(0, I) is VP-stationary


def test_predrawn_noise_serves_draws_in_order_and_names_misuse():
    from sdegen.testing import PredrawnNoise

    zs = [torch.randn(3, 2, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    noise = PredrawnNoise(zs)
    assert torch.equal(noise.normal((3, 2), device="cpu", dtype=torch.float32), zs[0])
    with pytest.raises(AssertionError, match="draw 2 has shape"):
        noise.normal((3, 3), device="cpu", dtype=torch.float32)
    assert torch.equal(noise.normal((3, 2), device="cpu", dtype=torch.float64), zs[1].double())
    with pytest.raises(AssertionError, match="draw 3 requested, only 2"):
        noise.normal((3, 2), device="cpu", dtype=torch.float32)
    with pytest.raises(AssertionError, match="uniform"):
        noise.uniform((3, 2), device="cpu", dtype=torch.float32)
    assert noise.used == 2 and noise.select(torch.tensor([0])) is noise
