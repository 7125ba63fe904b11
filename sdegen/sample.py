"""Sampling entry points: wire an SDE, a score model and a solver together.

``reverse_sample`` integrates the reverse-time SDE (``noise_scale=1``), the probability-flow ODE
(``noise_scale=0``) or anything between, from the prior at ``t_max`` (default ``T``) down to ``t_min``.
Every default follows the solver: its natural noise scale, its best measured time grid and step count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._batching import batch_noise, chunk_noise, chunks, select_model
from .grids import check_times, make_grid
from .integrate import Solution, integrate
from .noise import NoiseSource
from .reverse import ReverseSDE, ScoreFn
from .sde import SDE, LinearSDE
from .solvers import AdaptiveSolver, PathSolver, Solver, resolve_solver

__all__ = ["reverse_sample", "forward_sample", "check_state"]


def check_state(x: Any, name: str) -> Tensor:
    """Validate a user state ``(batch, *dims)``: a finite floating-point tensor; errors name ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape (batch, *dims), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}: convert it with {name}.float()")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (batch, *dims), got {tuple(x.shape)}"
            + (": add the batch dimension with x[None]" if x.ndim == 1 else "")
        )
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{name} must have non-empty dims, got shape {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _resolve_device_dtype(x_T, device, dtype):
    if x_T is not None:
        if device is not None and torch.device(device) != x_T.device:
            if not (torch.device(device).type == x_T.device.type and torch.device(device).index is None):
                raise ValueError(f"device={device!s} does not match x_T on {x_T.device}")
        if dtype is not None and dtype != x_T.dtype:
            raise ValueError(f"dtype={dtype} does not match x_T of dtype {x_T.dtype}")
        return x_T.device, x_T.dtype
    dtype = dtype or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    return torch.device(device) if device is not None else torch.device("cpu"), dtype


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints like (batch, *dims), got {shape!r}") from None
    if len(shape) < 2 or shape[0] < 0 or any(s < 1 for s in shape[1:]):
        raise ValueError(f"shape must be (batch, *dims) with batch >= 0 and positive dims, got {shape}")
    return shape


def _time(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def reverse_sample(
    sde: SDE,
    score: ScoreFn,
    shape: Sequence[int] | None = None,
    *,
    x_T: Tensor | None = None,
    solver: str | Solver = "euler_maruyama",
    steps: int | None = None,
    noise_scale: float | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    times: Tensor | Sequence[float] | None = None,
    grid: str | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    final_step: str = "none",
    save_at: str | Sequence[float] | Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    check_finite: bool = True,
    differentiable: bool = False,
    return_info: bool = False,
    **solver_options: Any,
) -> Tensor | Solution:
    """Draw samples by integrating the reverse-time dynamics of ``sde`` under ``score``.

    Args:
        sde: forward SDE (:class:`~sdegen.VPSDE`, :class:`~sdegen.VESDE`, ..., or any :class:`~sdegen.SDE`).
        score: ``score(x, t) -> ∇ log p_t(x)``, ``x`` ``(batch, *dims)``, ``t`` ``(batch,)``; wrap
            ε / x̂0 / v networks with :mod:`sdegen.models`.
        shape: ``(batch, *dims)`` of the samples, drawn from the prior at ``t_max``. Give this or ``x_T``.
        x_T: initial state at ``t_max`` (e.g. a probability-flow latent), a finite floating-point tensor;
            sets device and dtype.
        solver: name (see :func:`sdegen.solvers.available_solvers`) or a solver instance; options of a
            named solver go in ``**solver_options``.
        steps: number of steps of a fixed-step solver (``>= 1``); default the solver's ``default_steps``
            (e.g. 250 for ``"euler_maruyama"``, 25 for ``"dpmpp_2m"``, 20 for ``"unipc"``). Adaptive solvers choose
            their own.
        noise_scale: ``λ ∈ [0, 1]`` — 1 reverse SDE, 0 probability-flow ODE; default the solver's natural
            value (0 for ODE solvers such as ``"dpmpp_2m"``, ``"rk45"``, ``"ddim"``; 1 for SDE samplers).
        t_min: end time; default ``sde.t_min`` (1e-3 for VP/sub-VP, 1e-5 for VE, σ_min for EDM).
        t_max: start time; default ``sde.T``. Below ``T`` the prior is :meth:`~sdegen.LinearSDE.prior_std_at`
            ``(t_max)``, exact only at ``T`` (pass ``x_T`` for an exact start).
        times: explicit strictly decreasing grid (instead of ``steps``, ``grid``, ``t_min``, ``t_max``).
        grid: ``"uniform"``, ``"quadratic"``, ``"edm"``, ``"log_snr"`` or ``"log_snr_cos"`` (see
            :mod:`sdegen.grids`); default the solver's ``default_grid``, its best measured grid
            (``docs/performance.md``).
        generator: ``torch.Generator`` on the samples' device for all randomness.
        seed, sample_ids: counter-based per-sample noise instead of ``generator`` — sample ``i``
            depends only on ``(seed, sample_ids[i])`` (default ids ``0..batch-1``), so results do
            not depend on the batch size, on ``max_batch`` chunking or on the process layout.
        device, dtype: of the samples (default CPU, the default dtype); times stay float32 or better.
        final_step: ``"none"``, ``"noiseless"`` (last step without noise) or ``"tweedie"``
            (denoise ``x_{t_min}`` with ``E[x_0 | x_t]``, one extra evaluation).
        save_at: ``"all"`` or times to keep, returned with ``return_info``: fixed-step solvers snap
            them to the nearest grid point; adaptive solvers emit them exactly (dense output), and with
            ``"all"`` return every accepted step with per-sample times.
        callback: ``callback(step, t, x)`` after each step (see :func:`sdegen.integrate.integrate`).
        progress: a tqdm progress bar: True always, None (default) for calls that run longer than 2 s
            (if ``tqdm`` is installed), False never.
        max_batch: integrate at most this many samples at a time (bounded memory). With ``seed=``
            the result is bit-identical to one big batch; with ``generator=`` chunks consume the
            generator one after another, so samples differ from the unchunked run.
        model_kwargs: keyword arguments passed to every ``score`` call (conditioning); tensors
            whose first dimension is the batch follow the chunks and the active samples.
        check_finite: raise :class:`~sdegen.errors.NonFiniteError` on NaN/Inf (checked without
            per-step synchronisation; raised after the loop).
        differentiable: keep the autograd graph through sampling (to backpropagate through the sampler).
            Default False: sampling runs under ``torch.no_grad`` so a model whose parameters require grad
            does not grow a graph over the steps (classifier guidance still takes its own gradient).
        return_info: return a :class:`~sdegen.integrate.Solution` (``x``, ``nfe``, ``times``,
            ``trajectory``, ``trajectory_times``, ``stats``) instead of the tensor.
        **solver_options: passed to the solver (e.g. ``rtol=`` for ``"rk45"``).

    Returns:
        Samples ``(batch, *dims)``, or a :class:`~sdegen.integrate.Solution` with ``return_info``.
        ``nfe`` counts network evaluations per sample path; a batched call counts once.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    if not callable(score):
        raise TypeError("score must be a callable score(x, t)")
    if (shape is None) == (x_T is None):
        raise ValueError("give exactly one of shape= and x_T=")
    if x_T is not None:
        check_state(x_T, "x_T")
    if not isinstance(differentiable, bool):
        raise TypeError(f"differentiable must be a bool, got {differentiable!r}")
    device, dtype = _resolve_device_dtype(x_T, device, dtype)
    shape = _check_shape(tuple(x_T.shape)) if x_T is not None else _check_shape(shape)
    batch = shape[0]
    slv = resolve_solver(solver, solver_options, "reverse_sample", _ENTRY_PARAMS)
    if noise_scale is None:
        noise_scale = slv.default_noise_scale
    t_lo, t_hi = _time("t_min", t_min), _time("t_max", t_max)
    if times is not None:
        if steps is not None or grid is not None or t_lo is not None or t_hi is not None:
            raise ValueError("times= replaces steps=, grid=, t_min= and t_max=: give either times= or those")
        grid_t = check_times(times, sde)
        t_hi = float(grid_t[0])
    elif isinstance(slv, AdaptiveSolver | PathSolver):
        if steps is not None and not isinstance(slv, PathSolver):
            warnings.warn(
                f"solver {slv.name!r} is adaptive and chooses its own steps: steps={steps} is ignored", stacklevel=2
            )
        if grid is not None and not isinstance(slv, PathSolver):
            raise ValueError(f"solver {slv.name!r} is adaptive: it takes no grid= (give rtol=/atol=)")
        lo = sde.t_min if t_lo is None else t_lo
        hi = sde.T if t_hi is None else t_hi
        if isinstance(slv, PathSolver) and steps is not None:  # fixed-grid backends step on this grid
            grid_t = make_grid(grid or "uniform", sde, steps, t_min=lo, t_max=hi)
        else:  # the output times: the ends plus any save_at times (dense output)
            out = [hi, lo]
            if save_at is not None and not isinstance(save_at, str):
                out += [float(v) for v in torch.as_tensor(save_at, dtype=torch.float64).reshape(-1) if lo < v < hi]
            grid_t = check_times(torch.tensor(sorted(set(out), reverse=True), dtype=torch.float64), sde)
    else:
        grid_t = make_grid(
            grid or slv.default_grid, sde, slv.default_steps if steps is None else steps, t_min=t_lo, t_max=t_hi
        )
    noise = batch_noise(generator, seed, sample_ids, batch, device)
    model_kwargs = dict(model_kwargs or {})
    if batch == 0:
        slv.check(ReverseSDE(sde, score, noise_scale))  # the errors a non-empty batch would raise
        x0 = torch.empty(shape, device=device, dtype=dtype)
        return Solution(x=x0, nfe=0, times=grid_t.to(device)) if return_info else x0

    parts: list[Solution] = []
    with torch.enable_grad() if differentiable else torch.no_grad():
        for sl in chunks(batch, max_batch):
            part_noise = chunk_noise(noise, sl, batch)
            if x_T is not None:
                x0 = x_T[sl]
            else:
                x0 = _prior(sde, (sl.stop - sl.start, *shape[1:]), part_noise, device, dtype, float(grid_t[0]))
            part_score, part_kwargs = (
                select_model(score, model_kwargs, batch, sl) if sl != slice(0, batch) else (score, model_kwargs)
            )
            eq = ReverseSDE(sde, part_score, noise_scale, model_kwargs=part_kwargs)
            parts.append(
                integrate(
                    eq,
                    x0,
                    grid_t,
                    slv,
                    part_noise,
                    save_at=save_at,
                    callback=callback,
                    progress=progress,
                    final_step=final_step,
                    check_finite=check_finite,
                )
            )
    sol = parts[0] if len(parts) == 1 else _concat(parts)
    return sol if return_info else sol.x


_ENTRY_PARAMS = (
    "shape",
    "x_T",
    "solver",
    "steps",
    "noise_scale",
    "t_min",
    "t_max",
    "times",
    "grid",
    "generator",
    "seed",
    "sample_ids",
    "device",
    "dtype",
    "final_step",
    "save_at",
    "callback",
    "progress",
    "max_batch",
    "model_kwargs",
    "check_finite",
    "differentiable",
    "return_info",
)


def _prior(sde: SDE, shape, noise: NoiseSource, device, dtype, t_start: float) -> Tensor:
    if not isinstance(sde, LinearSDE):
        raise ValueError(f"{type(sde).__name__} has no prior: pass x_T= (the state at t_max)")
    return sde.prior_sample(shape, t=t_start, device=device, dtype=dtype, noise=noise)


def _concat(parts: list[Solution]) -> Solution:
    first = parts[0]
    traj = torch.cat([p.trajectory for p in parts], dim=1) if first.trajectory is not None else None
    ttimes = first.trajectory_times
    if ttimes is not None and ttimes.ndim == 2:  # per-sample times of adaptive steps: follow the samples
        k = max(p.trajectory_times.shape[0] for p in parts)
        pad = [
            torch.cat([p.trajectory_times, p.trajectory_times[-1:].expand(k - p.trajectory_times.shape[0], -1)])
            for p in parts
        ]
        trajp = [
            torch.cat([p.trajectory, p.trajectory[-1:].expand(k - p.trajectory.shape[0], *p.trajectory.shape[1:])])
            for p in parts
        ]
        ttimes, traj = torch.cat(pad, dim=1), torch.cat(trajp, dim=1)
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
        trajectory_times=ttimes,
        stats=stats,
        network_calls=sum(p.network_calls for p in parts),
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
    """Draw ``x_t ~ p(x_t | x_0)`` exactly from the Gaussian kernel of an affine SDE.

    ``x0`` is a finite floating-point ``(batch, *dims)`` tensor; ``t`` a number or a ``(batch,)`` tensor in
    ``[0, T]``.
    """
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"forward_sample needs an affine SDE with a Gaussian kernel, got {type(sde).__name__}")
    check_state(x0, "x0")
    tt = torch.as_tensor(t, dtype=torch.float64)
    if tt.numel() and (
        not bool(torch.isfinite(tt).all()) or float(tt.min()) < 0 or float(tt.max()) > sde.T * (1 + 1e-12)
    ):
        raise ValueError(f"t must lie in [0, T={sde.T}], got values in [{float(tt.min())}, {float(tt.max())}]")
    return sde.forward_sample(x0, t, noise=batch_noise(generator, seed, sample_ids, x0.shape[0], x0.device))
