"""Adaptive embedded Runge–Kutta (rk45 = Dormand–Prince, tsit5, bosh3) with per-sample error control.

What is proved here:
* the tableaux and the dense-output coefficients are the published ones (Dormand–Prince identical to
  SciPy's; Tsit5 agrees with torchode's, Bogacki–Shampine with torchdiffeq's solutions);
* on a linear ODE with a closed-form solution the global error tracks the tolerance: the fitted
  log-log slope of error against ``rtol`` lies in [0.8, 1.2] (theory: 1 for error-per-step control
  with local extrapolation; Hairer et al., II.4), at every dense-output time, in both directions;
* with the exact Gaussian-mixture score, probability-flow solutions agree with torchdiffeq's dopri5
  and SciPy's RK45 at tight tolerance;
* batch invariance: a sample gets the same answer (and the same steps) alone as in any batch;
* one hard sample does not slow down the others;
* the function is never evaluated outside ``[t_min, T]``; bounded work; clear errors.
All checks are deterministic (no Monte Carlo), so none fails by chance.
"""

import math

import numpy as np
import pytest
import torch

from sdegen import VESDE, VPSDE, MaxStepsExceeded, NonFiniteError, PIController, reverse_sample
from sdegen.integrate import solve_ivp
from sdegen.solvers import get_solver
from sdegen.solvers.rk45 import RK45
from sdegen.solvers.tableaux import BOSH3, DOPRI5, TSIT5
from sdegen.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture(
    [0.3, 0.7],
    [[-2.0, 0.0], [2.0, 1.0]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.40]]],
)

A_DECAY, W = 0.3, 2.0


def _rotation(y, t):
    """``y' = [[-a, -ω(t)], [ω(t), -a]] y`` with ``ω(t) = W (1 + cos(t)/2)``: a time-dependent linear ODE."""
    om = W * (1 + 0.5 * torch.cos(t))
    return torch.stack([-A_DECAY * y[:, 0] - om * y[:, 1], om * y[:, 0] - A_DECAY * y[:, 1]], 1)


def _rotation_exact(y0, t):
    """Closed form: rotation by ``θ(t) = W (t + sin(t)/2)`` and decay ``e^{-a t}``; ``(len(t), batch, 2)``."""
    th, r = W * (t + 0.5 * torch.sin(t)), torch.exp(-A_DECAY * t)
    c, s = (r * torch.cos(th))[:, None], (r * torch.sin(th))[:, None]
    return torch.stack([c * y0[:, 0] - s * y0[:, 1], s * y0[:, 0] + c * y0[:, 1]], -1)


Y0 = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]], dtype=F64)


def solve_ivp_per_sample(func, y0, times, *, solver="rk45", args=(), **options):
    """The state at every time and the solver statistics (``nfe`` added), as the old functional API."""
    sol = solve_ivp(func, y0, times, solver=solver, args=args, **options)
    return sol.trajectory, {**sol.stats, "nfe": sol.nfe}


def test_tableau_matches_scipy():
    from scipy.integrate._ivp.rk import RK45 as SciRK45

    np.testing.assert_allclose(np.array(DOPRI5.dense), SciRK45.P, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.array(DOPRI5.b_error), SciRK45.E, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.array(DOPRI5.b[:6]), SciRK45.B, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.array(DOPRI5.c[:6]), SciRK45.C, rtol=1e-15, atol=1e-15)
    for i in range(1, 6):
        np.testing.assert_allclose(np.array(DOPRI5.a[i]), SciRK45.A[i, :i], rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("tab", [DOPRI5, TSIT5, BOSH3], ids=lambda t: t.name)
def test_tableau_consistency(tab):
    """Row sums equal c, Σb = 1, Σ(b − b̂) = 0, and the continuous extension at θ = 1 is the solution."""
    for i, row in enumerate(tab.a):
        assert abs(sum(row) - tab.c[i]) < 1e-12
    assert abs(sum(tab.b) - 1) < 1e-12 and abs(sum(tab.b_error)) < 1e-12
    np.testing.assert_allclose(np.array(tab.dense).sum(1), np.array(tab.b), atol=1e-13)
    # order conditions up to the method's order for the propagated weights (bushy trees: Σ b c^k = 1/(k+1))
    c = np.array(tab.c)
    for k in range(tab.order):
        assert abs(float(np.dot(tab.b, c**k)) - 1 / (k + 1)) < 1e-12, (tab.name, k)
    # the embedded solution has exactly the lower order: it fails the condition of order error_order + 1
    bhat = np.array(tab.b) - np.array(tab.b_error)
    for k in range(tab.error_order):
        assert abs(float(np.dot(bhat, c**k)) - 1 / (k + 1)) < 1e-12, (tab.name, k)


@pytest.mark.parametrize("tab", [DOPRI5, TSIT5, BOSH3], ids=lambda t: t.name)
def test_dense_output_order(tab):
    """The continuous extension reproduces polynomials: on y' = p(t) it is exact for deg p < its order."""
    deg = {"dopri5": 3, "tsit5": 3, "bosh3": 2}[tab.name]
    h = 0.7
    ks = [np.polyval(np.arange(1, deg + 2)[::-1], ci * h) for ci in tab.c]  # k_i = p(c_i h), p = Σ (j+1) t^j
    for theta in (0.25, 0.5, 0.9):
        weights = [sum(p * theta ** (j + 1) for j, p in enumerate(row)) for row in tab.dense]
        approx = h * float(np.dot(weights, ks))
        exact = sum((theta * h) ** (j + 1) for j in range(deg + 1))  # ∫_0^{θh} p
        assert abs(approx - exact) < 1e-12, (tab.name, theta)


def test_global_error_tracks_tolerance():
    ts = torch.linspace(0.0, 6.0, 13, dtype=F64)
    exact = _rotation_exact(Y0, ts)
    rtols = [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
    errs = []
    for r in rtols:
        states, stats = solve_ivp_per_sample(_rotation, Y0, ts, rtol=r, atol=r)
        assert torch.equal(states[0], Y0)
        errs.append(float((states - exact).abs().max()))  # over every dense-output time
        assert stats["success"].all()
    slope = np.polyfit(np.log10(rtols), np.log10(errs), 1)[0]
    assert 0.8 <= slope <= 1.2, f"error ~ rtol^{slope:.3f}, errors {errs}"
    # and the error is of the order of the tolerance itself (measured: 1.6-2.4 x rtol)
    assert all(0.1 * r < e < 30 * r for r, e in zip(rtols, errs, strict=True)), errs


def test_decreasing_times_and_float32():
    ts = torch.linspace(6.0, 0.0, 7, dtype=F64)
    y_end = _rotation_exact(Y0, torch.tensor([6.0], dtype=F64))[0]
    states, _ = solve_ivp_per_sample(_rotation, y_end, ts, rtol=1e-8, atol=1e-8)
    assert (states[-1] - Y0).abs().max() < 1e-6
    assert (states - _rotation_exact(Y0, ts)).abs().max() < 1e-6
    y32 = y_end.float()
    states32, _ = solve_ivp_per_sample(_rotation, y32, ts.float(), rtol=1e-5, atol=1e-5)
    assert states32.dtype == torch.float32
    assert (states32[-1].double() - Y0).abs().max() < 1e-3


def test_pf_ode_matches_torchdiffeq_and_scipy():
    import torchdiffeq
    from scipy.integrate import solve_ivp

    sde = VPSDE()
    t_min, tol = 1e-3, 1e-10
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = reverse_sample(
        sde, GM.perturbed(sde).score, x_T=z, solver="rk45", noise_scale=0.0, t_min=t_min, rtol=tol, atol=tol
    )
    eq = sde.probability_flow(GM.perturbed(sde).score)

    # torchdiffeq dopri5, called directly; step_t stops it from stepping below t_min (where s(t)^2 < 0)
    def f_td(t, y):
        return eq.drift(y, t.expand(y.shape[0]))

    ref_td = torchdiffeq.odeint(
        f_td,
        z,
        torch.tensor([sde.T, t_min], dtype=F64),
        method="dopri5",
        rtol=tol,
        atol=tol,
        options={"step_t": torch.tensor([t_min], dtype=F64)},
    )[-1]

    def f_sp(t, y):
        x = torch.from_numpy(y).reshape(z.shape)
        return eq.drift(x, torch.full((z.shape[0],), t, dtype=F64)).reshape(-1).numpy()

    sol = solve_ivp(f_sp, (sde.T, t_min), z.reshape(-1).numpy(), method="RK45", rtol=tol, atol=tol)
    ref_sp = torch.from_numpy(sol.y[:, -1]).reshape(z.shape)
    assert (ours - ref_td).abs().max() < 1e-7
    assert (ours - ref_sp).abs().max() < 1e-7


def test_batch_invariance():
    sde = VESDE(0.01, 50.0)
    score = GM.perturbed(sde).score
    z = 50.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    eq = sde.probability_flow(score)
    times = torch.tensor([1.0, 0.3, 1e-5], dtype=F64)
    batch, stats = solve_ivp_per_sample(eq.drift, z, times, rtol=1e-6, atol=1e-6)
    for i in range(z.shape[0]):
        alone, st = solve_ivp_per_sample(eq.drift, z[i : i + 1], times, rtol=1e-6, atol=1e-6)
        assert (alone[:, 0] - batch[:, i]).abs().max() <= 1e-12
        assert int(st["accepted_steps"][0]) == int(stats["accepted_steps"][i])
    # and through reverse_sample, with a permuted batch
    perm = torch.tensor([3, 0, 4, 1, 2])
    a = reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0.0, rtol=1e-6, atol=1e-6)
    b = reverse_sample(sde, score, x_T=z[perm], solver="rk45", noise_scale=0.0, rtol=1e-6, atol=1e-6)
    assert (a[perm] - b).abs().max() <= 1e-12


def test_hard_sample_does_not_slow_down_easy_ones():
    # y' = -λ_i (y - cos t): λ = 200 forces explicit steps of ~3.3/λ (stability), λ = 1 does not.
    lam = torch.tensor([1.0, 1.5, 0.5, 1.0, 2.0, 1.0, 200.0], dtype=F64)

    def f(y, t, lam_i):
        return -lam_i[:, None] * (y - torch.cos(t)[:, None])

    y0 = torch.ones(7, 1, dtype=F64)
    times = torch.tensor([0.0, 10.0], dtype=F64)
    _, stats = solve_ivp_per_sample(f, y0, times, rtol=1e-6, atol=1e-6, args=(lam,))
    steps = stats["accepted_steps"] + stats["rejected_steps"]
    hard, easy = int(steps[-1]), steps[:-1]
    shared = hard * easy.numel()  # what one step size shared by the batch would cost the easy samples
    assert hard > 500, hard
    assert int(easy.sum()) < 0.15 * shared, (easy.tolist(), hard)
    # each easy sample takes exactly the steps it takes alone
    for i in range(6):
        _, alone = solve_ivp_per_sample(f, y0[i : i + 1], times, rtol=1e-6, atol=1e-6, args=(lam[i : i + 1],))
        assert int(alone["accepted_steps"][0]) == int(stats["accepted_steps"][i])
    # batched calls: about 6 per attempted step of the slowest sample (+2 for the initial step)
    assert stats["nfe"] == 6 * hard + 2


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 50.0)], ids=["vp", "ve"])
def test_never_evaluates_outside_interval(sde):
    pm = GM.perturbed(sde)
    seen = []

    def score(x, t):
        seen.append(t.detach().clone())
        return pm.score(x, t)

    z = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(2), dtype=F64)
    t_min = sde.t_min
    times = torch.tensor([sde.T, 0.5, 0.1, 0.01, t_min], dtype=F64)
    sol = reverse_sample(
        sde,
        score,
        x_T=z,
        solver="rk45",
        noise_scale=0.0,
        times=times,
        save_at="all",
        rtol=1e-4,
        atol=1e-4,
        return_info=True,
    )
    allt = torch.cat(seen)
    assert allt.min() >= t_min and allt.max() <= sde.T
    assert (allt == t_min).any()  # the last step lands exactly on t_min
    assert sol.trajectory.shape[1:] == (16, 2) and sol.trajectory_times.shape[1:] == (16,)  # every accepted step
    assert sol.nfe == len(seen)
    # float32 states: times float32, still inside the interval
    seen.clear()
    reverse_sample(sde, score, x_T=z.float(), solver="rk45", noise_scale=0.0, rtol=1e-4, atol=1e-4)
    allt = torch.cat(seen)
    assert allt.dtype == torch.float32
    assert allt.min() >= torch.tensor(t_min, dtype=torch.float32) and allt.max() <= sde.T


def test_dense_output_through_reverse_sample_matches_separate_solves():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    times = torch.tensor([1.0, 0.4, 1e-3], dtype=F64)
    sol = reverse_sample(
        sde,
        score,
        x_T=z,
        solver="rk45",
        noise_scale=0.0,
        times=times,
        save_at=[0.4],
        rtol=1e-9,
        atol=1e-9,
        return_info=True,
    )
    mid = reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0.0, t_max=1.0, t_min=0.4, rtol=1e-9, atol=1e-9)
    assert (sol.trajectory[0] - mid).abs().max() < 1e-7  # interpolated (4th order) vs stepped-to


def test_max_steps_raises_or_returns_partial():
    lam = torch.tensor([1.0, 300.0], dtype=F64)

    def f(y, t, lam_i):
        return -lam_i[:, None] * (y - torch.cos(t)[:, None])

    y0 = torch.ones(2, 1, dtype=F64)
    times = torch.tensor([0.0, 10.0], dtype=F64)
    with pytest.raises(MaxStepsExceeded, match=r"rk45.*max_steps=100.*sample 1 at t="):
        solve_ivp_per_sample(f, y0, times, max_steps=100, args=(lam,))
    states, stats = solve_ivp_per_sample(f, y0, times, max_steps=100, args=(lam,), return_partial=True)
    assert stats["success"].tolist() == [True, False]
    assert 0.0 < float(stats["t_reached"][1]) < 10.0 and float(stats["t_reached"][0]) == 10.0
    assert torch.isfinite(states).all()
    # through reverse_sample
    sde = VPSDE()
    z = torch.randn(3, 2, dtype=F64)
    with pytest.raises(MaxStepsExceeded, match="max_steps=3"):
        reverse_sample(sde, GM.perturbed(sde).score, x_T=z, solver="rk45", noise_scale=0.0, max_steps=3)


def test_bad_options():
    with pytest.raises(ValueError, match="rtol"):
        RK45(rtol=0.0)
    with pytest.raises(ValueError, match="rtol"):
        get_solver("rk45", rtol=-1e-3)
    with pytest.raises(ValueError, match="atol"):
        RK45(atol=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        RK45(max_steps=0)
    with pytest.raises(ValueError, match="safety"):
        RK45(safety=1.5)
    with pytest.raises(ValueError, match="first_step"):
        RK45(first_step=-0.1)
    with pytest.raises(ValueError, match="rtol"):
        reverse_sample(VPSDE(), GM.perturbed(VPSDE()).score, (2, 2), solver="rk45", noise_scale=0.0, rtol=0)
    with pytest.raises(ValueError, match="monotone"):
        solve_ivp_per_sample(_rotation, Y0, torch.tensor([0.0, 1.0, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="controller"):
        RK45(rtol=1e-3, controller=PIController())
    with pytest.raises(TypeError, match="did you mean 'rtol'"):
        get_solver("rk45", rtl=1e-3)


def test_refuses_sde():
    sde = VPSDE()
    with pytest.raises(ValueError, match="rk45.*ODEs only"):
        reverse_sample(sde, GM.perturbed(sde).score, (4, 2), solver="rk45", noise_scale=0.5)
    with pytest.raises(ValueError, match="rk45"):
        reverse_sample(sde, GM.perturbed(sde).score, (4, 2), solver="rk45", noise_scale=1.0)


def test_nonfinite_raises_naming_solver_and_time():
    def f(y, t):
        return torch.where(t[:, None] < 0.5, torch.nan, -y)

    with pytest.raises(NonFiniteError, match=r"rk45.*step \d+.*t="):
        solve_ivp_per_sample(f, Y0, torch.tensor([1.0, 0.0], dtype=F64))
    sde = VPSDE()

    def bad_score(x, t):
        return torch.full_like(x, math.nan)

    with pytest.raises(NonFiniteError, match="rk45"):
        reverse_sample(sde, bad_score, (2, 2), solver="rk45", noise_scale=0.0)


def test_per_sample_model_kwargs_follow_the_active_set():
    sde = VPSDE()
    pm = GM.perturbed(sde)

    def score(x, t, shift):  # a "conditional" model: a per-sample shift of the data
        return pm.score(x - shift * torch.exp(-0.5 * sde.integrated_beta(t))[:, None], t)

    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    shift = torch.linspace(-1.0, 3.0, 5, dtype=F64)[:, None].expand(5, 2).contiguous()
    x = reverse_sample(
        sde, score, x_T=z, solver="rk45", noise_scale=0.0, model_kwargs={"shift": shift}, rtol=1e-7, atol=1e-7
    )
    for i in (0, 4):
        xi = reverse_sample(
            sde,
            score,
            x_T=z[i : i + 1],
            solver="rk45",
            noise_scale=0.0,
            model_kwargs={"shift": shift[i : i + 1]},
            rtol=1e-7,
            atol=1e-7,
        )
        assert (xi[0] - x[i]).abs().max() <= 1e-12


def test_reverse_sample_save_at_is_exact_dense_output_for_rk45():
    """save_at times are emitted exactly by the adaptive solver and match a solve that ends there."""
    from sdegen import VPSDE, reverse_sample
    from sdegen.testing import GaussianMixture

    sde = VPSDE()
    pm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.3]).perturbed(sde)
    x_T = sde.prior_sample((6, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(solver="rk45", noise_scale=0.0, rtol=1e-9, atol=1e-9)
    sol = reverse_sample(sde, pm.score, x_T=x_T, save_at=[0.7, 0.3], return_info=True, **kw)
    assert sol.trajectory_times.tolist() == [0.7, 0.3]
    to_03 = reverse_sample(sde, pm.score, x_T=x_T, t_min=0.3, **kw)
    torch.testing.assert_close(sol.trajectory[1], to_03, rtol=1e-6, atol=1e-6)


def _pf_problem():
    sde = VPSDE()
    eq = sde.probability_flow(GM.perturbed(sde).score)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return sde, eq, z


def test_tsit5_matches_torchode():
    """Tsit5 against torchode's independent Tsit5 (per-sample steps too), rtol = atol = 1e-9, float64."""
    torchode = pytest.importorskip("torchode")
    sde, eq, z = _pf_problem()
    t_min, tol = 1e-3, 1e-9
    term = torchode.ODETerm(lambda t, y: eq.drift(y, t))
    ode_solver = torchode.AutoDiffAdjoint(
        torchode.Tsit5(term=term), torchode.IntegralController(atol=tol, rtol=tol, term=term)
    )
    problem = torchode.InitialValueProblem(
        y0=z, t_start=torch.full((6,), sde.T, dtype=F64), t_end=torch.full((6,), t_min, dtype=F64)
    )
    ref = ode_solver.solve(problem).ys[:, -1]
    ours = reverse_sample(sde, GM.perturbed(sde).score, x_T=z, solver="tsit5", t_min=t_min, rtol=tol, atol=tol)
    assert (ours - ref).abs().max() < 1e-6


def test_bosh3_matches_torchdiffeq():
    """Bogacki–Shampine 3(2) against torchdiffeq's bosh3, rtol = atol = 1e-9, float64."""
    import torchdiffeq

    sde, eq, z = _pf_problem()
    t_min, tol = 1e-3, 1e-9
    ref = torchdiffeq.odeint(
        lambda t, y: eq.drift(y, t.expand(y.shape[0])),
        z,
        torch.tensor([sde.T, t_min], dtype=F64),
        method="bosh3",
        rtol=tol,
        atol=tol,
        options={"step_t": torch.tensor([t_min], dtype=F64)},
    )[-1]
    ours = reverse_sample(
        sde, GM.perturbed(sde).score, x_T=z, solver="bosh3", t_min=t_min, rtol=tol, atol=tol, max_steps=100_000
    )
    assert (ours - ref).abs().max() < 1e-6


@pytest.mark.parametrize("solver", ["tsit5", "bosh3"])
def test_global_error_tracks_tolerance_for_every_tableau(solver):
    ts = torch.linspace(0.0, 6.0, 13, dtype=F64)
    exact = _rotation_exact(Y0, ts)
    rtols = [1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
    errs = [
        float(
            (solve_ivp_per_sample(_rotation, Y0, ts, solver=solver, rtol=r, atol=r, max_steps=50_000)[0] - exact)
            .abs()
            .max()
        )
        for r in rtols
    ]
    slope = np.polyfit(np.log10(rtols), np.log10(errs), 1)[0]
    assert 0.75 <= slope <= 1.25, f"{solver}: error ~ rtol^{slope:.3f}, errors {errs}"
    assert all(0.02 * r < e < 100 * r for r, e in zip(rtols, errs, strict=True)), errs


def test_shared_steps_give_one_step_size_for_the_batch():
    sde, eq, z = _pf_problem()
    kw = dict(solver="rk45", t_min=1e-3, rtol=1e-7, atol=1e-7, return_info=True)
    shared = reverse_sample(sde, GM.perturbed(sde).score, x_T=z, shared_steps=True, **kw)
    own = reverse_sample(sde, GM.perturbed(sde).score, x_T=z, **kw)
    steps = shared.stats["accepted_steps"]
    assert (steps == steps[0]).all() and (shared.stats["rejected_steps"] == shared.stats["rejected_steps"][0]).all()
    assert int(steps[0]) >= int(own.stats["accepted_steps"].max())  # the batch moves with its hardest sample
    assert (shared.x - own.x).abs().max() < 1e-5


def test_adaptive_save_all_returns_each_samples_accepted_steps():
    sde, eq, z = _pf_problem()
    sol = reverse_sample(
        sde,
        GM.perturbed(sde).score,
        x_T=z,
        solver="tsit5",
        t_min=1e-3,
        rtol=1e-6,
        atol=1e-6,
        save_at="all",
        return_info=True,
    )
    traj, tt = sol.trajectory, sol.trajectory_times
    n = sol.stats["accepted_steps"]
    assert traj.shape == (int(n.max()) + 1, 6, 2) and tt.shape == (int(n.max()) + 1, 6)
    assert torch.equal(traj[0], z) and (tt[0] == sde.T).all()
    for i in range(6):
        ti = tt[: int(n[i]) + 1, i]
        assert (ti[1:] < ti[:-1]).all()  # strictly decreasing over the sample's own accepted steps
        assert float(ti[-1]) == 1e-3 and torch.equal(traj[int(n[i]), i], sol.x[i])
        assert (tt[int(n[i]) :, i] == 1e-3).all() and torch.equal(traj[-1, i], sol.x[i])  # padded with the end
        # each saved state is the solution at its own time
        mid = int(n[i]) // 2
        ref = reverse_sample(
            sde, GM.perturbed(sde).score, x_T=z[i : i + 1], solver="tsit5", t_min=float(ti[mid]), rtol=1e-10, atol=1e-10
        )
        assert (ref[0] - traj[mid, i]).abs().max() < 1e-4


def test_adaptive_callback_and_progress(capsys):
    sde, eq, z = _pf_problem()
    seen = []
    reverse_sample(
        sde,
        GM.perturbed(sde).score,
        x_T=z,
        solver="rk45",
        callback=lambda i, t, x: seen.append((i, t.clone(), x.clone())),
        progress=True,
    )
    assert seen and all(t.shape == (6,) and x.shape == (6, 2) for _, t, x in seen)
    assert (seen[-1][1] == VPSDE().t_min).all()
    assert "100%" in capsys.readouterr().err
