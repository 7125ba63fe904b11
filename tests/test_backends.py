"""The torchdiffeq and torchsde backends: same problem, same answer.

* ODE: ``torchdiffeq:<method>`` on the probability-flow ODE of a Gaussian mixture agrees with SciPy's
  DOP853 at ``rtol = 1e-12`` (an independent reference) and with sdegen's own ``heun`` / ``rk45`` to
  within their stated tolerances, and never evaluates the model outside ``[t_min, T]``.
* SDE: ``torchsde:euler`` is Euler–Maruyama on another Brownian path, so with the same step size its
  samples have *the same distribution* as sdegen's ``euler_maruyama``: the two-sample differences of
  weights, means and covariances must lie within 5 standard errors of a difference (each check fails
  by chance with probability ~6e-7).
"""

import math

import pytest
import torch
from scipy.integrate import solve_ivp

from sdegen import SDE, VESDE, VPSDE, MaxStepsExceeded, get_solver, reverse_sample
from sdegen.testing.mixture import GaussianMixture

GM = GaussianMixture(
    [0.3, 0.7],
    [[-2.0, 0.0], [2.0, 1.0]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.40]]],
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _scipy_reference(sde, score, x_T, times):
    """Probability-flow ODE by SciPy DOP853 at rtol = atol = 1e-12, states at ``times``."""
    eq = sde.probability_flow(score)
    shape = x_T.shape

    def f(t, y):
        x = torch.from_numpy(y).reshape(shape)
        return eq.drift(x, torch.tensor(t, dtype=torch.float64)).reshape(-1).numpy()

    t_eval = times.numpy()
    sol = solve_ivp(f, (t_eval[0], t_eval[-1]), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12,
                    t_eval=t_eval)
    return torch.from_numpy(sol.y.T.copy()).reshape(len(t_eval), *shape)


@pytest.fixture(scope="module")
def vp_problem():
    sde = VPSDE()
    x_T = sde.prior_sample((32, 2), generator=_gen(1), dtype=torch.float64)
    times = torch.tensor([1.0, 0.5, 0.1, 0.02, 1e-3], dtype=torch.float64)
    ref = _scipy_reference(sde, GM.perturbed(sde).score, x_T, times)
    return sde, x_T, times, ref


def _recording(score, seen):
    def wrapped(x, t):
        seen.append((float(t.min()), float(t.max())))
        return score(x, t)

    return wrapped


@pytest.mark.parametrize("method, opts, tol", [
    ("dopri5", dict(rtol=1e-10, atol=1e-10), 1e-7),
    ("dopri8", dict(rtol=1e-10, atol=1e-10), 1e-7),
    ("bosh3", dict(rtol=1e-8, atol=1e-8), 1e-5),
    ("rk4", dict(step_size=2e-3), 1e-5),
])
def test_torchdiffeq_matches_scipy_at_every_output_time(vp_problem, method, opts, tol):
    sde, x_T, times, ref = vp_problem
    seen = []
    sol = reverse_sample(sde, _recording(GM.perturbed(sde).score, seen), x_T=x_T, solver=f"torchdiffeq:{method}",
                         times=times, noise_scale=0.0, save_at="all", return_info=True, **opts)
    torch.testing.assert_close(sol.trajectory, ref, rtol=0, atol=tol)
    assert sol.nfe == len(seen)
    # the model is never evaluated outside [t_min, T] (dopri5 without step_t would step below t_min)
    assert min(lo for lo, _ in seen) >= 1e-3 and max(hi for _, hi in seen) <= 1.0
    if method in ("dopri5", "dopri8", "bosh3"):
        assert (sol.stats["accepted_steps"] > 0).all() and sol.stats["rejected_steps"].shape == (x_T.shape[0],)


def test_plain_torchdiffeq_steps_past_t_min_and_the_backend_does_not():
    # Why the backend passes step_t: odeint on its own evaluates past the final time and interpolates.
    from torchdiffeq import odeint

    sde = VESDE(0.01, 50.0)
    eq = sde.probability_flow(GM.perturbed(sde).score)
    x_T = sde.prior_sample((16, 2), generator=_gen(2), dtype=torch.float64)
    t = torch.tensor([1.0, 0.05], dtype=torch.float64)
    seen = []

    def f(tt, y):
        seen.append(float(tt))
        return eq.drift(y, tt)

    odeint(f, x_T, t, rtol=1e-6, atol=1e-6, method="dopri5")
    assert min(seen) < 0.05
    seen.clear()
    reverse_sample(sde, _recording(GM.perturbed(sde).score, seen), x_T=x_T, solver="torchdiffeq:dopri5", times=t,
                   noise_scale=0.0, rtol=1e-6, atol=1e-6)
    assert min(lo for lo, _ in seen) >= 0.05


# heun: second order, measured max error 1.2e-4 at 400 uniform steps; rk45 at rtol 1e-8
@pytest.mark.parametrize(
    "solver, opts, tol", [("heun", dict(steps=400), 5e-4), ("rk45", dict(rtol=1e-8, atol=1e-8), 1e-5)]
)
def test_torchdiffeq_agrees_with_sdegen_ode_solvers(vp_problem, solver, opts, tol):
    sde, x_T, times, _ = vp_problem
    score = GM.perturbed(sde).score
    ours = reverse_sample(sde, score, x_T=x_T, solver=solver, noise_scale=0.0, **opts)
    theirs = reverse_sample(sde, score, x_T=x_T, solver="torchdiffeq:dopri5", noise_scale=0.0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)


def test_torchdiffeq_float32():
    sde = VPSDE()
    x_T = sde.prior_sample((16, 2), generator=_gen(3))
    x = reverse_sample(sde, GM.perturbed(sde).score, x_T=x_T, solver="torchdiffeq:dopri5", noise_scale=0.0)
    ref = reverse_sample(sde, GM.perturbed(sde).score, x_T=x_T.double(), solver="torchdiffeq:dopri5", noise_scale=0.0,
                         rtol=1e-9, atol=1e-9)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-3)


def test_torchdiffeq_max_steps():
    sde = VPSDE()
    with pytest.raises(MaxStepsExceeded, match="max_steps"):
        reverse_sample(sde, GM.perturbed(sde).score, (8, 2), solver="torchdiffeq:dopri5", noise_scale=0.0,
                       rtol=1e-12, atol=1e-12, max_steps=3, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# torchsde
# --------------------------------------------------------------------------------------------------
def _two_sample_check(x, y, z=5.0):
    """Weights, means, covariances of two sample sets equal within ``z`` SE of the difference."""
    n = x.shape[0]
    for k in range(2):
        wk, S = float(GM.weights[k]), GM.covariances[k]
        xk, yk = x[(x[:, 0] > 0).long() == k], y[(y[:, 0] > 0).long() == k]
        assert abs(xk.shape[0] - yk.shape[0]) / n < z * math.sqrt(2 * wk * (1 - wk) / n)
        nk = wk * n
        dg = torch.diagonal(S)
        assert torch.all((xk.mean(0) - yk.mean(0)).abs() < z * torch.sqrt(2 * dg / nk)), (xk.mean(0), yk.mean(0))
        se_cov = torch.sqrt(2 * (dg[:, None] * dg[None, :] + S**2) / nk)
        assert torch.all((torch.cov(xk.T) - torch.cov(yk.T)).abs() < z * se_cov)


def test_torchsde_euler_matches_euler_maruyama_in_distribution():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    n, steps = 4000, 100
    kw = dict(dtype=torch.float64, return_info=True)
    ours = reverse_sample(sde, score, (n, 2), solver="euler_maruyama", steps=steps, generator=_gen(4), **kw)
    theirs = reverse_sample(sde, score, (n, 2), solver="torchsde:euler", dt=(1.0 - 1e-3) / steps, generator=_gen(5),
                            **kw)
    assert theirs.nfe == steps  # torchsde's shape-check evaluation is reused by its first step
    assert torch.isfinite(theirs.x).all()
    _two_sample_check(ours.x, theirs.x)


def test_torchsde_is_deterministic_given_the_seed():
    sde = VESDE(0.01, 50.0)
    score = GM.perturbed(sde).score
    kw = dict(solver="torchsde:euler", dt=0.02, dtype=torch.float64)
    a = reverse_sample(sde, score, (16, 2), generator=_gen(6), **kw)
    b = reverse_sample(sde, score, (16, 2), generator=_gen(6), **kw)
    c = reverse_sample(sde, score, (16, 2), generator=_gen(7), **kw)
    d = reverse_sample(sde, score, (16, 2), seed=3, **kw)
    e = reverse_sample(sde, score, (16, 2), seed=3, **kw)
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["srk", "heun", "milstein"])
def test_torchsde_other_methods_run(method):
    # a sanity check of the wiring (finite, NFE counted, near the mixture); accuracy is EM's test above
    sde = VPSDE()
    calls = []
    score = _recording(GM.perturbed(sde).score, calls)
    sol = reverse_sample(sde, score, (500, 2), solver=f"torchsde:{method}", dt=0.02, generator=_gen(8),
                         dtype=torch.float32, return_info=True)
    assert sol.nfe == len(calls) > 0
    assert sol.x.dtype == torch.float32 and torch.isfinite(sol.x).all()
    w = float((sol.x[:, 0] < 0).double().mean())
    assert abs(w - 0.3) < 5 * math.sqrt(0.21 / 500) + 0.02
    assert min(lo for lo, _ in calls) >= 1e-3 - 1e-7 and max(hi for _, hi in calls) <= 1.0


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_backends_refuse_the_wrong_kind_of_equation():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    with pytest.raises(ValueError, match="SDEs only"):
        reverse_sample(sde, score, (4, 2), solver="torchsde:euler", noise_scale=0.0)
    with pytest.raises(ValueError, match="ODEs only"):
        reverse_sample(sde, score, (4, 2), solver="torchdiffeq:dopri5", noise_scale=1.0)
    multiplicative = SDE(lambda x, t: -x, lambda x, t: 0.1 * x, state_dependent=True)
    with pytest.raises(ValueError, match="Stratonovich"):
        reverse_sample(multiplicative, lambda x, t: -x, x_T=torch.ones(4, 2), solver="torchsde:heun")


@pytest.mark.parametrize("name, opts, exc, match", [
    ("torchdiffeq:nope", {}, ValueError, "unknown torchdiffeq method"),
    ("torchsde:nope", {}, ValueError, "torchsde method"),
    ("scipy:RK45", {}, ValueError, "backend"),
    ("torchdiffeq:dopri5", dict(rtol=0.0), ValueError, "rtol"),
    ("torchdiffeq:dopri5", dict(atol=-1.0), ValueError, "atol"),
    ("torchdiffeq:dopri5", dict(max_steps=0), ValueError, "max_steps"),
    ("torchsde:euler", dict(dt=0.0), ValueError, "dt"),
    ("torchdiffeq:dopri5", dict(bogus=1), TypeError, "bogus"),
    ("torchsde:euler", dict(adaptive="yes"), TypeError, "adaptive"),
])
def test_bad_backend_options(name, opts, exc, match):
    with pytest.raises(exc, match=match):
        get_solver(name, **opts)


def test_fixed_grid_torchdiffeq_needs_a_step():
    sde = VPSDE()
    with pytest.raises(ValueError, match="step_size"):
        reverse_sample(sde, GM.perturbed(sde).score, (4, 2), solver="torchdiffeq:rk4", noise_scale=0.0)
