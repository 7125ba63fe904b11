"""(b) Log-likelihood by the probability-flow ODE: error vs the analytic log p, NFE and time.

Same points, same tolerance (``rtol = atol``, default 1e-5), same ``t_min = 1e-5`` for every
method, and every method is given the *exact* ``p_T`` as its prior, so that the error measured
against the mixture's exact ``log p_{t_min}(x)`` is the solver's alone (with the standard normal
prior the VP prior mismatch alone is ~1e-3 to 1e-2 nats on these problems). k-diffusion hard-codes
``Normal(0, σ_max)``: the benchmark hands its ``log_likelihood`` a ``torch`` proxy whose
``distributions.Normal(...).log_prob`` returns the exact prior instead (its code is otherwise run as is).

* sdegen: :func:`sdegen.likelihood.log_likelihood` with the per-sample RK45, exact trace and
  Hutchinson (one Rademacher probe).
* k-diffusion: ``log_likelihood`` (torchdiffeq dopri5 in σ with one Rademacher probe); for VP the
  state is scaled, ``y = x/m``, and ``log p_x(x) = log p_y(x/m) − d log m(t_min)``.
* SciPy baseline (what score_sde's ``likelihood.py`` does): ``solve_ivp(method="RK45")`` on the
  flattened batch with a NumPy round trip at every evaluation and a Hutchinson probe held fixed;
  also with the exact trace (``D`` vector-Jacobian products), to compare like with like.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .common import Counted, Problem, k_diffusion, kd_denoiser, problem

T_MIN = 1e-5


def _sdegen(trace: str):
    def run(p: Problem, x: torch.Tensor, tol: float):
        from sdegen.likelihood import log_likelihood

        score = Counted(p.pm.score)
        ll, info = log_likelihood(p.sde, score, x, trace=trace, rtol=tol, atol=tol, t_min=T_MIN,
                                  prior_log_prob=lambda z: p.pm.log_prob(z, p.sde.T), seed=0, return_info=True)
        return ll, info.nfe

    return run


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


def _kdiff(p: Problem, x: torch.Tensor, tol: float):
    kd = k_diffusion()
    m0, m_T = p.m(T_MIN), p.m(p.sde.T)
    model = kd_denoiser(p)

    def log_prior_y(y):  # y = x / m(T): log p_y(y) = log p_T(m y) + d log m
        return p.pm.log_prob(m_T * y, p.sde.T).to(y.dtype) + p.dim * math.log(m_T)

    torch.manual_seed(0)
    saved = kd.torch
    kd.torch = _TorchWithExactPrior(log_prior_y)
    try:
        ll_y, info = kd.log_likelihood(model, x / m0, p.sigma(T_MIN), p.sigma(p.sde.T), atol=tol, rtol=tol)
    finally:
        kd.torch = saved
    return ll_y - p.dim * math.log(m0), info["fevals"]


def _scipy(p: Problem, x: torch.Tensor, tol: float, exact: bool = False):
    """score_sde-style: one ODE for the whole flattened batch, NumPy in and out at every call."""
    from scipy.integrate import solve_ivp

    sde, shape = p.sde, x.shape
    n = shape[0]
    eps = (torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(x.dtype)
    calls = [0]

    def drift(xt, t):
        tb = torch.full((n,), t, dtype=torch.float64)
        a = sde.drift_coef(tb).to(xt.dtype)[:, None]
        g = sde.diffusion_coef(tb).to(xt.dtype)[:, None]
        return a * xt - 0.5 * g**2 * p.pm.score(xt, tb)

    def ode(t, y):
        calls[0] += 1
        xt = torch.from_numpy(y[: x.numel()]).reshape(shape).to(x.dtype)
        with torch.enable_grad():
            xt.requires_grad_(True)
            f = drift(xt, t)
            if exact:  # D vector-Jacobian products, one per coordinate
                flat = f.reshape(n, -1)
                div = sum(torch.autograd.grad(flat[:, j].sum(), xt, retain_graph=True)[0].reshape(n, -1)[:, j]
                          for j in range(flat.shape[1]))
            else:
                (grad,) = torch.autograd.grad((f * eps).sum(), xt)
                div = (grad * eps).reshape(n, -1).sum(1)
        return np.concatenate([f.detach().reshape(-1).numpy(), div.numpy()])

    y0 = np.concatenate([x.reshape(-1).numpy(), np.zeros(n)])
    sol = solve_ivp(ode, (T_MIN, sde.T), y0, rtol=tol, atol=tol, method="RK45")
    z = torch.from_numpy(sol.y[: x.numel(), -1]).reshape(shape)
    delta = torch.from_numpy(sol.y[x.numel():, -1])
    return p.pm.log_prob(z, sde.T) + delta, calls[0]


def methods() -> dict:
    m = {}
    try:
        import sdegen.likelihood  # noqa: F401

        m["sdegen rk45 exact trace"] = _sdegen("exact")
        m["sdegen rk45 Hutchinson"] = _sdegen("hutchinson")
    except ImportError:
        pass
    if k_diffusion() is not None:
        m["k-diffusion log_likelihood"] = _kdiff
    m["SciPy RK45 baseline (score_sde, Hutchinson)"] = _scipy
    m["SciPy RK45 baseline, exact trace"] = lambda p, x, tol: _scipy(p, x, tol, exact=True)
    return m


def run(quick: bool = False, log=print) -> dict:
    n = 100 if quick else 500
    tol = 1e-5
    cases = [("ring8", "vp"), ("aniso16", "vp")] if quick else [("ring8", "vp"), ("aniso16", "vp"), ("ring8", "edm")]
    out: dict = {"n_points": n, "tol": tol, "t_min": T_MIN, "problems": {}}
    for mx, s in cases:
        p = problem(mx, s)
        x = p.pm.sample(n, T_MIN, seed=3, dtype=torch.float64)
        exact = p.pm.log_prob(x, T_MIN)
        rows = {}
        for label, fn in methods().items():
            fn(p, x[:8], tol)  # warm-up: first-call costs (autograd, vmap) are not per-point costs
            t0 = time.perf_counter()
            ll, nfe = fn(p, x, tol)
            dt = time.perf_counter() - t0
            err = (ll.double() - exact).abs()
            rows[label] = {"mean_abs_error": float(err.mean()), "max_abs_error": float(err.max()),
                           "bias": float((ll.double() - exact).mean()), "nfe": int(nfe),
                           "seconds_per_1000": dt * 1000 / n}
            log(f"  likelihood {p.name} {label}: |err| {rows[label]['mean_abs_error']:.2e} nats, "
                f"NFE {nfe}, {rows[label]['seconds_per_1000']:.2f} s / 1000 points")
        out["problems"][p.name] = rows
    return out
