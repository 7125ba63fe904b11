"""Noise sources: determinism, batch invariance of counter-based noise, and its statistics."""

import math
import random

import pytest
import torch

from sdegen.noise import GeneratorNoise, PerSampleNoise, make_noise, philox4x32_10, rademacher_like


def test_per_sample_noise_does_not_depend_on_the_batch():
    ids = torch.arange(100, 164)
    full = PerSampleNoise(5, ids).normal((64, 3, 4, 4), device="cpu", dtype=torch.float32)
    for lo, hi in [(0, 1), (3, 10), (20, 64)]:
        part = PerSampleNoise(5, ids[lo:hi]).normal((hi - lo, 3, 4, 4), device="cpu", dtype=torch.float32)
        assert torch.equal(part, full[lo:hi])
    other_seed = PerSampleNoise(6, ids).normal((64, 3, 4, 4), device="cpu", dtype=torch.float32)
    assert not torch.equal(other_seed, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (1,)], ids=["5", "3x7", "1"])
def test_per_sample_noise_batch_invariance_odd_shapes(shape, dtype):
    """Element counts that do not fill a Philox block (4 words) or a Box–Muller pair: still batch invariant."""
    ids = torch.arange(37) * 7919 - 100
    src = PerSampleNoise(11, ids)
    full = [src.normal((37, *shape), device="cpu", dtype=dtype), src.uniform((37, *shape), device="cpu", dtype=dtype)]
    for lo, hi in [(0, 1), (5, 18), (36, 37), (0, 37)]:
        part = PerSampleNoise(11, ids[lo:hi])
        assert torch.equal(part.normal((hi - lo, *shape), device="cpu", dtype=dtype), full[0][lo:hi])
        assert torch.equal(part.uniform((hi - lo, *shape), device="cpu", dtype=dtype), full[1][lo:hi])


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


# ---------------------------------------------------------------------------------------------------
# Philox-4x32-10: known answers, an exact reference, and the (key, counter) layout of PerSampleNoise
# ---------------------------------------------------------------------------------------------------

M32 = 0xFFFFFFFF


def _philox_ref(ctr, key, rounds=10):
    """Philox-4x32 on Python ints (exact), written from Salmon et al. (SC'11) / Random123 ``philox.h``."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


# Random123 known-answer vectors for philox4x32_10 (kat_vectors): counter, key, output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answer_vectors(ctr, key, expected):
    """Deterministic: the Random123 answers, from both the tensor code and the pure-Python reference."""
    assert _philox_ref(ctr, key) == expected
    out = philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in ctr), key)
    assert tuple(int(w) for w in out) == expected


def test_philox_matches_exact_reference_on_random_counters_and_keys():
    """Deterministic: 500 random (counter, key) pairs, plus the extremes, against exact Python ints."""
    rng = random.Random(1234)
    cases = [tuple(rng.choice([0, 1, M32, 2**31, rng.getrandbits(32)]) for _ in range(6)) for _ in range(100)]
    cases += [tuple(rng.getrandbits(32) for _ in range(6)) for _ in range(400)]
    t = torch.tensor(cases, dtype=torch.int64)
    out = philox4x32_10((t[:, 0], t[:, 1], t[:, 2], t[:, 3]), (t[:, 4], t[:, 5]))
    got = torch.stack(out, dim=1).tolist()
    for case, row in zip(cases, got, strict=True):
        assert tuple(row) == _philox_ref(case[:4], case[4:]), case
    assert all(0 <= w <= M32 for row in got for w in row)


def test_per_sample_noise_key_and_counter_layout():
    """Deterministic: word 4b+j of sample id s in draw d is Philox word j at counter (b, d, s_lo, s_hi),
    key = seed mod 2**64; normals are Box–Muller on word pairs (cos, sin). All 64 id bits are used."""
    seed = -3
    s = seed % 2**64
    key = (s & M32, s >> 32)
    ids = torch.tensor([0, 1, -1, 2**32, 2**32 + 1, 2**63 - 1, -(2**63)], dtype=torch.int64)
    src = PerSampleNoise(seed, ids)
    src.uniform((7, 1), device="cpu", dtype=torch.float64)  # draw 0
    w = torch.stack(src._blocks(7, 3, "cpu"), dim=-1).reshape(7, 12)  # draw 1
    z = src.normal((7, 2, 5), device="cpu", dtype=torch.float64).reshape(7, 10)  # draw 2
    for i, sid in enumerate(ids.tolist()):
        ref1 = [x for b in range(3) for x in _philox_ref((b, 1, sid & M32, (sid >> 32) & M32), key)]
        assert w[i].tolist() == ref1
        ref2 = [x for b in range(3) for x in _philox_ref((b, 2, sid & M32, (sid >> 32) & M32), key)]
        for e in range(10):
            w_r, w_t = ref2[2 * (e // 2)], ref2[2 * (e // 2) + 1]
            r = math.sqrt(-2 * math.log((w_r + 0.5) * 2.0**-32))
            th = 2 * math.pi * w_t * 2.0**-32
            assert float(z[i, e]) == pytest.approx(r * (math.cos(th) if e % 2 == 0 else math.sin(th)), abs=1e-12)
    # the old 32-bit folding of the id made 1 and 2**32 collide; every id above gets its own noise
    assert torch.unique(w, dim=0).shape[0] == 7


def test_seeds_beyond_64_bits_and_negative_are_reduced_mod_2_64():
    """Deterministic: any int seed is accepted, reduced modulo 2**64, and gives reproducible noise."""

    def draw(seed):
        return PerSampleNoise(seed).normal((3, 5), device="cpu", dtype=torch.float64)

    assert torch.equal(draw(-1), draw(2**64 - 1))
    assert torch.equal(draw(2**70 + 5), draw(5))
    assert torch.equal(draw(-(2**100) - 7), draw(-(2**100) - 7))
    assert torch.equal(draw(2**64), draw(0))
    distinct = torch.stack([draw(sd) for sd in (0, 1, -1, 2**32, 2**63, 2**64 - 2)])
    assert torch.unique(distinct.reshape(6, -1), dim=0).shape[0] == 6


def test_per_sample_noise_limits_raise():
    """Deterministic: more than 4 * 2**32 numbers per sample, or more than 2**32 draws, raise."""
    with pytest.raises(ValueError, match="at most 4"):
        PerSampleNoise(0).normal((1, 4 * 2**32 + 1), device="cpu", dtype=torch.float32)
    src = PerSampleNoise(0, _counter=[2**32 - 1])
    src.normal((1, 3), device="cpu", dtype=torch.float32)  # the last draw
    with pytest.raises(RuntimeError, match="exhausted"):
        src.normal((1, 3), device="cpu", dtype=torch.float32)


def test_select_shares_the_draw_counter_and_the_numbers():
    """Deterministic: select() gives the selected rows of the full batch and advances the shared counter."""
    ids = torch.arange(10, 20)
    full = PerSampleNoise(9, ids)
    a = full.normal((10, 4), device="cpu", dtype=torch.float64)
    sub = PerSampleNoise(9, ids).select(torch.tensor([2, 7]))
    assert torch.equal(sub.normal((2, 4), device="cpu", dtype=torch.float64), a[[2, 7]])
    b = full.uniform((10, 4), device="cpu", dtype=torch.float64)
    ref = PerSampleNoise(9, ids)
    ref.normal((10, 4), device="cpu", dtype=torch.float64)
    assert torch.equal(b, ref.uniform((10, 4), device="cpu", dtype=torch.float64))


def test_float32_and_float64_normals_come_from_the_same_words():
    """Deterministic: the same seed gives the same noise in float32 and float64, up to float32 rounding
    (Box–Muller in float32 rounds u1 to 24 bits, which moves a normal by < 1e-3 near 0)."""
    z64 = PerSampleNoise(4).normal((1000, 100), device="cpu", dtype=torch.float64)
    z32 = PerSampleNoise(4).normal((1000, 100), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(z32.double(), z64, rtol=1e-5, atol=1e-3)
    u64 = PerSampleNoise(4).uniform((1000, 100), device="cpu", dtype=torch.float64)
    u32 = PerSampleNoise(4).uniform((1000, 100), device="cpu", dtype=torch.float32)
    assert torch.equal(u32, u64.clamp_max(1 - 2.0**-24).float())


# ---------------------------------------------------------------------------------------------------
# Statistics: collisions, independence, normality, uniformity
# ---------------------------------------------------------------------------------------------------


def _corr(a, b):
    a = a.flatten().double()
    b = b.flatten().double()
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())), a.numel()


def _assert_uncorrelated(a, b):
    """|corr| < 5 standard errors (1/sqrt(n)) of 0: false-failure probability 5.7e-7 per call."""
    r, n = _corr(a, b)
    assert abs(r) < 5 / math.sqrt(n), (r, n)


def test_no_collisions_across_seeds():
    """Seeds 0 and 242786, 10,000 samples of shape (10,) each: no sample vector of one seed equals one of
    the other, and the two streams are uncorrelated. The old 32-bit hash made 8,192 of the 10,000 samples
    of seed 242786 bit-identical copies of samples of seed 0. False-failure probability: ~5.7e-7 (the
    correlation; Philox rows of 10 float64 normals collide with probability < 1e-60)."""
    a = PerSampleNoise(0).normal((10_000, 10), device="cpu", dtype=torch.float64)
    b = PerSampleNoise(242786).normal((10_000, 10), device="cpu", dtype=torch.float64)
    assert torch.unique(a, dim=0).shape[0] == 10_000
    assert torch.unique(b, dim=0).shape[0] == 10_000
    assert torch.unique(torch.cat([a, b]), dim=0).shape[0] == 20_000
    _assert_uncorrelated(a, b)


def test_no_repeated_vectors_among_samples_and_draws():
    """10,000 sample ids x 50 draws of shape (8,) within one seed: all 500,000 vectors are distinct (the old
    hash, a 32-bit key per (sample, draw), repeated 16 of them). False-failure probability < 1e-60."""
    src = PerSampleNoise(0, torch.arange(10_000))
    rows = torch.cat([src.normal((10_000, 8), device="cpu", dtype=torch.float64) for _ in range(50)])
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_independence_across_sample_ids_draws_and_elements():
    """Correlations within 5 SE of 0 between consecutive draws for the same ids, consecutive ids in one
    draw, consecutive elements (including the cos/sin pair of one Box–Muller draw, and their squares, which
    share the radius). Five checks, false-failure probability 5 x 5.7e-7 ~ 3e-6."""
    src = PerSampleNoise(17, torch.arange(1000, 21_000))
    d0 = src.normal((20_000, 16), device="cpu", dtype=torch.float32)
    d1 = src.normal((20_000, 16), device="cpu", dtype=torch.float32)
    _assert_uncorrelated(d0, d1)  # draw k vs k+1, same ids
    _assert_uncorrelated(d0[:-1], d0[1:])  # id i vs i+1, same draw
    _assert_uncorrelated(d0[:, :-1], d0[:, 1:])  # element e vs e+1 (crosses pairs and Philox blocks)
    _assert_uncorrelated(d0[:, 0::2], d0[:, 1::2])  # cos vs sin of one Box–Muller pair
    _assert_uncorrelated(d0[:, 0::2] ** 2, d0[:, 1::2] ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_per_sample_normals_are_normal(dtype):
    """KS test against N(0, 1) on 2e5 normals (p > 1e-6, false-failure probability 1e-6) and the first four
    moments within 6 SE (false-failure probability ~2e-9 each, by the normal approximation)."""
    from scipy.stats import kstest

    z = PerSampleNoise(123).normal((1000, 200), device="cpu", dtype=dtype).double().flatten()
    n = z.numel()
    assert kstest(z.numpy(), "norm").pvalue > 1e-6
    assert abs(float(z.mean())) < 6 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n)
    assert abs(float((z**3).mean())) < 6 * math.sqrt(15 / n)
    assert abs(float((z**4).mean()) - 3) < 6 * math.sqrt(96 / n)
    assert float(z.abs().max()) <= math.sqrt(66 * math.log(2)) + 1e-6  # the documented tail cut


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_per_sample_uniforms_are_uniform(dtype):
    """Chi-square on 256 equal bins of 1e6 uniforms, and on the low byte of 1e6 raw Philox words, each with
    p > 1e-6 (false-failure probability 2e-6 in all)."""
    from scipy.stats import chisquare

    u = PerSampleNoise(5).uniform((1000, 1000), device="cpu", dtype=dtype).double().flatten()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.bincount((u * 256).long(), minlength=256)
    assert chisquare(counts.numpy()).pvalue > 1e-6
    w = torch.stack(PerSampleNoise(5)._blocks(1000, 250, "cpu"), dim=-1).flatten()
    assert chisquare(torch.bincount(w & 255, minlength=256).numpy()).pvalue > 1e-6
