"""(e) Every time grid for every solver: the evidence behind each solver's ``default_grid``.

Deterministic samplers (the probability-flow ODE, ``noise_scale=0``) are scored by the **path error**:
the median over samples of ``‖x − x_exact‖``, ``x_exact`` the exact probability-flow image of the same
prior draw (sdegen's rk45 at rtol = atol = 1e-10 in float64). Stochastic samplers (``noise_scale=1``,
and solvers that integrate SDEs only) are scored by the sliced W2 distance to exact samples of
``p_{t_min}`` (the Monte-Carlo floor, two exact samples of that size, is reported).

For each solver, grid and NFE budget the score is the geometric mean over the four problems of
:mod:`benchmarks.accuracy` (ring8 and aniso16 under VP and EDM). A solver's best grid is the one with the
lowest mean score over its budgets; that is its ``default_grid`` (``docs/performance.md``).
"""

from __future__ import annotations

import math

import torch

from sdegen import reverse_sample
from sdegen.grids import GRIDS as ALL_GRIDS
from sdegen.solvers import get_solver

from .common import problem, sliced_w2

# "shift" (SD3/Flux's time shift) needs a shift value chosen for a flow-matching model's resolution: it is not a
# schedule of these diffusion problems
GRIDS = tuple(g for g in ALL_GRIDS if g != "shift")

ODE_SOLVERS = {  # label -> (solver, options)
    "euler_maruyama": ("euler_maruyama", {}),
    "heun": ("heun", {}),
    "reverse_diffusion": ("reverse_diffusion", {}),
    "ddim": ("ddim", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
    "edm": ("edm", {}),
    "unipc": ("unipc", {}),
    "unipc (order 2)": ("unipc", {"order": 2}),
    "lms": ("lms", {}),
    "lms (log_snr)": ("lms", {"variable": "log_snr"}),
    "lms (t: DEIS tAB)": ("lms", {"variable": "t"}),
    "ipndm": ("ipndm", {}),
    "unipc (predictor=ipndm, order 2)": ("unipc", {"predictor": "ipndm", "order": 2}),
}
SDE_SOLVERS = {
    "euler_maruyama": ("euler_maruyama", {}),
    "reverse_diffusion": ("reverse_diffusion", {}),
    "ddim (eta=1)": ("ddim", {}),
    "ancestral": ("ancestral", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
    "pc": ("pc", {}),
    "heun (SDE)": ("heun", {}),
}
PROBLEMS = [("ring8", "vp"), ("ring8", "edm"), ("aniso16", "vp"), ("aniso16", "edm")]


def _geo(values: list[float]) -> float:
    if any(not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _steps(solver, nfe: int) -> int:
    return max(1, nfe // get_solver(solver[0], **solver[1]).nfe_per_step)


def run(quick: bool = False, log=print) -> dict:
    n_ode, n_sde = (300, 1000) if quick else (1000, 2000)
    ode_nfe = [10, 20] if quick else [5, 10, 20, 50]
    sde_nfe = [50, 100] if quick else [20, 50, 100, 200]
    data = []
    for mx, sk in PROBLEMS:
        p = problem(mx, sk)
        x_T = p.sde.prior_sample((n_ode, p.dim), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref = reverse_sample(p.sde, p.pm.score, x_T=x_T, solver="rk45", noise_scale=0.0, rtol=1e-10, atol=1e-10)
        exact = p.pm.sample(n_sde, p.sde.t_min, seed=11, dtype=torch.float64)
        floor = sliced_w2(exact, p.pm.sample(n_sde, p.sde.t_min, seed=12, dtype=torch.float64))
        data.append((p, x_T, ref, exact, floor))
    out: dict = {"ode": {}, "sde": {}, "ode_nfe": ode_nfe, "sde_nfe": sde_nfe,
                 "sde_floor": _geo([d[4] for d in data]), "n_ode": n_ode, "n_sde": n_sde}
    for label, spec in ODE_SOLVERS.items():
        rec = {}
        for grid in GRIDS:
            scores = []
            for nfe in ode_nfe:
                errs = []
                for p, x_T, ref, _, _ in data:
                    x = reverse_sample(p.sde, p.pm.score, x_T=x_T, solver=spec[0], steps=_steps(spec, nfe), grid=grid,
                                       noise_scale=0.0, **spec[1])
                    errs.append(float((x - ref).norm(dim=1).median()) if torch.isfinite(x).all() else math.inf)
                scores.append(_geo(errs))
            rec[grid] = scores
        out["ode"][label] = rec
        log(f"  grids (ODE) {label}: best {min(rec, key=lambda g: _geo(rec[g]))}")
    for label, spec in SDE_SOLVERS.items():
        rec = {}
        for grid in GRIDS:
            scores = []
            for nfe in sde_nfe:
                errs = []
                for k, (p, _, _, exact, _) in enumerate(data):
                    x = reverse_sample(p.sde, p.pm.score, (n_sde, p.dim), solver=spec[0], steps=_steps(spec, nfe),
                                       grid=grid, noise_scale=1.0, dtype=torch.float64, seed=100 + k, **spec[1])
                    errs.append(sliced_w2(x, exact) if torch.isfinite(x).all() else math.inf)
                scores.append(_geo(errs))
            rec[grid] = scores
        out["sde"][label] = rec
        log(f"  grids (SDE) {label}: best {min(rec, key=lambda g: _geo(rec[g]))}")
    return out


def best_grids(result: dict) -> dict[str, str]:
    """``label -> grid`` with the lowest geometric-mean score over the budgets."""
    best = {}
    for kind in ("ode", "sde"):
        for label, rec in result[kind].items():
            best[f"{label} [{kind}]"] = min(rec, key=lambda g: _geo(rec[g]))
    return best


def to_markdown(result: dict) -> str:
    lines = []
    for kind, title, nfes in (
        ("ode", "Probability-flow ODE: median path error to the exact flow (geometric mean of 4 problems)", "ode_nfe"),
        ("sde", f"Reverse SDE: sliced W2 to exact samples (floor {result['sde_floor']:.3f})", "sde_nfe"),
    ):
        lines += [f"### {title}", "", "NFE " + " / ".join(str(v) for v in result[nfes]) + "; **bold**: best grid", "",
                  "| solver | " + " | ".join(GRIDS) + " |", "|---|" + "---|" * len(GRIDS)]
        for label, rec in result[kind].items():
            best = min(rec, key=lambda g: _geo(rec[g]))
            cells = []
            for g in GRIDS:
                txt = " / ".join("∞" if not math.isfinite(v) else f"{v:.2g}" for v in rec[g])
                cells.append(f"**{txt}**" if g == best else txt)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["run", "best_grids", "to_markdown"]
