"""Small tensor helpers shared across sdegen (private).

The one rule they enforce: a per-sample scalar has shape ``(batch,)`` and is broadcast against a
state of shape ``(batch, *dims)`` with :func:`bcast` — never with hand-written ``[:, None, None]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bcast", "time_dtype", "as_batch_time", "flat_sum", "finiteness_probe", "first_nonfinite"]


def bcast(v: Tensor | float, x: Tensor) -> Tensor | float:
    """Reshape a per-sample value so it broadcasts against ``x``.

    ``v`` may be a Python number, a 0-d tensor, a ``(batch,)`` tensor, or already have ``x.ndim``
    dimensions; a ``(batch,)`` tensor becomes ``(batch, 1, ..., 1)``.
    """
    if not isinstance(v, Tensor) or v.ndim == 0 or v.ndim == x.ndim:
        return v
    if v.ndim == 1:
        return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))
    raise ValueError(f"cannot broadcast a value of shape {tuple(v.shape)} against {tuple(x.shape)}")


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype used for times and schedules next to a state of ``dtype``: float32 or better.

    Low-precision states (bf16/fp16) keep their times in float32: in bf16, ``t = 1e-3`` and
    ``sigma = 0.002`` are poorly represented and schedules collapse.
    """
    if dtype == torch.float64:
        return torch.float64
    return torch.float32


def as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(batch,)`` tensor on ``x``'s device (times keep float32 or better)."""
    dt = time_dtype(x.dtype)
    if not isinstance(t, Tensor):
        return torch.full((x.shape[0],), float(t), device=x.device, dtype=dt)
    t = t.to(device=x.device, dtype=t.dtype if t.dtype == torch.float64 else dt)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape (batch,)={(x.shape[0],)}, got {tuple(t.shape)}")
    return t


def flat_sum(x: Tensor) -> Tensor:
    """Sum over all but the batch dimension: ``(batch, *dims) -> (batch,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def finiteness_probe(x: Tensor) -> Tensor:
    """A 0-d tensor that is finite iff every element of ``x`` is: the sum (NaN and ±Inf propagate through it).

    One cheap reduction (5x cheaper than ``aminmax``) and no synchronisation. A sum can overflow only
    when elements are near the dtype's largest value divided by ``x.numel()`` (~1e32 in float32 for a
    million elements): such a state is as broken as a NaN. float16 sums accumulate in float32.
    """
    x = x.detach()
    return x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum()


def first_nonfinite(probes: list[Tensor], device: torch.device, offset: int = 0) -> Tensor:
    """Index ``offset + i`` of the first non-finite probe, or -1, as a 0-d device tensor (no synchronisation).

    ``probes`` holds :func:`finiteness_probe` values, one per step or evaluation, kept on the device so
    that the check costs no host-device synchronisation until it is read.
    """
    if not probes:
        return torch.full((), -1, dtype=torch.long, device=device)
    try:  # mixed dtypes (a bf16 model under a float32 state) are promoted; the values are only tested
        bad = ~torch.isfinite(torch.stack(probes))
    except RuntimeError:  # mixed devices: test each, then gather
        bad = torch.stack([~torch.isfinite(p).to(device) for p in probes])
    first = torch.argmax(bad.to(torch.uint8)) + offset  # argmax returns the first maximum: the first bad entry
    return torch.where(bad.any(), first, -1)
