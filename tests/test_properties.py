"""Property-based tests (hypothesis, derandomized in CI by tests/conftest.py).

* affine SDEs: the kernel (m, s) solves the moment ODEs m' = a m, (s²)' = 2 a s² + g² for any
  valid parameters (autograd in float64);
* parametrisations: score ↔ ε ↔ x̂0 ↔ v conversions are exact inverses, and the oracle's predictions
  agree with them and with the adapters;
* the probability-flow ODE is reversible: integrating down then up returns x_T (to the solver's error);
* every registered solver preserves shape, device and dtype, is deterministic under a seed, and with
  per-sample noise sample i does not depend on the batch (solvers are discovered at collection time,
  so solvers added later are covered);
* with the exact score, sampler output passes distribution tests against exact samples (slow).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdegen import EDMSDE, VESDE, VPSDE, SubVPSDE, integrate, make_grid, reverse_sample
from sdegen.models import (
    denoiser_from_score,
    epsilon_from_score,
    from_denoiser,
    from_epsilon,
    from_velocity,
    score_from_denoiser,
    score_from_epsilon,
    score_from_velocity,
    velocity_from_score,
)
from sdegen.solvers import available_solvers, get_solver
from sdegen.testing import GaussianMixture, energy_test, mixture_weight_check, moment_check
from sdegen.testing.strategies import affine_sdes, batch_shapes, gaussian_mixtures

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _times(sde, u):
    return torch.as_tensor(sde.t_min + u * (sde.T - sde.t_min), dtype=F64)


def _ddt(y, t):
    """Elementwise dy/dt by autograd (y[i] depends on t[i] only); a constant (m ≡ 1 for VE/EDM) has no graph."""
    if not y.requires_grad:
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), t, retain_graph=True)[0]


# -- moment ODEs ------------------------------------------------------------------------------------------
@given(sde=affine_sdes(), u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
def test_kernel_satisfies_the_moment_odes(sde, u):
    """For x_t = m x_0 + s z under dx = a x dt + g dw: dm/dt = a m and d(s²)/dt = 2 a s² + g²."""
    t = _times(sde, torch.tensor(u, dtype=F64)).requires_grad_(True)
    m, s = sde.marginal(t)
    dm, ds2 = _ddt(m, t), _ddt(s**2, t)
    a, g = sde.drift_coef(t.detach()), sde.diffusion_coef(t.detach())
    m, s = m.detach(), s.detach()
    torch.testing.assert_close(dm, a * m, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ds2, 2 * a * s**2 + g**2, rtol=1e-9, atol=1e-12 * float(1 + g.max() ** 2))
    # the kernel starts at the identity: m(0) = 1 (and s(0) = 0 unless VE uses the s = σ(t) convention)
    m0, s0 = sde.marginal(torch.zeros(1, dtype=F64))
    assert float(m0) == pytest.approx(1.0, abs=1e-12)
    if getattr(sde, "marginal_std", "exact") == "exact":
        assert float(s0) == pytest.approx(0.0, abs=1e-12)


# -- parametrisation round trips ----------------------------------------------------------------------
@st.composite
def _state(draw):
    sde = draw(affine_sdes())
    shape = draw(batch_shapes(max_side=2, max_channels=2))
    t = _times(sde, torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=shape[0], max_size=shape[0]))))
    seed = draw(st.integers(0, 2**16))
    return sde, shape, t, seed


def _close(a, b, rtol=1e-7, atol=0.0):
    """|a − b| <= rtol · (1 + max|b|) + atol, per sample: conversions lose a few ulps of the largest term."""
    scale = 1.0 + b.reshape(b.shape[0], -1).abs().amax(1)
    err = (a - b).reshape(b.shape[0], -1).abs().amax(1)
    assert (err <= rtol * scale + atol).all(), f"max relative error {float((err / scale).max()):.3e}"


@given(_state())
def test_parametrisation_round_trips_are_identities(state):
    sde, shape, t, seed = state
    g = gen(seed)
    m, s = sde.marginal(t)
    x = torch.randn(shape, generator=g, dtype=F64) * (m + s).reshape(-1, *[1] * (len(shape) - 1))
    score = torch.randn(shape, generator=g, dtype=F64) / s.reshape(-1, *[1] * (len(shape) - 1))
    eps, x0, v = (f(sde, x, t, score) for f in (epsilon_from_score, denoiser_from_score, velocity_from_score))
    _close(score_from_epsilon(sde, x, t, eps), score)
    _close(score_from_denoiser(sde, x, t, x0), score)
    _close(score_from_velocity(sde, x, t, v), score)
    # and the other way round
    _close(epsilon_from_score(sde, x, t, score_from_epsilon(sde, x, t, eps)), eps)
    _close(denoiser_from_score(sde, x, t, score_from_denoiser(sde, x, t, x0)), x0)
    _close(velocity_from_score(sde, x, t, score_from_velocity(sde, x, t, v)), v)
    # the three predictions are one: x = m x̂0 + s ε and v = m ε − s x̂0
    mb, sb = (c.reshape(-1, *[1] * (len(shape) - 1)) for c in (m, s))
    _close(mb * x0 + sb * eps, x)
    _close(mb * eps - sb * x0, v)


@settings(max_examples=10)
@given(_state(), st.data())
def test_oracle_predictions_agree_with_adapters(state, data):
    """PerturbedMixture's ε / x̂0 / v are the conversions of its score; adapters recover the score."""
    sde, shape, t, _ = state
    mix = data.draw(gaussian_mixtures(dim=math.prod(shape[1:]), max_components=3))
    pm = mix.perturbed(sde)
    x = pm.sample(shape[0], t, generator=gen(0)).reshape(shape)
    score = pm.score(x, t)
    _close(pm.epsilon(x, t), epsilon_from_score(sde, x, t, score))
    _close(pm.denoiser(x, t), denoiser_from_score(sde, x, t, score))
    _close(pm.velocity(x, t), velocity_from_score(sde, x, t, score))
    # score = (m x̂0 − x) / s² cancels: rounding of x costs eps·|x| / s², large as s → 0 (ill-conditioned, not wrong)
    _, s = sde.marginal(t)
    cancel = 16 * torch.finfo(F64).eps * (1 + x.reshape(shape[0], -1).abs().amax(1)) / s**2
    for adapter, net in ((from_epsilon, pm.epsilon), (from_denoiser, pm.denoiser), (from_velocity, pm.velocity)):
        _close(adapter(net, sde)(x, t), score, rtol=1e-6, atol=cancel)
    _close(sde.probability_flow(pm.score).denoise(x, t), pm.denoiser(x, t))


# -- probability-flow reversibility ----------------------------------------------------------------------
@settings(max_examples=8)
@given(sde=affine_sdes(), mix=gaussian_mixtures(dim=st.integers(1, 3), max_components=3))
def test_probability_flow_is_reversible(sde, mix):
    """Heun, 200 steps uniform in log-SNR, from x_T down to σ = 0.1 and back up the reversed grid:
    the round trip returns x_T up to the solver's O(h²) error (measured ≤ 3e-4 relative; bound 3e-3)."""
    sigma_end = torch.tensor(0.1, dtype=F64)
    t_end = min(max(float(sde.t_from_sigma(sigma_end)), sde.t_min), 0.5 * sde.T)
    grid = make_grid("log_snr", sde, 200, t_min=t_end)
    pm = mix.perturbed(sde)
    x_T = pm.sample(8, sde.T, generator=gen(1))
    heun = get_solver("heun")
    down = integrate(sde.probability_flow(pm.score), x_T, grid, heun, None).x
    up = integrate(sde.probability_flow(pm.score), down, grid.flip(0), heun, None).x
    scale = x_T.norm(dim=1) + float(sde.prior_std)
    assert ((up - x_T).norm(dim=1) / scale).max() < 3e-3


@pytest.mark.parametrize(
    "sde",
    [VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0), VESDE(0.01, 50.0), EDMSDE(0.002, 80.0)],
    ids=["vp", "subvp", "ve", "edm"],
)
def test_likelihood_decode_inverts_encode(sde):
    """If sdegen.likelihood provides encode/decode (RK45 on the probability-flow ODE): at
    rtol = atol = 1e-7, decode(encode(x)) = x to 1e-5 (measured 1e-7 .. 3e-7 for VP and VE)."""
    from sdegen import likelihood
    t_min = float(sde.t_from_sigma(torch.tensor(0.05, dtype=F64)))
    pm = GaussianMixture([0.3, 0.7], [[-1.5, 0.0], [1.5, 1.0]], [0.3, 0.2]).perturbed(sde)
    x = pm.sample(8, t_min, generator=gen(2))
    kw = dict(t_min=t_min, rtol=1e-7, atol=1e-7)
    z = likelihood.encode(sde, pm.score, x, **kw)
    assert z.shape == x.shape and (z - x).abs().max() > 0.1  # it did move
    back = likelihood.decode(sde, pm.score, z, **kw)
    assert (back - x).norm(dim=1).max() < 1e-5


# -- solver contract ------------------------------------------------------------------------------------
SOLVERS = available_solvers()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONTRACT_SDE = VPSDE(0.1, 20.0)
CONTRACT_MIX = GaussianMixture([0.5, 0.5], [[1.0, 0.0, -1.0, 0.5], [-1.0, 0.5, 0.0, 0.0]], [0.3, 0.6])


def _sample(name, batch, *, noise_scale, dtype, device, shape=(1, 2, 2), seed=3, ids=None):
    pm = CONTRACT_MIX.to(device=device)
    return reverse_sample(
        CONTRACT_SDE, pm.perturbed(CONTRACT_SDE).score, (batch, *shape), solver=name,
        steps=None if get_solver(name).adaptive else 6,
        noise_scale=noise_scale, seed=seed, sample_ids=ids, dtype=dtype, device=device,
    )


def _solver_or_skip(name, noise_scale):
    """Skip only what the solver declares it does not do; a crash or a refusal fails the test."""
    slv = get_solver(name)
    if noise_scale > 0 and not slv.supports_sde:
        pytest.skip(f"solver {name!r} does not integrate SDEs")
    if noise_scale == 0 and not slv.supports_ode:
        pytest.skip(f"solver {name!r} does not integrate ODEs")
    return slv


def _run_or_skip(name, *args, **kwargs):
    return _sample(name, *args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("noise_scale", [1.0, 0.0], ids=["sde", "ode"])
@pytest.mark.parametrize("name", SOLVERS)
def test_solver_preserves_shape_device_dtype_and_is_deterministic(name, noise_scale, dtype, device):
    _solver_or_skip(name, noise_scale)
    for shape in [(1, 2, 2), (4,)]:
        x = _run_or_skip(name, 5, noise_scale=noise_scale, dtype=dtype, device=device, shape=shape)
        assert x.shape == (5, *shape) and x.dtype == dtype and x.device.type == device
        assert torch.isfinite(x).all()
        again = _sample(name, 5, noise_scale=noise_scale, dtype=dtype, device=device, shape=shape)
        assert torch.equal(x, again), "same seed, same device, same dtype must give identical samples"
    if noise_scale > 0:
        other = _sample(name, 5, noise_scale=noise_scale, dtype=dtype, device=device, seed=4)
        assert not torch.equal(other, _sample(name, 5, noise_scale=noise_scale, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("noise_scale", [1.0, 0.0], ids=["sde", "ode"])
@pytest.mark.parametrize("name", SOLVERS)
def test_sample_does_not_depend_on_batch_with_per_sample_noise(name, noise_scale, dtype):
    """With seed= (counter-based noise), samples 0..2 of a batch of 7 equal a batch of 3 (and ids 3..6 alone)."""
    _solver_or_skip(name, noise_scale)  # rk45 included: its step control is per sample
    big = _run_or_skip(name, 7, noise_scale=noise_scale, dtype=dtype, device="cpu")
    small = _sample(name, 3, noise_scale=noise_scale, dtype=dtype, device="cpu")
    tail = _sample(name, 4, noise_scale=noise_scale, dtype=dtype, device="cpu", ids=torch.arange(3, 7))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(big[:3], small, **tol)
    torch.testing.assert_close(big[3:], tail, **tol)


# -- exact score: sampler output against exact samples ---------------------------------------------------
DIST_SDE = VPSDE(0.1, 20.0)
DIST_MIX = GaussianMixture(
    [0.3, 0.7], [[-1.5, 0.0], [1.5, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]]]
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,noise_scale,steps",
    [("euler_maruyama", 1.0, 500), ("euler_maruyama", 0.0, 500), ("heun", 1.0, 200), ("heun", 0.0, 100)],
    ids=["em-sde", "euler-ode", "heun-sde", "heun-ode"],
)
def test_exact_score_sampler_matches_exact_samples(name, noise_scale, steps):
    """n = 1000 samples at t_min vs 1000 exact samples of p_{t_min}: energy permutation test, mixture
    weights and moments, each at alpha = 1e-3 (false-failure rate of the test ≲ 3e-3). The
    discretisation bias at these step counts is far below what n = 1000 can resolve."""
    n = 1000
    pm = DIST_MIX.perturbed(DIST_SDE)
    x = reverse_sample(
        DIST_SDE, pm.score, (n, 2), solver=name, steps=steps, noise_scale=noise_scale, generator=gen(11), dtype=F64
    )
    t = DIST_SDE.t_min
    exact = pm.sample(n, t, generator=gen(12))
    result = energy_test(x, exact, generator=gen(13))
    assert result.passed, result
    weights = mixture_weight_check(x, pm, t)
    assert weights.passed, weights
    m, s = (float(v) for v in DIST_SDE.marginal(torch.tensor(t, dtype=F64)))
    moments = moment_check(x, m * DIST_MIX.mean(), m**2 * DIST_MIX.covariance() + s**2 * torch.eye(2, dtype=F64))
    assert moments.passed, moments


@pytest.mark.slow
def test_distance_test_catches_a_wrong_score():
    """Negative control: sampling with the score of a mixture with weights 0.5/0.5 instead of 0.3/0.7
    is rejected by the energy test and the weight check (power, not a false-failure question)."""
    wrong = GaussianMixture([0.5, 0.5], DIST_MIX.means, DIST_MIX.covariances).perturbed(DIST_SDE)
    x = reverse_sample(DIST_SDE, wrong.score, (1000, 2), solver="heun", steps=100, noise_scale=0.0,
                       generator=gen(14), dtype=F64)
    exact = DIST_MIX.perturbed(DIST_SDE).sample(1000, DIST_SDE.t_min, generator=gen(15))
    assert not energy_test(x, exact, generator=gen(16)).passed
    assert not mixture_weight_check(x, DIST_MIX.perturbed(DIST_SDE), DIST_SDE.t_min).passed
