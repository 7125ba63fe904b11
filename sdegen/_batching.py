"""Splitting a batch into memory-bounded chunks without changing any sample's result (private).

Shared by :func:`sdegen.reverse_sample` and the likelihood functions: the chunks, the per-chunk
noise source (counter-based noise restarts its draw counter per chunk, so every sample sees the
same draws as in one big batch) and the per-chunk conditioning kwargs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .noise import NoiseSource, PerSampleNoise, make_noise

__all__ = ["chunks", "batch_noise", "chunk_noise", "select_model"]


def chunks(batch: int, max_batch: int | None) -> list[slice]:
    """Slices of at most ``max_batch`` samples covering ``range(batch)`` (one slice when None)."""
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
    size = max_batch or max(batch, 1)
    return [slice(s, min(batch, s + size)) for s in range(0, batch, size)]


def batch_noise(
    generator: torch.Generator | None,
    seed: int | None,
    sample_ids: Tensor | None,
    batch: int,
    device: torch.device,
) -> NoiseSource:
    """The noise source for a batch: per-sample (``seed``; ids default to ``0..batch-1``) or a generator."""
    if sample_ids is not None and (not isinstance(sample_ids, Tensor) or sample_ids.shape != (batch,)):
        got = tuple(sample_ids.shape) if isinstance(sample_ids, Tensor) else type(sample_ids).__name__
        raise ValueError(f"sample_ids must be an integer tensor of shape (batch,)={(batch,)}, got {got}")
    if seed is not None and sample_ids is None:
        sample_ids = torch.arange(batch, device=device)
    return make_noise(generator, seed, sample_ids)


def chunk_noise(noise: NoiseSource, sl: slice, batch: int) -> NoiseSource:
    """The source for the samples in ``sl``; a generator is shared (its chunks draw one after another)."""
    if isinstance(noise, PerSampleNoise) and (sl.start, sl.stop) != (0, batch):
        return PerSampleNoise(noise.seed, noise.sample_ids[sl])
    return noise


def select_model(score: Callable, model_kwargs: dict, batch: int, index: slice | Tensor) -> tuple[Callable, dict]:
    """The model and conditioning of the samples at ``index`` of a ``batch``.

    Every tensor kwarg whose leading dimension is the batch is indexed; the others pass through. A score
    model with per-sample parameters (:class:`~sdegen.models.PerSampleModel`, e.g. a guidance weight of
    shape ``(batch,)``) is restricted with its ``for_samples``.
    """
    from .models import PerSampleModel, implements

    kwargs = {
        k: v[index] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch else v
        for k, v in model_kwargs.items()
    }
    if implements(score, PerSampleModel):
        score = score.for_samples(index, batch)
    return score, kwargs
