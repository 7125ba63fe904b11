"""Flow-matching / rectified-flow models: interpolant SDEs, velocity models, sampling from t = 1, likelihoods, losses.

What is proved (the oracle is a 2-D Gaussian mixture, exact on every interpolant path):

* sign conventions: the forward SDE derived from ``(α, σ)`` has the kernel ``(α, σ)`` (moment ODEs by finite
  differences), and its probability-flow drift ``a x − ½ g² ∇log p_t`` *is* the oracle's flow velocity
  ``E[α̇ x0 + σ̇ ε | x_t]`` (float64 rounding), for the rectified-flow, cosine, autograd-differentiated and VP paths;
  the velocity-form drift of ``ReverseSDE`` equals the standard drift for every noise scale;
* ``from_flow`` converts exactly (score, x̂0, round trips) and stays finite at ``t = 1``; it is not ``from_velocity``;
* sampling from exactly ``t = 1``: every registered solver (and both backends) either returns finite samples or
  refuses with a ValueError before evaluating anything — never a NaN;
* "Done when": rk45 at rtol = atol = 1e-8 lands on SciPy's DOP853 (rtol = atol = 1e-12) solution of
  ``dx/dt = v`` (median distance < 1e-4; measured ~4e-9); Euler and DPM-Solver++(2M) converge at orders 1 and 2
  on the rectified-flow path from ``t = 1`` (``measure_order``); stochastic samplers (DDIM λ = 1, ancestral,
  Euler–Maruyama from ``t_max < 1``) match the exact marginals (energy test, false-failure rate 1e-3 each);
  the exact-trace likelihood matches the analytic density to < 1e-4 nats/dim (measured ~3e-9); Hutchinson is
  unbiased; the likelihood agrees with Meta ``flow_matching``'s ``ODESolver.compute_likelihood`` on the same
  network (measured ~2e-9 nats);
* ``flow_matching_loss``: the exact velocity is a stationary point (per-sample gradients average to zero within
  5 standard errors; a wrong velocity fails the same test), the loss equals ``dsm_loss(parametrisation="flow")``
  re-weighted, logit-normal times have the requested logit moments, and shifted times are ``shift_time`` of them;
* the SD3 / Flux time shift grids.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdegen import (
    VPSDE,
    CosineInterpolantSDE,
    FlowMatchingSDE,
    InterpolantSDE,
    ReverseSDE,
    available_solvers,
    flow_matching_loss,
    from_flow,
    from_velocity,
    get_solver,
    log_likelihood,
    make_grid,
    reverse_sample,
)
from sdegen.grids import dynamic_shift, shift_time
from sdegen.losses import dsm_loss
from sdegen.models import flow_from_score, score_from_flow
from sdegen.testing import GaussianMixture, ProbabilityFlowProblem, energy_test, measure_order

F64 = torch.float64
GM = GaussianMixture(
    [0.35, 0.65],
    [[-1.0, 0.5], [1.0, -0.5]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.15, -0.05], [-0.05, 0.40]]],
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _autograd_fm() -> InterpolantSDE:
    """The rectified-flow path with derivatives by autograd (no closed forms given)."""
    return InterpolantSDE(lambda t: 1.0 - t, lambda t: t)


def _bent() -> InterpolantSDE:
    """A non-linear path with α(1) = 0, derivatives by autograd: α = (1 − t)², σ = sin(πt/2)."""
    return InterpolantSDE(lambda t: (1.0 - t) ** 2, lambda t: torch.sin(0.5 * math.pi * t))


PATHS = [FlowMatchingSDE(), CosineInterpolantSDE(), _autograd_fm(), _bent()]
PATH_IDS = ["rectified_flow", "cosine", "autograd_fm", "bent"]


# -- the interpolant SDE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", PATHS, ids=PATH_IDS)
def test_kernel_solves_the_moment_odes_and_rates_are_derivatives(sde):
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    h = 1e-6
    (m1, s1), (m0, s0), (m, s) = sde.marginal(t + h), sde.marginal(t - h), sde.marginal(t)
    a, g = sde.drift_coef(t), sde.diffusion_coef(t)
    dm, ds2 = (m1 - m0) / (2 * h), (s1**2 - s0**2) / (2 * h)
    torch.testing.assert_close(dm, a * m, rtol=1e-7, atol=1e-8)  # dm/dt = a m
    torch.testing.assert_close(ds2, 2 * a * s**2 + g**2, rtol=1e-7, atol=1e-8)  # d(s²)/dt = 2 a s² + g²
    _, _, da, dsd = sde.rates(t)
    torch.testing.assert_close(da, dm, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(dsd, (s1 - s0) / (2 * h), rtol=1e-7, atol=1e-8)
    # the noise level and its inverse; the ends
    torch.testing.assert_close(sde.t_from_sigma(sde.sigma(t)), t, rtol=0, atol=1e-10)
    m_T, s_T = sde.marginal(torch.tensor(1.0, dtype=F64))
    assert float(m_T) == 0.0 and float(s_T) == 1.0 and sde.signal_vanishes_at_T and sde.prior_std == 1.0
    assert math.isinf(float(sde.sigma(torch.tensor(1.0, dtype=F64))))
    assert float(sde.t_from_sigma(torch.tensor(math.inf))) == pytest.approx(1.0, abs=1e-12)
    # float32 times stay float32 and finite below T
    t32 = t.float()
    assert sde.drift_coef(t32).dtype == torch.float32 and torch.isfinite(sde.diffusion_coef(t32)).all()


def test_interpolant_validation():
    with pytest.raises(TypeError, match="alpha"):
        InterpolantSDE("1 - t", lambda t: t)
    with pytest.raises(ValueError, match=r"sigma\(t\) must be > 0"):
        InterpolantSDE(lambda t: 1 - t, lambda t: t - 0.5)
    with pytest.raises(ValueError, match=r"alpha\(t\) must be > 0"):
        InterpolantSDE(lambda t: 0.5 - t, lambda t: t)
    with pytest.raises(ValueError, match="increase"):
        InterpolantSDE(lambda t: 1 + 0 * t, lambda t: 1 - 0.5 * t)
    with pytest.raises(ValueError, match="finite"):
        InterpolantSDE(lambda t: 1 - t, lambda t: torch.sqrt(t - 0.01))
    with pytest.raises(ValueError, match="shape"):
        InterpolantSDE(lambda t: torch.ones(3, dtype=t.dtype), lambda t: t)
    # a path that does not reach α = 0: a usable SDE whose prior N(0, σ(T)²) is an approximation
    sde = InterpolantSDE(lambda t: 1 - 0.9 * t, lambda t: t)
    assert not sde.signal_vanishes_at_T and sde.prior_std == 1.0


@pytest.mark.parametrize("sde", [*PATHS, VPSDE()], ids=[*PATH_IDS, "vp"])
def test_flow_velocity_is_the_probability_flow_drift(sde):
    """Sign conventions: the oracle's E[ṁ x0 + ṡ ε | x_t] is the PF drift a x − ½ g² ∇log p_t of the derived SDE."""
    pm = GM.perturbed(sde)
    x = 1.5 * torch.randn(64, 2, dtype=F64, generator=_gen(0))
    t = torch.rand(64, dtype=F64, generator=_gen(1)) * 0.9 + 0.05
    generic = ReverseSDE(sde, pm.score, 0.0)  # a plain score function: the standard a x − ½ g² score
    torch.testing.assert_close(pm.flow_velocity(x, t), generic.drift(x, t), rtol=1e-12, atol=1e-12)
    # ...and the velocity-form drift of a flow model equals the standard one for every noise scale
    model = from_flow(pm.flow_velocity, sde)
    for lam in (0.0, 0.5, 1.0):
        flow = ReverseSDE(sde, model, lam)
        torch.testing.assert_close(flow.drift(x, t), ReverseSDE(sde, pm.score, lam).drift(x, t), rtol=1e-10,
                                   atol=1e-10)
        torch.testing.assert_close(flow.drift(x, t[0]), ReverseSDE(sde, pm.score, lam).drift(x, t[0]),
                                   rtol=1e-10, atol=1e-10)  # 0-d times too


def test_flow_velocity_at_the_noise_end_and_rectified_flow_target():
    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    x = torch.randn(16, 2, dtype=F64, generator=_gen(2))
    # at t = 1: x_1 = ε exactly, x̂0 = E[x0]: v = x − E[x0]
    torch.testing.assert_close(pm.flow_velocity(x, 1.0), x - GM.mean(), rtol=0, atol=1e-14)
    torch.testing.assert_close(pm.denoiser(x, 1.0), GM.mean().expand(16, 2), rtol=0, atol=1e-14)
    # rectified flow: v = E[ε − x0 | x_t] = ε̂ − x̂0 (Monte-Carlo free identity from the oracle's own ε̂, x̂0)
    t = torch.full((16,), 0.3, dtype=F64)
    torch.testing.assert_close(pm.flow_velocity(x, t), pm.epsilon(x, t) - pm.denoiser(x, t), rtol=1e-12,
                               atol=1e-12)
    # Salimans & Ho's v (from_velocity's) is a different quantity
    assert (pm.velocity(x, t) - pm.flow_velocity(x, t)).abs().max() > 0.1


@pytest.mark.parametrize("sde", [FlowMatchingSDE(), CosineInterpolantSDE(), VPSDE()], ids=["rf", "cosine", "vp"])
def test_from_flow_converts_exactly(sde):
    pm = GM.perturbed(sde)
    model = from_flow(pm.flow_velocity, sde)
    x = 1.5 * torch.randn(32, 2, dtype=F64, generator=_gen(3))
    t = torch.rand(32, dtype=F64, generator=_gen(4)) * 0.9 + 0.05
    torch.testing.assert_close(model(x, t), pm.score(x, t), rtol=1e-10, atol=1e-10)
    score, x0 = model.predict(x, t)
    torch.testing.assert_close(score, pm.score(x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x0, pm.denoiser(x, t), rtol=1e-10, atol=1e-10)
    v = pm.flow_velocity(x, t)
    torch.testing.assert_close(flow_from_score(sde, x, t, score_from_flow(sde, x, t, v)), v, rtol=1e-10, atol=1e-10)
    # Salimans–Ho's velocity through from_velocity gives the same score: two conventions, one model
    torch.testing.assert_close(from_velocity(pm.velocity, sde)(x, t), model(x, t), rtol=1e-10, atol=1e-10)
    assert "FlowModel" in repr(model)


def test_from_flow_is_finite_at_the_noise_end():
    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    model = from_flow(pm.flow_velocity, sde)
    x = torch.randn(8, 2, dtype=F64, generator=_gen(5))
    one = torch.ones(8, dtype=F64)
    score, x0 = model.predict(x, one)
    torch.testing.assert_close(score, -x, rtol=0, atol=1e-14)  # p_1 = N(0, I)
    torch.testing.assert_close(x0, GM.mean().expand(8, 2), rtol=0, atol=1e-14)
    eq = ReverseSDE(sde, model, 0.0)
    torch.testing.assert_close(eq.drift(x, torch.tensor(1.0, dtype=F64)), x - GM.mean(), rtol=0, atol=1e-14)
    assert (eq.diffusion(x, torch.tensor(1.0, dtype=F64)) == 0).all()  # not 0 · ∞
    with pytest.raises(TypeError, match="affine"):
        from_flow(pm.flow_velocity, None)


# -- sampling from exactly t = 1 ----------------------------------------------------------------------
_OPTIONS = {"langevin": dict(n_steps_each=2), "torchsde:euler": dict(dt=0.05)}


@pytest.mark.parametrize("sde", [FlowMatchingSDE(), CosineInterpolantSDE()], ids=["rf", "cosine"])
def test_sampling_from_t_equal_1_never_gives_nan(sde):
    """Every registered solver (and both backends): finite samples from t = 1, or a ValueError before any work."""
    pm = GM.perturbed(sde)
    finite, refused = set(), set()
    for name in [*available_solvers(), "torchdiffeq:dopri5", "torchsde:euler"]:
        slv = get_solver(name, **_OPTIONS.get(name, {}))
        for lam in (0.0, 0.5, 1.0):
            calls = []

            def net(x, t, _calls=calls):
                _calls.append(1)
                return pm.flow_velocity(x, t)

            kw = dict(noise_scale=lam, seed=0, dtype=F64, progress=False, **_OPTIONS.get(name, {}))
            if not getattr(slv, "adaptive", False) and ":" not in name:
                kw["steps"] = 8
            try:  # below t = 1 the SDE is ordinary: a refusal there is not about t = 1 (e.g. 'ancestral', λ < 1)
                reverse_sample(sde, from_flow(pm.flow_velocity, sde), (4, 2), solver=name, t_max=0.99, **kw)
            except ValueError:
                continue
            try:
                x = reverse_sample(sde, from_flow(net, sde), (32, 2), solver=name, **kw)
            except ValueError as err:
                assert not calls, f"{name} (λ={lam}) refused after evaluating the model: {err}"
                assert "t=1" in str(err), f"{name} (λ={lam}): {err}"
                refused.add((name, lam))
                continue
            assert torch.isfinite(x).all(), f"{name} (λ={lam}) produced NaN/Inf from t = 1"
            finite.add((name, lam))
    # the solvers that can start there do
    for must in [("euler_maruyama", 0.0), ("heun", 0.0), ("rk45", 0.0), ("tsit5", 0.0), ("ddim", 0.0), ("ddim", 1.0),
                 ("ddim", 0.5), ("ancestral", 1.0), ("dpmpp_2m", 0.0), ("dpmpp_3m", 0.0), ("langevin", 1.0),
                 ("torchdiffeq:dopri5", 0.0)]:
        assert must in finite, must
    # and the refusals are the singular cases: λ > 0 drift solvers, σ = s/m steps
    for must in [("euler_maruyama", 1.0), ("heun", 0.5), ("torchsde:euler", 1.0), ("edm", 0.0),
                 ("reverse_diffusion", 0.0), ("pc", 1.0)]:
        assert must in refused, must


def test_refusals_name_the_fix_and_starting_below_one_works():
    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    model = from_flow(pm.flow_velocity, sde)
    with pytest.raises(ValueError, match=r"infinite.*'ddim'.*t_max=1 - 1e-3"):
        reverse_sample(sde, model, (4, 2), solver="euler_maruyama", noise_scale=1.0, steps=4, progress=False)
    with pytest.raises(ValueError, match="first step is not defined there"):
        reverse_sample(sde, model, (4, 2), solver="edm", steps=4, progress=False)
    with pytest.raises(ValueError, match="from_flow"):  # a plain score function has no x̂0 where α = 0
        reverse_sample(sde, pm.score, (4, 2), solver="heun", noise_scale=0.0, steps=4, progress=False)
    with pytest.raises(ValueError, match="from_flow"):
        reverse_sample(sde, pm.score, (4, 2), solver="ddim", steps=4, progress=False)
    # below t = 1 everything is an ordinary affine SDE again
    for kw in (dict(solver="euler_maruyama", noise_scale=1.0), dict(solver="edm"), dict(solver="heun")):
        x = reverse_sample(sde, model, (4, 2), steps=8, t_max=0.99, dtype=F64, seed=0, progress=False, **kw)
        assert torch.isfinite(x).all()
    x = reverse_sample(sde, pm.score, (4, 2), solver="heun", steps=8, t_max=0.99, dtype=F64, seed=0, progress=False)
    assert torch.isfinite(x).all()


def test_pc_with_a_kernel_predictor_starts_at_one():
    sde = FlowMatchingSDE()
    model = from_flow(GM.perturbed(sde).flow_velocity, sde)
    x = reverse_sample(sde, model, (16, 2), solver="pc", predictor="ancestral", steps=8, seed=0, dtype=F64,
                       progress=False)
    assert torch.isfinite(x).all()


# -- "Done when": accuracy against independent references -----------------------------------------------------
def test_rk45_lands_on_scipy_dop853_from_t_equal_1():
    from scipy.integrate import solve_ivp

    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    x1 = torch.randn(64, 2, dtype=F64, generator=_gen(6))  # exact samples of p_1 = N(0, I)
    t_end = 1e-3
    x = reverse_sample(sde, from_flow(pm.flow_velocity, sde), x_T=x1, solver="rk45", rtol=1e-8, atol=1e-8,
                       t_min=t_end, progress=False)

    def rhs(t, y):  # dx/dt = v(x, t), independently of sdegen's ReverseSDE
        return pm.flow_velocity(torch.as_tensor(y).reshape(x1.shape), t).reshape(-1).numpy()

    ref = solve_ivp(rhs, (1.0, t_end), x1.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert ref.success
    dist = (x - torch.as_tensor(ref.y[:, -1]).reshape(x1.shape)).norm(dim=1)
    assert float(dist.median()) < 1e-4, float(dist.median())  # measured 4e-9


class _FlowProblem(ProbabilityFlowProblem):
    """The probability-flow ODE of the mixture driven by the exact flow velocity (finite at t = 1)."""

    name = "flow_pf_ode"

    def equation(self, *, ode: bool = True):
        return self.sde.probability_flow(from_flow(self.perturbed.flow_velocity, self.sde))


@pytest.mark.parametrize(
    "solver, order, steps",
    [("euler_maruyama", 1.0, (16, 32, 64, 128)), ("dpmpp_2m", 2.0, (16, 32, 64, 128)), ("heun", 2.0, (16, 32, 64))],
)
def test_orders_on_the_rectified_flow_path_from_t_equal_1(solver, order, steps):
    problem = _FlowProblem(GM, FlowMatchingSDE(), t_start=1.0, t_end=0.05)
    res = measure_order(solver, problem, steps=steps, n_paths=16)
    # measured: Euler 0.991, DPM-Solver++(2M) 2.057, Heun 1.93
    assert abs(res.slope - order) < 0.15 and res.r2 > 0.99, str(res)


@pytest.mark.parametrize(
    "kw",
    [
        dict(solver="ddim", noise_scale=1.0, steps=100),
        dict(solver="ancestral", steps=100),
        dict(solver="euler_maruyama", noise_scale=0.5, steps=200, t_max=0.99),
    ],
    ids=["ddim_1", "ancestral", "euler_maruyama_0.5"],
)
def test_stochastic_sampling_matches_exact_marginals(kw):
    """Energy test, n = m = 1000, false-failure rate 1e-3 per case."""
    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    n, t_min = 1000, 1e-3
    kw = dict(kw)
    if "t_max" in kw:  # start from exact samples of p_{t_max} (the prior N(0, t_max²) is exact only at t = 1)
        kw["x_T"] = pm.sample(n, kw["t_max"], seed=5)
        kw["times"] = make_grid("uniform", sde, kw.pop("steps"), t_max=kw.pop("t_max"), t_min=t_min)
        shape = None
    else:
        kw["t_min"], shape = t_min, (n, 2)
    x = reverse_sample(sde, from_flow(pm.flow_velocity, sde), shape, seed=7, dtype=F64, progress=False, **kw)
    res = energy_test(x, pm.sample(n, t_min, seed=123), generator=_gen(0))
    assert res.passed, res


@pytest.mark.parametrize("sde", [FlowMatchingSDE(), CosineInterpolantSDE()], ids=["rf", "cosine"])
def test_exact_trace_likelihood_matches_analytic_density(sde):
    pm = GM.perturbed(sde)
    x = GM.sample(32, generator=_gen(7))
    t_min = 1e-5
    ll, info = log_likelihood(sde, from_flow(pm.flow_velocity, sde), x, rtol=1e-8, atol=1e-8, t_min=t_min,
                              return_info=True)
    per_dim = (ll - pm.log_prob(x, t_min)).abs() / 2
    assert float(per_dim.max()) < 1e-4, float(per_dim.max())  # measured ~3e-9
    # the latent is at t = 1, where the prior N(0, I) is exact
    torch.testing.assert_close(info.prior_logp, pm.log_prob(info.latent, 1.0), rtol=1e-12, atol=1e-12)


def test_hutchinson_likelihood_is_unbiased():
    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    model = from_flow(pm.flow_velocity, sde)
    x = GM.sample(1, generator=_gen(8))
    exact = log_likelihood(sde, model, x, rtol=1e-6, atol=1e-6)
    n = 256
    est = log_likelihood(sde, model, x.expand(n, 2).contiguous(), trace="hutchinson", seed=3, rtol=1e-6, atol=1e-6)
    se = est.std() / math.sqrt(n)
    assert (est.mean() - exact).abs() < 5 * se, (float(est.mean() - exact), float(se))


def test_likelihood_agrees_with_meta_flow_matching():
    """Meta's ODESolver.compute_likelihood on the same random network (its time runs the other way: noise at 0)."""
    solver_mod = pytest.importorskip("flow_matching.solver")
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))

        def forward(self, x, t):
            return self.f(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)], 1))

    net = Net().double()

    class MetaVelocity(nn.Module):  # Meta's time τ = 1 − t, x(τ = 0) noise: u = dx/dτ = −v(x, 1 − τ)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, **extras):
            return -self.net(x, (1.0 - t).expand(x.shape[0]))

    def log_p0(z):
        return -0.5 * (z**2).sum(1) - z.shape[1] * 0.5 * math.log(2 * math.pi)

    x = torch.randn(16, 2, dtype=F64, generator=_gen(9))
    _, ll_meta = solver_mod.ODESolver(MetaVelocity()).compute_likelihood(
        x, log_p0, step_size=None, method="dopri5", atol=1e-10, rtol=1e-10,
        time_grid=torch.tensor([1.0, 0.0], dtype=F64), exact_divergence=True,
    )
    sde = FlowMatchingSDE()
    ll = log_likelihood(sde, from_flow(net, sde), x, t_min=1e-10, rtol=1e-10, atol=1e-10)
    assert float((ll - ll_meta).abs().max()) < 1e-7  # measured 2e-9 nats


# -- training ------------------------------------------------------------------------------------------------
def _per_sample_gradients(sde, v, features, x0, seed, **kw):
    """Per-sample ``∂ loss_i / ∂θ_k`` at θ = 0 for the model ``v + Σ θ_k φ_k`` (central differences of a quadratic)."""
    grads = []
    for phi in features:
        def plus(x, t, phi=phi):
            return v(x, t) + phi(x, t)

        def minus(x, t, phi=phi):
            return v(x, t) - phi(x, t)

        lp = flow_matching_loss(sde, plus, x0, generator=_gen(seed), reduce="none", **kw)
        lm = flow_matching_loss(sde, minus, x0, generator=_gen(seed), reduce="none", **kw)
        grads.append((lp - lm) / 2)  # exact for a quadratic in θ (δ = 1)
    return grads


FEATURES = [
    lambda x, t: torch.stack([t, 0 * t], 1).to(x.dtype),
    lambda x, t: x * t[:, None].to(x.dtype),
    lambda x, t: torch.sin(2 * x).flip(1),
    lambda x, t: x**2 * (1 - t[:, None].to(x.dtype)),
]


@pytest.mark.parametrize("sde", [FlowMatchingSDE(), CosineInterpolantSDE()], ids=["rf", "cosine"])
@pytest.mark.parametrize("kw", [dict(), dict(time_sampling="logit_normal", shift=3.0)], ids=["uniform", "lognorm"])
def test_flow_matching_loss_is_minimised_by_the_exact_velocity(sde, kw):
    """Stationarity: E[2⟨v* − (α̇ x0 + σ̇ z), φ⟩] = 0 for every φ iff v* = E[α̇ x0 + σ̇ z | x_t] (5 SE: ~6e-7 each)."""
    pm = GM.perturbed(sde)
    n = 20000
    x0 = GM.sample(n, generator=_gen(10))
    for g in _per_sample_gradients(sde, pm.flow_velocity, FEATURES, x0, 11, **kw):
        se = g.std() / math.sqrt(n)
        assert abs(g.mean()) < 5 * se, (float(g.mean()), float(se))
    # Salimans–Ho's velocity is not the minimiser: its gradient along φ = its own error is far from zero
    def err(x, t):
        return pm.velocity(x, t) - pm.flow_velocity(x, t)

    (g,) = _per_sample_gradients(sde, pm.velocity, [err], x0, 11, **kw)
    assert g.mean() > 20 * g.std() / math.sqrt(n)


def test_flow_matching_loss_is_dsm_flow_reweighted_and_time_sampling():
    sde = FlowMatchingSDE()
    pm = GM.perturbed(sde)
    n = 4096
    x0 = GM.sample(n, generator=_gen(12))
    t = torch.rand(n, dtype=F64, generator=_gen(13)) * 0.98 + 0.01
    fm = flow_matching_loss(sde, pm.flow_velocity, x0, t=t, generator=_gen(14), reduce="none")
    dsm = dsm_loss(sde, from_flow(pm.flow_velocity, sde), x0, t=t, generator=_gen(14), reduce="none")
    m = sde.marginal(t)[0]
    torch.testing.assert_close(dsm, fm * m**2, rtol=1e-10, atol=1e-12)  # FM: m ṡ − ṁ s = 1, weight m²
    # and the "flow" row of dsm_loss is the same J as the ε row (exact oracle)
    eps = dsm_loss(sde, pm.epsilon, x0, t=t, generator=_gen(14), reduce="none")
    torch.testing.assert_close(dsm, eps, rtol=1e-8, atol=1e-10)

    seen = []

    def record(x, tt):
        seen.append(tt.clone())
        return torch.zeros_like(x)

    flow_matching_loss(sde, record, x0, time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8,
                       generator=_gen(15))
    logit = torch.logit(seen[-1])
    assert abs(float(logit.mean()) - 0.5) < 5 * 0.8 / math.sqrt(n)
    assert abs(float(logit.std()) - 0.8) < 5 * 0.8 / math.sqrt(2 * n)
    flow_matching_loss(sde, record, x0, generator=_gen(16))
    flow_matching_loss(sde, record, x0, generator=_gen(16), shift=3.0)
    torch.testing.assert_close(seen[-1], shift_time(seen[-2], 3.0), rtol=1e-12, atol=1e-12)
    assert float(seen[-2].min()) >= 0.0 and float(seen[-2].max()) <= 1.0  # t ~ U(0, 1) by default

    with pytest.raises(ValueError, match="time_sampling"):
        flow_matching_loss(sde, record, x0, time_sampling="beta")
    with pytest.raises(ValueError, match="from_flow"):
        flow_matching_loss(sde, from_velocity(record, sde), x0)
    with pytest.raises(ValueError, match="logit_std"):
        flow_matching_loss(sde, record, x0, time_sampling="logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="returned"):
        flow_matching_loss(sde, lambda x, tt: x[:, :1], x0)


def test_flow_matching_loss_trains_a_flow_model():
    """The object trained is the object sampled: a FlowModel's prediction goes through its time_input."""
    sde = FlowMatchingSDE()
    lin = torch.nn.Linear(3, 2).double()
    model = from_flow(lambda x, t: lin(torch.cat([x, t[:, None]], 1)), sde, time_input=lambda t: 1000 * t)
    loss = flow_matching_loss(sde, model, GM.sample(64, generator=_gen(17)), generator=_gen(18))
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(loss)


# -- time shifts -----------------------------------------------------------------------------------------
def test_shift_grids():
    sde = FlowMatchingSDE()
    u = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(shift_time(u, 3.0), 3 * u / (1 + 2 * u), rtol=0, atol=1e-15)
    # the σ-ratio definition agrees with SD3's formula on any path expressed through σ = s/m
    torch.testing.assert_close(shift_time(u[1:-1], 3.0, sde), 3 * u[1:-1] / (1 + 2 * u[1:-1]), rtol=1e-12, atol=0)
    # Flux: linspace(1, 1/n, n) shifted with mu; the grid ends at t_min = shift(1/n)
    n, mu = 10, dynamic_shift(1024)
    assert mu == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)
    base = torch.linspace(1.0, 1.0 / n, n, dtype=F64)
    want = shift_time(base, math.exp(mu))
    grid = make_grid("shift", sde, n - 1, mu=mu, t_min=float(want[-1]))
    torch.testing.assert_close(grid, want, rtol=0, atol=1e-14)
    assert float(grid[0]) == 1.0
    grid3 = make_grid("shift", sde, 6, shift=3.0)
    assert float(grid3[0]) == 1.0 and float(grid3[-1]) == sde.t_min and (grid3.diff() < 0).all()
    # another path: the same σ-scaling, ends pinned
    c = CosineInterpolantSDE()
    g = make_grid("shift", c, 5, shift=2.0)
    torch.testing.assert_close(c.sigma(g[1:-1]), 2.0 * c.sigma(shift_time(g[1:-1], 0.5, c)), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="needs shift"):
        make_grid("shift", sde, 5)
    with pytest.raises(ValueError, match="not both"):
        make_grid("shift", sde, 5, shift=2.0, mu=1.0)
    with pytest.raises(ValueError, match="apply to grid='shift'"):
        make_grid("uniform", sde, 5, shift=2.0)
    with pytest.raises(ValueError, match="shift must be"):
        make_grid("shift", sde, 5, shift=-1.0)


@pytest.mark.parametrize("kind", ["log_snr", "edm"])
def test_noise_level_grids_from_t_equal_1(kind):
    """σ(1) = ∞: the first step goes to the uniform grid's second point, the rest is the usual spacing."""
    sde = FlowMatchingSDE()
    g = make_grid(kind, sde, 10)
    assert g.shape == (11,) and float(g[0]) == 1.0 and float(g[-1]) == sde.t_min and torch.isfinite(g).all()
    torch.testing.assert_close(g[1:], make_grid(kind, sde, 9, t_max=1.0 - (1.0 - sde.t_min) / 10), rtol=0, atol=0)
    assert make_grid(kind, sde, 1).tolist() == [1.0, sde.t_min]
    x = reverse_sample(sde, from_flow(GM.perturbed(sde).flow_velocity, sde), (16, 2), solver="dpmpp_2m", grid=kind,
                       steps=10, seed=0, dtype=F64, progress=False)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("solver, lam", [("euler_maruyama", 0.0), ("heun", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_no_host_device_sync_inside_the_loop_from_t_equal_1(solver, lam):
    """The velocity-form drift and the start check add no synchronisation to the step loop (GPU-ready)."""
    from test_gpu_ready import count_syncs

    from sdegen import integrate
    from sdegen.noise import GeneratorNoise

    sde = FlowMatchingSDE()
    eq = ReverseSDE(sde, from_flow(lambda x, t: -x, sde), lam)  # a zero-cost "network"
    marks = {}

    def callback(i, t, x):
        marks[i] = len(counter.events)

    with count_syncs() as counter:
        integrate(eq, torch.randn(8, 2), make_grid("uniform", sde, 6), get_solver(solver),
                  GeneratorNoise(_gen(0)), callback=callback)
    assert counter.events[marks[0]:marks[5]] == [], counter.events
