"""Score adapters: conversions are exact inverses, and adapters wrap networks correctly."""

import pytest
import torch

from sdegen import EDMSDE, VESDE, VPSDE, SubVPSDE, from_denoiser, from_epsilon, from_score, from_velocity, models
from sdegen.testing import GaussianMixture

GM = GaussianMixture([0.5, 0.5], [[-1.0, 0.5, 0.0], [1.0, 0.0, 2.0]], [0.3, 0.6])


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), EDMSDE()], ids=["vp", "subvp", "ve", "edm"])
def test_round_trips_are_identities(sde):
    x = torch.randn(16, 3, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.9 * sde.T + 0.05 * sde.T
    score = GM.perturbed(sde).score(x, t)
    for to, back in [
        (models.epsilon_from_score, models.score_from_epsilon),
        (models.denoiser_from_score, models.score_from_denoiser),
        (models.velocity_from_score, models.score_from_velocity),
    ]:
        torch.testing.assert_close(back(sde, x, t, to(sde, x, t, score)), score, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDMSDE()], ids=["vp", "ve", "edm"])
def test_adapters_with_exact_predictions(sde):
    pm = GM.perturbed(sde)
    x = torch.randn(16, 3, dtype=torch.float64) * 2
    t = torch.full((16,), 0.3 * sde.T, dtype=torch.float64)
    ref = pm.score(x, t)
    for adapter, net in [(from_epsilon, pm.epsilon), (from_denoiser, pm.denoiser), (from_velocity, pm.velocity)]:
        torch.testing.assert_close(adapter(net, sde)(x, t), ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(from_score(pm.score)(x, t), ref)


def test_kwargs_pass_through_and_time_input():
    seen = {}

    def net(x, t, class_labels=None):
        seen["labels"], seen["t"] = class_labels, t
        return torch.zeros_like(x)

    sm = from_epsilon(net, VPSDE(), time_input=lambda t: 999 * t)
    sm(torch.zeros(2, 3), torch.tensor([0.5, 1.0]), class_labels=torch.tensor([1, 2]))
    assert seen["labels"].tolist() == [1, 2]
    torch.testing.assert_close(seen["t"], torch.tensor([499.5, 999.0]))


def test_adapter_errors():
    with pytest.raises(ValueError, match="parametrisation"):
        models.ScoreModel(lambda x, t: x, VPSDE(), "noise")
    with pytest.raises(ValueError, match="needs the sde"):
        models.ScoreModel(lambda x, t: x, None, "epsilon")
    with pytest.raises(ValueError, match="network returned"):
        from_epsilon(lambda x, t: x[:, :1], VPSDE())(torch.zeros(2, 3), torch.tensor(0.5))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ddim"])
def test_data_prediction_solvers_skip_the_score(monkeypatch, solver):
    """Solvers that use only x̂0 take it from the model's raw output with per-grid coefficients (or its
    ``denoise``): the same samples as through ``predict`` (to float32 rounding), without computing the score."""
    from sdegen import reverse_sample

    sde = VPSDE()
    pm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.3]).perturbed(sde)
    eps_net = lambda x, t: -pm.score(x, t) * sde.marginal(t)[1][:, None]  # noqa: E731
    model = from_epsilon(eps_net, sde)

    class PredictOnly:  # the same model without the x̂0-only method
        def __call__(self, x, t):
            return model(x, t)

        def predict(self, x, t):
            return model.predict(x, t)

    kw = dict(shape=(64, 2), solver=solver, steps=12, generator=torch.Generator().manual_seed(3))
    ref = reverse_sample(sde, PredictOnly(), **kw)
    kw["generator"] = torch.Generator().manual_seed(3)

    def no_score(*args):
        raise AssertionError("the score was computed")

    monkeypatch.setitem(models.ScoreModel._CONVERT, "epsilon", no_score)
    torch.testing.assert_close(reverse_sample(sde, model, **kw), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parametrisation", ["score", "epsilon", "denoiser", "velocity", "flow"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "ddim"])
def test_fused_grid_updates_match_the_conversions(parametrisation, solver):
    """On a fixed grid a ScoreModel's raw output enters the drift and x̂0 through per-grid coefficients
    (``linear_coefficients``); a subclass takes the general path (convert, then update): same samples to
    float64 rounding, for every parametrisation, including a flow model started at t = 1."""
    from sdegen import FlowMatchingSDE, reverse_sample

    f64 = torch.float64
    sde = FlowMatchingSDE() if parametrisation == "flow" else VPSDE()
    pm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.3]).perturbed(sde)
    cls = models.FlowModel if parametrisation == "flow" else models.ScoreModel

    def net(x, t):  # the exact model in the requested parametrisation
        score = pm.score(x, t)
        m, s = (v[:, None] for v in sde.marginal(t))
        x0 = (x + s**2 * score) / m if parametrisation != "flow" else None
        if parametrisation == "score":
            return score
        if parametrisation == "epsilon":
            return -s * score
        if parametrisation == "denoiser":
            return x0
        if parametrisation == "velocity":
            return m * (-s * score) - s * x0
        return pm.flow_velocity(x, t)

    general = type("Subclass", (cls,), {})  # not exactly ScoreModel/FlowModel: the unfused path
    args = (net, sde) if parametrisation == "flow" else (net, sde, parametrisation)
    fused, unfused = cls(*args), general(*args)
    kw = dict(shape=(32, 2), solver=solver, steps=8, dtype=f64)
    if parametrisation == "flow":  # from t = 1: the probability-flow ODE (the reverse SDE is refused there)
        kw.update(t_min=1e-3, noise_scale=0.0)
    a = reverse_sample(sde, fused, generator=torch.Generator().manual_seed(1), **kw)
    b = reverse_sample(sde, unfused, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
