"""Jacobian diagonals and divergences of per-sample vector fields by autograd.

A *per-sample* field maps ``(batch, *dims) -> (batch, *dims)`` with output sample ``b`` depending
only on input sample ``b`` (true for score networks without batch-norm in training mode). Then one
vector-Jacobian product with the same basis vector ``e_j`` in every sample gives column ``j`` of all
``batch`` Jacobians at once, and ``D = prod(dims)`` products give every diagonal exactly.

Used for the ``∇·(G Gᵀ)`` term of state-dependent diffusions (:mod:`sdegen.reverse`) and for the
exact trace in the likelihood. Gradients are taken locally: the graph never outlives one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["jacobian_diagonal", "divergence_exact", "divergence_hutchinson"]

Field = Callable[[Tensor], Tensor]


def _default_chunk(x: Tensor) -> int:
    per = math.prod(x.shape[1:])
    # keep chunk * numel(x) around 2**22 elements, at least 1, at most D
    return max(1, min(per, (1 << 22) // max(1, x.numel())))


class _VJP:
    """``grads[k]ᵀ J`` for every ``k`` (``(K, *x.shape)``) of ``y = fn(x)``, batched with vmap when possible.

    Some models cannot run their backward under vmap (e.g. attention in diffusers UNets: "NYI: querying
    is_contiguous inside of vmap"). A failed batched backward may already have freed part of the graph,
    so the forward pass is recomputed once and the products are then taken one by one (same values).
    """

    def __init__(self, fn: Field, xg: Tensor):
        self.fn, self.xg = fn, xg
        self.y = fn(xg)
        self.batched = True

    def __call__(self, grads: Tensor, *, retain_graph: bool) -> Tensor:
        if self.batched:
            try:
                return torch.autograd.grad(self.y, self.xg, grads, retain_graph=retain_graph, is_grads_batched=True)[0]
            except RuntimeError as err:
                if "vmap" not in str(err) and "batched" not in str(err).lower():
                    raise
                self.batched = False
                self.y = self.fn(self.xg)
        last = grads.shape[0] - 1
        rows = [
            torch.autograd.grad(self.y, self.xg, g, retain_graph=retain_graph or k < last)[0]
            for k, g in enumerate(grads)
        ]
        return torch.stack(rows)


def jacobian_diagonal(fn: Field, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Exact diagonal ``∂fn(x)_i / ∂x_i`` of a per-sample field, shaped like ``x``.

    Args:
        fn: per-sample field ``(batch, *dims) -> (batch, *dims)``.
        x: ``(batch, *dims)`` point.
        chunk_size: number of basis vectors per batched vector-Jacobian product (memory bound);
            default keeps about 4M elements per product.

    Cost: one forward pass and ``ceil(D / chunk_size)`` batched backward passes, ``D = prod(dims)``.
    """
    return _diagonal_and_value(fn, x, chunk_size)[0]


def _diagonal_and_value(fn: Field, x: Tensor, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    batch, per = x.shape[0], math.prod(x.shape[1:])
    chunk = chunk_size or _default_chunk(x)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        vjp = _VJP(fn, xg)
        y = vjp.y
        if y.shape != x.shape:
            raise ValueError(f"field returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
        diag = torch.empty(batch, per, device=x.device, dtype=y.dtype)
        eye = torch.eye(per, device=x.device, dtype=y.dtype)
        for start in range(0, per, chunk):
            stop = min(per, start + chunk)
            basis = eye[start:stop]  # (c, per)
            grads = basis[:, None, :].expand(stop - start, batch, per).reshape(-1, *x.shape)
            cols = vjp(grads, retain_graph=stop < per)  # row j = e_jᵀ J for every sample
            cols = cols.reshape(stop - start, batch, per)
            idx = torch.arange(start, stop, device=x.device)
            diag[:, start:stop] = cols[torch.arange(stop - start, device=x.device), :, idx].T
    return diag.reshape(x.shape).detach(), y.detach()


def divergence_exact(fn: Field, x: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact divergence (Jacobian trace) per sample, ``(batch,)``, and the field value ``fn(x)`` (detached)."""
    diag, y = _diagonal_and_value(fn, x, chunk_size)
    return diag.reshape(x.shape[0], -1).sum(1), y


def divergence_hutchinson(fn: Field, x: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate ``mean_k ε_kᵀ J ε_k`` per sample, and the field value.

    Args:
        fn: per-sample field.
        x: ``(batch, *dims)``.
        probes: ``(K, batch, *dims)`` probe vectors with ``E[ε εᵀ] = I`` (Rademacher or Gaussian),
            held fixed along an ODE path.

    Returns:
        ``(estimate (batch,), fn(x) detached)`` — one forward and one batched backward pass.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        products = _VJP(fn, xg)
        vjp = products(probes.to(products.y.dtype), retain_graph=False)
        y = products.y
    est = (vjp * probes).reshape(probes.shape[0], x.shape[0], -1).sum(-1).mean(0)
    return est.detach(), y.detach()
