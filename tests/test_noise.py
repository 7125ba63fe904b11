"""Noise sources: determinism, batch invariance of counter-based noise, and its statistics."""

import math

import pytest
import torch

from sdegen.noise import GeneratorNoise, PerSampleNoise, make_noise, rademacher_like


def test_per_sample_noise_does_not_depend_on_the_batch():
    ids = torch.arange(100, 164)
    full = PerSampleNoise(5, ids).normal((64, 3, 4, 4), device="cpu", dtype=torch.float32)
    for lo, hi in [(0, 1), (3, 10), (20, 64)]:
        part = PerSampleNoise(5, ids[lo:hi]).normal((hi - lo, 3, 4, 4), device="cpu", dtype=torch.float32)
        assert torch.equal(part, full[lo:hi])
    other_seed = PerSampleNoise(6, ids).normal((64, 3, 4, 4), device="cpu", dtype=torch.float32)
    assert not torch.equal(other_seed, full)


def test_per_sample_noise_draws_advance():
    src = PerSampleNoise(1)
    a = src.normal((4, 8), device="cpu", dtype=torch.float64)
    b = src.normal((4, 8), device="cpu", dtype=torch.float64)
    assert not torch.equal(a, b)
    again = PerSampleNoise(1)
    assert torch.equal(again.normal((4, 8), device="cpu", dtype=torch.float64), a)


def test_per_sample_noise_statistics():
    """Moments of 2M normals within 6 standard errors (false-failure probability ~1e-8 per check)."""
    z = PerSampleNoise(0).normal((2000, 1000), device="cpu", dtype=torch.float64).flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 6 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 6 * math.sqrt(96 / n)
    # Kolmogorov–Smirnov against N(0, 1) on a sub-sample
    from scipy.stats import kstest

    assert kstest(z[:200000].numpy(), "norm").pvalue > 1e-6
    u = PerSampleNoise(0).uniform((1000, 1000), device="cpu", dtype=torch.float64).flatten()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / u.numel())


def test_rademacher_and_generator_noise():
    g = GeneratorNoise(torch.Generator().manual_seed(0))
    r = rademacher_like(g, torch.empty(1000, 10))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    a = GeneratorNoise(torch.Generator().manual_seed(3)).normal((5,), device="cpu", dtype=torch.float32)
    b = GeneratorNoise(torch.Generator().manual_seed(3)).normal((5,), device="cpu", dtype=torch.float32)
    assert torch.equal(a, b)


def test_make_noise_errors():
    with pytest.raises(ValueError, match="either generator= or seed="):
        make_noise(torch.Generator(), 3)
    with pytest.raises(ValueError, match="sample_ids"):
        make_noise(None, None, torch.arange(3))
    with pytest.raises(TypeError, match="generator"):
        GeneratorNoise("cpu")
    with pytest.raises(TypeError, match="seed"):
        PerSampleNoise(1.5)
