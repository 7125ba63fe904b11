"""Sources of randomness for samplers, probes and dequantisation.

Every random draw in sdegen goes through a :class:`NoiseSource`, so the caller decides where the
randomness comes from:

* :class:`GeneratorNoise` draws from one ``torch.Generator`` (the default; fastest). Sample ``i``'s
  noise then depends on the batch it is drawn in.
* :class:`PerSampleNoise` is *counter based*: every number is a hash of
  ``(seed, sample_id, draw_counter, element_index)``, computed with integer tensor ops on the
  tensors' own device. Sample ``i`` gets bit-identical noise whether it is drawn alone, in a batch
  of 64, in chunks, or on rank 3 of 8 — the property that distributed and chunked sampling needs.
  It costs a few dozen integer ops per number and needs no host-device synchronisation.

The hash is the 32-bit "lowbias32" integer finaliser (C. Wellons, *Prospecting for hash functions*,
2018), chained over the four keys; two 32-bit words give a Box-Muller normal. It is a statistical
RNG for Monte Carlo, not a cryptographic one.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._utils import time_dtype

__all__ = ["NoiseSource", "GeneratorNoise", "PerSampleNoise", "make_noise"]

_M32 = 0xFFFFFFFF


@runtime_checkable
class NoiseSource(Protocol):
    """Where random numbers come from. ``shape[0]`` is always the batch dimension."""

    def normal(self, shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Standard normal numbers of ``shape``."""
        ...

    def uniform(self, shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Uniform numbers on ``[0, 1)`` of ``shape``."""
        ...

    def select(self, index: Tensor) -> NoiseSource:
        """The source restricted to the samples at ``index`` (for solvers that drop finished samples)."""
        ...


def normal_like(noise: NoiseSource, x: Tensor) -> Tensor:
    """Standard normal noise with the shape, device and dtype of ``x``."""
    return noise.normal(tuple(x.shape), device=x.device, dtype=x.dtype)


def rademacher_like(noise: NoiseSource, x: Tensor) -> Tensor:
    """Random signs (+1/-1 with probability 1/2 each) shaped like ``x``."""
    u = noise.uniform(tuple(x.shape), device=x.device, dtype=time_dtype(x.dtype))
    return torch.where(u < 0.5, -1.0, 1.0).to(x.dtype)


class GeneratorNoise:
    """Noise from a single ``torch.Generator`` (or torch's global RNG if ``generator`` is None).

    Same seed, same device, same dtype, same batch: bit-identical numbers.
    """

    def __init__(self, generator: torch.Generator | None = None):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def _check(self, device: torch.device) -> None:
        g = self.generator
        if g is not None and torch.device(g.device).type != torch.device(device).type:
            raise ValueError(
                f"generator is on device {g.device!s} but the samples are on {device!s}; "
                f"pass torch.Generator({str(torch.device(device).type)!r})"
            )

    def normal(self, shape, *, device, dtype):
        self._check(device)
        return torch.randn(shape, generator=self.generator, device=device, dtype=dtype)

    def uniform(self, shape, *, device, dtype):
        self._check(device)
        return torch.rand(shape, generator=self.generator, device=device, dtype=dtype)

    def select(self, index: Tensor) -> GeneratorNoise:
        return self


def _mix32(h: Tensor) -> Tensor:
    """lowbias32 finaliser on int64 tensors holding values in [0, 2**32).

    Both multipliers are below 2**31, so every product stays below 2**63: no signed overflow.
    """
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _M32
    return h ^ (h >> 15)


def _fold32(v: int) -> int:
    return (v ^ (v >> 32)) & _M32


class PerSampleNoise:
    """Counter-based noise: each number depends only on ``(seed, sample_id, draw, element)``.

    Args:
        seed: any Python integer.
        sample_ids: ``(batch,)`` integer tensor, the global index of each sample (default
            ``arange(batch)`` at the first draw). Two runs that give sample ``i`` the same id give it
            the same noise, whatever the batch, chunking or process layout.

    The draw counter advances by one at each call (prior, each Brownian increment, each probe), so
    two runs agree when they make the same sequence of draws — which every sdegen solver does for
    a given grid, independently of the batch.
    """

    def __init__(self, seed: int, sample_ids: Tensor | None = None, *, _counter: list[int] | None = None):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if sample_ids is not None:
            if not isinstance(sample_ids, Tensor) or sample_ids.ndim != 1 or sample_ids.is_floating_point():
                raise ValueError("sample_ids must be a 1-D integer tensor of shape (batch,)")
        self.seed = seed
        self.sample_ids = sample_ids
        self._counter = _counter if _counter is not None else [0]

    def _words(self, shape, device) -> tuple[Tensor, Tensor]:
        batch = shape[0]
        per = math.prod(shape[1:])
        ids = self.sample_ids
        if ids is None:
            ids = torch.arange(batch, device=device)
        if ids.shape[0] != batch:
            raise ValueError(f"sample_ids has {ids.shape[0]} entries but the batch has {batch}")
        ids = ids.to(device=device, dtype=torch.int64)
        draw = self._counter[0]
        self._counter[0] += 1
        ids32 = (ids ^ (ids >> 32)) & _M32
        key = _mix32(ids32 ^ _fold32(self.seed * 0x9E3779B9 + 0x7F4A7C15))
        key = _mix32(key ^ ((draw * 0x85EBCA6B + 0x68E31DA4) & _M32))
        elem = torch.arange(2 * per, device=device, dtype=torch.int64).reshape(1, per, 2)
        h = _mix32(elem ^ key.reshape(batch, 1, 1))
        h = _mix32(h ^ ((key.reshape(batch, 1, 1) * 0x2C1B3C6D) & _M32))
        return h[..., 0].reshape(shape), h[..., 1].reshape(shape)

    def uniform(self, shape, *, device, dtype):
        w, _ = self._words(tuple(shape), device)
        u = w.to(torch.float64) * 2.0**-32
        if dtype != torch.float64:  # rounding 1 - 2**-32 to a narrower dtype would give exactly 1.0
            u = u.clamp_max(1.0 - torch.finfo(dtype).eps / 2)
        return u.to(dtype)

    def normal(self, shape, *, device, dtype):
        w1, w2 = self._words(tuple(shape), device)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        u1 = (w1.to(cdt) + 0.5) * 2.0**-32  # in (0, 1): the log is finite
        u2 = w2.to(cdt) * 2.0**-32
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)

    def select(self, index: Tensor) -> PerSampleNoise:
        ids = self.sample_ids
        if ids is None:
            raise ValueError("select() on PerSampleNoise needs explicit sample_ids")
        return PerSampleNoise(self.seed, ids[index], _counter=self._counter)


def make_noise(
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
) -> NoiseSource:
    """Build the noise source an entry point asked for: ``seed`` → per-sample, else the generator."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator= or seed=, not both")
        return PerSampleNoise(seed, sample_ids)
    if sample_ids is not None:
        raise ValueError("sample_ids= needs seed= (counter-based per-sample noise)")
    return GeneratorNoise(generator)
