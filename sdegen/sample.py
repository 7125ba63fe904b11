"""Sampling entry points: wire an SDE, a score model and a solver together.

``reverse_sample`` integrates the reverse-time SDE (``noise_scale=1``), the probability-flow ODE
(``noise_scale=0``) or anything between, from the prior at ``T`` down to ``t_min``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._batching import batch_noise, chunk_kwargs, chunk_noise, chunks
from .grids import check_times, make_grid
from .integrate import Solution, integrate
from .noise import NoiseSource
from .reverse import ReverseSDE, ScoreFn
from .sde import SDE, LinearSDE
from .solvers import PathSolver, Solver, get_solver

__all__ = ["reverse_sample", "forward_sample"]


def _resolve_device_dtype(x_T, device, dtype):
    if x_T is not None:
        if device is not None and torch.device(device) != x_T.device:
            if not (torch.device(device).type == x_T.device.type and torch.device(device).index is None):
                raise ValueError(f"device={device!s} does not match x_T on {x_T.device}")
        if dtype is not None and dtype != x_T.dtype:
            raise ValueError(f"dtype={dtype} does not match x_T of dtype {x_T.dtype}")
        return x_T.device, x_T.dtype
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return torch.device(device) if device is not None else torch.device("cpu"), dtype


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints like (batch, *dims), got {shape!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, *dims) with positive sizes, got {shape}")
    return shape


def reverse_sample(
    sde: SDE,
    score: ScoreFn,
    shape: Sequence[int] | None = None,
    *,
    x_T: Tensor | None = None,
    solver: str | Solver = "euler_maruyama",
    steps: int = 1000,
    noise_scale: float = 1.0,
    t_min: float | None = None,
    t_max: float | None = None,
    times: Tensor | Sequence[float] | None = None,
    grid: str = "uniform",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    final_step: str = "none",
    save_at: str | Sequence[float] | Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    check_finite: bool = True,
    return_info: bool = False,
    **solver_options: Any,
) -> Tensor | Solution:
    """Draw samples by integrating the reverse-time dynamics of ``sde`` under ``score``.

    Args:
        sde: forward SDE (:class:`~sdegen.VPSDE`, :class:`~sdegen.VESDE`, ..., or any :class:`~sdegen.SDE`).
        score: ``score(x, t) -> ∇ log p_t(x)``, ``x`` ``(batch, *dims)``, ``t`` ``(batch,)``; wrap
            ε / x̂0 / v networks with :mod:`sdegen.models`.
        shape: ``(batch, *dims)`` of the samples; the prior is sampled at ``t_max``. Give this or ``x_T``.
        x_T: initial state at ``t_max`` (e.g. a probability-flow latent); sets device and dtype.
        solver: name (see :func:`sdegen.solvers.available_solvers`) or a solver instance.
        steps: number of steps of a fixed-step solver (``>= 1``; ignored by adaptive solvers).
        noise_scale: ``λ ∈ [0, 1]`` — 1 reverse SDE, 0 probability-flow ODE.
        t_min: end time; default ``sde.t_min`` (1e-3 for VP/sub-VP, 1e-5 for VE, σ_min for EDM).
        t_max: start time; default ``sde.T``.
        times: explicit strictly decreasing grid (overrides ``steps``, ``grid``, ``t_min``, ``t_max``).
        grid: ``"uniform"``, ``"quadratic"``, ``"edm"`` or ``"log_snr"`` (see :mod:`sdegen.grids`).
        generator: ``torch.Generator`` on the samples' device for all randomness.
        seed, sample_ids: counter-based per-sample noise instead of ``generator`` — sample ``i``
            depends only on ``(seed, sample_ids[i])`` (default ids ``0..batch-1``), so results do
            not depend on the batch size, on ``max_batch`` chunking or on the process layout.
        device, dtype: of the samples (default CPU, the default dtype); times stay float32 or better.
        final_step: ``"none"``, ``"noiseless"`` (last step without noise) or ``"tweedie"``
            (denoise ``x_{t_min}`` with ``E[x_0 | x_t]``, one extra evaluation).
        save_at: ``"all"`` or times to keep, returned with ``return_info``: fixed-step solvers snap
            them to the nearest grid point; adaptive solvers (``"rk45"``, backends) emit them exactly
            (dense output).
        callback: ``callback(step, t, x)`` after each fixed step.
        progress: show a tqdm progress bar (needs ``tqdm``).
        max_batch: integrate at most this many samples at a time (bounded memory). With ``seed=``
            the result is bit-identical to one big batch; with ``generator=`` chunks consume the
            generator one after another, so samples differ from the unchunked run.
        model_kwargs: keyword arguments passed to every ``score`` call (conditioning); tensors
            whose first dimension is the batch are sliced along with the chunks.
        check_finite: raise :class:`~sdegen.errors.NonFiniteError` on NaN/Inf (checked without
            per-step synchronisation; raised after the loop).
        return_info: return a :class:`~sdegen.integrate.Solution` (``x``, ``nfe``, ``times``,
            ``trajectory``, ``trajectory_times``, ``stats``) instead of the tensor.
        **solver_options: passed to the solver (e.g. ``rtol=`` for ``"rk45"``).

    Returns:
        Samples ``(batch, *dims)``, or a :class:`~sdegen.integrate.Solution` with ``return_info``.
        ``nfe`` counts network evaluations per sample path; a batched call counts once.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    if (shape is None) == (x_T is None):
        raise ValueError("give exactly one of shape= and x_T=")
    if x_T is not None and not isinstance(x_T, Tensor):
        raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
    device, dtype = _resolve_device_dtype(x_T, device, dtype)
    shape = tuple(x_T.shape) if x_T is not None else _check_shape(shape)
    batch = shape[0]
    slv = get_solver(solver, **solver_options)
    if times is not None:
        grid_t = check_times(times, sde)
    elif isinstance(slv, PathSolver):
        # adaptive/backends: the grid is the output times — the ends plus any save_at times (dense output)
        lo = sde.t_min if t_min is None else float(t_min)
        hi = sde.T if t_max is None else float(t_max)
        out = [hi, lo]
        if save_at is not None and not isinstance(save_at, str):
            out += [float(v) for v in torch.as_tensor(save_at, dtype=torch.float64).reshape(-1) if lo < v < hi]
        grid_t = check_times(torch.tensor(sorted(set(out), reverse=True), dtype=torch.float64), sde)
    else:
        grid_t = make_grid(grid, sde, steps, t_min=t_min, t_max=t_max)
    parts_sl = chunks(batch, max_batch)
    noise = batch_noise(generator, seed, sample_ids, batch, device)
    model_kwargs = dict(model_kwargs or {})

    parts: list[Solution] = []
    for sl in parts_sl:
        part_noise = chunk_noise(noise, sl, batch)
        if x_T is not None:
            x0 = x_T[sl]
        else:
            x0 = _prior(sde, (sl.stop - sl.start, *shape[1:]), part_noise, device, dtype)
        eq = ReverseSDE(sde, score, noise_scale, model_kwargs=chunk_kwargs(model_kwargs, batch, sl))
        parts.append(
            integrate(
                eq, x0, grid_t, slv, part_noise, save_at=save_at, callback=callback,
                progress=progress, final_step=final_step, check_finite=check_finite,
            )
        )
    sol = parts[0] if len(parts) == 1 else _concat(parts)
    return sol if return_info else sol.x


def _prior(sde: SDE, shape, noise: NoiseSource, device, dtype) -> Tensor:
    if not isinstance(sde, LinearSDE) and not hasattr(sde, "prior_sample"):
        raise ValueError(f"{type(sde).__name__} has no prior: pass x_T= (the state at t_max)")
    return sde.prior_sample(shape, device=device, dtype=dtype, noise=noise)


def _concat(parts: list[Solution]) -> Solution:
    first = parts[0]
    traj = torch.cat([p.trajectory for p in parts], dim=1) if first.trajectory is not None else None
    stats: dict[str, Any] = {}
    for k, v in first.stats.items():
        vals = [p.stats[k] for p in parts]
        if isinstance(v, Tensor) and v.ndim > 0:
            stats[k] = torch.cat(vals)  # per-sample counters follow the samples
        elif isinstance(v, int | float) and not isinstance(v, bool):
            stats[k] = sum(vals)
        else:
            stats[k] = vals
    return Solution(
        x=torch.cat([p.x for p in parts]),
        nfe=max(p.nfe for p in parts),
        times=first.times,
        trajectory=traj,
        trajectory_times=first.trajectory_times,
        stats=stats | {"network_calls": sum(p.nfe for p in parts)},
    )


def forward_sample(
    sde: LinearSDE,
    x0: Tensor,
    t: Tensor | float,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
) -> Tensor:
    """Draw ``x_t ~ p(x_t | x_0)`` exactly from the Gaussian kernel of an affine SDE."""
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"forward_sample needs an affine SDE with a Gaussian kernel, got {type(sde).__name__}")
    return sde.forward_sample(x0, t, noise=batch_noise(generator, seed, sample_ids, x0.shape[0], x0.device))
