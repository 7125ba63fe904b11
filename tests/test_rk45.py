"""Adaptive Dormand–Prince RK45 with per-sample error control.

What is proved here:
* the tableau and the dense-output coefficients are Dormand–Prince's (identical to SciPy's);
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

from sdegen import VESDE, VPSDE, MaxStepsExceeded, NonFiniteError, reverse_sample
from sdegen.solvers import get_solver
from sdegen.solvers import rk45 as rk
from sdegen.solvers.rk45 import RK45, solve_ivp_per_sample
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


def test_tableau_matches_scipy():
    from scipy.integrate._ivp.rk import RK45 as SciRK45

    np.testing.assert_allclose(np.array(rk._P), SciRK45.P, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.array(rk._E), SciRK45.E, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.array(rk._B), SciRK45.B, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(np.array(rk._C[:6]), SciRK45.C, rtol=1e-15, atol=1e-15)
    for i in range(1, 6):
        np.testing.assert_allclose(np.array(rk._A[i]), SciRK45.A[i, :i], rtol=1e-15, atol=1e-15)
    # the continuous extension at θ = 1 reproduces the 5th-order solution (Σ_j P_ij = b_i)
    np.testing.assert_allclose(np.array(rk._P).sum(1), np.array([*rk._B, 0.0]), atol=1e-14)


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
    ours = reverse_sample(sde, GM.perturbed(sde).score, x_T=z, solver="rk45", noise_scale=0.0, t_min=t_min,
                          rtol=tol, atol=tol)
    eq = sde.probability_flow(GM.perturbed(sde).score)

    # torchdiffeq dopri5, called directly; step_t stops it from stepping below t_min (where s(t)^2 < 0)
    def f_td(t, y):
        return eq.drift(y, t.expand(y.shape[0]))

    ref_td = torchdiffeq.odeint(
        f_td, z, torch.tensor([sde.T, t_min], dtype=F64), method="dopri5", rtol=tol, atol=tol,
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
        assert int(st["steps_per_sample"][0]) == int(stats["steps_per_sample"][i])
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
    steps = stats["steps_per_sample"] + stats["rejected_per_sample"]
    hard, easy = int(steps[-1]), steps[:-1]
    shared = hard * easy.numel()  # what one step size shared by the batch would cost the easy samples
    assert hard > 500, hard
    assert int(easy.sum()) < 0.15 * shared, (easy.tolist(), hard)
    # each easy sample takes exactly the steps it takes alone
    for i in range(6):
        _, alone = solve_ivp_per_sample(f, y0[i : i + 1], times, rtol=1e-6, atol=1e-6, args=(lam[i : i + 1],))
        assert int(alone["steps_per_sample"][0]) == int(stats["steps_per_sample"][i])
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
    sol = reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0.0, times=times, save_at="all",
                         rtol=1e-4, atol=1e-4, return_info=True)
    allt = torch.cat(seen)
    assert allt.min() >= t_min and allt.max() <= sde.T
    assert (allt == t_min).any()  # the last step lands exactly on t_min
    assert sol.trajectory.shape == (5, 16, 2)
    assert sol.nfe == sol.stats["nfe"] == len(seen)
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
    sol = reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0.0, times=times, save_at="all",
                         rtol=1e-9, atol=1e-9, return_info=True)
    mid = reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0.0, t_max=1.0, t_min=0.4,
                         rtol=1e-9, atol=1e-9)
    assert (sol.trajectory[1] - mid).abs().max() < 1e-7  # interpolated (4th order) vs stepped-to


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


def test_refuses_sde():
    sde = VPSDE()
    with pytest.raises(ValueError, match="rk45.*ODEs only"):
        reverse_sample(sde, GM.perturbed(sde).score, (4, 2), solver="rk45", noise_scale=0.5)
    with pytest.raises(ValueError, match="rk45"):
        reverse_sample(sde, GM.perturbed(sde).score, (4, 2), solver="rk45")  # default noise_scale=1


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
    x = reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0.0, model_kwargs={"shift": shift},
                       rtol=1e-7, atol=1e-7)
    for i in (0, 4):
        xi = reverse_sample(sde, score, x_T=z[i : i + 1], solver="rk45", noise_scale=0.0,
                            model_kwargs={"shift": shift[i : i + 1]}, rtol=1e-7, atol=1e-7)
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
