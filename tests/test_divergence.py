"""Exact Jacobian diagonals and Hutchinson estimates against full Jacobians."""

import pytest
import torch

from sdegen.divergence import divergence_exact, divergence_hutchinson, jacobian_diagonal


def _full_jacobians(f, x):
    jac = torch.autograd.functional.jacobian
    return torch.stack([jac(lambda z: f(z[None])[0].reshape(-1), xi).reshape(xi.numel(), -1) for xi in x])


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_diagonal_and_trace_match_full_jacobian(chunk_size):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 7)).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    J = _full_jacobians(net, x)
    torch.testing.assert_close(jacobian_diagonal(net, x, chunk_size=chunk_size), torch.diagonal(J, dim1=1, dim2=2))
    torch.testing.assert_close(divergence_exact(net, x, chunk_size=chunk_size)[0], J.diagonal(dim1=1, dim2=2).sum(1))
    probes = torch.randn(3, 4, 7, dtype=torch.float64)
    est, y = divergence_hutchinson(net, x, probes)
    ref = torch.einsum("kbi,bij,kbj->kb", probes, J, probes).mean(0)
    torch.testing.assert_close(est, ref)
    torch.testing.assert_close(y, net(x).detach())
    assert not y.requires_grad and not est.requires_grad


def test_models_whose_backward_cannot_run_under_vmap():
    """diffusers' attention blocks refuse batched gradients; the products are then taken one by one."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).double()
    f = lambda z: unet(z, 10).sample
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    J = _full_jacobians(f, x)
    torch.testing.assert_close(divergence_exact(f, x, chunk_size=32)[0], J.diagonal(dim1=1, dim2=2).sum(1))
    probes = torch.randn(2, 2, 1, 8, 8, dtype=torch.float64)
    est, _ = divergence_hutchinson(f, x, probes)
    p = probes.reshape(2, 2, 64)
    torch.testing.assert_close(est, torch.einsum("kbi,bij,kbj->kb", p, J, p).mean(0))
