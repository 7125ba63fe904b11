"""k-diffusion denoisers on EDMSDE, EDM preconditioning, and cross-checks against k_diffusion.sampling.

What is proved:
* ``from_k_diffusion`` turns ``D(x, σ)`` into the exact score ``(D − x)/σ²`` on ``EDMSDE`` (oracle check);
* ``edm_precondition`` implements Karras et al. (2022) Table 1 (its defining identities hold exactly);
* sdegen's ``heun`` (``grid="edm"``, ``final_step="tweedie"``, ``steps = n − 1``) reproduces
  ``k_diffusion.sampling.sample_heun`` on ``get_sigmas_karras(n, …)`` — same NFE, same output to ~1e-12
  relative in float64 — for an exact mixture denoiser and for a preconditioned random network; and
  ``euler_maruyama`` at ``noise_scale=0`` reproduces ``sample_euler``.

k-diffusion's package ``__init__`` imports its training stack (torchvision, scikit-image, ...), which a
sampler cross-check does not need: ``sdegen.testing.peers.load_k_diffusion_sampling`` runs k-diffusion's own
``sampling.py`` without it.
"""

import pytest
import torch
from torch import nn

from sdegen import EDMSDE, make_grid, reverse_sample
from sdegen.integrations.kdiffusion import EDMPreconditioner, edm_precondition, from_k_diffusion
from sdegen.testing import GaussianMixture
from sdegen.testing.peers import load_k_diffusion_sampling

try:
    K = load_k_diffusion_sampling()
except ImportError as err:  # k-diffusion not installed
    pytest.skip(str(err), allow_module_level=True)


GM = GaussianMixture([0.5, 0.5], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.2, 0.3, 0.1], [0.3, 0.1, 0.2]])


def _close(a, b, rel=1e-12):
    scale = b.abs().max()
    assert (a - b).abs().max() <= rel * scale, f"max diff {(a - b).abs().max():.3g} at scale {scale:.3g}"


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def test_denoiser_becomes_exact_score():
    sde, score = from_k_diffusion(GM.perturbed(EDMSDE()).denoiser)
    assert isinstance(sde, EDMSDE) and sde.t_min == 0.002 and sde.T == 80.0
    x = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.logspace(-2.5, 1.8, 32, dtype=torch.float64)
    assert torch.allclose(score(x, t), GM.perturbed(sde).score(x, t), rtol=1e-10, atol=1e-10)

    class WithRange:  # k-diffusion's discrete wrappers expose sigma_min / sigma_max
        sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)

        def __call__(self, x, sigma):
            return x

    sde2, _ = from_k_diffusion(WithRange())
    assert sde2.t_min == pytest.approx(0.03) and sde2.T == pytest.approx(14.6)
    with pytest.raises(ValueError, match="precondition"):
        from_k_diffusion(WithRange(), precondition="vp")


def test_edm_preconditioning_table_1():
    sd = 0.5
    pre = edm_precondition(lambda x, c: x, sigma_data=sd)
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    # Karras et al. 2022, Table 1 and App. B.6: unit-variance input and training target
    assert torch.allclose(c_in**2 * (sigma**2 + sd**2), torch.ones_like(sigma), rtol=1e-14)
    assert torch.allclose((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2, c_out**2, rtol=1e-12)
    assert torch.allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-14)
    assert torch.allclose(c_noise, 0.25 * torch.log(sigma), rtol=1e-14)
    # D = c_skip x + c_out F(c_in x, c_noise), with kwargs passed through
    seen = {}

    def raw(x_in, c, **kw):
        seen.update(kw, c=c, x_in=x_in)
        return torch.sin(x_in) + c.reshape(-1, 1)

    d = EDMPreconditioner(raw, sd)
    x = torch.randn(50, 3, dtype=torch.float64)
    out = d(x, sigma, class_labels=7)
    ci = c_in.reshape(-1, 1)
    expect = c_skip.reshape(-1, 1) * x + c_out.reshape(-1, 1) * (torch.sin(ci * x) + c_noise.reshape(-1, 1))
    assert torch.allclose(out, expect, rtol=1e-14, atol=1e-14)
    assert seen["class_labels"] == 7 and torch.allclose(seen["x_in"], ci * x)
    with pytest.raises(ValueError, match="sigma_data"):
        edm_precondition(raw, sigma_data=0.0)
    # an nn.Module raw network is registered: parameters and .to() work
    net = nn.Linear(3, 3)
    assert len(list(edm_precondition(lambda x, c: net(x)).parameters())) == 0
    assert len(list(EDMPreconditioner(net).parameters())) == 2


def _random_raw_net():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 3)).double()

    def raw(x_in, c_noise):
        return body(torch.cat([x_in, c_noise.reshape(-1, 1).to(x_in.dtype)], dim=1))

    return raw


@pytest.mark.parametrize("which", ["oracle", "preconditioned_net"])
def test_heun_reproduces_k_diffusion_sample_heun(which):
    n = 12  # k-diffusion: n sigmas + a final 0; sdegen: the same n sigmas = n − 1 steps, then Tweedie
    sigma_min, sigma_max = 0.002, 80.0
    sigmas = K.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0).double()
    # sdegen's "edm" grid is the same ρ-schedule (k-diffusion builds it in float32)
    assert torch.allclose(make_grid("edm", EDMSDE(sigma_min, sigma_max), n - 1), sigmas[:-1], rtol=1e-6)
    if which == "oracle":
        denoiser, kw = GM.perturbed(EDMSDE(sigma_min, sigma_max)).denoiser, {}
    else:
        denoiser, kw = _random_raw_net(), {"precondition": "edm", "sigma_data": 0.5}
    d_k = _Counting(denoiser if which == "oracle" else edm_precondition(denoiser, 0.5))
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigma_max
    with torch.no_grad():
        ref = K.sample_heun(d_k, x.clone(), sigmas, disable=True)
        sde, score = from_k_diffusion(denoiser, sigma_min=sigma_min, sigma_max=sigma_max, **kw)
        sol = reverse_sample(
            sde, score, x_T=x, times=sigmas[:-1], solver="heun", noise_scale=0.0, final_step="tweedie", return_info=True
        )
    _close(sol.x, ref)
    assert sol.nfe == d_k.calls == 2 * (n - 1) + 1


def test_euler_reproduces_k_diffusion_sample_euler():
    n = 15
    sigmas = K.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()
    denoiser = GM.perturbed(EDMSDE()).denoiser
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 80.0
    ref = K.sample_euler(denoiser, x.clone(), sigmas, disable=True)
    sde, score = from_k_diffusion(denoiser)
    out = reverse_sample(
        sde, score, x_T=x, times=sigmas[:-1], solver="euler_maruyama", noise_scale=0.0, final_step="tweedie"
    )
    _close(out, ref)
