"""(b) Log-likelihood by the probability-flow ODE: error against the analytic log p, evaluations and time.

Problems: ``ring8`` (d = 2) and ``aniso16`` (d = 16) Gaussian mixtures under VP (``VPSDE(0.1, 20)``) and VE
(``VESDE(0.01, 50)``); ``t_min = 1e-5``; every method is given the *exact* ``p_T`` as its prior, so the error
measured against the mixture's exact ``log p_{t_min}(x)`` is the solver's (and the trace estimator's) alone.
Float64 throughout, one thread.

Sections (``python -m benchmarks.likelihood --only ...``; ``python -m benchmarks.run --only likelihood`` runs
the head-to-head and the fixed-tolerance table):

* ``equal`` — the done-when comparison: sdegen's default (``log_likelihood`` with no options: exact trace,
  per-sample RK45, ``time_variable="auto"``) against torchdiffeq ``dopri5`` with the exact trace (the loop
  of ``D`` vector–Jacobian products of FFJORD's ``divergence_bf``, state ``(x, Δ)`` as a tuple, in ``t``),
  both swept over tolerances, **interleaved, best of several**; at each of dopri5's errors, sdegen's time and
  evaluations are read off its own curve by log–log interpolation. *Evaluations per point*: network
  evaluations summed over the samples, divided by the batch (dopri5: its number of batched calls, every
  sample is evaluated at each; sdegen: finished samples leave the batch). Also reported: batched calls.
* ``curves`` — error vs evaluations and time for every sdegen option: time variable (``t``, ``vp_t``,
  ``sigma``, ``log_sigma``) × tableau (``rk45``, ``tsit5``, ``bosh3``) × step control (per sample, shared),
  next to torchdiffeq dopri5 (exact trace), Meta ``flow_matching``'s ``ODESolver.compute_likelihood``
  (``exact_divergence=True``, dopri5) and the SciPy RK45 baseline with the exact trace.
* ``table`` — one tolerance (1e-5), every method, including the one-probe Hutchinson peers: k-diffusion's
  ``log_likelihood`` (torchdiffeq dopri5 in σ; k-diffusion hard-codes ``Normal(0, σ_max)``, so it is handed a
  ``torch`` proxy whose ``distributions.Normal(...).log_prob`` is the exact prior) and the score_sde-style SciPy
  ``solve_ivp(method="RK45")`` on the flattened batch with a NumPy round trip per evaluation.
* ``trace`` — seconds per exact-trace evaluation for each product mode (``vjp``: batched backward passes
  under vmap, the default chunk and one pass over all ``D`` rows; ``vjp_loop``: one backward per basis vector;
  ``jvp``: forward mode under vmap) on the mixtures and on MLPs of dimension 16 to 256, batches of 16 and
  1,024: what ``exact_mode="auto"`` picks on this device.
* ``hutch`` — stochastic traces on aniso16-VP (d = 16) and a d = 64 MLP field: Hutchinson with 1 to 24 probes
  and Hutch++ with 12 and 24 products: error, the reported standard error and its calibration (mean reported
  variance over the variance across independent draws; coverage of ±2 standard errors), and the network
  evaluations and products needed to reach a stated standard error (one-probe Hutchinson reaches it by
  averaging repeated solves).

Run: ``python -m benchmarks.likelihood`` (full: about 40 minutes on 2 shared cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from sdegen import VESDE, VPSDE
from sdegen.likelihood import log_likelihood
from sdegen.testing import GaussianMixture

from .common import MIXTURES, RESULTS, Counted, Problem, k_diffusion, kd_denoiser

T_MIN = 1e-5
SDES: dict[str, Callable[[], object]] = {"vp": lambda: VPSDE(0.1, 20.0), "ve": lambda: VESDE(0.01, 50.0)}
PROBLEMS = [("ring8", "vp"), ("aniso16", "vp"), ("ring8", "ve"), ("aniso16", "ve")]


def make_problem(mix: str, kind: str) -> Problem:
    mixture = MIXTURES[mix]()
    sde = SDES[kind]()
    return Problem(f"{mix}-{kind}", mixture, sde, mixture.perturbed(sde))


# -- methods: (problem, x, tol) -> (ll, stats) ------------------------------------------------------------
def sdegen_method(**opts) -> Callable:
    """sdegen ``log_likelihood`` with ``opts``; evaluations counted by a wrapper around the score."""

    def run(p: Problem, x: torch.Tensor, tol: float):
        score = Counted(p.pm.score)
        ll, info = log_likelihood(p.sde, score, x, rtol=tol, atol=tol, t_min=T_MIN, seed=0, return_info=True,
                                  progress=False, prior_log_prob=lambda z: p.pm.log_prob(z, p.sde.T), **opts)
        return ll, {"calls": info.nfe, "evals": score.work / x.shape[0], "se": info.trace_se}

    return run


def _pf_drift(p: Problem, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = xt.shape[0]
    tb = t.expand(n) if t.ndim == 0 else t
    a = p.sde.drift_coef(tb).to(xt.dtype)[:, None]
    g2 = p.sde.diffusion_coef(tb).to(xt.dtype)[:, None] ** 2
    return a * xt - 0.5 * g2 * p.pm.score(xt, tb)


def _div_loop(f: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
    """FFJORD's ``divergence_bf``: one vector-Jacobian product per coordinate."""
    d = f.shape[1]
    div = torch.zeros(f.shape[0], dtype=f.dtype)
    for i in range(d):
        div = div + torch.autograd.grad(f[:, i].sum(), xg, retain_graph=i < d - 1)[0][:, i]
    return div


def torchdiffeq_exact(p: Problem, x: torch.Tensor, tol: float, method: str = "dopri5"):
    """torchdiffeq ``odeint`` on the tuple ``(x, Δ)`` in ``t``, exact trace by a loop of VJPs."""
    from torchdiffeq import odeint

    calls = [0]

    def func(t, state):
        calls[0] += 1
        with torch.enable_grad():
            xg = state[0].detach().requires_grad_(True)
            f = _pf_drift(p, xg, t)
            div = _div_loop(f, xg)
        return f.detach(), div.detach()

    ts = torch.tensor([T_MIN, p.sde.T], dtype=torch.float64)
    xs, ds = odeint(func, (x, torch.zeros(x.shape[0], dtype=x.dtype)), ts, rtol=tol, atol=tol, method=method)
    return p.pm.log_prob(xs[-1], p.sde.T) + ds[-1], {"calls": calls[0], "evals": calls[0]}


def flow_matching_exact(p: Problem, x: torch.Tensor, tol: float):
    """Meta flow_matching ``ODESolver.compute_likelihood`` (dopri5, exact divergence) on the PF ODE.

    flow_matching integrates from data at ``τ = 1`` to the source at ``τ = 0``: the velocity is
    ``dx/dτ = −(T − t_min) F(x, t)`` with ``t = T − τ (T − t_min)``.
    """
    from flow_matching.solver import ODESolver

    span = p.sde.T - T_MIN
    calls = [0]

    def velocity(x, t, **extras):
        calls[0] += 1
        return -span * _pf_drift(p, x, (p.sde.T - t * span).to(torch.float64))

    solver = ODESolver(velocity_model=velocity)
    grid = torch.tensor([1.0, 0.0], dtype=torch.float64)
    _, ll = solver.compute_likelihood(x, lambda z: p.pm.log_prob(z, p.sde.T), step_size=None, method="dopri5",
                                      atol=tol, rtol=tol, time_grid=grid, exact_divergence=True)
    return ll.detach(), {"calls": calls[0], "evals": calls[0]}


class _TorchWithExactPrior:
    """Forwards to ``torch``; ``distributions.Normal(0, σ_max).log_prob(y)`` returns the exact prior."""

    def __init__(self, log_prior):
        self._log_prior = log_prior
        outer = self

        class _Normal:
            def __init__(self, loc, scale):
                pass

            def log_prob(self, y):  # k-diffusion sums it over all but the batch dimension
                out = torch.zeros_like(y).flatten(1)
                out[:, 0] = outer._log_prior(y)
                return out.reshape(y.shape)

        self.distributions = type("distributions", (), {"Normal": _Normal})

    def __getattr__(self, name):
        return getattr(torch, name)


def kdiff(p: Problem, x: torch.Tensor, tol: float):
    """k-diffusion ``log_likelihood`` (one Rademacher probe, dopri5 in σ); for VP the state is ``y = x/m``."""
    kd = k_diffusion()
    m0, m_t = p.m(T_MIN), p.m(p.sde.T)
    model = Counted(kd_denoiser(p))

    def log_prior_y(y):  # y = x / m(T): log p_y(y) = log p_T(m y) + d log m
        return p.pm.log_prob(m_t * y, p.sde.T).to(y.dtype) + p.dim * math.log(m_t)

    torch.manual_seed(0)
    saved = kd.torch
    kd.torch = _TorchWithExactPrior(log_prior_y)
    try:
        ll_y, info = kd.log_likelihood(model, x / m0, p.sigma(T_MIN), p.sigma(p.sde.T), atol=tol, rtol=tol)
    finally:
        kd.torch = saved
    return ll_y - p.dim * math.log(m0), {"calls": info["fevals"], "evals": info["fevals"]}


def scipy_baseline(p: Problem, x: torch.Tensor, tol: float, exact: bool = False):
    """score_sde-style: one ODE for the whole flattened batch, NumPy in and out at every call."""
    from scipy.integrate import solve_ivp

    shape, n = x.shape, x.shape[0]
    eps = (torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(x.dtype)
    calls = [0]

    def ode(t, y):
        calls[0] += 1
        xt = torch.from_numpy(y[: x.numel()]).reshape(shape).to(x.dtype)
        with torch.enable_grad():
            xt.requires_grad_(True)
            f = _pf_drift(p, xt, torch.tensor(t, dtype=torch.float64))
            if exact:
                div = _div_loop(f, xt)
            else:
                (grad,) = torch.autograd.grad((f * eps).sum(), xt)
                div = (grad * eps).reshape(n, -1).sum(1)
        return np.concatenate([f.detach().reshape(-1).numpy(), div.detach().numpy()])

    y0 = np.concatenate([x.reshape(-1).numpy(), np.zeros(n)])
    sol = solve_ivp(ode, (T_MIN, p.sde.T), y0, rtol=tol, atol=tol, method="RK45")
    z = torch.from_numpy(sol.y[: x.numel(), -1]).reshape(shape)
    delta = torch.from_numpy(sol.y[x.numel():, -1])
    return p.pm.log_prob(z, p.sde.T) + delta, {"calls": calls[0], "evals": calls[0]}


# -- measurement --------------------------------------------------------------------------------------------
def _points(p: Problem, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = p.pm.sample(n, T_MIN, seed=3, dtype=torch.float64)
    return x, p.pm.log_prob(x, T_MIN)


def _sweep(p: Problem, x, exact, methods: dict, tols: dict, repeats: int, log) -> dict:
    """Every method at each of its tolerances, ``repeats`` interleaved rounds; best time per point."""
    rows: dict = {label: {} for label in methods}
    for label, fn in methods.items():  # warm-up: first-call costs are not per-point costs
        fn(p, x[:8], tols[label][0])
    labels = list(methods)
    for r in range(repeats):
        order = labels[r % len(labels):] + labels[: r % len(labels)]  # rotate: no method always runs first
        for label in order:
            for tol in tols[label]:
                t0 = time.perf_counter()
                ll, st = methods[label](p, x, tol)
                dt = time.perf_counter() - t0
                row = rows[label].setdefault(tol, {"tol": tol, "seconds_per_1000": math.inf})
                err = (ll.double() - exact).abs()
                row.update(mean_abs_error=float(err.mean()), max_abs_error=float(err.max()), calls=int(st["calls"]),
                           evals_per_point=float(st["evals"]),
                           seconds_per_1000=min(row["seconds_per_1000"], dt * 1000 / x.shape[0]))
    for label in labels:
        rows[label] = [rows[label][t] for t in tols[label]]
        log(f"  {p.name} {label}: " + "  ".join(
            f"{r['mean_abs_error']:.1e}/{r['evals_per_point']:.0f}/{r['seconds_per_1000']:.2f}s" for r in rows[label]))
    return rows


def _interp(curve: list[dict], err: float, key: str) -> float:
    """``key`` at mean error ``err`` by log–log interpolation along ``curve`` (nan outside its range)."""
    pts = sorted(((r["mean_abs_error"], r[key]) for r in curve), key=lambda v: -v[0])
    for (e1, v1), (e2, v2) in zip(pts, pts[1:], strict=False):
        if e1 >= err >= e2 and e1 > e2:
            w = math.log(e1 / err) / math.log(e1 / e2)
            return math.exp((1 - w) * math.log(v1) + w * math.log(v2))
    return math.nan


def equal_error(n: int, repeats: int, problems, log, tols_peer=(1e-3, 1e-4, 1e-5, 1e-6)) -> dict:
    """sdegen's default vs torchdiffeq dopri5 (exact trace) at equal mean error."""
    tols_sd = [3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7]
    out: dict = {}
    for mix, kind in problems:
        p = make_problem(mix, kind)
        x, exact = _points(p, n)
        methods = {"sdegen default": sdegen_method(), "torchdiffeq dopri5 exact": torchdiffeq_exact}
        rows = _sweep(p, x, exact, methods, {"sdegen default": tols_sd, "torchdiffeq dopri5 exact": list(tols_peer)},
                      repeats, log)
        ratios = []
        for r in rows["torchdiffeq dopri5 exact"]:
            e = r["mean_abs_error"]
            t_sd = _interp(rows["sdegen default"], e, "seconds_per_1000")
            ev_sd = _interp(rows["sdegen default"], e, "evals_per_point")
            calls_sd = _interp(rows["sdegen default"], e, "calls")
            ratios.append({"peer_tol": r["tol"], "error": e, "time_ratio": t_sd / r["seconds_per_1000"],
                           "evals_ratio": ev_sd / r["evals_per_point"], "calls_ratio": calls_sd / r["calls"]})
            log(f"  {p.name} at dopri5 tol {r['tol']:g} (error {e:.1e}): time x{ratios[-1]['time_ratio']:.2f}, "
                f"evaluations/point x{ratios[-1]['evals_ratio']:.2f}, batched calls x{ratios[-1]['calls_ratio']:.2f}")
        out[p.name] = {"rows": rows, "ratios": ratios}
    return out


def curves(n: int, repeats: int, problems, log, tols=(1e-3, 1e-4, 1e-5, 1e-6)) -> dict:
    """Error vs evaluations and time for every sdegen option and the exact-trace peers."""
    out: dict = {}
    for mix, kind in problems:
        p = make_problem(mix, kind)
        x, exact = _points(p, n)
        methods: dict = {}
        for var in ("t", "vp_t", "sigma", "log_sigma"):
            for solver in ("rk45", "tsit5", "bosh3"):
                for shared in (False, True):
                    label = f"sdegen {solver} {var} {'shared' if shared else 'per-sample'}"
                    methods[label] = sdegen_method(time_variable=var, solver=solver, shared_steps=shared)
        methods["torchdiffeq dopri5 exact"] = torchdiffeq_exact
        methods["flow_matching dopri5 exact"] = flow_matching_exact
        methods["SciPy RK45 exact"] = lambda p_, x_, t_: scipy_baseline(p_, x_, t_, exact=True)
        out[p.name] = _sweep(p, x, exact, methods, {k: list(tols) for k in methods}, repeats, log)
    return out


def table(n: int, repeats: int, problems, log, tol: float = 1e-5) -> dict:
    """One tolerance, every method (the section ``python -m benchmarks.run`` summarises)."""
    out: dict = {}
    for mix, kind in problems:
        p = make_problem(mix, kind)
        x, exact = _points(p, n)
        methods: dict = {
            "sdegen default (exact trace)": sdegen_method(),
            "sdegen Hutchinson, 1 probe": sdegen_method(trace="hutchinson"),
            "sdegen Hutch++, 9 products": sdegen_method(trace="hutch++"),
            "torchdiffeq dopri5 exact": torchdiffeq_exact,
            "flow_matching dopri5 exact": flow_matching_exact,
            "SciPy RK45 baseline (score_sde, Hutchinson)": scipy_baseline,
            "SciPy RK45 exact": lambda p_, x_, t_: scipy_baseline(p_, x_, t_, exact=True),
        }
        if k_diffusion() is not None:
            methods["k-diffusion log_likelihood (Hutchinson)"] = kdiff
        rows = _sweep(p, x, exact, methods, {k: [tol] for k in methods}, repeats, log)
        out[p.name] = {label: {"mean_abs_error": r[0]["mean_abs_error"], "nfe": r[0]["calls"],
                               "evals_per_point": r[0]["evals_per_point"],
                               "seconds_per_1000": r[0]["seconds_per_1000"]} for label, r in rows.items()}
    return out


def trace_modes(repeats: int, log, batches: tuple[int, ...] = (16, 1024)) -> dict:
    """Seconds per exact-trace evaluation, per product mode, on the mixtures and on MLPs of growing D.

    ``vjp`` is the default (``exact_mode="auto"``: batched backward passes of the device's default chunk),
    ``vjp, one pass`` all ``D`` rows in one batched pass (the default before this benchmark existed).
    """
    from sdegen.divergence import divergence_exact, exact_mode

    cases: list = []
    for mix, kind in (("ring8", "vp"), ("aniso16", "vp")):
        p = make_problem(mix, kind)
        cases.append((f"{p.name} score (d={p.dim}, float64)", p.dim,
                      lambda b, p=p: p.pm.sample(b, 0.3, seed=0, dtype=torch.float64),
                      lambda z, p=p: _pf_drift(p, z, torch.tensor(0.3, dtype=torch.float64))))
    for d in (16, 64, 256):
        torch.manual_seed(d)
        net = torch.nn.Sequential(torch.nn.Linear(d, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256),
                                  torch.nn.SiLU(), torch.nn.Linear(256, d))
        cases.append((f"MLP 256 hidden (d={d}, float32)", d, lambda b, d=d: torch.randn(b, d), net))
    modes = {"vjp": dict(mode="vjp"), "vjp, one pass": dict(mode="vjp", chunk_size=None),
             "vjp_loop": dict(mode="vjp_loop"), "jvp": dict(mode="jvp")}
    out = []
    for name, d, sample, fn in cases:
        for batch in batches:
            xs = sample(batch)
            modes["vjp, one pass"]["chunk_size"] = d
            row = {"case": name, "batch": batch, "auto": exact_mode("auto", xs.device)}
            ref = divergence_exact(fn, xs, mode="vjp")[0]
            for label, kw in modes.items():
                div = divergence_exact(fn, xs, **kw)[0]
                row[f"{label} max_rel_diff"] = float((div - ref).abs().max() / (ref.abs().max() + 1e-30))
                best = math.inf
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    divergence_exact(fn, xs, **kw)
                    best = min(best, time.perf_counter() - t0)
                row[f"{label} ms"] = best * 1000
            out.append(row)
            log(f"  trace {name}, batch {batch}: " + ", ".join(f"{m} {row[m + ' ms']:.2f} ms" for m in modes))
    return {"device": "cpu", "threads": torch.get_num_threads(), "rows": out}


def _mlp_problem(d: int = 64) -> tuple:
    """A d-dimensional VP 'model' whose score is a fixed random MLP around the N(0, I) score."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, 128), torch.nn.Tanh(), torch.nn.Linear(128, d)).double()
    with torch.no_grad():
        for prm in net.parameters():
            prm.mul_(0.5)

    def score(x, t):
        return -x + net(torch.cat([x, t[:, None].to(x.dtype)], 1))

    return VPSDE(0.1, 20.0), score


def hutch(n: int, log, tol: float = 1e-5, target_se: float = 0.1) -> dict:
    """Stochastic traces: error, reported standard error, calibration, evaluations to a stated error."""
    out: dict = {}
    p = make_problem("aniso16", "vp")
    mlp_sde, mlp_score = _mlp_problem()
    gm = GaussianMixture([1.0], torch.zeros(1, 64, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    settings = [("hutchinson", 1), ("hutchinson", 4), ("hutchinson", 12), ("hutchinson", 24), ("hutch++", 12),
                ("hutch++", 24)]
    for name, sde, score, x, prior in (
        ("aniso16-vp", p.sde, p.pm.score, _points(p, 1)[0].expand(n, -1).contiguous(),
         lambda z: p.pm.log_prob(z, p.sde.T)),
        ("mlp64-vp", mlp_sde, mlp_score, gm.sample(1, generator=torch.Generator().manual_seed(1)).expand(n, -1)
         .contiguous(), None),
    ):
        kw = dict(rtol=tol, atol=tol, t_min=T_MIN, prior_log_prob=prior)
        ref = float(log_likelihood(sde, score, x[:1], **kw)[0])  # exact trace: the solver's value
        rows = []
        for trace, probes in settings:
            counted = Counted(score)
            t0 = time.perf_counter()
            ll, info = log_likelihood(sde, counted, x, trace=trace, probes=probes, seed=0, return_info=True, **kw)
            dt = time.perf_counter() - t0
            err = ll - ref
            sd = float(err.std())  # spread over independent probe draws (one point repeated n times)
            evals = counted.work / n  # network evaluations per solve
            per_solve_products = evals * probes
            row = {"trace": trace, "probes": probes, "bias": float(err.mean()), "sd": sd,
                   "mean_abs_error": float(err.abs().mean()), "evals_per_solve": evals,
                   "seconds_per_1000": dt * 1000 / n}
            if info.trace_se is not None:
                # calibration: mean reported variance over the variance across independent draws (1 when
                # calibrated), and the coverage of ±2 reported standard errors
                z = err / info.trace_se
                row.update(mean_reported_se=float(info.trace_se.mean()),
                           variance_ratio=float(info.trace_se.pow(2).mean()) / sd**2,
                           coverage_2se=float((z.abs() < 2).double().mean()))
            # evaluations to reach a standard error of target_se nats: average ceil((sd / target)²) solves
            solves = max(1, math.ceil((sd / target_se) ** 2))
            row.update(solves_for_target=solves, evals_for_target=solves * evals,
                       products_for_target=solves * per_solve_products)
            rows.append(row)
            log(f"  {name} {trace}({probes}): sd {sd:.3f} nats, bias {row['bias']:+.3f}, "
                f"reported se {row.get('mean_reported_se', math.nan):.3f}, variance ratio "
                f"{row.get('variance_ratio', math.nan):.2f}, coverage {row.get('coverage_2se', math.nan):.2f}, "
                f"evals for se {target_se}: {row['evals_for_target']:.0f}, products {row['products_for_target']:.0f}")
        out[name] = {"exact_value": ref, "target_se": target_se, "rows": rows}
    return out


def run(quick: bool = False, log=print, sections: tuple[str, ...] = ("equal", "table")) -> dict:
    n = 200 if quick else 1000
    repeats = 2 if quick else 3
    problems = [("ring8", "vp"), ("aniso16", "ve")] if quick else PROBLEMS
    out: dict = {"n_points": n, "t_min": T_MIN, "repeats": repeats, "threads": torch.get_num_threads()}
    if "equal" in sections:
        log(" equal error: sdegen default vs torchdiffeq dopri5 (exact trace)")
        out["equal_error"] = equal_error(n, repeats, problems, log)
    if "table" in sections:
        log(" fixed tolerance 1e-5, every method")
        out["problems"] = table(n, 1 if quick else 2, problems, log)
    if "curves" in sections:
        log(" error vs evaluations and time, every sdegen option")
        out["curves"] = curves(n, 1 if quick else 2, problems, log)
    if "trace" in sections:
        log(" exact-trace product modes")
        out["trace_modes"] = trace_modes(3 if quick else 7, log)
    if "hutch" in sections:
        log(" stochastic traces")
        out["hutch"] = hutch(64 if quick else 256, log)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.likelihood", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="equal,table,curves,trace,hutch")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/likelihood_full.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = run(args.quick, sections=tuple(s.strip() for s in args.only.split(",") if s.strip()))
    res["seconds"] = time.perf_counter() - t0
    path = args.out or RESULTS / ("likelihood_quick.json" if args.quick else "likelihood_full.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1, default=lambda v: v.tolist() if isinstance(v, torch.Tensor) else str(v))
    print(f"wrote {path} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
