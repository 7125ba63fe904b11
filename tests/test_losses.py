"""Tests for ``sdegen.losses.dsm_loss`` against the exact Gaussian-mixture oracle.

What is proven:
* all four parametrisations compute the same objective (exact identity with the exact oracle);
* the loss of the exact model equals its known minimum, the conditional-variance term
  ``E[w(t) tr Cov(z | x_t)]`` (closed form for one Gaussian, an independent Monte-Carlo identity for a
  mixture), and a perturbed model does worse;
* likelihood weighting with importance sampling is unbiased (matches quadrature and uniform-t sampling);
* ``g² = m² dσ²/dt`` (the identity the importance sampler relies on) for VP, sub-VP and VE;
* gradients, shapes, dtypes, kwargs and argument errors.

Monte-Carlo comparisons use 5 standard errors: false-failure rate ~6e-7 per assertion (normal approx.).
"""

from __future__ import annotations

import math

import pytest
import torch

from sdegen import SDE, VESDE, VPSDE, SubVPSDE, from_epsilon
from sdegen.losses import dsm_loss
from sdegen.testing import GaussianMixture

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixture() -> GaussianMixture:
    return GaussianMixture(
        [0.3, 0.7],
        [[-1.0, 0.5], [1.5, -0.5]],
        [[[0.30, 0.10], [0.10, 0.20]], [[0.50, -0.20], [-0.20, 0.40]]],
    )


def _data(n: int, seed: int = 1) -> torch.Tensor:
    return _mixture().sample(n, generator=_gen(seed))


def _oracle_net(pm, parametrisation):
    return {"epsilon": pm.epsilon, "score": pm.score, "denoiser": pm.denoiser, "velocity": pm.velocity}[parametrisation]


# -- the four parametrisations are one objective ----------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_min=0.01, sigma_max=5.0)], ids=repr)
@pytest.mark.parametrize("lw", [False, True])
def test_parametrisations_give_identical_losses(sde, lw):
    pm = _mixture().perturbed(sde)
    x0 = _data(256)
    losses = {
        p: dsm_loss(sde, _oracle_net(pm, p), x0, parametrisation=p, likelihood_weighting=lw, t_min=1e-3,
                    generator=_gen(5), reduce="none")
        for p in ("epsilon", "score", "denoiser", "velocity")
    }
    ref = losses["epsilon"]
    assert ref.shape == (256,) and torch.isfinite(ref).all()
    for p, val in losses.items():
        torch.testing.assert_close(val, ref, rtol=1e-8, atol=1e-10, msg=f"{p} differs from epsilon")


# -- the minimum is the conditional-variance term -----------------------------------------------------
def _gaussian_min(sde, lam, t):
    """``tr Cov(z | x_t) = Σ_i m² λ_i / (m² λ_i + s²)`` for ``x0 ~ N(μ, diag(λ))``; ``t`` ``(n,)``."""
    m, s = sde.marginal(t)
    v = m[:, None] ** 2 * lam[None]
    return (v / (v + s[:, None] ** 2)).sum(1)


def test_exact_model_attains_closed_form_minimum_single_gaussian():
    sde = VPSDE()
    lam = torch.tensor([0.5, 2.0], dtype=F64)
    g = GaussianMixture([1.0], [[1.0, -1.0]], lam[None])
    pm = g.perturbed(sde)
    n = 20000
    x0 = g.sample(n, generator=_gen(2))
    t = torch.rand(n, generator=_gen(3), dtype=F64) * (1 - 1e-3) + 1e-3
    loss = dsm_loss(sde, pm.epsilon, x0, t=t, generator=_gen(4), reduce="none")
    resid = loss - _gaussian_min(sde, lam, t)
    se = resid.std() / math.sqrt(n)
    assert abs(resid.mean()) < 5 * se, (resid.mean(), se)

    # a perturbed model pays E‖δ‖² more (same x0, t, z through the same generator seed)
    delta = torch.tensor([0.2, -0.2], dtype=F64)
    worse = dsm_loss(sde, lambda x, tt: pm.epsilon(x, tt) + delta, x0, t=t, generator=_gen(4), reduce="none")
    gap = worse - loss
    gap_se = gap.std() / math.sqrt(n)
    assert worse.mean() > loss.mean()
    assert abs(gap.mean() - (delta**2).sum()) < 5 * gap_se


def test_exact_model_attains_minimum_mixture_fixed_t():
    """At fixed t: E‖ε* − z‖² = d − E_{x_t ~ p_t}‖ε*(x_t)‖², the right side from independent samples of p_t."""
    sde = VPSDE()
    pm = _mixture().perturbed(sde)
    n, t0 = 20000, 0.25
    t = torch.full((n,), t0, dtype=F64)
    loss = dsm_loss(sde, pm.epsilon, _data(n, 6), t=t, generator=_gen(7), reduce="none")
    eps = pm.epsilon(pm.sample(n, t0, generator=_gen(8)), t)
    other = 2.0 - (eps**2).sum(1)
    se = math.sqrt(loss.var() / n + other.var() / n)
    assert abs(loss.mean() - other.mean()) < 5 * se, (loss.mean(), other.mean(), se)
    # and a perturbed (rescaled) ε does worse
    worse = dsm_loss(sde, lambda x, tt: 1.3 * pm.epsilon(x, tt), _data(n, 6), t=t, generator=_gen(7))
    assert worse > loss.mean()


# -- time sampling and likelihood weighting ------------------------------------------------------------
def _quad_expectation(sde, lam, t_eps, weight):
    """``1/(T − t_eps) ∫ weight(t) tr Cov(z|x_t) dt`` by trapezoid on a log grid (float64)."""
    u = torch.linspace(math.log(t_eps), math.log(sde.T), 20001, dtype=F64)
    t = torch.exp(u)
    f = weight(t) * _gaussian_min(sde, lam, t) * t  # dt = t du
    return float(torch.trapezoid(f, u)) / (sde.T - t_eps)


def test_uniform_and_importance_sampled_times_are_unbiased():
    sde = VPSDE()
    lam = torch.linspace(0.2, 2.0, 8, dtype=F64)
    g = GaussianMixture([1.0], 0.1 * torch.arange(8.0, dtype=F64)[None], lam[None])
    pm = g.perturbed(sde)
    # d = 8 and n = 1e5: SE ≈ 0.25 % of the mean, so a 2 % error in a weight (or dropping the 1/(T − t_eps)
    # factor, 5 % here) fails the 5-SE check
    n, t_eps = 100000, 5e-2
    x0 = g.sample(n, generator=_gen(9))

    def w_lik(t):
        m, s = sde.marginal(t)
        return sde.diffusion_coef(t) ** 2 / s**2

    cases = [
        (dict(), _quad_expectation(sde, lam, t_eps, lambda t: torch.ones_like(t))),
        (dict(likelihood_weighting=True), _quad_expectation(sde, lam, t_eps, w_lik)),
        (dict(likelihood_weighting=True, importance_sampling=True), _quad_expectation(sde, lam, t_eps, w_lik)),
    ]
    for kw, expected in cases:
        loss = dsm_loss(sde, pm.epsilon, x0, t_min=t_eps, generator=_gen(10), reduce="none", **kw)
        se = loss.std() / math.sqrt(n)
        assert abs(loss.mean() - expected) < 5 * se, (kw, float(loss.mean()), expected, float(se))
    # near t = 0 (w ~ 1/t) importance sampling's constant weight gives far lower variance than uniform t
    kw = dict(t_min=1e-3, generator=_gen(10), reduce="none", likelihood_weighting=True)
    lw_u = dsm_loss(sde, pm.epsilon, x0[:20000], **kw)
    lw_is = dsm_loss(sde, pm.epsilon, x0[:20000], importance_sampling=True, **kw)
    assert lw_is.var() < 0.2 * lw_u.var(), (lw_is.var(), lw_u.var())


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=repr)
def test_likelihood_weight_is_minus_log_snr_derivative(sde):
    """``g²/s² = d log σ²/dt`` — the identity behind sampling t uniformly in log-SNR."""
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    h = 1e-6
    dlog = (sde.log_snr(t - h) - sde.log_snr(t + h)) / (2 * h)
    _, s = sde.marginal(t)
    torch.testing.assert_close(sde.diffusion_coef(t) ** 2 / s**2, dlog, rtol=1e-6, atol=0)


def test_importance_sampled_times_stay_in_range():
    sde = VPSDE()
    x0 = torch.zeros(4096, 2)
    seen = []
    loss = dsm_loss(sde, lambda x, t: seen.append(t) or torch.zeros_like(x), x0, likelihood_weighting=True,
                    importance_sampling=True, t_min=1e-4, generator=_gen(0), reduce="none")
    t = seen[0]
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert float(t.min()) >= 1e-4 and float(t.max()) <= 1.0
    # uniform in log-SNR: the median log-SNR is the midpoint of the two ends (5 SE of a median ≈ 0.04 range)
    ends = sde.log_snr(torch.tensor([1e-4, 1.0], dtype=F64))
    frac = (sde.log_snr(t.double()) - ends[1]) / (ends[0] - ends[1])
    assert abs(float(frac.median()) - 0.5) < 0.04
    assert torch.isfinite(loss).all()


# -- gradients, shapes, dtypes, plumbing ---------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d + 1, d)

    def forward(self, x, t, scale=1.0):
        flat = x.reshape(x.shape[0], -1)
        return scale * self.lin(torch.cat([flat, t[:, None].to(x.dtype)], 1)).reshape(x.shape)


@pytest.mark.parametrize("parametrisation", ["epsilon", "score", "denoiser", "velocity"])
@pytest.mark.parametrize("lw", [False, True])
def test_gradients_flow(parametrisation, lw):
    torch.manual_seed(0)
    net = _Net(9)
    x0 = torch.randn(8, 1, 3, 3)
    loss = dsm_loss(VPSDE(), net, x0, parametrisation=parametrisation, likelihood_weighting=lw,
                    importance_sampling=lw, generator=_gen(1))
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_shapes_reductions_dtype_kwargs_and_determinism():
    net = _Net(9).double()
    x0 = torch.randn(5, 1, 3, 3, dtype=F64, generator=_gen(0))
    none = dsm_loss(VPSDE(), net, x0, generator=_gen(3), reduce="none", model_kwargs={"scale": 0.5})
    assert none.shape == (5,) and none.dtype == F64
    mean = dsm_loss(VPSDE(), net, x0, generator=_gen(3), model_kwargs={"scale": 0.5})
    total = dsm_loss(VPSDE(), net, x0, generator=_gen(3), reduce="sum", model_kwargs={"scale": 0.5})
    torch.testing.assert_close(mean, none.mean())
    torch.testing.assert_close(total, none.sum())
    other = dsm_loss(VPSDE(), net, x0, generator=_gen(3), reduce="none", model_kwargs={"scale": 2.0})
    assert not torch.allclose(other, none)  # kwargs reach the network
    # a ScoreModel is trained through its raw prediction and parametrisation
    sde = VPSDE()
    sm = from_epsilon(net, sde)
    torch.testing.assert_close(dsm_loss(sde, sm, x0, generator=_gen(3)), dsm_loss(sde, net, x0, generator=_gen(3)))


def test_bad_arguments():
    sde, net, x0 = VPSDE(), _Net(2), torch.randn(4, 2)
    general = SDE(lambda x, t: -x, lambda x, t: torch.ones_like(t))
    with pytest.raises(TypeError, match="sde"):
        dsm_loss(general, net, x0)
    with pytest.raises(TypeError, match="model"):
        dsm_loss(sde, "net", x0)
    with pytest.raises(TypeError, match="x0"):
        dsm_loss(sde, net, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x0"):
        dsm_loss(sde, net, torch.zeros(4))
    with pytest.raises(ValueError, match="parametrisation"):
        dsm_loss(sde, net, x0, parametrisation="noise")
    with pytest.raises(ValueError, match="reduce"):
        dsm_loss(sde, net, x0, reduce="max")
    with pytest.raises(ValueError, match="t_min"):
        dsm_loss(sde, net, x0, t_min=1.5)
    with pytest.raises(ValueError, match="t must have shape"):
        dsm_loss(sde, net, x0, t=torch.rand(3))
    with pytest.raises(ValueError, match="importance_sampling"):
        dsm_loss(sde, net, x0, importance_sampling=True)
    with pytest.raises(ValueError, match="model returned"):
        dsm_loss(sde, lambda x, t: x[:, :1], x0)
    with pytest.raises(ValueError, match="contradicts"):
        dsm_loss(sde, from_epsilon(net, sde), x0, parametrisation="score")
