"""DPM-Solver++ (2M, 3M) and the EDM sampler against the exact Gaussian-mixture oracle.

* Orders are measured, not assumed: the float64 path error to a fine reference solution of the
  probability-flow ODE is fitted against the number of steps (log-log slope, as ``sdegen.testing.measure_order``).
* Exact identities are checked to rounding (EDM without churn == Heun on ``EDMSDE``; one 2M step
  == the DDIM/DPM-Solver-1 formula; 2M == k-diffusion's ``sample_dpmpp_2m`` on the same σ grid).
* The churned EDM sampler is a random sampler: its samples are compared with the mixture's
  weights, means and covariances within 5 Monte-Carlo standard errors plus a stated bias allowance
  (false-failure rate about 1e-6 per check).
"""

import importlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from sdegen import EDMSDE, SDE, VESDE, VPSDE, reverse_sample
from sdegen.testing import GaussianMixture

GM = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[0.2, 0.1], [0.1, 0.3]])
ODE = dict(noise_scale=0.0, dtype=torch.float64)
S_NOISE = 1.0  # setting 1.2 makes test_edm_churn_recovers_mixture fail (checked), so it can fail


def _x_T(sde, n=64, seed=1):
    return sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _path_error(sde, solver, steps, x_T, ref, grid="log_snr", **opts):
    x = reverse_sample(sde, GM.perturbed(sde).score, x_T=x_T, solver=solver, steps=steps, grid=grid, **ODE, **opts)
    return float((x - ref).norm(dim=1).mean())


@pytest.fixture(scope="module")
def vp_reference():
    sde = VPSDE()
    x_T = _x_T(sde)
    ref = reverse_sample(sde, GM.perturbed(sde).score, x_T=x_T, solver="dpmpp_3m", steps=1200, grid="log_snr", **ODE)
    return sde, x_T, ref


@pytest.mark.parametrize("solver, order", [("dpmpp_2m", 2.0), ("dpmpp_3m", 3.0)])
def test_measured_order(vp_reference, solver, order):
    sde, x_T, ref = vp_reference
    steps = [40, 80, 160]
    errs = [_path_error(sde, solver, n, x_T, ref) for n in steps]
    slope = -torch.linalg.lstsq(
        torch.tensor([[math.log(n), 1.0] for n in steps], dtype=torch.float64),
        torch.tensor([math.log(e) for e in errs], dtype=torch.float64)[:, None],
    ).solution[0, 0].item()
    assert abs(slope - order) < 0.3, f"{solver}: errors {errs}, slope {slope:.2f}, expected {order}"


@pytest.mark.parametrize("grid", ["log_snr", "edm"])
def test_dpmpp_beats_euler_and_heun_at_nfe_10(vp_reference, grid):
    sde, x_T, ref = vp_reference
    e_euler = _path_error(sde, "euler_maruyama", 10, x_T, ref, grid)
    e_heun = _path_error(sde, "heun", 5, x_T, ref, grid)  # 2 NFE per step
    # 3M extrapolates with three past steps: at NFE 10 it needs the uniform-h grid (docs/performance.md)
    for solver in ("dpmpp_2m", "dpmpp_3m") if grid == "log_snr" else ("dpmpp_2m",):
        e = _path_error(sde, solver, 10, x_T, ref, grid)
        margin = 0.75 if grid == "log_snr" else 1.0  # the ρ-grid of EDM is tuned for σ ∈ [0.002, 80], not VP
        msg = f"{solver} on {grid}: {e:.3g} vs euler {e_euler:.3g}, heun {e_heun:.3g}"
        assert e < margin * min(e_euler, e_heun), msg


def test_dpmpp_first_step_is_ddim():
    sde = VPSDE()
    pm = GM.perturbed(sde)
    x_T = _x_T(sde, 8)
    times = torch.tensor([0.8, 0.3], dtype=torch.float64)
    x = reverse_sample(sde, pm.score, x_T=x_T, solver="dpmpp_2m", times=times, **ODE)
    (m0, m1), (s0, s1) = sde.marginal(times)
    lam0, lam1 = torch.log(m0 / s0), torch.log(m1 / s1)
    expect = (s1 / s0) * x_T - m1 * torch.expm1(-(lam1 - lam0)) * pm.denoiser(x_T, times[0])
    torch.testing.assert_close(x, expect, rtol=1e-12, atol=1e-12)


def _load_k_diffusion_sampling():
    """k-diffusion's sampling module; its package __init__ needs extras we do not need, so stub them."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        source = Path(pkg.__path__[0]) / "sampling.py"
        mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", source)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    except ImportError as err:
        pytest.skip(f"k-diffusion sampling unavailable: {err}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_dpmpp_2m_matches_k_diffusion():
    """With >= 15 steps (no lower-order final step) 2M is k-diffusion's sample_dpmpp_2m on EDMSDE."""
    kd = _load_k_diffusion_sampling()
    sde = EDMSDE()
    pm = GM.perturbed(sde)
    x_T = _x_T(sde, 16)
    sol = reverse_sample(sde, pm.score, x_T=x_T, solver="dpmpp_2m", steps=16, grid="edm", return_info=True, **ODE)
    ref = kd.sample_dpmpp_2m(lambda x, sigma: pm.denoiser(x, sigma), x_T, sol.times, disable=True)
    torch.testing.assert_close(sol.x, ref, rtol=1e-10, atol=1e-10)


def test_lower_order_final_helps_at_low_nfe(vp_reference):
    sde, x_T, ref = vp_reference
    for solver in ("dpmpp_2m", "dpmpp_3m"):
        on = _path_error(sde, solver, 6, x_T, ref, "edm")
        off = _path_error(sde, solver, 6, x_T, ref, "edm", lower_order_final=False)
        assert on < off, f"{solver}: lower_order_final on {on:.3g}, off {off:.3g}"


def test_edm_without_churn_is_heun_on_edmsde():
    sde = EDMSDE()
    pm = GM.perturbed(sde)
    x_T = _x_T(sde, 32)
    a = reverse_sample(sde, pm.score, x_T=x_T, solver="edm", steps=12, grid="edm", **ODE)
    b = reverse_sample(sde, pm.score, x_T=x_T, solver="heun", steps=12, grid="edm", **ODE)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_edm_is_second_order_on_vp(vp_reference):
    """On VP the EDM sampler is Heun in (σ, x/m), a different method from Heun in t: still order 2."""
    sde, x_T, ref = vp_reference
    errs = [_path_error(sde, "edm", n, x_T, ref, "edm") for n in (20, 40, 80)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(s - 2.0) < 0.4 for s in slopes), f"errors {errs}, slopes {slopes}"


@pytest.mark.parametrize("sde", [EDMSDE(), VPSDE()], ids=["edm", "vp"])
def test_edm_churn_recovers_mixture(sde):
    n = 4000
    x = reverse_sample(
        sde, GM.perturbed(sde).score, (n, 2), solver="edm", steps=24, grid="edm",
        S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=S_NOISE, generator=torch.Generator().manual_seed(3), **ODE,
    )
    # E[posterior responsibility of component 1] = its weight exactly, for exact samples
    comps = [torch.distributions.MultivariateNormal(GM.means[k], torch.diag(GM.covariances[k])) for k in range(2)]
    resp = torch.softmax(torch.stack([c.log_prob(x) for c in comps], 1) + torch.log(GM.weights), dim=1)
    w1 = float(resp[:, 1].mean())
    se_w = math.sqrt(0.3 * 0.7 / n)
    assert abs(w1 - 0.7) < 5 * se_w + 0.01, f"weight {w1}"
    mean, cov = GM.mean(), GM.covariance()
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert torch.all((x.mean(0) - mean).abs() < 5 * se_mean + 0.02), f"mean {x.mean(0)} vs {mean}"
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)  # Monte-Carlo standard error of each covariance entry
    assert torch.all((torch.cov(x.T) - cov).abs() < 5 * se_cov + 0.05), f"cov {torch.cov(x.T)} vs {cov}"


def test_edm_churn_is_random_and_reproducible():
    sde = EDMSDE()
    pm = GM.perturbed(sde)
    kw = dict(steps=8, grid="edm", S_churn=10.0, **ODE)
    a = reverse_sample(sde, pm.score, (16, 2), solver="edm", generator=torch.Generator().manual_seed(0), **kw)
    b = reverse_sample(sde, pm.score, (16, 2), solver="edm", generator=torch.Generator().manual_seed(0), **kw)
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = reverse_sample(sde, pm.score, x_T=x_T, solver="edm", steps=8, grid="edm", **ODE)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3  # the churn noise changed the path
    # sigma_hat is capped at sigma(T): the network never sees t > T
    seen = []
    reverse_sample(sde, lambda x, t: seen.append(t.max()) or pm.score(x, t), (4, 2), solver="edm", **kw)
    assert max(float(t) for t in seen) <= sde.T * (1 + 1e-12)


def test_ve_dpmpp_and_edm_run_in_float32():
    sde = VESDE(0.01, 20.0)
    pm = GM.perturbed(sde)
    for solver in ("dpmpp_2m", "dpmpp_3m", "edm"):
        x = reverse_sample(sde, pm.score, (64, 2), solver=solver, steps=10, grid="edm", noise_scale=0.0,
                           generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_bad_options_and_equations():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    with pytest.raises(ValueError, match="S_churn"):
        reverse_sample(sde, score, (2, 2), solver="edm", steps=2, noise_scale=0.0, S_churn=-1.0)
    with pytest.raises(ValueError, match="S_tmax"):
        reverse_sample(sde, score, (2, 2), solver="edm", steps=2, noise_scale=0.0, S_tmin=1.0, S_tmax=0.5)
    with pytest.raises(ValueError, match="S_noise"):
        reverse_sample(sde, score, (2, 2), solver="edm", steps=2, noise_scale=0.0, S_noise=-0.1)
    with pytest.raises(TypeError, match="S_churn"):
        reverse_sample(sde, score, (2, 2), solver="edm", steps=2, noise_scale=0.0, S_churn="lots")
    with pytest.raises(TypeError, match="lower_order_final"):
        reverse_sample(sde, score, (2, 2), solver="dpmpp_2m", steps=2, noise_scale=0.0, lower_order_final="yes")
    with pytest.raises(TypeError, match="unknown option"):
        reverse_sample(sde, score, (2, 2), solver="dpmpp_3m", steps=2, noise_scale=0.0, eta=0.5)
    for solver in ("dpmpp_2m", "dpmpp_3m", "edm"):
        with pytest.raises(ValueError, match="noise_scale=0"):
            reverse_sample(sde, score, (2, 2), solver=solver, steps=2, noise_scale=1.0)
    generic = SDE(lambda x, t: -x, lambda x, t: torch.ones_like(t))
    for solver in ("dpmpp_2m", "edm"):
        with pytest.raises(ValueError, match="affine SDE"):
            reverse_sample(generic, lambda x, t: -x, x_T=torch.zeros(2, 2), solver=solver, steps=2, noise_scale=0.0)
