"""Classifier-free and classifier guidance.

What is proved:
* classifier-free guidance equals the two-call formula ``s_u + w (s_c − s_u)`` exactly, makes ONE network
  call on a doubled batch per evaluation, and counts 1 NFE per evaluation inside ``reverse_sample``;
* classifier guidance at scale 1 with the Bayes classifier of a Gaussian mixture is exactly the
  conditional score ``∇ log p_t(x | y)`` (autograd), and samples the conditional component with several
  solvers (moments within 5 standard errors plus a stated discretisation allowance; each assertion
  fails by chance with probability ~1e-6);
* conditioning passes through ``reverse_sample(model_kwargs=...)`` to a diffusers class-conditional UNet.
"""

import math

import pytest
import torch

from sdegen import VPSDE, reverse_sample
from sdegen.guidance import ClassifierFreeGuidance, classifier_free, classifier_guidance
from sdegen.testing import GaussianMixture

MEANS = [[-1.0, 0.0], [1.0, 0.5]]
VARS = [[0.3, 0.2], [0.25, 0.4]]
GM = GaussianMixture([0.5, 0.5], MEANS, VARS)
COMPONENTS = [GaussianMixture([1.0], [mu], [var]) for mu, var in zip(MEANS, VARS, strict=True)]
NULL = 2  # the "unconditional" label


class ConditionalOracle:
    """Exact class-conditional score: labels 0/1 -> component score, label 2 -> mixture score."""

    def __init__(self, sde):
        self.parts = [c.perturbed(sde) for c in COMPONENTS] + [GM.perturbed(sde)]
        self.calls = []

    def __call__(self, x, t, class_labels, **kwargs):
        self.calls.append((x.shape[0], dict(kwargs, class_labels=class_labels)))
        all_scores = torch.stack([p.score(x, t) for p in self.parts], dim=1)  # (B, 3, d)
        idx = class_labels.long().reshape(-1, 1, 1).expand(-1, 1, x.shape[1])
        return all_scores.gather(1, idx).squeeze(1)


def bayes_log_prob_y(sde):
    """Exact ``log p_t(y | x) = log w_y + log N_y,t(x) − log p_t(x)`` of the mixture (differentiable)."""
    comps = [c.perturbed(sde) for c in COMPONENTS]
    mix = GM.perturbed(sde)

    def log_prob_y(x, t, class_labels):
        joint = torch.stack([math.log(0.5) + c.log_prob(x, t) for c in comps], dim=1)  # (B, K)
        return joint.gather(1, class_labels.long().reshape(-1, 1)).squeeze(1) - mix.log_prob(x, t)

    return log_prob_y


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, dtype=torch.float64, generator=g) * 1.5
    t = torch.rand(n, dtype=torch.float64, generator=g) * 0.9 + 0.05
    y = torch.randint(0, 2, (n,), generator=g)
    return x, t, y


# -- classifier-free guidance ------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, "tensor"])
def test_cfg_equals_two_call_formula_in_one_call(w):
    sde = VPSDE()
    model = ConditionalOracle(sde)
    x, t, y = _data()
    if w == "tensor":
        w = torch.linspace(0.0, 4.0, 8, dtype=torch.float64)
    guided = classifier_free(model, w, uncond=NULL)
    extra = torch.arange(8.0)
    out = guided(x, t, class_labels=y, extra=extra, flag="keep")
    assert len(model.calls) == 1
    batch, kw = model.calls[0]
    assert batch == 16
    assert torch.equal(kw["class_labels"], torch.cat([y, torch.full_like(y, NULL)]))
    assert torch.equal(kw["extra"], torch.cat([extra, extra])) and kw["flag"] == "keep"
    s_c = model(x, t, class_labels=y)
    s_u = model(x, t, class_labels=torch.full_like(y, NULL))
    wb = w.reshape(-1, 1) if isinstance(w, torch.Tensor) else w
    assert torch.allclose(out, s_u + wb * (s_c - s_u), rtol=1e-13, atol=1e-13)
    if not isinstance(w, torch.Tensor) and w == 1.0:  # w = 1: the conditional score itself
        assert torch.allclose(out, s_c, rtol=1e-13, atol=1e-13)


def test_cfg_counts_one_nfe_per_evaluation():
    sde = VPSDE()
    model = ConditionalOracle(sde)
    y = torch.tensor([0, 1, 1, 0, 1])
    sol = reverse_sample(
        sde,
        classifier_free(model, 3.0, uncond=NULL),
        (5, 2),
        solver="heun",
        steps=4,
        noise_scale=0.0,
        model_kwargs={"class_labels": y},
        seed=0,
        return_info=True,
    )
    assert sol.nfe == 8 == len(model.calls)  # Heun: 2 evaluations per step, each ONE network call
    assert all(b == 10 for b, _ in model.calls)
    assert all(torch.equal(kw["class_labels"][:5], y) for _, kw in model.calls)
    # embeddings: a (1, L, D) null embedding broadcasts to the conditional one
    emb_calls = []

    def emb_model(x, t, encoder_hidden_states):
        emb_calls.append(encoder_hidden_states)
        return -x * encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1)

    cond = torch.ones(5, 3, 4)
    g = classifier_free(emb_model, 2.0, cond_kwarg="encoder_hidden_states", uncond=torch.zeros(1, 3, 4))
    x = torch.randn(5, 2)
    assert torch.allclose(g(x, torch.full((5,), 0.5), encoder_hidden_states=cond), -2.0 * x)
    assert emb_calls[0].shape == (10, 3, 4) and emb_calls[0][5:].abs().sum() == 0


def test_cfg_errors():
    model = ConditionalOracle(VPSDE())
    with pytest.raises(ValueError, match="uncond"):
        classifier_free(model, 2.0, uncond=None)
    with pytest.raises(TypeError, match="w must"):
        classifier_free(model, "2", uncond=NULL)
    g = ClassifierFreeGuidance(model, 2.0, uncond=NULL)
    x, t, y = _data()
    with pytest.raises(TypeError, match="class_labels"):
        g(x, t)
    with pytest.raises(ValueError, match="first dimension"):
        g(x, t, class_labels=y[:3])


# -- classifier guidance -----------------------------------------------------------------------------------
def test_classifier_guidance_is_the_exact_conditional_score():
    sde = VPSDE()
    x, t, y = _data(32)
    guided = classifier_guidance(GM.perturbed(sde).score, bayes_log_prob_y(sde), 1.0)
    with torch.no_grad():  # autograd still runs on the local graph
        out = guided(x, t, class_labels=y)
    exact = ConditionalOracle(sde)(x, t, class_labels=y)
    assert torch.allclose(out, exact, rtol=1e-9, atol=1e-9)
    # scale multiplies the classifier gradient only
    g2 = classifier_guidance(GM.perturbed(sde).score, bayes_log_prob_y(sde), 3.0)
    base = GM.perturbed(sde).score(x, t)
    assert torch.allclose(g2(x, t, class_labels=y) - base, 3.0 * (exact - base), rtol=1e-9, atol=1e-9)


def test_classifier_guidance_log_prob_shape_checked():
    sde = VPSDE()
    x, t, y = _data()
    g = classifier_guidance(GM.perturbed(sde).score, lambda x, t, **k: x, 1.0)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        g(x, t, class_labels=y)


# solver, noise_scale, steps, allowance for discretisation bias: the bias measured with 20000 samples per
# class at these steps is at most 0.4 of it (ddim variance: -0.02; Euler-Maruyama and Heun: <= 0.01)
GUIDED_CASES = [("euler_maruyama", 1.0, 100, 0.06), ("heun", 0.0, 25, 0.03), ("ddim", 0.0, 100, 0.05)]


@pytest.mark.parametrize(("solver", "noise_scale", "steps", "bias"), GUIDED_CASES)
def test_classifier_guidance_samples_the_conditional_component(solver, noise_scale, steps, bias):
    sde = VPSDE()
    n = 2000
    y = torch.arange(n) % 2
    guided = classifier_guidance(GM.perturbed(sde).score, bayes_log_prob_y(sde), 1.0)
    x = reverse_sample(
        sde,
        guided,
        (n, 2),
        solver=solver,
        steps=steps,
        noise_scale=noise_scale,
        model_kwargs={"class_labels": y},
        seed=7,
        dtype=torch.float64,
    )
    for k in range(2):
        xk = x[y == k]
        nk = xk.shape[0]
        mu, var = torch.tensor(MEANS[k], dtype=torch.float64), torch.tensor(VARS[k], dtype=torch.float64)
        se_mean, se_var = torch.sqrt(var / nk), var * math.sqrt(2 / (nk - 1))
        assert ((xk.mean(0) - mu).abs() < 5 * se_mean + bias).all(), (solver, k, xk.mean(0))
        assert ((xk.var(0) - var).abs() < 5 * se_var + bias).all(), (solver, k, xk.var(0))


def test_cfg_with_a_class_conditional_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    from sdegen.integrations.diffusers import from_diffusers

    torch.manual_seed(0)
    unet = (
        diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=3,
        )
        .double()
        .eval()
    )
    sde, score = from_diffusers(unet, diffusers.DDPMScheduler(num_train_timesteps=100))
    y = torch.tensor([0, 1, 0])
    x_T = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sol = reverse_sample(
            sde,
            classifier_free(score, 2.0, uncond=2),
            x_T=x_T,
            solver="ddim",
            steps=3,
            noise_scale=0.0,
            model_kwargs={"class_labels": y},
            return_info=True,
        )
        assert sol.nfe == 3 and torch.isfinite(sol.x).all()
        # one guided evaluation = the two-call formula on the real network (batch-size-invariant kernels)
        t = torch.full((3,), 0.5, dtype=torch.float64)
        guided = classifier_free(score, 2.0, uncond=2)(x_T, t, class_labels=y)
        s_c, s_u = score(x_T, t, class_labels=y), score(x_T, t, class_labels=torch.full_like(y, 2))
    assert torch.allclose(guided, s_u + 2.0 * (s_c - s_u), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["classifier", "cfg"])
def test_guided_likelihood_is_the_conditional_likelihood(kind):
    """Scale 1 (classifier, Bayes) and w = 1 (CFG) give the exact log p(x | y) through the likelihood ODE.

    The divergence of the classifier-guided score needs the guidance term differentiated too (the
    gradient is then built with create_graph=True); without it the error here is ~0.3 nats.
    Tolerance 1e-4 nats: the measured ODE error at rtol = atol = 1e-5 is ~2e-6.
    """
    likelihood = pytest.importorskip("sdegen.likelihood")
    sde = VPSDE()
    y = torch.zeros(6, dtype=torch.long)
    comp = COMPONENTS[0].perturbed(sde)
    x = COMPONENTS[0].sample(6, generator=torch.Generator().manual_seed(0))
    if kind == "classifier":
        guided = classifier_guidance(GM.perturbed(sde).score, bayes_log_prob_y(sde), 1.0)
    else:
        guided = classifier_free(ConditionalOracle(sde), 1.0, uncond=NULL)
    ll = likelihood.log_likelihood(
        sde, guided, x, model_kwargs={"class_labels": y}, prior_log_prob=lambda z: comp.log_prob(z, sde.T)
    )
    assert torch.allclose(ll, comp.log_prob(x, 1e-5), rtol=0, atol=1e-4)
