"""Sharded sampling and likelihood on a ``torch.distributed`` process group — same numbers at any world size.

Launch with ``torchrun`` (or any launcher), call ``torch.distributed.init_process_group`` yourself, then
call :func:`sample`, :func:`log_likelihood` or :func:`bits_per_dim` on every rank. sdegen manages no
processes; when ``torch.distributed`` is not initialised the functions behave as world size 1.

**Split.** The global index range ``[0, n_total)`` is split into ``world_size`` contiguous shards in rank
order, as balanced as possible (``numpy.array_split`` / ``torch.tensor_split`` convention): with
``n_total = q · W + r``, ranks ``0 .. r-1`` get ``q + 1`` indices and the others ``q``
(see :func:`shard`). Each rank works through its shard in chunks of at most ``max_batch`` samples.

**Per-sample randomness.** Every random number used for sample ``i`` — prior draw, Brownian increments,
Hutchinson probes, dequantisation noise — comes from :class:`~sdegen.noise.PerSampleNoise` keyed by
``(seed, i)`` with ``i`` the *global* index. So sample ``i`` is the same whichever rank and chunk
computes it; with a batch-invariant model the gathered result is bit-identical to the single-process
``reverse_sample(..., seed=seed)`` / ``log_likelihood(..., seed=seed)`` at every world size and
``max_batch``. (A network whose output for one sample depends on the batch size — BLAS blocking,
batch-norm in training mode — agrees to rounding instead.)

**No collective inside a solver loop.** Each rank integrates its shard with no communication at all;
adaptive solvers (per-sample RK45) may take a different number of steps, and hence network calls, on
every rank. The only collectives are at the end, made by every rank in the same order whatever its
work: one ``all_gather`` of a status flag (so an error on one rank raises on all ranks instead of
leaving the others blocked in the gather), one ``all_gather``/``gather`` per returned tensor, and, only
when ``n_total < world_size``, a ``broadcast_object_list`` of the output dtype and shape. Putting a
collective inside the loop is what makes k-diffusion's adaptive likelihood hang under DDP
(crowsonkb/k-diffusion#79): ranks making different numbers of forward passes block one another.
For the same reason, pass the bare network (``ddp_model.module``), not a
``DistributedDataParallel`` wrapper (its forward may broadcast buffers), and no ``SyncBatchNorm``.

**Gather.** Shards differ in size by at most one, so each rank pads its result to the largest shard
size, the padded blocks are all-gathered (``gather="all"``) or gathered to group rank 0
(``gather="rank0"``; the other ranks get ``None``), and the padding is dropped: the result is in
global order. ``gather=None`` returns each rank's own shard, with no collective. Tensors travel on the
backend's device — CUDA for ``nccl`` (``torch.cuda.current_device()``; set it per rank), CPU for
``gloo`` — and come back on the device the results were computed on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .reverse import ScoreFn
from .sample import reverse_sample
from .sde import SDE

__all__ = ["sample", "log_likelihood", "bits_per_dim", "shard", "world_info", "GATHER_MODES"]

GATHER_MODES = ("all", "rank0", None)

_FORBIDDEN = ("sample_ids", "generator", "shape", "x_T", "return_info")

Result = Tensor | tuple[Tensor, ...]


# -- process layout ----------------------------------------------------------------------------------
def world_info(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default: the default group); ``(0, 1)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group= was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group=")
    return rank, dist.get_world_size(group)


def _shard_sizes(n_total: int, world: int) -> list[int]:
    q, r = divmod(n_total, world)
    return [q + (k < r) for k in range(world)]


def shard(n_total: int, rank: int | None = None, world_size: int | None = None, *, group: Any = None) -> range:
    """Global indices handled by ``rank``: a contiguous, balanced block of ``range(n_total)``.

    With ``n_total = q · W + r`` ranks ``0 .. r-1`` get ``q + 1`` indices, the rest ``q``; blocks follow
    rank order, so concatenating them in rank order gives ``range(n_total)``. ``rank`` and
    ``world_size`` default to this process's place in ``group``.
    """
    _check_count(n_total, "n_total")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank= and world_size=, or neither")
    if rank is None:
        rank, world_size = world_info(group)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    sizes = _shard_sizes(n_total, world_size)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


# -- public entry points -----------------------------------------------------------------------------
def sample(
    n_total: int,
    sde: SDE,
    score: ScoreFn,
    dims: int | Sequence[int],
    *,
    seed: int,
    max_batch: int | None = None,
    gather: str | None = "all",
    group: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **reverse_sample_kwargs: Any,
) -> Tensor | None:
    """Draw ``n_total`` samples split over the ranks of ``group``; the same tensor at any world size.

    Sample ``i`` (global index) is ``reverse_sample(sde, score, (n_total, *dims), seed=seed, ...)[i]``:
    its noise depends only on ``(seed, i)``, never on the rank, the world size or ``max_batch``.

    Args:
        n_total: number of samples over all ranks (``>= 1``).
        sde, score: as in :func:`sdegen.reverse_sample`.
        dims: shape of one sample, e.g. ``(3, 32, 32)`` or ``2``.
        seed: integer seed of the counter-based per-sample noise (required: a ``torch.Generator``
            would make the result depend on the process layout).
        max_batch: at most this many samples per network call on each rank (bounded memory);
            default the whole shard at once. Does not change the result.
        gather: ``"all"`` (every rank returns all ``n_total`` samples), ``"rank0"`` (group rank 0
            returns them, the others ``None``) or ``None`` (each rank returns its shard
            ``shard(n_total)``, no communication).
        group: process group (default: the default group).
        device, dtype: of the samples (default CPU / the default dtype). With ``nccl`` pass this
            rank's GPU, e.g. ``device=f"cuda:{local_rank}"``.
        model_kwargs: keyword arguments for the score (conditioning). A tensor whose first
            dimension is ``n_total`` is per-sample: each rank gets its rows (and each chunk its own).
        **reverse_sample_kwargs: solver, steps, noise_scale, grid, final_step, ... (not
            ``sample_ids``, ``generator``, ``shape``, ``x_T``, ``return_info``).

    Returns:
        ``(n_total, *dims)`` in global order, this rank's ``(len(shard), *dims)`` block for
        ``gather=None``, or ``None`` on ranks other than 0 for ``gather="rank0"``.
    """
    _check_count(n_total, "n_total")
    _check_seed(seed)
    _check_gather(gather)
    _check_max_batch(max_batch)
    _check_kwargs(reverse_sample_kwargs, "reverse_sample")
    _check_score(score)
    dims = _check_dims(dims)
    rank, world = world_info(group)
    ids = shard(n_total, rank, world)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def compute() -> Tensor:
        if len(ids) == 0:
            return torch.empty((0, *dims), device=dev, dtype=dtype or torch.get_default_dtype())
        return reverse_sample(
            sde,
            score,
            (len(ids), *dims),
            seed=seed,
            sample_ids=torch.arange(ids.start, ids.stop, device=dev),
            max_batch=max_batch,
            device=dev,
            dtype=dtype,
            model_kwargs=_slice_kwargs(model_kwargs, n_total, ids.start, ids.stop),
            **reverse_sample_kwargs,
        )

    return _finish(compute, n_total, gather, group, rank, world)


def log_likelihood(
    data: Tensor | Sequence[Any],
    sde: SDE,
    score: ScoreFn,
    *,
    seed: int,
    max_batch: int | None = None,
    gather: str | None = "all",
    group: Any = None,
    device: torch.device | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Result | None:
    """:func:`sdegen.likelihood.log_likelihood` of a whole data set, split over the ranks of ``group``.

    Args:
        data: ``(n, *dims)`` tensor (every rank may hold all of it — each reads only its rows), or a
            map-style dataset (``len(data)``, ``data[i]``) whose items are tensors or tuples whose
            first element is the tensor, e.g. ``(image, label)``.
        sde, score: as in :func:`sdegen.likelihood.log_likelihood`.
        seed: seed of the per-sample noise (Hutchinson probes; dequantisation in :func:`bits_per_dim`);
            sample ``i`` uses global id ``i`` whatever rank computes it.
        max_batch: rows loaded and integrated at a time on each rank (default: the whole shard).
        gather, group: as in :func:`sample`.
        device: where to compute (default: where the data lives); chunks are moved there one at a time.
        model_kwargs: conditioning; tensors whose first dimension is ``n`` are sliced per sample.
        **kwargs: options of :func:`sdegen.likelihood.log_likelihood` (trace, probes, solver — a name or a
            :class:`~sdegen.solvers.Solver` —, its options such as rtol, atol, return_latent, ...). With several
            returned tensors, each is gathered.

    Returns:
        What :func:`sdegen.likelihood.log_likelihood` returns, for all ``n`` rows in global order
        (``(n,)`` nats by default), or this rank's rows (``gather=None``), or ``None`` off rank 0
        (``gather="rank0"``).
    """
    from . import likelihood

    return _map_data(likelihood.log_likelihood, data, sde, score, seed, max_batch, gather, group, device,
                     model_kwargs, kwargs)


def bits_per_dim(
    data: Tensor | Sequence[Any],
    sde: SDE,
    score: ScoreFn,
    *,
    seed: int,
    max_batch: int | None = None,
    gather: str | None = "all",
    group: Any = None,
    device: torch.device | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Result | None:
    """:func:`sdegen.likelihood.bits_per_dim` of a whole data set, split over ranks as :func:`log_likelihood`.

    Dequantisation noise for row ``i`` is keyed by ``(seed, i)``, so the per-row bits/dim (and their
    mean, which you take yourself: ``bpd.mean()``) do not depend on the world size or ``max_batch``.
    """
    from . import likelihood

    return _map_data(likelihood.bits_per_dim, data, sde, score, seed, max_batch, gather, group, device,
                     model_kwargs, kwargs)


# -- the shared machinery ------------------------------------------------------------------------
def _map_data(fn: Callable[..., Any], data, sde, score, seed, max_batch, gather, group, device, model_kwargs,
              kwargs) -> Result | None:
    _check_seed(seed)
    _check_gather(gather)
    _check_max_batch(max_batch)
    _check_kwargs(kwargs, fn.__name__)
    _check_score(score)
    if isinstance(data, Tensor):
        if data.ndim < 2:
            raise ValueError(f"data must have shape (n, *dims), got {tuple(data.shape)}")
    elif not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a tensor or a map-style dataset, got {type(data).__name__}")
    n_total = len(data)
    _check_count(n_total, "len(data)")
    rank, world = world_info(group)
    ids = shard(n_total, rank, world)
    chunk = max_batch or max(1, len(ids))

    def compute() -> Result:
        parts: list[Result] = []
        for a in range(ids.start, ids.stop, chunk):
            b = min(ids.stop, a + chunk)
            x = _load(data, a, b, device)
            mk = _slice_kwargs(model_kwargs, n_total, a, b)
            extra = {"model_kwargs": mk} if mk is not None else {}
            out = fn(sde, score, x, seed=seed, sample_ids=torch.arange(a, b, device=x.device), **extra, **kwargs)
            parts.append(_as_result(out, fn.__name__))
        if not parts:
            return None  # empty shard: dtype and shape come from rank 0 in _finish
        if isinstance(parts[0], Tensor):
            return torch.cat(parts)
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))

    return _finish(compute, n_total, gather, group, rank, world)


def _finish(compute: Callable[[], Result | None], n_total: int, gather, group, rank: int, world: int):
    """Run this rank's work, then (and only then) make the collectives every rank makes alike."""
    if world == 1 or gather is None:
        return compute()  # no collective at all; an error raises on its own rank
    error: BaseException | None = None
    local: Result | None = None
    try:
        local = compute()
    except Exception as exc:  # re-raised below, after every rank has learnt about it
        error = exc
    comm = _comm_device(group, _device_of(local))
    # one status gather: did each rank fail, and do all ranks agree on the size and layout of the result?
    # (ranks that disagree would otherwise abort the process group inside the gathers below)
    layout = _layout(local) if error is None else None
    mine = [int(error is not None), n_total, -1 if layout is None else zlib.crc32(repr(layout).encode())]
    flags = [torch.zeros(3, dtype=torch.int64, device=comm) for _ in range(world)]
    dist.all_gather(flags, torch.tensor(mine, dtype=torch.int64, device=comm), group=group)
    status = torch.stack(flags).tolist()
    failed = [r for r, f in enumerate(status) if f[0]]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"sdegen.distributed: rank(s) {failed} of group {_group_name(group)} failed; see their logs")
    totals = [f[1] for f in status]
    if len(set(totals)) > 1:
        raise ValueError(
            f"sdegen.distributed: the ranks of group {_group_name(group)} disagree on the number of samples "
            f"(n_total / len(data) per rank: {totals}); every rank must pass the same data set or n_total"
        )
    if len({f[2] for f in status if f[2] >= 0}) > 1:
        raise ValueError(
            f"sdegen.distributed: the ranks of group {_group_name(group)} computed results of different shapes or "
            "dtypes (different data dims, dtype or options per rank); every rank must make the same call"
        )

    sizes = _shard_sizes(n_total, world)
    meta = _layout(local)
    if min(sizes) == 0:  # some shards are empty and cannot tell the output's dtype and shape
        box = [meta]
        dist.broadcast_object_list(box, src=_global_rank(group, 0), group=group)
        meta = box[0]
    tensors = local if isinstance(local, tuple) else (local,)
    if local is None:
        tensors = tuple(None for _ in meta[1])
    out_dev = _device_of(local) or comm
    gathered = tuple(
        _gather_one(t, tail, dt, sizes, gather, group, rank, comm, out_dev)
        for t, (tail, dt) in zip(tensors, meta[1], strict=True)
    )
    if gather == "rank0" and rank != 0:
        return None
    return gathered if meta[0] else gathered[0]


def _gather_one(t: Tensor | None, tail, dtype, sizes, gather, group, rank, comm, out_dev) -> Tensor | None:
    world, m = len(sizes), max(sizes)
    buf = torch.zeros((m, *tail), dtype=dtype, device=comm)
    if t is not None and t.shape[0] > 0:
        buf[: t.shape[0]] = t.to(comm)
    if gather == "all":
        blocks = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(blocks, buf, group=group)
    else:
        blocks = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
        dist.gather(buf, gather_list=blocks, dst=_global_rank(group, 0), group=group)
        if rank != 0:
            return None
    return torch.cat([blk[:s] for blk, s in zip(blocks, sizes, strict=True)]).to(out_dev)


# -- helpers --------------------------------------------------------------------------------------
def _layout(local: Result | None):
    """``(is_tuple, [(shape[1:], dtype), ...])`` of a result, or None for an empty shard."""
    if local is None:
        return None
    ts = local if isinstance(local, tuple) else (local,)
    return (isinstance(local, tuple), [(tuple(t.shape[1:]), t.dtype) for t in ts])


def _as_result(out: Any, name: str) -> Result:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list) and out and all(isinstance(t, Tensor) for t in out):
        return tuple(out)
    raise TypeError(f"sdegen.distributed can gather tensors or tuples of tensors; {name} returned {type(out).__name__}")


def _device_of(local: Result | None) -> torch.device | None:
    if local is None:
        return None
    return (local[0] if isinstance(local, tuple) else local).device


def _comm_device(group, local: torch.device | None) -> torch.device:
    """The device collectives of ``group``'s backend accept (CUDA for nccl, CPU for gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl": the tensor's own device if the group serves it
        served = {part.split(":")[0] for part in backend.split(",")}
        if local is not None and local.type in served:
            return local
        return torch.device("cpu") if "cpu" in served else torch.device("cuda", torch.cuda.current_device())
    if backend == "nccl":
        if local is not None and local.type == "cuda":
            return local
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return local or torch.device("cpu")


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _group_name(group) -> str:
    return "WORLD" if group is None else repr(group)


def _load(data, a: int, b: int, device) -> Tensor:
    if isinstance(data, Tensor):
        x = data[a:b]
    else:
        items = [data[i] for i in range(a, b)]
        items = [it[0] if isinstance(it, tuple | list) else it for it in items]
        x = torch.stack([torch.as_tensor(it) for it in items])
    return x.to(device) if device is not None else x


def _slice_kwargs(model_kwargs: dict[str, Any] | None, n_total: int, a: int, b: int) -> dict[str, Any] | None:
    if model_kwargs is None:
        return None
    return {
        k: v[a:b] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n_total else v
        for k, v in model_kwargs.items()
    }


def _check_count(n: Any, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (per-sample noise keyed by (seed, global index)), got {seed!r}")


def _check_gather(gather: Any) -> None:
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be 'all', 'rank0' or None, got {gather!r}")


def _check_max_batch(max_batch: Any) -> None:
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")


def _check_kwargs(kwargs: dict[str, Any], where: str) -> None:
    bad = [k for k in _FORBIDDEN if k in kwargs]
    if bad:
        raise TypeError(
            f"sdegen.distributed sets {bad} itself (per-sample ids are the global indices); do not pass "
            f"them through to {where}. For a rank's own slice call {where} with sample_ids=shard(n)."
        )


def _check_score(score: Any) -> None:
    if isinstance(score, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "score is a DistributedDataParallel wrapper: its forward may run collectives, which hang when ranks "
            "make different numbers of network calls (crowsonkb/k-diffusion#79). Pass ddp_model.module."
        )


def _check_dims(dims: Any) -> tuple[int, ...]:
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise TypeError(f"dims must be the shape of one sample, e.g. (3, 32, 32), got {dims!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"dims must be a non-empty shape of positive sizes, got {dims}")
    return dims
