"""Adaptive Dormand–Prince 5(4) with *per-sample* step-size control and dense output.

The embedded pair of Dormand & Prince (1980), "A family of embedded Runge–Kutta formulae",
J. Comp. Appl. Math. 6 — Butcher tableau as in Hairer, Nørsett & Wanner, *Solving ODEs I*
(2nd ed., 1993), Table II.5.2: 7 stages, the 7th evaluated at the new solution (FSAL), so an
accepted step costs 6 evaluations. The step advances with the 5th-order solution (local
extrapolation); the difference with the embedded 4th-order one estimates the local error.

* **Error norm, per sample**: ``‖err / (atol + rtol · max(|y|, |y_new|))‖_RMS`` over that sample's
  dimensions (Hairer et al. II.4, eq. 4.11). A step is accepted (``norm <= 1``) or rejected **per
  sample**, and every sample keeps its own time and step size: one hard sample does not force small
  steps on the others. The function is still called once per stage on the whole still-running batch,
  with a per-sample time ``t`` of shape ``(n_active,)``; finished samples leave the batch.
* **Step-size controller**: Gustafsson's PI controller as in Hairer's ``DOPRI5`` code (II.4, eq. 4.13,
  ``β = 0.04``): ``h_new = h · clip(safety · err^{-(1/5 - 0.75 β)} · err_old^{β}, 0.2, 10)``; after a
  rejection ``h_new = h · max(0.2, safety · err^{-(1/5 - 0.75 β)})`` and the next accepted step may
  not grow.
* **Initial step** (when ``first_step`` is None): Hairer et al. II.4, p. 169 ("Starting step size"),
  per sample, clipped to the interval; 2 evaluations.
* **Dense output**: the 4th-order continuous extension of Dormand–Prince (Shampine 1986, "Some
  practical Runge–Kutta formulas", Math. Comp. 46; coefficients as in SciPy's ``RK45``) gives the
  state at every requested time inside a step; requested end points are hit exactly.
* **The function is never evaluated outside the closed interval** ``[times[-1], times[0]]``: the
  last step of each sample is clipped to land on the end time, and stage times are clamped to it
  (torchdiffeq's ``dopri5`` instead steps past the end and interpolates back).
* **Bounded work**: at most ``max_steps`` attempted steps per sample, then
  :class:`~sdegen.errors.MaxStepsExceeded` (or the partial result, ``return_partial=True``).
  NaN/Inf raise :class:`~sdegen.errors.NonFiniteError` naming the solver, the step and the time.

:func:`solve_ivp_per_sample` is the engine (also used by :mod:`sdegen.likelihood`);
:class:`RK45` is the ``solver="rk45"`` path solver that runs it on an equation's drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import bcast
from ..errors import MaxStepsExceeded, NonFiniteError
from .base import PathSolver

__all__ = ["RK45", "solve_ivp_per_sample", "equation_field", "rms_norm"]

# --- Dormand–Prince 5(4) tableau (Hairer, Nørsett & Wanner, Table II.5.2) -------------------------
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)  # 5th order (stage 7 input)
# b5 - b4 (the 7th weight of b4 is 1/40, on the FSAL stage)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
# Continuous extension: y(t + θh) = y + h Σ_i k_i Σ_j P[i][j] θ^(j+1)  (Shampine 1986)
_P = (
    (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
    (0.0, 0.0, 0.0, 0.0),
    (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
    (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
    (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632),
    (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
    (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
)
_BETA = 0.04  # PI controller (Hairer's DOPRI5 default)
_EXPO = 1 / 5 - 0.75 * _BETA
_FAC_MIN, _FAC_MAX = 0.2, 10.0

Func = Callable[..., Tensor]
Norm = Callable[[Tensor], Tensor]


def _pow(x: Tensor, p: float) -> Tensor:
    """``x ** p`` as ``exp(p log x)``: on CPU ``Tensor.pow`` rounds a tensor's SIMD body and its scalar
    tail differently (last bit), which would make a sample's step sizes depend on its batch position."""
    return torch.exp(p * torch.log(x))


def rms_norm(v: Tensor) -> Tensor:
    """Root-mean-square over all but the batch dimension: ``(n, *dims) -> (n,)``."""
    return v.reshape(v.shape[0], -1).pow(2).mean(dim=1).sqrt()


def _combine(y: Tensor, h: Tensor, ks: Sequence[Tensor], coefs: Sequence[float]) -> Tensor:
    """``y + h Σ c_i k_i`` skipping zero coefficients; ``h`` is ``(n,)``."""
    acc = None
    for c, k in zip(coefs, ks, strict=True):
        if c != 0.0:
            acc = c * k if acc is None else acc + c * k
    return y if acc is None else y + bcast(h.to(y.dtype), y) * acc


def check_tolerances(rtol: Any, atol: Any) -> None:
    """``rtol > 0`` and ``atol >= 0``, finite numbers; errors name the argument."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
    if rtol <= 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")


def _check_options(rtol, atol, first_step, max_steps, safety) -> None:
    check_tolerances(rtol, atol)
    if isinstance(safety, bool) or not isinstance(safety, int | float) or not math.isfinite(safety):
        raise TypeError(f"safety must be a finite number, got {safety!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must lie in (0, 1], got {safety}")
    if first_step is not None:
        if isinstance(first_step, bool) or not isinstance(first_step, int | float) or not first_step > 0:
            raise ValueError(f"first_step must be a positive number or None, got {first_step!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")


def solve_ivp_per_sample(
    func: Func,
    y0: Tensor,
    times: Tensor | Sequence[float],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 10_000,
    safety: float = 0.9,
    return_partial: bool = False,
    args: Sequence[Tensor] = (),
    norm: Norm | None = None,
    name: str = "rk45",
) -> tuple[Tensor, dict[str, Any]]:
    """Solve ``dy/dt = func(y, t, *args)`` with Dormand–Prince 5(4), each sample on its own steps.

    Args:
        func: ``func(y, t, *args) -> dy/dt`` with ``y`` ``(n_active, *dims)``, ``t`` ``(n_active,)`` (in
            ``times``' dtype, float32 or better) and ``args`` the per-sample tensors below restricted to
            the active samples. Each output row must depend only on its own input row.
        y0: initial state ``(batch, *dims)`` at ``times[0]``.
        times: 1-D, strictly monotone (decreasing for sampling, increasing for the likelihood),
            at least 2 entries; the state is returned at every one of them (dense output).
        rtol, atol: relative / absolute tolerance of the per-sample error norm (``rtol > 0``, ``atol >= 0``).
        first_step: initial step size ``|h|`` (default: Hairer's selection, 2 evaluations).
        max_steps: bound on attempted (accepted + rejected) steps per sample.
        safety: step-size safety factor.
        return_partial: on ``max_steps`` / step-size underflow return what was computed instead of
            raising; unreached outputs hold the state at ``stats["t_reached"]``, and
            ``stats["success"]`` flags each sample.
        args: tensors with leading dimension ``batch``, sliced along with the active set.
        norm: ``(n, *dims) -> (n,)`` norm of the scaled error (default :func:`rms_norm`).
        name: solver name used in error messages.

    Returns:
        ``(states, stats)``: ``states`` ``(len(times), batch, *dims)`` with ``states[0] = y0``;
        ``stats`` holds ``nfe`` (batched calls of ``func``), ``accepted`` / ``rejected`` (totals over
        samples, ints), ``steps_per_sample`` / ``rejected_per_sample`` (``(batch,)`` int64),
        ``success`` (``(batch,)`` bool) and ``t_reached`` (``(batch,)`` float64).

    Raises:
        MaxStepsExceeded: a sample used ``max_steps`` steps (or its step size underflowed).
        NonFiniteError: ``func`` returned NaN/Inf.
    """
    _check_options(rtol, atol, first_step, max_steps, safety)
    if not isinstance(y0, Tensor) or not y0.is_floating_point() or y0.ndim < 1:
        raise ValueError("y0 must be a floating-point tensor of shape (batch, *dims)")
    norm = norm or rms_norm
    dev = y0.device
    times = torch.as_tensor(times, device=dev)
    if not times.is_floating_point():
        times = times.to(torch.float64)
    tdt = times.dtype
    tt = times.to(torch.float64)
    if tt.ndim != 1 or tt.shape[0] < 2:
        raise ValueError(f"times must be 1-D with at least 2 entries, got shape {tuple(tt.shape)}")
    diffs = tt[1:] - tt[:-1]
    t_start, t_end = tt[0].item(), tt[-1].item()
    if not (math.isfinite(t_start) and math.isfinite(t_end)) or not ((diffs > 0).all() or (diffs < 0).all()):
        raise ValueError("times must be finite and strictly monotone")
    direction = 1.0 if t_end > t_start else -1.0
    lo, hi = min(t_start, t_end), max(t_start, t_end)
    span = hi - lo
    key = direction * tt  # increasing
    batch = y0.shape[0]
    args = tuple(args)
    for a in args:
        if not isinstance(a, Tensor) or a.shape[:1] != (batch,):
            raise ValueError(f"every entry of args must be a tensor with leading dimension batch={batch}")

    nfe = 0

    def call(y: Tensor, t: Tensor, active_args: tuple) -> Tensor:
        nonlocal nfe
        nfe += 1
        out = func(y, t.clamp(lo, hi).to(tdt), *active_args)
        if not isinstance(out, Tensor) or out.shape != y.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"func returned {shape}, expected a tensor of shape {tuple(y.shape)}")
        return out

    states = y0.new_empty((tt.shape[0], *y0.shape))
    states[0] = y0
    ids = torch.arange(batch, device=dev)
    y = y0
    t = torch.full((batch,), t_start, dtype=torch.float64, device=dev)
    a_args = args
    f = call(y, t, a_args)
    _raise_if_nonfinite(name, f, ids, t, None, 0, "at the initial point")
    h = _initial_step(call, y, t, f, a_args, direction, span, rtol, atol, norm, first_step)
    nxt = torch.ones(batch, dtype=torch.long, device=dev)
    err_old = torch.full((batch,), 1e-4, dtype=torch.float64, device=dev)
    was_rejected = torch.zeros(batch, dtype=torch.bool, device=dev)
    n_acc = torch.zeros(batch, dtype=torch.long, device=dev)
    n_rej = torch.zeros(batch, dtype=torch.long, device=dev)
    success = torch.ones(batch, dtype=torch.bool, device=dev)
    t_reached = torch.full((batch,), t_end, dtype=torch.float64, device=dev)
    tiny = 16 * torch.finfo(torch.float64).eps * max(abs(t_start), abs(t_end))
    failure = ""

    for it in range(max_steps + 1):
        if ids.numel() == 0:
            break
        if it == max_steps:
            failure = f"max_steps={max_steps} exceeded"
            break
        remaining = direction * (t_end - t)
        last = h >= remaining
        hs = torch.where(last, remaining, h)  # |h| actually taken
        hsig = direction * hs
        t_new = torch.where(last, torch.full_like(t, t_end), t + hsig)
        ks = [f]
        for i in range(1, 6):
            yi = _combine(y, hsig, ks, _A[i])
            ks.append(call(yi, t + _C[i] * hsig, a_args))
        y_new = _combine(y, hsig, ks, _B)
        ks.append(call(y_new, t_new, a_args))
        err = _combine(torch.zeros_like(y), hsig, ks, _E)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        en = norm(err / scale).to(torch.float64)
        finite = torch.isfinite(en) & torch.isfinite(ks[-1].reshape(ks[-1].shape[0], -1)).all(1)
        accept = (en <= 1.0) & finite
        fac_acc = (safety * _pow(en, -_EXPO) * _pow(err_old, _BETA)).clamp(_FAC_MIN, _FAC_MAX)
        fac_acc = torch.where(was_rejected, fac_acc.clamp_max(1.0), fac_acc)
        fac_rej = (safety * _pow(en, -_EXPO)).clamp(_FAC_MIN, 1.0)
        h = hs * torch.where(accept, fac_acc, fac_rej)
        err_old = torch.where(accept, en.clamp_min(1e-4), err_old)
        was_rejected = ~accept
        n_acc[ids] += accept.long()
        n_rej[ids] += (~accept).long()
        done = accept & last
        ncov = torch.searchsorted(key, direction * t_new, right=True)
        nemit = torch.where(accept, ncov - nxt, torch.zeros_like(nxt)).clamp_min(0)
        stuck = ~done & (h < tiny)
        flags = torch.stack([(~finite).any().long(), nemit.max(), (done | stuck).any().long(), stuck.any().long()])
        any_bad, max_emit, any_leave, any_stuck = flags.tolist()
        if any_bad:
            _raise_if_nonfinite(name, None, ids[~finite], t[~finite], hsig[~finite], it, "in a step")
        for r in range(max_emit):
            sel = (nemit > r).nonzero().squeeze(1)
            j = nxt[sel] + r
            theta = ((tt[j] - t[sel]) / hsig[sel]).to(y.dtype)
            coefs = [bcast(_poly(p, theta), y[sel]) for p in _P]
            acc = sum(c * k[sel] for c, k, p in zip(coefs, ks, _P, strict=True) if any(p))
            out = y[sel] + bcast(hsig[sel].to(y.dtype), y[sel]) * acc
            exact = bcast(tt[j] == t_new[sel], out)
            states[j, ids[sel]] = torch.where(exact, y_new[sel], out)
        nxt = torch.where(accept, torch.maximum(ncov, nxt), nxt)
        y = torch.where(bcast(accept, y), y_new, y)
        f = torch.where(bcast(accept, f), ks[-1], f)
        t = torch.where(accept, t_new, t)
        if any_stuck and not failure:
            failure = "the step size underflowed (the problem is too stiff for an explicit method at this tolerance)"
            _mark_failed(states, ids[stuck], y[stuck], nxt[stuck], t[stuck], success, t_reached)
        if any_leave:
            keep = ~(done | stuck)
            ids, y, f, t, h = ids[keep], y[keep], f[keep], t[keep], h[keep]
            nxt, err_old, was_rejected = nxt[keep], err_old[keep], was_rejected[keep]
            a_args = tuple(a[ids] for a in args)

    if ids.numel():
        _mark_failed(states, ids, y, nxt, t, success, t_reached)
    stats: dict[str, Any] = {
        "nfe": nfe,
        "accepted": int(n_acc.sum()),
        "rejected": int(n_rej.sum()),
        "steps_per_sample": n_acc,
        "rejected_per_sample": n_rej,
        "success": success,
        "t_reached": t_reached,
    }
    if failure and not return_partial:
        bad = (~success).nonzero().squeeze(1)
        where = ", ".join(f"sample {int(i)} at t={float(t_reached[i]):.6g}" for i in bad[:5])
        more = f" (and {bad.numel() - 5} more)" if bad.numel() > 5 else ""
        raise MaxStepsExceeded(
            f"solver {name!r}: {failure} for {bad.numel()} of {batch} sample(s) integrating from "
            f"t={t_start:.6g} to t={t_end:.6g}: {where}{more}. Loosen rtol/atol, raise max_steps, or pass "
            "return_partial=True to get the partial result."
        )
    return states, stats


def _poly(p: Sequence[float], theta: Tensor) -> Tensor:
    """``Σ_j p_j θ^(j+1)`` by Horner's rule."""
    acc = torch.full_like(theta, p[-1])
    for c in reversed(p[:-1]):
        acc = acc * theta + c
    return acc * theta


def _mark_failed(states, ids, y, nxt, t, success, t_reached) -> None:
    """Fill a failed sample's unreached outputs with its last state and flag it."""
    n_out = states.shape[0]
    for i in range(ids.numel()):
        j0 = int(nxt[i])
        if j0 < n_out:
            states[j0:, int(ids[i])] = y[i]
    success[ids] = False
    t_reached[ids] = t


def _raise_if_nonfinite(name, f, ids, t, h, step, where) -> None:
    if f is not None:
        ok = torch.isfinite(f.reshape(f.shape[0], -1)).all(1)
        if bool(ok.all()):
            return
        ids, t = ids[~ok], t[~ok]
    first = ", ".join(f"sample {int(i)} at t={float(ti):.6g}" for i, ti in zip(ids[:5], t[:5], strict=True))
    hs = "" if h is None else f" with step h={float(h[0]):.3g}"
    raise NonFiniteError(
        f"solver {name!r}: the function returned NaN/Inf {where} (attempted step {step}){hs}: {first}"
        f"{' ...' if ids.numel() > 5 else ''}"
    )


def _initial_step(call, y, t, f, a_args, direction, span, rtol, atol, norm, first_step) -> Tensor:
    """Per-sample starting step (Hairer, Nørsett & Wanner, II.4 'Starting step size'), ``(n,)`` float64."""
    n = y.shape[0]
    if first_step is not None:
        return torch.full((n,), min(float(first_step), span), dtype=torch.float64, device=y.device)
    scale = atol + rtol * y.abs()
    d0 = norm(y / scale).to(torch.float64)
    d1 = norm(f / scale).to(torch.float64)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300)).clamp_max(span)
    y1 = _combine(y, direction * h0, [f], [1.0])
    f1 = call(y1, t + direction * h0, a_args)
    d2 = norm((f1 - f) / scale).to(torch.float64) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.clamp_min(h0 * 1e-3, 1e-6),
        _pow(0.01 / dmax.clamp_min(1e-300), 1 / 5),
    )
    h = torch.minimum(100 * h0, h1).clamp_max(span)
    return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6).clamp_max(span))


def equation_field(eq: Any, batch: int) -> tuple[Func, tuple[Tensor, ...]]:
    """``(func, args)`` for :func:`solve_ivp_per_sample` running ``eq.drift``.

    Tensor ``model_kwargs`` whose leading dimension is the batch (class labels, conditioning) must
    follow the active set: they are passed as per-sample ``args`` and swapped into
    ``eq.model_kwargs`` for the duration of each call.
    """
    kw = getattr(eq, "model_kwargs", None) or {}
    keys = [k for k, v in kw.items() if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch]
    if not keys:
        return (lambda y, t: eq.drift(y, t)), ()

    def func(y: Tensor, t: Tensor, *vals: Tensor) -> Tensor:
        saved = eq.model_kwargs
        eq.model_kwargs = {**saved, **dict(zip(keys, vals, strict=True))}
        try:
            return eq.drift(y, t)
        finally:
            eq.model_kwargs = saved

    return func, tuple(kw[k] for k in keys)


class RK45(PathSolver):
    """Adaptive Dormand–Prince 5(4) for the probability-flow ODE, with per-sample error control.

    Order 5 (local extrapolation), embedded order 4; FSAL, so about 6 evaluations per step. See the
    module docstring for the controller, the initial step and the dense output.

    Args:
        rtol: relative tolerance (> 0), default 1e-5.
        atol: absolute tolerance (>= 0), default 1e-5.
        first_step: initial ``|h|``; default Hairer's automatic choice.
        max_steps: bound on attempted steps per sample (default 10 000).
        safety: step-size safety factor in (0, 1], default 0.9.
        return_partial: on ``max_steps`` return the partial result (``stats["success"]`` per
            sample) instead of raising :class:`~sdegen.errors.MaxStepsExceeded`.

    ODEs only (``reverse_sample(..., noise_scale=0)``); ``times`` are the output times.
    """

    name = "rk45"
    order = 5.0
    supports_sde = False
    nfe_per_step = 6

    def __init__(
        self,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        first_step: float | None = None,
        max_steps: int = 10_000,
        safety: float = 0.9,
        return_partial: bool = False,
    ):
        _check_options(rtol, atol, first_step, max_steps, safety)
        self.rtol, self.atol, self.first_step = float(rtol), float(atol), first_step
        self.max_steps, self.safety, self.return_partial = max_steps, float(safety), bool(return_partial)

    def solve(self, eq, x, times, noise):
        self.check(eq)
        func, args = equation_field(eq, x.shape[0])
        return solve_ivp_per_sample(
            func, x, times, rtol=self.rtol, atol=self.atol, first_step=self.first_step,
            max_steps=self.max_steps, safety=self.safety, return_partial=self.return_partial,
            args=args, name=self.name,
        )

    def __repr__(self) -> str:
        return f"RK45(rtol={self.rtol}, atol={self.atol}, max_steps={self.max_steps})"
