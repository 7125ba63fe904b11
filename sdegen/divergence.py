"""Jacobian diagonals, divergences and trace estimators of per-sample vector fields by autograd.

A *per-sample* field maps ``(batch, *dims) -> (batch, *dims)`` with output sample ``b`` depending
only on input sample ``b`` (true for score networks without batch-norm in training mode). Then one
vector-Jacobian product (VJP) with the same basis vector ``e_j`` in every sample gives row ``j`` of all
``batch`` Jacobians at once, and ``D = prod(dims)`` products give every diagonal exactly.

**Exact diagonal / trace** (:func:`jacobian_diagonal`, :func:`divergence_exact`), three ways to take the
``D`` products, chosen by ``mode``:

* ``"vjp"`` — reverse mode, ``chunk_size`` rows per backward pass run as one batched backward
  (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the backward);
* ``"vjp_loop"`` — reverse mode, one backward pass per basis vector on the retained graph;
* ``"jvp"`` — forward mode, ``torch.func.jvp`` under ``torch.func.vmap`` over ``chunk_size`` tangents
  (one forward pass per chunk; no graph is stored).

``"auto"`` picks the fastest measured for the device (:func:`exact_mode`; ``benchmarks/likelihood.py``
and ``docs/likelihood.md`` hold the measurements). Memory is bounded by ``chunk_size`` rows of products at a
time; the default chunk depends on the device (about ``2**17`` elements per pass on CPU, ``2**22`` elsewhere).
Models whose backward cannot run under ``vmap`` (attention in diffusers UNets: "NYI: querying
is_contiguous inside of vmap") fall back to one product at a time, with the same values; forward mode falls
back to reverse mode for models ``torch.func`` cannot transform.

**Stochastic traces.** :func:`hutchinson_estimates` gives Hutchinson's ``ε_kᵀ J ε_k`` for every probe
``k`` (Hutchinson 1989), :func:`hutchpp_estimates` the Hutch++ estimator (Meyer, Musco, Musco & Woodruff
2021, "Hutch++: optimal stochastic trace estimation", Alg. 1) with one value per residual probe, so that the
caller can report the spread over probes as a standard error.

Used for the ``∇·(G Gᵀ)`` term of state-dependent diffusions (:mod:`sdegen.reverse`) and for the
likelihood (:mod:`sdegen.likelihood`). Gradients are taken locally: the graph never outlives one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "jacobian_diagonal",
    "divergence_exact",
    "divergence_hutchinson",
    "hutchinson_estimates",
    "hutchpp_estimates",
    "exact_mode",
    "EXACT_MODES",
]

Field = Callable[[Tensor], Tensor]
EXACT_MODES = ("auto", "vjp", "vjp_loop", "jvp")


def _default_chunk(x: Tensor) -> int:
    """Basis vectors per batched backward pass: ``chunk · numel(x)`` near ``2**17`` elements on CPU (measured
    fastest there: larger batched passes lose to vmap overhead and cache misses, smaller ones to per-pass
    overhead), ``2**22`` elsewhere; at least 1, at most ``D``."""
    per = math.prod(x.shape[1:])
    budget = 1 << (17 if x.device.type == "cpu" else 22)
    return max(1, min(per, budget // max(1, x.numel())))


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def exact_mode(mode: str, device: torch.device | str) -> str:
    """The product mode ``"auto"`` resolves to on ``device`` (other modes are returned as given).

    ``"vjp"`` with the device's default chunk (about ``2**17`` elements per batched pass on CPU, ``2**22``
    elsewhere). Measured on CPU (one thread,
    ``python -m benchmarks.likelihood --only trace``): with about ``2**17`` elements per batched backward pass
    it is as fast as a loop of single products (``"vjp_loop"``) for large batches and 2-4x faster for small
    ones (fixed cost per backward pass), where one batched pass over all ``D`` rows is 2-3x slower for large
    batches; forward mode (``"jvp"``) was 1.5-5x slower than both on every case.
    """
    if mode not in EXACT_MODES:
        raise ValueError(f"exact_mode must be one of {EXACT_MODES}, got {mode!r}")
    return "vjp" if mode == "auto" else mode


class _Products:
    """Vector–Jacobian products ``vᵀ J`` of ``y = fn(x)`` for a stack of ``v``, batched with vmap when possible.

    Some models cannot run their backward under vmap (e.g. attention in diffusers UNets: "NYI: querying
    is_contiguous inside of vmap"). A failed batched backward may already have freed part of the graph,
    so the forward pass is recomputed once and the products are then taken one by one (same values). The
    outcome is remembered in ``memo`` (a dict shared by the calls of one solve), so the failing attempt and
    its recomputed forward pass happen once, not at every evaluation.
    """

    def __init__(self, fn: Field, x: Tensor, *, batched: bool = True, memo: dict | None = None):
        self.fn = fn
        self.xg = x.detach().requires_grad_(True)
        self.y = fn(self.xg)
        if not isinstance(self.y, Tensor) or self.y.shape != x.shape:
            got = tuple(self.y.shape) if isinstance(self.y, Tensor) else type(self.y).__name__
            raise ValueError(f"field returned shape {got}, expected {tuple(x.shape)}")
        self.memo = memo if memo is not None else {}
        self.batched = batched and self.memo.get("batched", True)

    def __call__(self, grads: Tensor, *, retain_graph: bool) -> Tensor:
        """``(K, *x.shape)`` products for ``grads`` ``(K, *x.shape)``."""
        if self.batched and grads.shape[0] > 1:
            try:
                return torch.autograd.grad(self.y, self.xg, grads, retain_graph=retain_graph, is_grads_batched=True)[0]
            except RuntimeError as err:
                if "vmap" not in str(err) and "batched" not in str(err).lower():
                    raise
                self.batched = self.memo["batched"] = False  # later calls with the same memo skip the attempt
                self.y = self.fn(self.xg)
        last = grads.shape[0] - 1
        rows = [
            torch.autograd.grad(self.y, self.xg, g, retain_graph=retain_graph or k < last)[0]
            for k, g in enumerate(grads)
        ]
        return torch.stack(rows)

    def chunked(self, grads: Tensor, chunk: int, *, retain_graph: bool) -> Tensor:
        """The products of ``grads`` ``(K, *x.shape)``, ``chunk`` rows per backward pass."""
        k = grads.shape[0]
        if k <= chunk:
            return self(grads, retain_graph=retain_graph)
        out = [
            self(grads[s : s + chunk], retain_graph=retain_graph or s + chunk < k) for s in range(0, k, chunk)
        ]
        return torch.cat(out)


def _basis(eye: Tensor, start: int, stop: int, batch: int, shape: tuple) -> Tensor:
    """Rows ``e_j`` for ``j in [start, stop)`` repeated over the batch: ``(stop - start, *shape)``."""
    return eye[start:stop, None, :].expand(stop - start, batch, eye.shape[0]).reshape(stop - start, *shape)


def _pick(rows: Tensor, start: int, batch: int, per: int) -> Tensor:
    """From ``(c, batch, per)`` products of ``e_{start+j}``, the entries ``j``: ``(batch, c)``."""
    c = rows.shape[0]
    return torch.diagonal(rows.reshape(c, batch, per)[:, :, start : start + c], dim1=0, dim2=2)


def jacobian_diagonal(
    fn: Field, x: Tensor, *, chunk_size: int | None = None, mode: str = "auto", memo: dict | None = None
) -> Tensor:
    """Exact diagonal ``∂fn(x)_i / ∂x_i`` of a per-sample field, shaped like ``x``.

    Args:
        fn: per-sample field ``(batch, *dims) -> (batch, *dims)``.
        x: ``(batch, *dims)`` point.
        chunk_size: basis vectors per batched product (memory bound); default keeps about 4M elements per
            product. Unused by ``mode="vjp_loop"`` (one row at a time).
        mode: ``"auto"``, ``"vjp"``, ``"vjp_loop"`` or ``"jvp"`` (module docstring).
        memo: a dict kept across the calls for one model (e.g. along an ODE solve): remembers whether its
            backward runs under vmap and whether forward mode works, so a failing attempt is made once.

    Cost: one forward pass and ``D = prod(dims)`` products (reverse: ``ceil(D / chunk_size)`` batched backward
    passes; forward: as many forward passes with ``chunk_size`` tangents).
    """
    return _diagonal_and_value(fn, x, chunk_size, mode, memo)[0]


def _diagonal_and_value(
    fn: Field, x: Tensor, chunk_size: int | None, mode: str, memo: dict | None = None
) -> tuple[Tensor, Tensor]:
    _check_chunk(chunk_size)
    mode = exact_mode(mode, x.device)
    memo = memo if memo is not None else {}
    if mode == "jvp" and memo.get("jvp", True):
        try:
            return _diagonal_jvp(fn, x, chunk_size)
        except RuntimeError as err:  # a model torch.func cannot transform (e.g. diffusers attention under vmap)
            if "vmap" not in str(err) and "batch" not in str(err).lower() and "forward" not in str(err).lower():
                raise
            memo["jvp"] = False
    if mode == "jvp":
        mode = "vjp"
    batch, per = x.shape[0], math.prod(x.shape[1:])
    chunk = 1 if mode == "vjp_loop" else (chunk_size or _default_chunk(x))
    with torch.enable_grad():
        products = _Products(fn, x, batched=mode == "vjp", memo=memo)
        y = products.y
        diag = torch.empty(batch, per, device=x.device, dtype=y.dtype)
        eye = torch.eye(per, device=x.device, dtype=y.dtype)
        for start in range(0, per, chunk):
            stop = min(per, start + chunk)
            grads = _basis(eye, start, stop, batch, tuple(x.shape))
            rows = products(grads, retain_graph=stop < per)  # row j = e_jᵀ J for every sample
            diag[:, start:stop] = _pick(rows, start, batch, per)
    return diag.reshape(x.shape).detach(), y.detach()


def _diagonal_jvp(fn: Field, x: Tensor, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Forward mode: ``J e_j`` for a chunk of basis vectors per forward pass (``torch.func.jvp`` + ``vmap``)."""
    from torch.func import jvp, vmap

    batch, per = x.shape[0], math.prod(x.shape[1:])
    chunk = chunk_size or _default_chunk(x)
    xd = x.detach()
    diag = torch.empty(batch, per, device=x.device, dtype=x.dtype)
    eye = torch.eye(per, device=x.device, dtype=x.dtype)
    y = None
    for start in range(0, per, chunk):
        stop = min(per, start + chunk)
        tangents = _basis(eye, start, stop, batch, tuple(x.shape))
        ys, cols = vmap(lambda v: jvp(fn, (xd,), (v,)))(tangents)  # noqa: B023 - used at once
        if y is None:
            y = ys[0]
            if y.shape != x.shape:
                raise ValueError(f"field returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
            diag = diag.to(y.dtype)
        diag[:, start:stop] = _pick(cols, start, batch, per)
    assert y is not None
    return diag.reshape(x.shape).detach(), y.detach()


def divergence_exact(
    fn: Field, x: Tensor, *, chunk_size: int | None = None, mode: str = "auto", memo: dict | None = None
) -> tuple[Tensor, Tensor]:
    """Exact divergence (Jacobian trace) per sample, ``(batch,)``, and the field value ``fn(x)`` (detached).

    Options as :func:`jacobian_diagonal`.
    """
    diag, y = _diagonal_and_value(fn, x, chunk_size, mode, memo)
    return diag.reshape(x.shape[0], -1).sum(1), y


def hutchinson_estimates(
    fn: Field, x: Tensor, probes: Tensor, *, chunk_size: int | None = None, memo: dict | None = None
) -> tuple[Tensor, Tensor]:
    """Hutchinson's ``ε_kᵀ J ε_k`` for every probe: ``(K, batch)``, and the field value (detached).

    Args:
        fn: per-sample field.
        x: ``(batch, *dims)``.
        probes: ``(K, batch, *dims)`` probe vectors with ``E[ε εᵀ] = I`` (Rademacher or Gaussian).
        chunk_size: probes per batched backward pass (memory bound; default all ``K``).
        memo: as :func:`jacobian_diagonal`.

    Cost: one forward pass and ``K`` VJPs (``ceil(K / chunk_size)`` batched backward passes).
    """
    _check_chunk(chunk_size)
    k = probes.shape[0]
    with torch.enable_grad():
        products = _Products(fn, x, memo=memo)
        rows = products.chunked(probes.to(products.y.dtype), chunk_size or k, retain_graph=False)
        y = products.y
    est = (rows * probes).reshape(k, x.shape[0], -1).sum(-1)
    return est.detach(), y.detach()


def divergence_hutchinson(
    fn: Field, x: Tensor, probes: Tensor, *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate ``mean_k ε_kᵀ J ε_k`` per sample, and the field value.

    Args:
        fn: per-sample field.
        x: ``(batch, *dims)``.
        probes: ``(K, batch, *dims)`` probe vectors with ``E[ε εᵀ] = I`` (Rademacher or Gaussian),
            held fixed along an ODE path.
        chunk_size: probes per batched backward pass (default all).

    Returns:
        ``(estimate (batch,), fn(x) detached)`` — one forward and ``K`` VJPs.
    """
    est, y = hutchinson_estimates(fn, x, probes, chunk_size=chunk_size)
    return est.mean(0), y


def hutchpp_estimates(
    fn: Field,
    x: Tensor,
    sketch: Tensor,
    probes: Tensor,
    *,
    chunk_size: int | None = None,
    memo: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutch++ trace estimates, one per residual probe: ``(M, batch)``, and the field value (detached).

    Hutch++ (Meyer et al. 2021, Alg. 1) splits the trace into a low-rank part computed exactly and a
    Hutchinson estimate of the rest. Per sample, with ``J`` the Jacobian, ``S`` the ``m`` sketch vectors and
    ``g_k`` the ``M`` residual probes:

    1. ``Q = orth(Jᵀ S)`` (``D × m``, QR): the dominant directions of ``J``;
    2. ``tr(J) = tr(Qᵀ J Q) + tr(J P)`` with ``P = I − Q Qᵀ``, the second term estimated with the projected
       probes ``g̃_k = P g_k`` as ``g̃_kᵀ J g̃_k − c (‖g̃_k‖² − (D − m))``, where
       ``c = (mean_i s_iᵀ J s_i · D/‖s_i‖² − tr(Qᵀ J Q)) / (D − m)`` estimates the mean eigenvalue of the rest.

    Each returned value is unbiased for ``tr(J)`` for *any* sketch: ``Q`` and ``c`` depend on ``S`` only, and
    ``E_g[g̃ᵀ (J − cI) g̃] = tr((J − cI) P) = tr(J P) − c (D − m)``. So the spread of the ``M`` values is the
    estimator's whole variance (their mean has variance ``var / M``). The shift ``c`` is sdegen's addition to
    Alg. 1: projected probes are no longer Rademacher, and without it the ``c I`` part of ``J`` (the drift
    ``a(t) x`` of an affine SDE) would turn into variance.

    Args:
        fn: per-sample field.
        x: ``(batch, *dims)``.
        sketch: ``(m, batch, *dims)`` sketch vectors (``1 <= m <= D``; at ``m = D`` the result is exact).
        probes: ``(M, batch, *dims)`` residual probes with ``E[g gᵀ] = I``.
        chunk_size: rows per batched backward pass (default all).
        memo: as :func:`jacobian_diagonal`.

    Cost: one forward pass and ``2m + M`` VJPs in two rounds.
    """
    _check_chunk(chunk_size)
    m, mres = sketch.shape[0], probes.shape[0]
    batch, per = x.shape[0], math.prod(x.shape[1:])
    if not 1 <= m <= per:
        raise ValueError(f"Hutch++ needs 1 <= sketch size <= D={per}, got {m}")
    with torch.enable_grad():
        products = _Products(fn, x, memo=memo)
        dt = products.y.dtype
        s = sketch.to(dt).reshape(m, batch, per)
        g = probes.to(dt).reshape(mres, batch, per)
        ys = products.chunked(s.reshape(m, *x.shape), chunk_size or m, retain_graph=True).reshape(m, batch, per)
        q = torch.linalg.qr(ys.permute(1, 2, 0)).Q  # (batch, D, m) orthonormal columns spanning Jᵀ S
        gt = g - torch.einsum("bdm,kbm->kbd", q, torch.einsum("bdm,kbd->kbm", q, g))  # P g = g − Q Qᵀ g
        rows = torch.cat([q.permute(2, 0, 1), gt])  # (m + M, batch, D)
        z = products.chunked(rows.reshape(m + mres, *x.shape), chunk_size or (m + mres), retain_graph=False)
        z = z.reshape(m + mres, batch, per)
        y = products.y
    top = (z[:m] * rows[:m]).sum(-1).sum(0)  # tr(Qᵀ J Q), (batch,)
    # c: the mean eigenvalue of the rest, (Hutchinson's trace from the sketch − tr(Qᵀ J Q)) / (D − m)
    c = ((ys * s).sum(-1) * (per / (s * s).sum(-1))).mean(0).sub(top).div(max(per - m, 1))
    res = (z[m:] * gt).sum(-1) - c * ((gt * gt).sum(-1) - (per - m))  # (M, batch)
    return (top + res).detach(), y.detach()
