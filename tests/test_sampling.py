"""reverse_sample with the core solvers, against the exact Gaussian-mixture oracle.

Statistical tolerances: with n samples, a mixture weight has standard error sqrt(w(1-w)/n), a
component mean sqrt(var/n_k), a variance var*sqrt(2/n_k). Every check allows 5 standard errors
plus a stated discretisation allowance, so each assertion fails by chance with probability ~1e-6.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from sdegen import EDMSDE, VESDE, VPSDE, NonFiniteError, SubVPSDE, make_grid, reverse_sample
from sdegen.testing import GaussianMixture

GM = GaussianMixture(
    [0.3, 0.7],
    [[-2.0, 0.0], [2.0, 1.0]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.40]]],
)
N = 6000


def _component_stats(x):
    """Assign each sample to its most responsible component under the data mixture."""
    comp = (x[:, 0] > 0).long()  # the two components are > 6 std apart along x[0]
    out = []
    for k in range(2):
        xk = x[comp == k]
        out.append((xk.shape[0] / x.shape[0], xk.mean(0), torch.cov(xk.T)))
    return out


def _assert_recovers(x, bias=0.0):
    for k, (w, mu, cov) in enumerate(_component_stats(x)):
        wk = float(GM.weights[k])
        nk = wk * x.shape[0]
        assert abs(w - wk) < 5 * math.sqrt(wk * (1 - wk) / x.shape[0]) + bias, f"weight {k}: {w} vs {wk}"
        var = torch.diagonal(GM.covariances[k])
        assert torch.all((mu - GM.means[k]).abs() < 5 * torch.sqrt(var / nk) + bias), f"mean {k}: {mu}"
        assert torch.all((cov - GM.covariances[k]).abs() < 5 * 0.5 * math.sqrt(2 / nk) + bias), f"cov {k}: {cov}"


CASES = [
    (VPSDE(), "uniform"),
    (SubVPSDE(), "uniform"),
    (VESDE(0.01, 50.0), "edm"),
    (EDMSDE(), "edm"),
]


@pytest.mark.parametrize("sde, grid", CASES, ids=["vp", "subvp", "ve", "edm"])
@pytest.mark.parametrize("solver, noise_scale", [("euler_maruyama", 1.0), ("heun", 0.0), ("heun", 1.0)])
def test_recovers_mixture_with_exact_score(sde, grid, solver, noise_scale):
    pm = GM.perturbed(sde)
    x = reverse_sample(
        sde, pm.score, (N, 2), solver=solver, steps=250, noise_scale=noise_scale, grid=grid,
        generator=torch.Generator().manual_seed(0), dtype=torch.float64,
    )
    assert x.shape == (N, 2) and x.dtype == torch.float64
    # discretisation allowance: EM at 250 steps has O(1/250) weak bias; t_min > 0 adds s(t_min)^2
    _assert_recovers(x, bias=0.03)


def _pf_reference(sde, score, x_T, t_min):
    """Probability-flow ODE solved by SciPy's DOP853 at rtol=1e-12 (independent reference)."""
    eq = sde.probability_flow(score)
    shape = x_T.shape

    def f(t, y):
        x = torch.from_numpy(y).reshape(shape)
        return eq.drift(x, torch.tensor(t, dtype=torch.float64)).reshape(-1).numpy()

    sol = solve_ivp(f, (sde.T, t_min), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


@pytest.mark.parametrize("solver, order", [("euler_maruyama", 1.0), ("heun", 2.0)])
def test_probability_flow_convergence_order(solver, order):
    """Global error vs step count on log-log axes: slope within 0.25 of the declared order."""
    sde = VPSDE()
    pm = GM.perturbed(sde)
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t_min = 0.05  # keep the problem smooth so the asymptotic regime is reached with few steps
    ref = _pf_reference(sde, pm.score, x_T, t_min)
    steps = [20, 40, 80, 160] if order == 2.0 else [100, 200, 400, 800]
    errs = []
    for n in steps:
        x = reverse_sample(sde, pm.score, x_T=x_T, solver=solver, steps=n, noise_scale=0.0, t_min=t_min)
        errs.append(float((x - ref).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, f"{solver}: measured order {slope:.3f}, errors {errs}"
    if order == 2.0:
        ratio = errs[-2] / errs[-1]
        assert 3.0 < ratio < 5.0, f"doubling the steps should divide the error by ~4, got {ratio:.2f}"


def test_determinism_and_seed_sensitivity():
    sde = VPSDE()
    pm = GM.perturbed(sde)
    run = lambda s: reverse_sample(sde, pm.score, (32, 2), steps=20, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.parametrize("solver, noise_scale", [("euler_maruyama", 1.0), ("heun", 1.0), ("heun", 0.0)])
def test_per_sample_seed_is_batch_and_chunk_invariant(solver, noise_scale):
    sde = VPSDE()
    score = lambda x, t: -x / (1 + t[:, None])  # elementwise: bitwise batch-invariant
    kw = dict(solver=solver, steps=10, noise_scale=noise_scale, seed=11)
    full = reverse_sample(sde, score, (64, 3), **kw)
    alone = reverse_sample(sde, score, (1, 3), sample_ids=torch.tensor([37]), **kw)
    assert torch.equal(alone[0], full[37])
    seven = reverse_sample(sde, score, (7, 3), sample_ids=torch.arange(30, 37), **kw)
    assert torch.equal(seven, full[30:37])
    assert torch.equal(reverse_sample(sde, score, (64, 3), max_batch=10, **kw), full)


def test_return_info_nfe_and_trajectory():
    sde = VPSDE()
    pm = GM.perturbed(sde)
    sol = reverse_sample(
        sde, pm.score, (8, 2), solver="heun", steps=10, noise_scale=0.0, save_at="all", return_info=True
    )
    assert sol.nfe == 20
    assert sol.trajectory.shape == (11, 8, 2)
    assert torch.equal(sol.trajectory[-1], sol.x)
    torch.testing.assert_close(sol.trajectory_times, sol.times)
    sol = reverse_sample(sde, pm.score, (8, 2), steps=10, grid="uniform", save_at=[1.0, 0.5], return_info=True)
    assert sol.trajectory.shape == (2, 8, 2) and sol.nfe == 10
    torch.testing.assert_close(sol.trajectory_times, sol.times[[0, 5]])  # snapped to the nearest grid points
    sol = reverse_sample(sde, pm.score, (8, 2), steps=10, final_step="tweedie", return_info=True)
    assert sol.nfe == 11


def test_final_steps():
    sde = VPSDE()
    pm = GM.perturbed(sde)
    g = lambda: torch.Generator().manual_seed(0)
    kw = dict(steps=100, grid="uniform", dtype=torch.float64)  # uniform: the last step is 1/100 of the interval
    a = reverse_sample(sde, pm.score, (4000, 2), final_step="none", generator=g(), **kw)
    b = reverse_sample(sde, pm.score, (4000, 2), final_step="noiseless", generator=g(), **kw)
    c = reverse_sample(sde, pm.score, (4000, 2), final_step="tweedie", generator=g(), **kw)
    # the last noise draw has std g·sqrt(h) ≈ 0.045: removing it lowers the total variance
    assert float(b.var(0).sum()) < float(a.var(0).sum())
    assert not torch.equal(a, b) and not torch.equal(a, c)
    _assert_recovers(c, bias=0.03)


def test_grids():
    sde = VPSDE()
    for kind in ("uniform", "quadratic", "edm", "log_snr"):
        t = make_grid(kind, sde, 12)
        assert t.shape == (13,) and t[0] == 1.0 and t[-1] == sde.t_min
        assert torch.all(t[1:] < t[:-1])
    edm = make_grid("edm", EDMSDE(), 18)
    i = torch.arange(19, dtype=torch.float64)
    karras = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(edm, karras)
    lam = sde.log_snr(make_grid("log_snr", sde, 10))
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10))


def test_explicit_times_and_errors():
    sde = VPSDE()
    score = lambda x, t: -x
    x = reverse_sample(sde, score, (3, 2), times=torch.tensor([1.0, 0.5, 0.01]))
    assert x.shape == (3, 2)
    with pytest.raises(ValueError, match="decreasing"):
        reverse_sample(sde, score, (3, 2), times=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="times"):
        reverse_sample(sde, score, (3, 2), times=[2.0, 0.5])
    with pytest.raises(ValueError, match="steps"):
        reverse_sample(sde, score, (3, 2), steps=0)
    with pytest.raises(ValueError, match="noise_scale"):
        reverse_sample(sde, score, (3, 2), noise_scale=-0.1)
    with pytest.raises(ValueError, match="shape"):
        reverse_sample(sde, lambda x, t: x[:, :1], (3, 2))
    with pytest.raises(ValueError, match="shape"):
        reverse_sample(sde, score, (3,))
    with pytest.raises(ValueError, match="exactly one"):
        reverse_sample(sde, score)
    with pytest.raises(ValueError, match="dtype"):
        reverse_sample(sde, score, x_T=torch.zeros(2, 2), dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown solver"):
        reverse_sample(sde, score, (3, 2), solver="nope")
    with pytest.raises(TypeError, match="unknown option"):
        reverse_sample(sde, score, (3, 2), solver="heun", bogus=1)
    with pytest.raises(ValueError, match="t_min"):
        reverse_sample(sde, score, (3, 2), t_min=0.0)
    with pytest.raises(ValueError, match="ODEs only|additive"):
        from sdegen import SDE

        sd = SDE(lambda x, t: -x, lambda x, t: 1 + x**2, state_dependent=True)
        reverse_sample(sd, score, x_T=torch.zeros(2, 2), solver="heun")


def test_nan_from_model_names_solver_step_and_time():
    sde = VPSDE()

    def score(x, t):
        return torch.where(t[:, None] < 0.55, torch.nan, -x)

    with pytest.raises(NonFiniteError, match=r"solver 'heun'.*score model.*step 4 of 10.*t=0\.6.*t=0\.5"):
        reverse_sample(sde, score, (4, 2), solver="heun", times=torch.linspace(1.0, 0.1, 11))


def test_float32_default_and_float64():
    sde = VESDE()
    pm = GM.perturbed(sde)
    assert reverse_sample(sde, pm.score, (4, 2), steps=5).dtype == torch.float32
    assert reverse_sample(sde, pm.score, (4, 2), steps=5, dtype=torch.float64).dtype == torch.float64
