"""The one stepping loop: drives a solver over a time grid and owns NFE counting, non-finite
checks, the progress bar, callbacks and the saved trajectory.

The loop performs **no host-device synchronisation per step**: the grid is moved to the device
once, each step indexes it on the device, and the non-finite check keeps a device-side flag
(the first bad step) that is read once, after the loop. A NaN/Inf therefore still raises
:class:`~sdegen.errors.NonFiniteError` naming the solver, the step and its times — after the loop
finishes rather than at the faulty step. Path solvers (adaptive RK45, backends) synchronise by
nature and check as they go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._utils import first_nonfinite, time_dtype
from .errors import NonFiniteError
from .noise import NoiseSource
from .solvers.base import PathSolver, Solver

__all__ = ["Solution", "integrate", "FINAL_STEPS"]

FINAL_STEPS = ("none", "noiseless", "tweedie")


@dataclass
class Solution:
    """What an integration returns.

    Attributes:
        x: final state ``(batch, *dims)``.
        nfe: network evaluations per sample path (a batched call counts once).
        times: the time grid used (1-D, decreasing; for path solvers the requested output times).
        trajectory: saved states ``(K, batch, *dims)`` or None.
        trajectory_times: ``(K,)`` times of the saved states, or None.
        stats: solver counters, e.g. ``accepted`` / ``rejected`` steps for adaptive solvers.
    """

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None
    trajectory_times: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def _save_indices(times_cpu: Tensor, save_at: str | Sequence[float] | Tensor | None) -> list[int]:
    if save_at is None:
        return []
    if isinstance(save_at, str):
        if save_at != "all":
            raise ValueError(f"save_at must be 'all', a sequence of times or None, got {save_at!r}")
        return list(range(times_cpu.shape[0]))
    want = torch.as_tensor(save_at, dtype=torch.float64).reshape(-1)
    if want.numel() == 0:
        return []
    idx = (want[:, None] - times_cpu[None, :]).abs().argmin(dim=1)
    return sorted(set(idx.tolist()))


def integrate(
    eq: Any,
    x: Tensor,
    times: Tensor,
    solver: Solver,
    noise: NoiseSource | None,
    *,
    save_at: str | Sequence[float] | Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    final_step: str = "none",
    check_finite: bool = True,
) -> Solution:
    """Integrate ``eq`` from ``times[0]`` to ``times[-1]`` with ``solver``.

    Args:
        eq: the equation (``drift``, ``diffusion``, ``is_ode``, ``nfe``; see :mod:`sdegen.reverse`).
        x: initial state ``(batch, *dims)``.
        times: decreasing 1-D float64 CPU tensor (validated grid); moved to ``x.device`` once.
        solver: a fixed-step :class:`Solver` or a :class:`PathSolver`.
        noise: where Brownian increments come from (None: deterministic).
        save_at: ``"all"`` grid points, or times (each snapped to the nearest grid point), or None.
        callback: ``callback(step, t_next, x)`` after each fixed step (may synchronise; your call).
        progress: show a tqdm progress bar.
        final_step: ``"none"``; ``"noiseless"`` (last step draws no noise, as score_sde's
            ``noise_removal``); ``"tweedie"`` (after the last step, replace ``x`` by
            ``E[x_0 | x_{t_min}]`` — one extra evaluation, affine SDEs only).
        check_finite: track non-finite states/evaluations and raise :class:`NonFiniteError`.
    """
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    if final_step == "tweedie" and not getattr(eq, "has_marginal", False):
        raise ValueError("final_step='tweedie' needs an affine SDE with a Gaussian kernel (m, s)")
    solver.check(eq)
    times_cpu = times.detach().to("cpu", torch.float64)
    tdev = times_cpu.to(device=x.device, dtype=time_dtype(x.dtype))
    save_idx = _save_indices(times_cpu, save_at)
    nfe0 = eq.nfe
    stats: dict[str, Any] = {}
    traj: list[Tensor] = []

    if isinstance(solver, PathSolver):
        states, stats = solver.solve(eq, x, tdev, noise)
        x = states[-1]
        traj = [states[i] for i in save_idx]
    else:
        n = times_cpu.shape[0] - 1
        state = solver.init_state(eq, x, tdev)
        tlist = tdev.unbind()  # views of every grid time, made once (no per-step indexing op)
        prepare = getattr(eq, "prepare_grid", None)
        if prepare is not None:
            prepare(tlist, x)  # per-time coefficients in one vectorised pass (ReverseSDE)
        minmax: list[tuple[Tensor, Tensor]] = []  # per-step (min, max) of the state: NaN/Inf check
        nfe_at_step: list[int] = []
        save_set = set(save_idx)
        if 0 in save_set:
            traj.append(x)
        steps = range(n)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"sdegen {solver.name}")
        try:
            for i in steps:
                step_noise = None if (final_step == "noiseless" and i == n - 1) else noise
                x, state = solver.step(eq, x, tlist[i], tlist[i + 1], step_noise, state)
                nfe_at_step.append(eq.nfe)
                if check_finite:
                    minmax.append(torch.aminmax(x.detach()))  # all finite <=> min and max finite; one pass, no sync
                if i + 1 in save_set:
                    traj.append(x)
                if callback is not None:
                    callback(i, tlist[i + 1], x)
        finally:
            if prepare is not None:
                prepare(None)  # drop the per-grid cache even when a step raises
        if check_finite:
            _raise_if_bad(eq, solver, times_cpu, first_nonfinite(minmax, x.device), nfe_at_step, nfe0)

    if final_step == "tweedie":
        x = eq.denoise(x, tdev[-1])
        if check_finite and not torch.isfinite(x).all():
            raise NonFiniteError(f"the Tweedie denoising step at t={float(times_cpu[-1]):.6g} gave NaN/Inf")
        if save_idx and save_idx[-1] == times_cpu.shape[0] - 1:
            traj[-1] = x
    trajectory = torch.stack(traj) if traj else None
    traj_times = times_cpu[save_idx].to(tdev.device, tdev.dtype) if traj else None
    return Solution(x=x, nfe=eq.nfe - nfe0, times=tdev, trajectory=trajectory, trajectory_times=traj_times, stats=stats)


def _raise_if_bad(eq, solver, times_cpu, bad_step, nfe_at_step, nfe0) -> None:
    bad_eval = getattr(eq, "_bad_eval", None)
    flags = torch.stack([bad_step, bad_eval if bad_eval is not None else torch.full_like(bad_step, -1)])
    step, ev = flags.tolist()  # the loop's single synchronisation
    if step < 0 and ev < 0:
        return
    if ev >= 0:
        evaluation = ev - nfe0
        step = next(i for i, c in enumerate(nfe_at_step) if c - nfe0 > evaluation)
        what = f"the score model returned NaN/Inf (network evaluation {evaluation + 1})"
    else:
        what = "the state became NaN/Inf (the step is unstable or the model output overflowed)"
    raise NonFiniteError(
        f"solver {solver.name!r}: {what} at step {step} of {len(nfe_at_step)}, "
        f"from t={float(times_cpu[step]):.6g} to t={float(times_cpu[step + 1]):.6g}"
    )
