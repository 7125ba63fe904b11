"""The one stepping loop: drives any solver over a time interval and owns NFE counting, non-finite checks,
the progress bar, callbacks and the saved trajectory.

* **Fixed-step solvers** (:class:`~sdegen.solvers.Solver`) step over the given grid. The loop performs no
  host-device synchronisation per step: the grid is moved to the device once, and the non-finite check
  keeps a device-side record (the first bad step; the equation's first bad network evaluation) read once
  after the loop. A NaN/Inf therefore raises :class:`~sdegen.errors.NonFiniteError` naming the solver,
  the step and its times — after the loop finishes rather than at the faulty step.
* **Adaptive solvers** (:class:`~sdegen.solvers.AdaptiveSolver`: ``rk45``, ``tsit5``, ``bosh3``, ...) try
  steps whose size a step-size controller (:class:`~sdegen.controllers.PIController`) sets **per sample**:
  every sample accepts or rejects its own step, keeps its own time and leaves the batch when it reaches
  the end (the equation is told with ``select_samples``), so one hard sample does not slow the others and a
  sample's result does not depend on its batch-mates. Output times inside a step come from the solver's
  dense output. Each attempted step synchronises once (accept/reject is data dependent). Work is bounded by
  the solver's ``max_steps`` (:class:`~sdegen.errors.MaxStepsExceeded`).
* **Path solvers** (``torchdiffeq:*``, ``torchsde:*``) run another library's loop over the output times.

Time may run in either direction: sampling integrates from ``T`` down to ``t_min``, the likelihood and
``encode`` from ``t_min`` up to ``T``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._utils import bcast, finiteness_probe, first_nonfinite, time_dtype
from .equation import Equation, EquationBase
from .errors import MaxStepsExceeded, NonFiniteError
from .noise import NoiseSource
from .solvers.base import AdaptiveSolver, Clock, PathSolver, Solver

__all__ = ["Solution", "integrate", "solve_ivp", "FunctionEquation", "FINAL_STEPS"]

FINAL_STEPS = ("none", "noiseless", "tweedie")
_BAD_START = "the initial state contains NaN/Inf (check x_T / the data passed in)"
_NONFINITE_RETRIES = 8  # consecutive non-finite attempts (each shrinking h by the controller's factor_min)


@dataclass
class Solution:
    """What an integration returns.

    Attributes:
        x: final state ``(batch, *dims)``.
        nfe: network evaluations along the longest sample path: batched evaluations of the model, a
            batched call counting once (with ``max_batch`` chunks: the largest chunk's count). Every
            sample saw at most ``nfe`` evaluations; adaptive solvers' finished samples leave the batch.
        times: the time grid (fixed-step solvers) or the requested output times (adaptive and path
            solvers), 1-D, on the state's device.
        trajectory: saved states ``(K, batch, *dims)`` or None.
        trajectory_times: ``(K,)`` times of the saved states; ``(K, batch)`` per-sample times for
            ``save_at="all"`` with an adaptive solver (each sample's accepted steps, the last one repeated
            to pad); None without a trajectory.
        stats: solver counters. Adaptive solvers: ``accepted_steps`` and ``rejected_steps`` (``(batch,)``
            int64: the steps *each sample* took), ``success`` (``(batch,)`` bool) and ``t_reached``.
        network_calls: batched model calls in total, over all ``max_batch`` chunks (``= nfe`` for one chunk).
    """

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None
    trajectory_times: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    network_calls: int | None = None

    def __post_init__(self) -> None:
        if self.network_calls is None:
            self.network_calls = self.nfe

    def summary(self) -> str:
        """One line saying what the counters count."""
        parts = [f"nfe={self.nfe} (batched network evaluations along the longest sample path)"]
        if self.network_calls != self.nfe:
            parts.append(f"network_calls={self.network_calls} (all chunks)")
        for key in ("accepted_steps", "rejected_steps"):
            v = self.stats.get(key)
            if isinstance(v, Tensor) and v.numel():
                f = v.to(torch.float64)
                parts.append(f"{key} per sample: min {int(v.min())}, mean {float(f.mean()):.1f}, max {int(v.max())}")
        return "; ".join(parts)


def _save_indices(times_cpu: Tensor, save_at: str | Sequence[float] | Tensor | None) -> list[int]:
    if save_at is None or isinstance(save_at, str):
        if save_at not in (None, "all"):
            raise ValueError(f"save_at must be 'all', a sequence of times or None, got {save_at!r}")
        return [] if save_at is None else list(range(times_cpu.shape[0]))
    want = torch.as_tensor(save_at, dtype=torch.float64).reshape(-1)
    if want.numel() == 0:
        return []
    if not torch.isfinite(want).all():
        raise ValueError("save_at times must be finite")
    idx = (want[:, None] - times_cpu[None, :]).abs().argmin(dim=1)
    return sorted(set(idx.tolist()))


def _check_grid(times: Tensor) -> Tensor:
    t = torch.as_tensor(times).detach().to("cpu", torch.float64).reshape(-1)
    v = t.tolist()  # validated on the host, once (a CPU tensor: no device synchronisation)
    if len(v) < 2 or not all(math.isfinite(a) for a in v):
        raise ValueError(f"times must be finite and 1-D with at least 2 entries, got {tuple(t.shape)}")
    if not (all(b > a for a, b in zip(v, v[1:], strict=False)) or all(b < a for a, b in zip(v, v[1:], strict=False))):
        raise ValueError("times must be strictly monotone")
    return t


def integrate(
    eq: Equation,
    x: Tensor,
    times: Tensor,
    solver: Solver,
    noise: NoiseSource | None = None,
    *,
    save_at: str | Sequence[float] | Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool | None = False,
    final_step: str = "none",
    check_finite: bool = True,
) -> Solution:
    """Integrate ``eq`` from ``times[0]`` to ``times[-1]`` with ``solver``.

    Args:
        eq: the equation (the :class:`~sdegen.equation.Equation` protocol).
        x: initial state ``(batch, *dims)``, finite.
        times: strictly monotone 1-D tensor: the grid of a fixed-step solver, the output times of an
            adaptive or path solver (at least the two end points). Moved to ``x.device`` once.
        solver: a :class:`~sdegen.solvers.Solver`, :class:`~sdegen.solvers.AdaptiveSolver` or
            :class:`~sdegen.solvers.PathSolver` instance.
        noise: where Brownian increments come from (None: deterministic).
        save_at: ``"all"`` — every grid point (fixed step) or every accepted step of every sample (adaptive;
            per-sample times); times — fixed-step solvers snap each to the nearest grid point, adaptive and
            path solvers need them among ``times`` (they are emitted exactly, by dense output); None.
        callback: ``callback(step, t, x)`` after each fixed step (``t`` 0-d), or after each attempted
            adaptive step (``t`` ``(batch,)``: each sample's current time; ``x`` the whole batch). May
            synchronise; your call. Path solvers do not support it.
        progress: a tqdm progress bar (fixed: steps; adaptive and path solvers: percent of the interval):
            True always, None once the call has run :data:`AUTO_PROGRESS_AFTER` seconds (if tqdm is
            installed), False never.
        final_step: ``"none"``; ``"noiseless"`` (the last step draws no noise, as score_sde's
            ``noise_removal``); ``"tweedie"`` (after the last step, replace ``x`` by ``E[x_0 | x_{t_end}]`` —
            one extra evaluation, affine equations only).
        check_finite: track non-finite states/evaluations and raise :class:`NonFiniteError`.
    """
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    if final_step == "tweedie" and not eq.is_affine:
        raise ValueError("final_step='tweedie' needs an affine SDE with a Gaussian kernel (m, s)")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver instance (see sdegen.get_solver), got {type(solver).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(step, t, x)")
    solver.check(eq)
    times_cpu = _check_grid(times)
    eq.check_start(solver, times_cpu[0])  # e.g. t = 1 of a flow-matching path, before any work
    tdev = times_cpu.to(device=x.device, dtype=time_dtype(x.dtype))
    nfe0 = eq.nfe
    if x.shape[0] == 0:  # an empty batch: nothing to integrate
        return Solution(x=x.clone(), nfe=0, times=tdev, stats={})

    # fixed-step loops check the initial state with their single post-loop read instead (no extra sync)
    if check_finite and isinstance(solver, AdaptiveSolver | PathSolver) and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(_BAD_START)
    if isinstance(solver, AdaptiveSolver):
        sol = _adaptive_loop(eq, x, times_cpu, tdev, solver, save_at, callback, progress)
    elif isinstance(solver, PathSolver):
        sol = _path(eq, x, times_cpu, tdev, solver, noise, save_at, callback, progress, final_step)
    else:
        sol = _fixed_loop(eq, x, times_cpu, tdev, solver, noise, save_at, callback, progress, final_step, check_finite)
    if final_step == "tweedie":
        xt = eq.denoise(sol.x, tdev[-1])  # type: ignore[attr-defined]
        if check_finite and not bool(torch.isfinite(xt).all()):
            raise NonFiniteError(f"the Tweedie denoising step at t={float(times_cpu[-1]):.6g} gave NaN/Inf")
        if sol.trajectory is not None and sol.trajectory_times is not None and sol.trajectory_times.ndim == 1:
            if float(sol.trajectory_times[-1]) == float(tdev[-1]):
                sol.trajectory[-1] = xt
        sol.x = xt
    sol.nfe = sol.network_calls = eq.nfe - nfe0
    return sol


# -- fixed steps -------------------------------------------------------------------------------------------
def _fixed_loop(eq, x, times_cpu, tdev, solver, noise, save_at, callback, progress, final_step, check_finite):
    n = times_cpu.shape[0] - 1
    save_idx = _save_indices(times_cpu, save_at)
    nfe0 = eq.nfe
    state = solver.init_state(eq, x, tdev)
    tlist = tdev.unbind()  # views of every grid time, made once (no per-step indexing op)
    eq.prepare_grid(tlist, x)  # per-time coefficients in one vectorised pass (ReverseSDE)
    # finiteness probes of the initial state, then of the state after every step: the NaN/Inf check
    probes: list[Tensor] = [finiteness_probe(x)] if check_finite else []
    nfe_at_step: list[int] = []
    save_set = set(save_idx)
    traj: list[Tensor] = [x] if 0 in save_set else []
    bar = _bar(progress, solver.name, n, "step")
    try:
        for i in range(n):
            step_noise = None if (final_step == "noiseless" and i == n - 1) else noise
            x, state = solver.step(eq, x, tlist[i], tlist[i + 1], step_noise, state)
            nfe_at_step.append(eq.nfe)
            if check_finite:
                probes.append(finiteness_probe(x))  # one cheap reduction, no sync
            if i + 1 in save_set:
                traj.append(x)
            if callback is not None:
                callback(i, tlist[i + 1], x)
            if bar is not None:
                bar.update()
    finally:
        eq.prepare_grid(None)  # drop the per-grid cache even when a step raises
        if bar is not None:
            bar.close()
    if check_finite:
        _raise_if_bad(eq, solver, times_cpu, first_nonfinite(probes, x.device), nfe_at_step, nfe0)
    trajectory = torch.stack(traj) if traj else None
    traj_times = times_cpu[save_idx].to(tdev.device, tdev.dtype) if traj else None
    return Solution(x=x, nfe=0, times=tdev, trajectory=trajectory, trajectory_times=traj_times)


def _raise_if_bad(eq, solver, times_cpu, bad_step, nfe_at_step, nfe0) -> None:
    # A NaN/Inf from the model reaches the state in the same step (NaN · 0 is NaN), so finite states mean a
    # clean run: the evaluations' record is read only to say who was at fault, on the error path.
    (step,) = bad_step.reshape(1).tolist()  # the loop's single synchronisation
    if step < 0:
        return
    if step == 0:
        raise NonFiniteError(_BAD_START)
    step -= 1  # entry 0 is the initial state
    bad_eval = eq.nonfinite_evaluation()
    ev = -1 if bad_eval is None else int(bad_eval)
    if ev >= 0 and ev < nfe0:
        ev = -1  # an earlier integration's evaluation (a reused equation); not this loop's
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


AUTO_PROGRESS_AFTER = 2.0
"""Seconds after which ``progress=None`` (the entry points' default) shows a bar: long calls show progress."""


def _bar(progress: bool | None, name: str, total: int, unit: str) -> Any:
    """A tqdm bar: always (``True``), after :data:`AUTO_PROGRESS_AFTER` s if tqdm is installed (``None``), or None."""
    if progress is False:
        return None
    if progress is not None and progress is not True:
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - tqdm is in the extras
        if progress is None:
            return None
        raise ImportError("progress=True needs tqdm: pip install tqdm") from err
    if progress is None:
        return _AutoBar(lambda n: tqdm(total=total, desc=f"sdegen {name}", unit=unit, initial=n))
    return tqdm(total=total, desc=f"sdegen {name}", unit=unit)


class _AutoBar:
    """A bar made only once the call has run :data:`AUTO_PROGRESS_AFTER` seconds (then a tqdm bar starting at the
    progress so far): a short call pays one clock read per update, not a tqdm bar's construction."""

    def __init__(self, make: Any):
        self.make, self.bar, self.n = make, None, 0
        self.start = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif time.perf_counter() - self.start >= AUTO_PROGRESS_AFTER:
            self.bar = self.make(self.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Percent:
    """A progress bar over the fraction of the integration interval covered."""

    def __init__(self, bar: Any, t_start: float, t_end: float):
        self.bar = bar
        self.t_start, self.span = t_start, abs(t_end - t_start)

    def __call__(self, t: float) -> None:
        done = min(100, int(100 * abs(t - self.t_start) / self.span + 1e-9)) if self.span > 0 else 100
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


# -- adaptive steps ----------------------------------------------------------------------------------------
def _adaptive_loop(eq, x, times_cpu, tdev, solver: AdaptiveSolver, save_at, callback, progress) -> Solution:
    ctrl = solver.controller
    save_all = isinstance(save_at, str)
    if save_all and save_at != "all":
        raise ValueError(f"save_at must be 'all', a sequence of times or None, got {save_at!r}")
    out_idx = [] if save_at is None or save_all else _output_indices(times_cpu, save_at, solver.name)
    dev, batch = x.device, x.shape[0]
    tt = times_cpu.to(dev)
    t_start, t_end = float(times_cpu[0]), float(times_cpu[-1])
    direction = 1.0 if t_end > t_start else -1.0
    lo, hi = min(t_start, t_end), max(t_start, t_end)
    span = hi - lo
    clock = Clock(lo, hi, time_dtype(x.dtype))
    key = direction * tt  # increasing
    name = solver.name
    nfe0 = eq.nfe

    states = x.new_empty((tt.shape[0], *x.shape))
    states[0] = x
    ids = torch.arange(batch, device=dev)
    y = x
    t = torch.full((batch,), t_start, dtype=torch.float64, device=dev)
    bar = _bar(progress, name, 100, "%")
    bar = None if bar is None else _Percent(bar, t_start, t_end)
    record: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # save_at="all": (ids, step, t, x) of accepted steps
    cur_x = x.clone() if callback is not None else None
    cur_t = t.clone() if callback is not None else None
    try:
        sstate = solver.init_state(eq, y, t, clock)
        f0 = solver.derivative(sstate)
        if f0 is None:
            f0 = eq.drift(y, clock(t))
        _raise_if_nonfinite_rows(eq, name, f0, ids, t, None, 0, "at the initial point", nfe0)
        h = ctrl.initial_step(
            lambda z, tz: eq.drift(z, clock(tz)), y, t, f0, direction, span, solver.error_order, eq.error_norm
        )
        cst = ctrl.init(batch, dev)
        nxt = torch.ones(batch, dtype=torch.long, device=dev)
        bad_run = torch.zeros(batch, dtype=torch.long, device=dev)  # consecutive non-finite attempts per sample
        n_acc = torch.zeros(batch, dtype=torch.long, device=dev)
        n_rej = torch.zeros(batch, dtype=torch.long, device=dev)
        success = torch.ones(batch, dtype=torch.bool, device=dev)
        t_reached = torch.full((batch,), t_end, dtype=torch.float64, device=dev)
        tiny = 16 * torch.finfo(torch.float64).eps * max(abs(t_start), abs(t_end), span)
        failure = ""
        for it in range(solver.max_steps + 1):
            if ids.numel() == 0:
                break
            if it == solver.max_steps:
                failure = f"max_steps={solver.max_steps} exceeded"
                break
            remaining = direction * (t_end - t)
            last = h >= remaining
            hs = torch.where(last, remaining, h)  # |h| actually taken
            hsig = direction * hs
            t_new = torch.where(last, torch.full_like(t, t_end), t + hsig)
            att = solver.attempt(eq, y, t, hsig, t_new, sstate, clock)
            en = ctrl.error_ratio(att.error, y, att.x, eq.error_norm)
            check = att.derivative if att.derivative is not None else att.x
            finite = torch.isfinite(en) & torch.isfinite(check.reshape(check.shape[0], -1)).all(1)
            # a non-finite trial step (an unstable stage on a stiff stretch) is rejected and shrunk; a sample
            # whose attempts stay non-finite _NONFINITE_RETRIES times in a row has a model returning NaN/Inf
            accept, h, cst = ctrl.adapt(hs, en, finite, solver.error_order, cst)
            bad_run = torch.where(finite, torch.zeros_like(bad_run), bad_run + 1)
            n_acc[ids] += accept.long()
            n_rej[ids] += (~accept).long()
            done = accept & last
            ncov = torch.searchsorted(key, direction * t_new, right=True)
            nemit = torch.where(accept, ncov - nxt, torch.zeros_like(nxt)).clamp_min(0)
            stuck = ~done & (h < tiny)
            flags = torch.stack([bad_run.max(), nemit.max(), (done | stuck).any().long(), stuck.any().long()])
            worst_run, max_emit, any_leave, any_stuck = flags.tolist()  # the step's one synchronisation
            if worst_run >= _NONFINITE_RETRIES or (any_stuck and bool((stuck & (bad_run > 0)).any())):
                # NaN/Inf that shrinking the step does not cure: the model (or the equation) returns it
                bad = (bad_run >= _NONFINITE_RETRIES) | (stuck & (bad_run > 0))
                _raise_if_nonfinite_rows(eq, name, None, ids[bad], t[bad], hsig[bad], it, "in a step", nfe0)
            for r in range(max_emit):  # output times inside the step: dense output
                sel = (nemit > r).nonzero().squeeze(1)
                j = nxt[sel] + r
                theta = (tt[j] - t[sel]) / hsig[sel]
                out = solver.interpolate(y, hsig, att.dense, theta, sel)
                exact = bcast(tt[j] == t_new[sel], out)
                states[j, ids[sel]] = torch.where(exact, att.x[sel], out)
            if save_all and bool(accept.any()):
                acc = accept.nonzero().squeeze(1)
                record.append((ids[acc], n_acc[ids[acc]], t_new[acc], att.x[acc]))
            nxt = torch.where(accept, torch.maximum(ncov, nxt), nxt)
            acc_x = bcast(accept, y)
            y = torch.where(acc_x, att.x, y)
            sstate = tuple(
                torch.where(bcast(accept, old), new, old) for old, new in zip(sstate, att.state, strict=True)
            )
            t = torch.where(accept, t_new, t)
            if callback is not None:
                cur_x[ids] = y
                cur_t[ids] = t
                callback(it, cur_t, cur_x)
            if bar is not None:
                bar(t_start + direction * float((direction * (t - t_start)).min()))
            if any_stuck and not failure:
                failure = (
                    "the step size underflowed (the problem is too stiff for an explicit method at this tolerance)"
                )
                _mark_failed(states, ids[stuck], y[stuck], nxt[stuck], t[stuck], success, t_reached)
            if any_leave:
                keep = ~(done | stuck)
                ids, y, t, h, nxt, bad_run = ids[keep], y[keep], t[keep], h[keep], nxt[keep], bad_run[keep]
                sstate = tuple(v[keep] for v in sstate)
                cst = cst.select(keep)
                eq.select_samples(ids, batch)
    finally:
        eq.select_samples(None, batch)
        if bar is not None:
            bar.close()

    if ids.numel():
        _mark_failed(states, ids, y, nxt, t, success, t_reached)
    stats: dict[str, Any] = {
        "accepted_steps": n_acc,
        "rejected_steps": n_rej,
        "success": success,
        "t_reached": t_reached,
    }
    if failure and not solver.return_partial:
        bad = (~success).nonzero().squeeze(1)
        where = ", ".join(f"sample {int(i)} at t={float(t_reached[i]):.6g}" for i in bad[:5])
        more = f" (and {bad.numel() - 5} more)" if bad.numel() > 5 else ""
        raise MaxStepsExceeded(
            f"solver {name!r}: {failure} for {bad.numel()} of {batch} sample(s) integrating from "
            f"t={t_start:.6g} to t={t_end:.6g}: {where}{more}. Loosen rtol/atol, raise max_steps, or pass "
            "return_partial=True to get the partial result."
        )
    trajectory = traj_times = None
    if save_all:
        trajectory, traj_times = _accepted_path(x, t_start, record, n_acc)
    elif out_idx:
        trajectory, traj_times = states[out_idx], tdev[out_idx]
    return Solution(x=states[-1], nfe=0, times=tdev, trajectory=trajectory, trajectory_times=traj_times, stats=stats)


def _output_indices(times_cpu: Tensor, save_at: Any, name: str) -> list[int]:
    want = torch.as_tensor(save_at, dtype=torch.float64).reshape(-1)
    idx = (want[:, None] - times_cpu[None, :]).abs().argmin(dim=1) if want.numel() else want.long()
    if want.numel() and ((times_cpu[idx] - want).abs() > 1e-12 * (1 + want.abs())).any():
        raise ValueError(
            f"solver {name!r} emits save_at times by dense output: they must be among the integration's "
            "output times (reverse_sample adds them; with sdegen.integrate pass them in times=)"
        )
    return sorted(set(idx.tolist()))


def _accepted_path(x0: Tensor, t0: float, record, n_acc: Tensor) -> tuple[Tensor, Tensor]:
    """``(K, batch, *dims)`` states and ``(K, batch)`` times of every accepted step, padded with the last."""
    batch = x0.shape[0]
    k = int(n_acc.max()) + 1 if batch else 1
    traj = x0.new_empty((k, *x0.shape))
    times = torch.empty((k, batch), dtype=torch.float64, device=x0.device)
    traj[0] = x0
    times[0] = t0
    for ids, step, t, xs in record:
        traj[step, ids] = xs
        times[step, ids] = t
    # pad each sample's tail with its final state and time
    rows = torch.arange(k, device=x0.device)[:, None].minimum(n_acc[None, :])  # (K, batch)
    cols = torch.arange(batch, device=x0.device)[None, :].expand(k, batch)
    return traj[rows, cols], times[rows, cols]


def _mark_failed(states, ids, y, nxt, t, success, t_reached) -> None:
    """Fill a failed sample's unreached outputs with its last state and flag it."""
    n_out = states.shape[0]
    for i in range(ids.numel()):
        j0 = int(nxt[i])
        if j0 < n_out:
            states[j0:, int(ids[i])] = y[i]
    success[ids] = False
    t_reached[ids] = t


def _raise_if_nonfinite_rows(eq, name, f, ids, t, h, step, where, nfe0) -> None:
    if f is not None:
        ok = torch.isfinite(f.reshape(f.shape[0], -1)).all(1)
        if bool(ok.all()):
            return
        ids, t = ids[~ok], t[~ok]
    bad_eval = eq.nonfinite_evaluation()
    ev = -1 if bad_eval is None else int(bad_eval)
    what = (
        f"the score model returned NaN/Inf (network evaluation {ev - nfe0 + 1})"
        if ev >= nfe0
        else "the solution became NaN/Inf"
    )
    first = ", ".join(f"sample {int(i)} at t={float(ti):.6g}" for i, ti in zip(ids[:5], t[:5], strict=True))
    hs = "" if h is None else f" with step h={float(h[0]):.3g}"
    raise NonFiniteError(
        f"solver {name!r}: {what} {where} (attempted step {step}){hs}: {first}{' ...' if ids.numel() > 5 else ''}"
    )


# -- another library's loop ----------------------------------------------------------------------------
def _path(eq, x, times_cpu, tdev, solver: PathSolver, noise, save_at, callback, progress, final_step) -> Solution:
    if callback is not None:
        raise ValueError(f"solver {solver.name!r} runs another library's loop and takes no callback; use save_at=")
    if final_step == "noiseless" and not eq.is_ode:
        raise ValueError(
            f"solver {solver.name!r} cannot drop the noise of its last step (final_step='noiseless'); "
            "use an sdegen SDE solver, or final_step='tweedie'"
        )
    if isinstance(save_at, str) and save_at != "all":
        raise ValueError(f"save_at must be 'all', a sequence of times or None, got {save_at!r}")
    out_idx = (
        list(range(times_cpu.shape[0]))
        if save_at == "all"
        else ([] if save_at is None else _output_indices(times_cpu, save_at, solver.name))
    )
    bar = _bar(progress, solver.name, 100, "%")
    bar = None if bar is None else _Percent(bar, float(times_cpu[0]), float(times_cpu[-1]))
    try:
        states, stats = solver.solve(eq, x, tdev, noise, monitor=bar)
    finally:
        if bar is not None:
            bar.close()
    trajectory = states[out_idx] if out_idx else None
    traj_times = tdev[out_idx] if out_idx else None
    return Solution(x=states[-1], nfe=0, times=tdev, trajectory=trajectory, trajectory_times=traj_times, stats=stats)


# -- plain functions ---------------------------------------------------------------------------------------
class FunctionEquation(EquationBase):
    """The ODE ``dy/dt = func(y, t, *args)`` as an :class:`~sdegen.equation.Equation`.

    ``t`` reaches ``func`` as a 0-d tensor (fixed-step solvers) or ``(n,)`` tensor (adaptive solvers: the
    time of each active sample). ``args`` are per-sample tensors (leading dimension ``batch``) that follow
    the active samples. Each output row must depend only on its own input row.
    """

    is_ode = True

    def __init__(self, func: Callable[..., Tensor], args: Sequence[Tensor] = ()):
        super().__init__()
        if not callable(func):
            raise TypeError("func must be callable as func(y, t, *args)")
        self.func = func
        self._args_all = tuple(args)
        self.args = self._args_all

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.func(x, t, *self.args)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"func returned {got}, expected a tensor of shape {tuple(x.shape)}")
        self.record_evaluation(out)
        return out

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros((), device=x.device, dtype=x.dtype)

    def select_samples(self, index: Tensor | None, batch: int) -> None:
        self.args = self._args_all if index is None else tuple(a[index] for a in self._args_all)


def solve_ivp(
    func: Callable[..., Tensor],
    y0: Tensor,
    times: Tensor | Sequence[float],
    *,
    solver: str | Solver = "rk45",
    args: Sequence[Tensor] = (),
    **solver_options: Any,
) -> Solution:
    """Solve ``dy/dt = func(y, t, *args)`` from ``times[0]`` through every time in ``times``.

    A convenience over :func:`integrate` for plain functions (scipy's ``solve_ivp`` / torchdiffeq's
    ``odeint`` shape). ``y0`` is ``(batch, *dims)``; with the default ``"rk45"`` (or ``"tsit5"``,
    ``"bosh3"``) each sample takes its own steps; a fixed-step solver steps on ``times``.

    Returns:
        A :class:`Solution` whose ``trajectory`` holds the state at every time ``(len(times), batch, *dims)``.
    """
    from .solvers import get_solver

    if not isinstance(y0, Tensor) or not y0.is_floating_point() or y0.ndim < 1:
        raise TypeError("y0 must be a floating-point tensor of shape (batch, *dims)")
    batch = y0.shape[0]
    args = tuple(args)
    for a in args:
        if not isinstance(a, Tensor) or a.shape[:1] != (batch,):
            raise ValueError(f"every entry of args must be a tensor with leading dimension batch={batch}")
    grid = _check_grid(torch.as_tensor(times))
    slv = get_solver(solver, **solver_options)
    return integrate(FunctionEquation(func, args), y0, grid, slv, save_at=grid.tolist())
