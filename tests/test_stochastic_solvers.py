"""Annealed Langevin, predictor–corrector, DDPM ancestral and reverse-diffusion samplers.

Statistical checks use the exact Gaussian-mixture oracle. With ``n`` samples and ``n_k ≈ w_k n`` of
them in component ``k`` (the two components are > 6 std apart along ``x[0]``, so ``x[0] > 0`` assigns
them), the standard errors are: weight ``√(w(1−w)/n)``; mean ``√(Σ_ii/n_k)``; covariance entry
``√((Σ_ii Σ_jj + Σ_ij²)/n_k)`` (Gaussian fourth moments). Every check allows 5 standard errors plus a
stated discretisation allowance, so each assertion fails by chance with probability ~6e-7 and a test
of 12 such checks with probability < 1e-5.

Exact identities (DDPM step == diffusers' ``DDPMScheduler.step``, ``step_size`` ↔ ``snr``, batch-mate
independence) are checked to rounding.
"""

import math

import pytest
import torch

from sdegen import SDE, VESDE, VPSDE, ReverseSDE, get_solver, reverse_sample
from sdegen.noise import GeneratorNoise
from sdegen.testing.mixture import GaussianMixture

GM = GaussianMixture(
    [0.3, 0.7],
    [[-2.0, 0.0], [2.0, 1.0]],
    [[[0.30, 0.10], [0.10, 0.20]], [[0.25, -0.05], [-0.05, 0.40]]],
)
F64 = dict(dtype=torch.float64)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_recovers(x, *, bias_w=0.0, bias_mu=0.0, bias_cov=0.0, z=5.0):
    """Weights, means and covariances of GM within ``z`` standard errors plus the stated allowances."""
    n = x.shape[0]
    assert torch.isfinite(x).all()
    comp = (x[:, 0] > 0).long()
    for k in range(2):
        xk = x[comp == k]
        nk = xk.shape[0]
        wk, S = float(GM.weights[k]), GM.covariances[k]
        w = nk / n
        assert abs(w - wk) < z * math.sqrt(wk * (1 - wk) / n) + bias_w, f"weight {k}: {w:.4f} vs {wk}"
        dg = torch.diagonal(S)
        se_mu = torch.sqrt(dg / nk)
        assert torch.all((xk.mean(0) - GM.means[k]).abs() < z * se_mu + bias_mu), f"mean {k}: {xk.mean(0)}"
        se_cov = torch.sqrt((dg[:, None] * dg[None, :] + S**2) / nk)
        cov = torch.cov(xk.T)
        assert torch.all((cov - S).abs() < z * se_cov + bias_cov), f"cov {k}: {cov} vs {S}"


# --------------------------------------------------------------------------------------------------
# recovering the mixture with the exact score
# --------------------------------------------------------------------------------------------------
def test_langevin_recovers_mixture_ve():
    # NCSN-style: geometric noise levels 10 -> 0.01 (VE with s = σ), 40 levels x 20 Langevin steps.
    # The annealed chain lags behind the shrinking target (relative error ~ Δlog σ² / (2 snr² n) per
    # level); at snr = 0.3 the measured lag is < 0.03 in covariance entries: allowance 0.03.
    sde = VESDE(0.01, 10.0, marginal_std="sigma")
    sol = reverse_sample(
        sde, GM.perturbed(sde).score, (4000, 2), solver="langevin", steps=40, n_steps_each=20, snr=0.3,
        generator=_gen(0), return_info=True, **F64,
    )
    assert sol.nfe == 40 * 20
    assert_recovers(sol.x, bias_w=0.01, bias_cov=0.03)


@pytest.mark.parametrize(
    "sde, predictor",
    [(VESDE(0.01, 50.0), "reverse_diffusion"), (VPSDE(), "euler_maruyama"), (VPSDE(), "ancestral")],
    ids=["ve-reverse_diffusion", "vp-euler_maruyama", "vp-ancestral"],
)
def test_pc_recovers_mixture(sde, predictor):
    # 100 steps: first-order weak bias O(1/100) allowed in every moment (measured < 2 SE)
    sol = reverse_sample(
        sde, GM.perturbed(sde).score, (4000, 2), solver="pc", predictor=predictor, steps=100,
        generator=_gen(1), return_info=True, **F64,
    )
    assert sol.nfe == 100 * 2  # predictor + one corrector per step
    assert_recovers(sol.x, bias_w=0.01, bias_mu=0.02, bias_cov=0.03)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_recovers_mixture_vp(variance):
    sde = VPSDE()
    sol = reverse_sample(
        sde, GM.perturbed(sde).score, (4000, 2), solver="ancestral", variance=variance, steps=100,
        generator=_gen(2), return_info=True, **F64,
    )
    assert sol.nfe == 100
    assert_recovers(sol.x, bias_w=0.01, bias_mu=0.02, bias_cov=0.03)


def test_reverse_diffusion_recovers_mixture_ve():
    sde = VESDE(0.01, 50.0)
    x = reverse_sample(sde, GM.perturbed(sde).score, (4000, 2), solver="reverse_diffusion", steps=200,
                       generator=_gen(3), **F64)
    assert_recovers(x, bias_w=0.01, bias_mu=0.02, bias_cov=0.03)


# --------------------------------------------------------------------------------------------------
# the corrector helps where the predictor is biased
# --------------------------------------------------------------------------------------------------
def _second_moment_error(x):
    """‖mean − μ‖ + ‖Cov − C‖_F against the exact mixture, and a bound on its Monte-Carlo noise.

    The noise term ``e`` obeys ``|measured − true| ≤ ‖noise‖``; its rms is ``√(Σ SE²)`` over the 2 mean
    and 4 covariance entries, each SE estimated from the samples.
    """
    n = x.shape[0]
    mu, c = GM.mean(), GM.covariance()
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    err = float((x.mean(0) - mu).norm() + (torch.cov(x.T) - c).norm())
    rms = math.sqrt(float(x.var(0).sum() / n) + float(prods.reshape(n, -1).var(0).sum() / n))
    return err, rms


def test_pc_corrector_at_least_as_accurate_as_predictor_alone():
    # VE, reverse-diffusion predictor on a coarse 20-step grid: the predictor alone is visibly biased
    # (error ~0.7 against a Monte-Carlo noise rms ~0.05 at n = 10000). Each comparison allows 5 rms of
    # noise on each side (the noise norm exceeds 5 rms with probability < 1e-4 for 6 entries).
    sde = VESDE(0.01, 50.0)
    score = GM.perturbed(sde).score

    def run(nc, snr, seed):
        x = reverse_sample(sde, score, (10000, 2), solver="pc", predictor="reverse_diffusion", n_corrector=nc,
                           snr=snr, steps=20, generator=_gen(seed), **F64)
        return _second_moment_error(x)

    e0, r0 = run(0, 0.16, 10)
    e1, r1 = run(1, 0.16, 11)
    e3, r3 = run(3, 0.3, 12)
    assert e0 > 10 * r0, "the coarse predictor should be visibly biased"
    assert e1 <= e0 + 5 * (r0 + r1), f"default PC ({e1:.3f}) worse than the predictor alone ({e0:.3f})"
    assert e3 + 5 * r3 < e0 - 5 * r0, f"3 correctors at snr 0.3 ({e3:.3f}) do not improve on {e0:.3f}"


# --------------------------------------------------------------------------------------------------
# the PC step size: per sample, batch independent, stable in 2-D, ≈ score_sde's in high dimension
# --------------------------------------------------------------------------------------------------
def test_pc_sample_independent_of_batch_mates():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    kw = dict(solver="pc", n_corrector=2, steps=15, seed=7, **F64)
    alone = reverse_sample(sde, score, (1, 2), sample_ids=torch.tensor([5]), **kw)
    ids = torch.tensor([0, 1, 5, 9, 2, 3])
    batch = reverse_sample(sde, score, (6, 2), sample_ids=ids, **kw)
    other = reverse_sample(sde, score, (3, 2), sample_ids=torch.tensor([100, 5, 200]), **kw)
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(other[1:2], alone, rtol=0, atol=1e-12)


def _norm_ratios(pm, sde, t, n, d, gen):
    """score_sde's step factors ``(‖z‖/‖∇log p_t‖)² / s²`` on exact samples: batch-averaged and per sample."""
    x = pm.sample(n, t, generator=gen)
    sc = pm.score(x, torch.full((n,), t, dtype=torch.float64))
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    s2 = float(sde.marginal(torch.tensor(t, dtype=torch.float64))[1]) ** 2
    batch = float((z.norm(dim=1).mean() / sc.norm(dim=1).mean()) ** 2) / s2
    per_sample = (z.norm(dim=1) / sc.norm(dim=1)) ** 2 / s2
    return batch, per_sample


def test_pc_step_matches_score_sde_in_high_dimension():
    # d = 64, data concentrated relative to s (component variance 1e-3): score_sde's batch-averaged
    # ratio ≈ s(t) at every level with s² >= 0.01, so δ = 2 (snr s)² is its high-dimensional limit.
    # At all levels it is >= ours (Fisher-information bound E‖score‖² <= d/s²), up to MC noise.
    d, gen = 64, _gen(4)
    means = 2.0 * torch.randn(3, d, generator=gen, dtype=torch.float64)
    gm = GaussianMixture(torch.ones(3), means, torch.full((3,), 1e-3))
    for sde in (VESDE(0.01, 50.0), VPSDE()):
        pm = gm.perturbed(sde)
        for t in (0.02, 0.1, 0.3, 0.6, 1.0):
            batch, _ = _norm_ratios(pm, sde, t, 400, d, gen)
            s2 = float(sde.marginal(torch.tensor(t, dtype=torch.float64))[1]) ** 2
            assert batch > 0.9, (type(sde).__name__, t, batch)
            if s2 >= 0.01:
                assert batch < 1.1, (type(sde).__name__, t, batch)


def test_pc_stable_in_2d_where_per_sample_norms_explode():
    # In 2-D the per-sample ratio (‖z‖/‖score‖)² spans orders of magnitude (‖score‖ -> 0 at a mode):
    # a per-sample score_sde step would be > 100x the noise-level step for some samples and unstable.
    sde = VESDE(0.01, 50.0)
    pm = GM.perturbed(sde)
    _, per_sample = _norm_ratios(pm, sde, 0.3, 2000, 2, _gen(5))
    assert per_sample.max() > 100 * per_sample.median()
    # the noise-level step: many strong corrector steps stay finite and accurate
    x = reverse_sample(sde, pm.score, (3000, 2), solver="pc", predictor="reverse_diffusion", n_corrector=5,
                       snr=0.3, steps=60, generator=_gen(6), **F64)
    assert_recovers(x, bias_w=0.01, bias_mu=0.02, bias_cov=0.03)


def test_pc_high_dimensional_mixture_moments():
    # d = 32, two isotropic components (variance 0.05) at ±1: per-component means and the average
    # per-dimension variance; SE of the average variance over d dims is var·√(2/(n_k d)).
    d, n = 32, 2000
    mu = torch.ones(d, dtype=torch.float64)
    gm = GaussianMixture([0.4, 0.6], torch.stack([-mu, mu]), torch.tensor([0.05, 0.05]))
    sde = VPSDE()
    x = reverse_sample(sde, gm.perturbed(sde).score, (n, d), solver="pc", steps=100, generator=_gen(7), **F64)
    assert torch.isfinite(x).all()
    comp = (x.mean(1) > 0).long()
    w1 = float(comp.double().mean())
    assert abs(w1 - 0.6) < 5 * math.sqrt(0.24 / n) + 0.01
    for k, sign in ((0, -1.0), (1, 1.0)):
        xk = x[comp == k]
        nk = xk.shape[0]
        # mean of all coordinates: SE √(0.05/(n_k d)); allowance 0.02 for the 100-step weak bias
        assert abs(float(xk.mean()) - sign) < 5 * math.sqrt(0.05 / (nk * d)) + 0.02
        var = float(xk.var(0).mean())
        assert abs(var - 0.05) < 5 * 0.05 * math.sqrt(2 / (nk * d)) + 0.005, var


# --------------------------------------------------------------------------------------------------
# exact identities
# --------------------------------------------------------------------------------------------------
def test_langevin_step_size_and_snr_are_the_same_rule():
    # δ_i = ε σ_i²/(2 σ_L²) = 2 (r σ_i)²  <=>  ε = 4 r² σ_L²
    sde = VESDE(0.01, 10.0, marginal_std="sigma")
    score = GM.perturbed(sde).score
    times = torch.linspace(1.0, 0.05, 6, dtype=torch.float64)
    sigma_l = float(sde.marginal(times[-1])[1])
    r = 0.2
    kw = dict(solver="langevin", times=times, n_steps_each=3, seed=1, **F64)
    a = reverse_sample(sde, score, (16, 2), snr=r, **kw)
    b = reverse_sample(sde, score, (16, 2), step_size=4 * r**2 * sigma_l**2, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _vp_times_for_alphas_cumprod(sde, abar):
    """Continuous VP times where m(t)² equals the given ᾱ (a discrete schedule mapped onto VP)."""
    return sde.t_from_sigma(torch.sqrt((1 - abar) / abar))


@pytest.mark.parametrize("variance, variance_type", [("beta", "fixed_large"), ("posterior", "fixed_small")])
def test_ancestral_step_equals_diffusers_ddpm(variance, variance_type):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=False)
    sde = VPSDE()
    i = 500
    abar = sched.alphas_cumprod.to(torch.float64)[[i, i - 1]]
    t, t_next = _vp_times_for_alphas_cumprod(sde, abar)
    torch.testing.assert_close(sde.marginal(t)[0] ** 2, abar[0], rtol=1e-12, atol=0)

    def eps_model(x):
        return torch.tanh(x) + 0.1 * x

    x = torch.randn(8, 3, generator=_gen(8), dtype=torch.float64)
    s_t = float(sde.marginal(t)[1])
    eq = ReverseSDE(sde, lambda y, tt: -eps_model(y) / s_t)
    solver = get_solver("ancestral", variance=variance)
    times = torch.stack([t, t_next, t_next / 2])  # t_next is not the last grid point: noise is added
    state = solver.init_state(eq, x, times)
    ours, _ = solver.step(eq, x, t, t_next, GeneratorNoise(_gen(9)), state)
    ref = sched.step(eps_model(x), i, x, generator=_gen(9)).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_ancestral_posterior_variance_is_ddim_eta_one():
    # the DDPM posterior q(x_t' | x_t, x̂0) is DDIM's η = 1 step: the same map, to rounding
    sde = VPSDE()
    score = GM.perturbed(sde).score
    kw = dict(steps=10, grid="uniform", seed=1, final_step="noiseless", dtype=torch.float64, noise_scale=1.0)
    a = reverse_sample(sde, score, (16, 2), solver="ancestral", variance="posterior", **kw)
    b = reverse_sample(sde, score, (16, 2), solver="ddim", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ancestral_final_step_follows_the_integrator_option():
    """The last step is noise-free exactly when final_step='noiseless' (DDPM Alg. 2's z = 0 at t = 1)."""
    sde = VPSDE()
    score = GM.perturbed(sde).score
    x_T = torch.randn(5, 2, generator=_gen(0), dtype=torch.float64)
    times = torch.tensor([1.0, 0.01], dtype=torch.float64)  # one step: the last one
    run = lambda seed, final: reverse_sample(
        sde, score, x_T=x_T, times=times, solver="ancestral", final_step=final, generator=_gen(seed)
    )
    torch.testing.assert_close(run(1, "noiseless"), run(2, "noiseless"), rtol=0, atol=0)
    assert not torch.allclose(run(1, "none"), run(2, "none"))


def test_reverse_diffusion_matches_score_sde_formulas():
    x = torch.randn(6, 2, generator=_gen(0), dtype=torch.float64)
    t, tn = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.55, dtype=torch.float64)
    z = torch.randn(6, 2, generator=_gen(1), dtype=torch.float64)
    # VE: x + (σ_t² − σ_t'²) s + √(σ_t² − σ_t'²) z
    ve = VESDE(0.01, 50.0)
    eq = ReverseSDE(ve, GM.perturbed(ve).score)
    out, _ = get_solver("reverse_diffusion").step(eq, x, t, tn, GeneratorNoise(_gen(1)), None)
    d2 = ve.sigma_t(t) ** 2 - ve.sigma_t(tn) ** 2
    torch.testing.assert_close(out, x + d2 * eq.score(x, t) + d2.sqrt() * z, rtol=1e-12, atol=1e-12)
    # VP: (2 − √(1−β)) x + β s + √β z with β = 1 − m(t)²/m(t')²
    vp = VPSDE()
    eq = ReverseSDE(vp, GM.perturbed(vp).score)
    out, _ = get_solver("reverse_diffusion").step(eq, x, t, tn, GeneratorNoise(_gen(1)), None)
    beta = 1 - (vp.marginal(t)[0] / vp.marginal(tn)[0]) ** 2
    ref = (2 - torch.sqrt(1 - beta)) * x + beta * eq.score(x, t) + beta.sqrt() * z
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_reverse_diffusion_is_euler_maruyama_without_a_kernel():
    sde = SDE(lambda x, t: -x, lambda x, t: torch.ones_like(t), t_min=1e-3)
    x_T = torch.randn(8, 2, generator=_gen(0), dtype=torch.float64)
    kw = dict(x_T=x_T, steps=10, seed=3)
    a = reverse_sample(sde, lambda x, t: -x, solver="reverse_diffusion", **kw)
    b = reverse_sample(sde, lambda x, t: -x, solver="euler_maruyama", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# NFE, dtypes, bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "solver, opts, per_step",
    [
        ("langevin", dict(n_steps_each=3), 3),
        ("pc", dict(), 2),
        ("pc", dict(predictor="heun", n_corrector=2), 4),
        ("pc", dict(n_corrector=0), 1),
        ("ancestral", dict(), 1),
        ("reverse_diffusion", dict(), 1),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nfe_and_dtype(solver, opts, per_step, dtype):
    sde = VPSDE()
    calls = []

    def score(x, t):
        calls.append(1)
        assert x.dtype == dtype
        return GM.perturbed(sde).score(x, t)

    sol = reverse_sample(sde, score, (32, 2), solver=solver, steps=7, generator=_gen(0), dtype=dtype,
                         return_info=True, **opts)
    assert sol.nfe == len(calls) == 7 * per_step
    assert get_solver(solver, **opts).nfe_per_step == per_step
    assert sol.x.dtype == dtype and torch.isfinite(sol.x).all()


def test_per_sample_noise_is_reproducible():
    sde = VESDE(0.01, 50.0)
    score = GM.perturbed(sde).score
    for solver in ("langevin", "pc", "ancestral", "reverse_diffusion"):
        kw = dict(solver=solver, steps=5, seed=11, **F64)
        if solver == "langevin":
            kw["n_steps_each"] = 2
        a = reverse_sample(sde, score, (8, 2), **kw)
        b = reverse_sample(sde, score, (8, 2), **kw)
        assert torch.equal(a, b), solver


@pytest.mark.parametrize(
    "solver, opts, match",
    [
        ("pc", dict(snr=0.0), "snr"),
        ("pc", dict(snr=-1.0), "snr"),
        ("pc", dict(n_corrector=-1), "n_corrector"),
        ("pc", dict(predictor="no_such_solver"), "predictor"),
        ("pc", dict(predictor="pc"), "predictor"),
        ("langevin", dict(n_steps_each=0), "n_steps_each"),
        ("langevin", dict(snr=0.1, step_size=1e-5), "step_size"),
        ("langevin", dict(step_size=-1.0), "step_size"),
        ("ancestral", dict(variance="large"), "variance"),
    ],
)
def test_bad_options(solver, opts, match):
    with pytest.raises(ValueError, match=match):
        get_solver(solver, **opts)


def test_pc_rejects_a_path_solver_predictor():
    with pytest.raises(ValueError, match="fixed-step"):
        get_solver("pc", predictor="torchdiffeq:dopri5")


@pytest.mark.parametrize("solver", ["langevin", "pc", "ancestral"])
def test_bad_equations(solver):
    vp = VPSDE()
    score = GM.perturbed(vp).score
    with pytest.raises(ValueError, match="noise_scale"):
        reverse_sample(vp, score, (4, 2), solver=solver, steps=3, noise_scale=0.0)
    generic = SDE(lambda x, t: -x, lambda x, t: torch.ones_like(t))
    with pytest.raises(ValueError, match="affine"):
        reverse_sample(generic, score, x_T=torch.zeros(4, 2), solver=solver, steps=3)


def test_ancestral_needs_the_reverse_sde():
    vp = VPSDE()
    with pytest.raises(ValueError, match="noise_scale=1"):
        reverse_sample(vp, GM.perturbed(vp).score, (4, 2), solver="ancestral", steps=3, noise_scale=0.5)
