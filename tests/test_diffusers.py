"""DiscreteVPSDE, from_diffusers and the DDIM solver, cross-checked against diffusers itself.

What is proved:
* the discrete schedule's kernel passes exactly through ``ᾱ_i`` at ``t_i = (i+1)/N`` and satisfies the
  moment ODEs ``dm/dt = a m``, ``ds²/dt = 2 a s² + g²`` (finite differences, away from the nodes);
* the ε / v / x̂0 adapters give the exact score of a Gaussian-mixture oracle dressed as a diffusers model;
* with a randomly initialised ``UNet2DModel`` in float64, the same timesteps and the same noise:
  sdegen's ``ddim`` reproduces ``DDIMScheduler`` (η = 0 and η = 0.5) and ``DDPMScheduler`` (η = 1, i.e.
  ``noise_scale=1``), and the ``ancestral`` solver reproduces ``DDPMScheduler`` ("fixed_small" with
  ``variance="posterior"``, "fixed_large" with ``"beta"``) — to 1e-11 relative (measured ~1e-15);
* ``ddim`` converges at first order to the exact marginals for every noise scale (exact moment propagation);
* ``from_diffusers`` honours the scheduler's ``clip_sample`` / ``thresholding`` settings (the model's ``x̂0`` is
  processed, its score made consistent): ``DDPMScheduler(clip_sample=True)`` (its default), ``DDIMScheduler(
  clip_sample=True)`` with ``use_clipped_model_output=True`` and ``UniPCMultistepScheduler(thresholding=True)``
  are reproduced to 1e-11 relative, ``DPMSolverMultistepScheduler(thresholding=True)`` to 1e-6 (diffusers rounds
  the sample to float32 inside its ``step``). diffusers' DDIM default ``use_clipped_model_output=False`` mixes the
  clipped ``x̂0`` with the unclipped ``ε̂`` and is not one model's prediction (``docs/models.md``). The other
  cross-checks build their schedulers with ``clip_sample=False``.
"""

from types import SimpleNamespace

import pytest
import torch

from sdegen import VPSDE, ReverseSDE, get_solver, integrate, make_grid, reverse_sample
from sdegen.discrete import DiscreteVPSDE
from sdegen.integrations.diffusers import DiffusersNetwork, from_diffusers
from sdegen.testing import GaussianMixture, PredrawnNoise

diffusers = pytest.importorskip("diffusers")

N_TRAIN = 1000
GM = GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.5, -0.5]], [[0.3, 0.2], [0.25, 0.4]])


def _betas():
    return torch.linspace(1e-4, 0.02, N_TRAIN, dtype=torch.float64)


# -- the discrete schedule -----------------------------------------------------------------------------
def test_timestep_time_map_and_nodes():
    sde = DiscreteVPSDE(betas=_betas())
    i = torch.arange(N_TRAIN)
    t = sde.timesteps_to_times(i)
    assert t.dtype == torch.float64
    assert torch.allclose(t, (i.double() + 1.0) / N_TRAIN, rtol=0, atol=1e-15)
    assert float(t[-1]) == 1.0 and sde.T == 1.0 and sde.t_min == pytest.approx(1.0 / N_TRAIN)
    assert torch.allclose(sde.times_to_timesteps(t), i.double(), rtol=0, atol=1e-10)
    abar = torch.cumprod(1 - _betas(), 0)
    m, s = sde.marginal(t)
    assert torch.allclose(m**2, abar, rtol=1e-13, atol=0)
    assert torch.allclose(s**2, 1 - abar, rtol=1e-12, atol=0)
    assert torch.allclose(sde.betas, _betas(), rtol=1e-10, atol=0)
    same = DiscreteVPSDE(abar)
    assert torch.allclose(same.marginal(t)[1], s, rtol=1e-12, atol=0)
    # sigma and its inverse, log-SNR decreasing
    tt = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.999 + 1e-4
    assert torch.allclose(sde.t_from_sigma(sde.sigma(tt)), tt, rtol=0, atol=1e-12)
    lam = sde.log_snr(t)
    assert (lam[1:] < lam[:-1]).all()


def test_moment_odes_hold_between_nodes():
    sde = DiscreteVPSDE(betas=_betas())
    # midpoints of segments: the finite-difference stencil never straddles a node
    e = torch.arange(0, N_TRAIN, dtype=torch.float64) + 0.5
    t, h = e / N_TRAIN, 1e-6
    (m1, s1), (m0, s0), (m, s) = sde.marginal(t + h), sde.marginal(t - h), sde.marginal(t)
    a, g = sde.drift_coef(t), sde.diffusion_coef(t)
    dm, ds2 = (m1 - m0) / (2 * h), (s1**2 - s0**2) / (2 * h)
    assert torch.allclose(dm, a * m, rtol=1e-6, atol=1e-9)
    assert torch.allclose(ds2, 2 * a * s**2 + g**2, rtol=1e-6, atol=1e-9)
    # the slope at a node is the one of the segment below it, also for float32 times
    t32 = sde.timesteps_to_times(torch.arange(1, N_TRAIN)).float()
    seg = torch.log1p(-_betas()[1:]) * N_TRAIN
    assert torch.allclose(sde.drift_coef(t32).double(), 0.5 * seg, rtol=1e-5)


def test_discrete_schedule_validation():
    with pytest.raises(ValueError, match="exactly one"):
        DiscreteVPSDE()
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVPSDE([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteVPSDE([0.9, 0.0])
    with pytest.raises(ValueError, match="betas"):
        DiscreteVPSDE(betas=[0.1, 1.0])
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiscreteVPSDE(alphas_cumprod="abc")


# -- adapters against the exact oracle ---------------------------------------------------------------------
class _OracleModel:
    """A Gaussian-mixture oracle dressed as a diffusers model: ``model(x, timestep).sample``."""

    def __init__(self, sde, kind):
        self.sde, self.kind, self.calls = sde, kind, []
        self.pm = GM.perturbed(sde)

    def __call__(self, sample, timestep, **kwargs):
        self.calls.append((timestep.clone(), kwargs))
        t = self.sde.timesteps_to_times(timestep)
        out = {"epsilon": self.pm.epsilon, "v_prediction": self.pm.velocity, "sample": self.pm.denoiser}[self.kind]
        return SimpleNamespace(sample=out(sample, t))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_give_the_exact_score(kind):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN, prediction_type=kind, clip_sample=False)
    probe_sde = DiscreteVPSDE(scheduler.alphas_cumprod)
    model = _OracleModel(probe_sde, kind)
    sde, score = from_diffusers(model, scheduler)
    assert sde.num_timesteps == N_TRAIN
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, dtype=torch.float64, generator=gen) * 1.5
    pm = GM.perturbed(sde)
    # at the nodes every rounding mode sees exactly the trained timestep
    t_nodes = sde.timesteps_to_times(torch.randint(0, N_TRAIN, (64,), generator=gen))
    for mode in ("round", "interpolate", "continuous"):
        _, sc = from_diffusers(model, scheduler, timestep_rounding=mode)
        assert torch.allclose(sc(x, t_nodes), pm.score(x, t_nodes), rtol=1e-9, atol=1e-9), mode
    # between the nodes the "continuous" mode feeds the oracle the exact fractional timestep
    t_any = torch.rand(64, dtype=torch.float64, generator=gen) * (1 - 1 / N_TRAIN) + 1 / N_TRAIN
    _, sc = from_diffusers(model, scheduler, timestep_rounding="continuous")
    assert torch.allclose(sc(x, t_any), pm.score(x, t_any), rtol=1e-9, atol=1e-9)
    # "round" passes int64 timesteps: the nearest node
    model.calls.clear()
    score(x, t_any, class_labels=torch.arange(64))
    ((ts, kw),) = model.calls
    assert ts.dtype == torch.int64
    assert torch.equal(ts, torch.round(t_any * N_TRAIN - 1).long().clamp(0, N_TRAIN - 1))
    assert torch.equal(kw["class_labels"], torch.arange(64))  # conditioning passes through


def test_interpolate_mode_is_linear_between_nodes_and_one_call():
    calls = []

    def net(x, timestep, **kw):
        calls.append((x.shape[0], kw))
        return (x * 0 + timestep.double().reshape(-1, 1) ** 2,)  # a tuple output, value u²

    wrapped = DiffusersNetwork(net, 10, "interpolate")
    u = torch.tensor([0.25, 3.5, 8.75, 9.0, -0.5], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 5])
    out = wrapped(torch.zeros(5, 1, dtype=torch.float64), u, class_labels=y, scale=2.0)
    lo = torch.tensor([0.0, 3.0, 8.0, 8.0, 0.0], dtype=torch.float64)
    w = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.0], dtype=torch.float64)
    expect = (1 - w) * lo**2 + w * (lo + 1) ** 2
    assert torch.allclose(out[:, 0], expect, rtol=0, atol=1e-12)
    assert len(calls) == 1 and calls[0][0] == 10
    assert torch.equal(calls[0][1]["class_labels"], torch.cat([y, y])) and calls[0][1]["scale"] == 2.0


def test_learned_variance_channels_are_dropped_and_errors():
    sched = diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="learned_range", clip_sample=False)
    sde, score = from_diffusers(lambda x, t: torch.cat([x, 100 + x], dim=1), sched)
    x = torch.ones(3, 2, 4, 4)
    assert torch.allclose(score(x, torch.full((3,), 0.5)), -x / sde.marginal(torch.tensor(0.5))[1])
    with pytest.raises(ValueError, match="timestep_rounding"):
        from_diffusers(lambda x, t: x, sched, timestep_rounding="nearest")
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(lambda x, t: x, sched, prediction_type="score")
    with pytest.raises(TypeError, match="alphas_cumprod"):
        from_diffusers(lambda x, t: x, object())
    with pytest.raises(TypeError, match="sample"):
        from_diffusers(lambda x, t: "nope", sched)[1](x, torch.full((3,), 0.5))


# -- cross-checks against diffusers' schedulers with a real (random) UNet ----------------------------------
@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return net.double().eval()


def _f64(scheduler):
    """Run diffusers' scheduler arithmetic in float64, like sdegen's (the values are the same)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def _x_T(seed=1):
    return torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    scale = b.abs().max()
    assert (a - b).abs().max() <= 1e-11 * scale, f"max diff {(a - b).abs().max():.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_reproduces_ddim_scheduler(unet, set_alpha_to_one):
    # "leading" spacing with steps_offset=0 and N divisible by the steps: timesteps 900, 800, ..., 0 and
    # diffusers' prev_timestep = t - 100 is the next grid point. Its last step goes from timestep 0 to
    # ᾱ = final_alpha_cumprod: with set_alpha_to_one=False that is ᾱ_0 (an identity step, so sdegen's grid
    # simply ends at t_0); with True it is ᾱ = 1, i.e. x̂0 at t_0 = sdegen's final_step="tweedie".
    steps = 10
    sched = _f64(
        diffusers.DDIMScheduler(
            num_train_timesteps=N_TRAIN,
            clip_sample=False,
            steps_offset=0,
            set_alpha_to_one=set_alpha_to_one,
            timestep_spacing="leading",
        )
    )
    sched.set_timesteps(steps)
    x = _x_T()
    with torch.no_grad():
        ref = x.clone()
        for ts in sched.timesteps:
            ref = sched.step(unet(ref, ts).sample, ts, ref, eta=0.0).prev_sample
        sde, score = from_diffusers(unet, sched)
        sol = reverse_sample(
            sde,
            score,
            x_T=x,
            times=sde.timesteps_to_times(sched.timesteps),
            solver="ddim",
            noise_scale=0.0,
            final_step="tweedie" if set_alpha_to_one else "none",
            return_info=True,
        )
    _close(sol.x, ref)
    assert sol.nfe == (steps if set_alpha_to_one else steps - 1)


def test_stochastic_ddim_reproduces_ddim_scheduler_eta(unet):
    eta, steps = 0.5, 8
    sched = _f64(
        diffusers.DDIMScheduler(
            num_train_timesteps=N_TRAIN,
            clip_sample=False,
            steps_offset=0,
            set_alpha_to_one=True,
            timestep_spacing="leading",
        )
    )
    sched.set_timesteps(steps)  # 875, 750, ..., 0
    gen = torch.Generator().manual_seed(2)
    zs = [torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=gen) for _ in range(steps)]
    x = _x_T()
    with torch.no_grad():
        ref = x.clone()
        for ts, z in zip(sched.timesteps, zs, strict=True):
            ref = sched.step(unet(ref, ts).sample, ts, ref, eta=eta, variance_noise=z).prev_sample
        sde, score = from_diffusers(unet, sched)
        times = sde.timesteps_to_times(sched.timesteps)
        eq = ReverseSDE(sde, score, noise_scale=eta)
        noise = PredrawnNoise(zs)
        sol = integrate(eq, x, times, get_solver("ddim", eta=eta), noise, final_step="tweedie")
    _close(sol.x, ref)
    assert noise.used == steps - 1  # the final (x̂0) step draws nothing; diffusers' zero-variance draw is unused


def _ddpm_reference(unet, sched, x, seeds):
    out = x.clone()
    for ts, seed in zip(sched.timesteps, seeds, strict=True):
        out = sched.step(unet(out, ts).sample, ts, out, generator=torch.Generator().manual_seed(seed)).prev_sample
    return out


DDPM_CASES = [
    # (solver, options, DDPMScheduler variance_type)
    ("ddim", {}, "fixed_small"),  # ddim at noise_scale=1 is η = 1: the posterior step with β̃
    ("ancestral", {"variance": "posterior"}, "fixed_small"),
    ("ancestral", {"variance": "beta"}, "fixed_large"),
]


@pytest.mark.parametrize(("solver", "options", "variance_type"), DDPM_CASES)
def test_reproduces_ddpm_scheduler(unet, solver, options, variance_type):
    # DDPMScheduler draws noise at every step but the last; its last step (timestep 0 -> ᾱ = 1) returns
    # x̂0 without noise: sdegen's final_step="tweedie", for both solvers.
    steps = 10
    sched = _f64(diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN, clip_sample=False, variance_type=variance_type))
    sched.set_timesteps(steps)
    seeds = list(range(100, 100 + steps))
    zs = [torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x = _x_T()
    with torch.no_grad():
        ref = _ddpm_reference(unet, sched, x, seeds)
        sde, score = from_diffusers(unet, sched)
        times = sde.timesteps_to_times(sched.timesteps)
        eq = ReverseSDE(sde, score, noise_scale=1.0)
        noise = PredrawnNoise(zs[:-1])
        sol = integrate(eq, x, times, get_solver(solver, **options), noise, final_step="tweedie")
        assert noise.used == steps - 1
    _close(sol.x, ref)
    assert sol.nfe == steps


def test_ddim_options_and_checks():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    with pytest.raises(ValueError, match="noise_scale=1.0"):
        reverse_sample(sde, score, (4, 2), solver="ddim", eta=1.0, steps=2)  # ddim's default noise_scale is 0
    with pytest.raises(ValueError, match="eta"):
        get_solver("ddim", eta=1.5)
    with pytest.raises(TypeError, match="eta"):
        get_solver("ddim", eta="0")
    # eta=None follows noise_scale: η = 0 / 1 coincide with the explicit values bit for bit
    for lam in (0.0, 1.0):
        a = reverse_sample(sde, score, (8, 2), solver="ddim", steps=5, noise_scale=lam, seed=3, dtype=torch.float64)
        b = reverse_sample(
            sde, score, (8, 2), solver="ddim", eta=lam, steps=5, noise_scale=lam, seed=3, dtype=torch.float64
        )
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


class _OnesNoise:
    def normal(self, shape, *, device, dtype):
        return torch.ones(shape, device=device, dtype=dtype)

    def uniform(self, shape, *, device, dtype):
        raise AssertionError("no uniform draws expected")

    def select(self, index):
        return self


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("explicit_eta", [False, True])
def test_ddim_converges_to_the_marginals_at_first_order(lam, explicit_eta):
    """Exact moment propagation (no sampling) for Gaussian data N(1, 0.25) on the VP SDE.

    With a linear score the ddim step is affine, x' = A x + b + c z, so the law stays Gaussian and its mean
    and variance are propagated exactly (A, b, c read off three calls of the step). For every noise scale,
    with η = η(λ) (default) or η = λ verbatim, the variance error at t_min = 0.01 halves when the steps
    double (first order; measured ratios 1.79–1.93 at 64 -> 128 steps) and the mean is exact.
    """
    sde = VPSDE()
    pm = GaussianMixture([1.0], [[1.0]], [0.25]).perturbed(sde)
    solver = get_solver("ddim", eta=lam if explicit_eta else None)
    eq = ReverseSDE(sde, pm.score, noise_scale=lam)
    solver.check(eq)

    def exact(t):
        m, s = sde.marginal(torch.tensor(t, dtype=torch.float64))
        return m, m**2 * 0.25 + s**2

    errors = []
    for n in (32, 64, 128):
        times = make_grid("uniform", sde, n, t_min=0.01)
        mean, var = exact(1.0)
        zero = torch.zeros(1, 1, dtype=torch.float64)
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            b = solver.step(eq, zero, t, t_next, None, None)[0]
            a = solver.step(eq, zero + 1, t, t_next, None, None)[0] - b
            c = solver.step(eq, zero, t, t_next, _OnesNoise(), None)[0] - b
            mean, var = a * mean + b, a**2 * var + c**2
        m_exact, v_exact = exact(0.01)
        assert abs(float(mean) - float(m_exact)) < 1e-12
        errors.append(abs(float(var) - float(v_exact)))
    assert errors[2] < 0.03
    assert 1.6 < errors[1] / errors[2] < 2.4, errors


# -- x̂0 clipping and dynamic thresholding (from_diffusers honours the scheduler's settings) ---------------------
def _clipping_active(unet, sched, x):
    """True when the random UNet's x̂0 leaves [-1, 1] at the first timestep (so the clip changes the result)."""
    ts = sched.timesteps[0]
    abar = sched.alphas_cumprod[ts]
    x0 = (x - (1 - abar).sqrt() * unet(x, ts).sample) / abar.sqrt()
    return bool((x0.abs() > 1).any())


def test_ddpm_scheduler_with_clip_sample_is_reproduced(unet):
    steps = 10
    sched = _f64(diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN))  # clip_sample=True by default
    assert sched.config.clip_sample
    sched.set_timesteps(steps)
    seeds = list(range(200, 200 + steps))
    zs = [torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x = _x_T()
    with torch.no_grad():
        assert _clipping_active(unet, sched, x)
        ref = _ddpm_reference(unet, sched, x, seeds)
        sde, score = from_diffusers(unet, sched)
        eq = ReverseSDE(sde, score, noise_scale=1.0)
        sol = integrate(eq, x, sde.timesteps_to_times(sched.timesteps), get_solver("ancestral", variance="posterior"),
                        PredrawnNoise(zs[:-1]), final_step="tweedie")
        raw = integrate(ReverseSDE(sde, from_diffusers(unet, sched, thresholding=None)[1], noise_scale=1.0), x,
                        sde.timesteps_to_times(sched.timesteps), get_solver("ancestral", variance="posterior"),
                        PredrawnNoise(zs[:-1]), final_step="tweedie")
    _close(sol.x, ref)
    assert (raw.x - ref).abs().max() > 1e-3  # without the clipping the result differs


def test_ddim_scheduler_with_clip_sample_is_reproduced(unet):
    """DDIMScheduler.step(..., use_clipped_model_output=True): ε̂ from the clipped x̂0, one consistent model."""
    steps = 10
    sched = _f64(diffusers.DDIMScheduler(num_train_timesteps=N_TRAIN, steps_offset=0, set_alpha_to_one=True,
                                         timestep_spacing="leading"))
    sched.set_timesteps(steps)
    x = _x_T()
    with torch.no_grad():
        assert _clipping_active(unet, sched, x)
        ref = x.clone()
        for ts in sched.timesteps:
            ref = sched.step(unet(ref, ts).sample, ts, ref, eta=0.0, use_clipped_model_output=True).prev_sample
        sde, score = from_diffusers(unet, sched)
        out = reverse_sample(sde, score, x_T=x, times=sde.timesteps_to_times(sched.timesteps), solver="ddim",
                             noise_scale=0.0, final_step="tweedie")
    _close(out, ref)


def _multistep_reference(sched, unet, steps):
    """``(x_T, diffusers' sample)`` of a multistep scheduler's own loop, its schedule in float64."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    ts_ = sched.timesteps
    acp = sched.alphas_cumprod
    sched.sigmas = torch.cat([((1 - acp[ts_]) / acp[ts_]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x = _x_T()
    with torch.no_grad():
        ref = x.clone()
        for ts in sched.timesteps:
            ref = sched.step(unet(ref, ts).sample, ts, ref).prev_sample
    return x, ref


def test_dpm_solver_multistep_with_dynamic_thresholding_is_reproduced(unet):
    steps = 16  # >= 15: diffusers lowers no order before its last step (σ = 0, i.e. final_step="tweedie")
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, thresholding=True,
                                                  dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    x, ref = _multistep_reference(sched, unet, steps)
    with torch.no_grad():
        sde, score = from_diffusers(unet, sched)
        assert score.thresholding.mode == "dynamic" and score.thresholding.max_value == 1.5
        out = reverse_sample(sde, score, x_T=x, times=sde.timesteps_to_times(sched.timesteps), solver="dpmpp_2m",
                             final_step="tweedie")
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 1e-6 * scale  # diffusers rounds the sample to float32 inside step


def test_unipc_scheduler_with_dynamic_thresholding_is_reproduced(unet):
    steps = 8
    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=N_TRAIN, thresholding=True,
                                              dynamic_thresholding_ratio=0.95, sample_max_value=2.0)
    x, ref = _multistep_reference(sched, unet, steps)
    with torch.no_grad():
        sde, score = from_diffusers(unet, sched)
        out = reverse_sample(sde, score, x_T=x, times=sde.timesteps_to_times(sched.timesteps), solver="unipc",
                             order=2, final_step="tweedie", lower_order_final="diffusers")
    _close(out, ref)


def test_from_diffusers_reads_the_thresholding_settings():
    from sdegen.models import Thresholding

    ddpm = diffusers.DDPMScheduler(num_train_timesteps=20, clip_sample_range=2.5)
    assert from_diffusers(lambda x, t: x, ddpm)[1].thresholding.clip_range == 2.5
    assert from_diffusers(lambda x, t: x, ddpm, thresholding=None)[1].thresholding is None
    dyn = diffusers.DDPMScheduler(num_train_timesteps=20, thresholding=True, dynamic_thresholding_ratio=0.9)
    thr = from_diffusers(lambda x, t: x, dyn)[1].thresholding
    assert thr.mode == "dynamic" and thr.ratio == 0.9  # thresholding wins over clip_sample, as in diffusers
    euler = diffusers.EulerDiscreteScheduler(num_train_timesteps=20)
    assert from_diffusers(lambda x, t: x, euler)[1].thresholding is None
    mine = Thresholding("clip", clip_range=3.0)
    assert from_diffusers(lambda x, t: x, ddpm, thresholding=mine)[1].thresholding is mine
    with pytest.raises(ValueError, match="thresholding"):
        from_diffusers(lambda x, t: x, ddpm, thresholding="dynamic")
    # the dynamic threshold is diffusers' _threshold_sample, per sample
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    torch.testing.assert_close(thr(x0), dyn._threshold_sample(x0), rtol=0, atol=1e-15)
