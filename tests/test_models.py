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
