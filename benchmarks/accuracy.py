"""(a) Sample accuracy vs network evaluations on Gaussian mixtures with exact scores.

For each problem (ring8 / aniso16 under VP / EDM) every method starts from the same prior draw
``x_T`` and its output is compared with samples of the law it targets: ``p_{t_min}`` for samplers
that stop at ``t_min`` (sdegen, torchdiffeq, torchsde) and ``p_0`` for samplers whose last step
denoises to ``σ = 0`` (k-diffusion, diffusers, sdegen with ``final_step="tweedie"``). Metrics:

* ``sw2``: sliced 2-Wasserstein distance (128 fixed directions) to *independent* exact samples of
  the mixture. Unbiased but noisy: two exact samples of this size are ``floor_sw2`` apart, so
  differences below that are not significant.
* ``sw2_coupled`` (primary): sliced W2 to the *exact probability-flow image of the same* ``x_T``
  (torchdiffeq dopri5 at rtol = atol = 1e-9 in float64, cross-checked with sdegen's rk45; for
  ``p_0`` targets followed by the exact Tweedie denoiser at ``t_min``). Those are exact samples of
  the flow of the prior — of ``p_{t_min}`` up to the prior mismatch common to every ODE method — and
  share the sampler's randomness, so the Monte-Carlo noise cancels and the distance goes to 0 with
  the discretisation error (stochastic samplers keep their sampling noise).
* ``path`` (primary since the samplers issue): the *median over samples of the distance* ``‖x − x_exact‖``
  to that same exact image — the path error of each sample, with no Monte-Carlo noise at all for
  deterministic samplers.
* ``weight_error``: total variation between the mixture weights and the mean responsibilities.

Every method is a **whole call** (grid, coefficients and setup included). sdegen solvers are run at their
default grid (labels ``(default)``: what a newcomer gets) and on other grids (tuned); k-diffusion's
samplers on their default Karras ρ = 7 schedule and, tuned, on the exponential (log-uniform σ) one;
adaptive methods at several tolerances (their NFE is an output; ``work`` counts evaluations per sample,
which differ from batched calls for sdegen's per-sample ``dpm_adaptive`` and ``rk45``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from sdegen import reverse_sample

from .common import Counted, Problem, k_diffusion, kd_denoiser, optional, problem, sliced_w2, weight_error

Run = Callable[[Problem, torch.Tensor, int, int], tuple[torch.Tensor, int, str] | None]


# -- sdegen ----------------------------------------------------------------------------------------
def _sdegen(solver: str, grid: str | None = None, per_step: int = 1, noise_scale: float = 0.0, final: str = "none",
            **opts) -> Run:
    """A fixed-step sdegen solver at ``grid`` (None: the solver's default grid)."""

    def run(p, x_T, nfe, seed):
        extra = 1 if final == "tweedie" else 0
        steps = (nfe - extra) // per_step
        if steps < 1:
            return None
        kw = {} if grid is None else {"grid": grid}
        sol = reverse_sample(
            p.sde, p.pm.score, x_T=x_T, solver=solver, steps=steps, noise_scale=noise_scale,
            final_step=final, generator=torch.Generator().manual_seed(seed), return_info=True, **kw, **opts,
        )
        return sol.x, sol.nfe, "p0" if final == "tweedie" else "ptmin"

    return run


def _sdegen_adaptive(solver: str, rtol: float, atol: float | None = None, **opts) -> Run:
    def run(p, x_T, nfe, seed):
        score = Counted(p.pm.score)
        sol = reverse_sample(p.sde, score, x_T=x_T, solver=solver, noise_scale=0.0, rtol=rtol,
                             atol=rtol if atol is None else atol, return_info=True, **opts)
        return sol.x, sol.nfe, "ptmin", score.work / x_T.shape[0]

    return run


def _sdegen_rk45(rtol: float) -> Run:
    return _sdegen_adaptive("rk45", rtol)


# -- k-diffusion -----------------------------------------------------------------------------------
def _kd_sigmas(kd, p: Problem, steps: int, schedule: str, device) -> torch.Tensor:
    smin, smax = p.sigma(p.sde.t_min), p.sigma(p.sde.T)
    if schedule == "karras":
        return kd.get_sigmas_karras(steps, smin, smax, device=device)
    return kd.get_sigmas_exponential(steps, smin, smax, device=device)


def _kd(name: str, heun_like: bool = False, schedule: str = "karras", **kw) -> Run:
    """A k-diffusion sampler on its Karras ρ = 7 schedule (its default) or the exponential one, ending at σ = 0."""

    def run(p, x_T, nfe, seed):
        kd = k_diffusion()
        steps = (nfe + 1) // 2 if heun_like else nfe
        if steps < 1:
            return None
        sigmas = _kd_sigmas(kd, p, steps, schedule, x_T.device).to(x_T.dtype)
        y = x_T / p.m(p.sde.T)
        model = Counted(kd_denoiser(p))
        torch.manual_seed(seed)
        out = getattr(kd, name)(model, y, sigmas, disable=True, **kw)
        return out, model.calls, "p0"

    return run


def _kd_fast() -> Run:
    """DPM-Solver-fast (singlestep DPM-Solver-3/2/1 on a uniform log-SNR grid): its last step lands on σ_min."""

    def run(p, x_T, nfe, seed):
        kd = k_diffusion()
        if nfe < 3:
            return None
        model = Counted(kd_denoiser(p))
        out = kd.sample_dpm_fast(model, x_T / p.m(p.sde.T), p.sigma(p.sde.t_min), p.sigma(p.sde.T), nfe, disable=True)
        return out * p.m(p.sde.t_min), model.calls, "ptmin"

    return run


def _kd_adaptive(rtol: float, atol: float | None = None) -> Run:
    def run(p, x_T, nfe, seed):
        kd = k_diffusion()
        smin, smax = p.sigma(p.sde.t_min), p.sigma(p.sde.T)
        model = Counted(kd_denoiser(p))
        out = kd.sample_dpm_adaptive(model, x_T / p.m(p.sde.T), smin, smax, rtol=rtol,
                                     atol=rtol / 10 if atol is None else atol, disable=True)
        # its last step lands on σ_min, not 0: the target is p at σ_min (= p_{t_min})
        return out * p.m(p.sde.t_min), model.calls, "ptmin"

    return run


# -- torchdiffeq / torchsde ---------------------------------------------------------------------------
def _pf_drift(p: Problem, score) -> Callable:
    sde = p.sde

    def f(t, x):
        # torchdiffeq's initial-step heuristic probes outside [t_min, T]: clamp the model's time
        tb = t.to(torch.float64).clamp(sde.t_min, sde.T).reshape(1).expand(x.shape[0])
        a = sde.drift_coef(tb).to(x.dtype)[:, None]
        g = sde.diffusion_coef(tb).to(x.dtype)[:, None]
        return a * x - 0.5 * g**2 * score(x, tb)

    return f


def _dopri5(rtol: float) -> Run:
    def run(p, x_T, nfe, seed):
        tdq = optional("torchdiffeq")
        score = Counted(p.pm.score)
        ts = torch.tensor([p.sde.T, p.sde.t_min], dtype=x_T.dtype)
        out = tdq.odeint(_pf_drift(p, score), x_T, ts, rtol=rtol, atol=rtol, method="dopri5")[-1]
        return out, score.calls, "ptmin"

    return run


def _torchsde_euler() -> Run:
    def run(p, x_T, nfe, seed):
        tsde = optional("torchsde")
        sde, score = p.sde, Counted(p.pm.score)
        span = sde.T - sde.t_min

        class Reverse(torch.nn.Module):
            noise_type, sde_type = "diagonal", "ito"

            def f(self, tau, x):  # reverse time τ = T − t runs forward
                tb = (sde.T - tau).reshape(1).expand(x.shape[0]).to(torch.float64)
                a = sde.drift_coef(tb).to(x.dtype)[:, None]
                g = sde.diffusion_coef(tb).to(x.dtype)[:, None]
                return -(a * x - g**2 * score(x, tb))

            def g(self, tau, x):
                tb = (sde.T - tau).reshape(1).expand(x.shape[0]).to(torch.float64)
                return sde.diffusion_coef(tb).to(x.dtype)[:, None].expand_as(x)

        torch.manual_seed(seed)
        ts = torch.tensor([0.0, span], dtype=x_T.dtype)
        out = tsde.sdeint(Reverse(), x_T, ts, method="euler", dt=span / nfe)[-1]
        return out, score.calls, "ptmin"

    return run


# -- diffusers ---------------------------------------------------------------------------------------
def _diffusers(cls_name: str, heun_like: bool = False, **kw) -> Run:
    """A diffusers scheduler on the VP SDE discretised as DDPM: ``ᾱ_i = m(t_i)²``, ``t_i = (i+1)/1000``."""

    def run(p, x_T, nfe, seed):
        if p.name.split("-")[1] != "vp":
            return None
        diffusers = optional("diffusers")
        steps = (nfe + 1) // 2 if heun_like else nfe
        t = torch.arange(1, 1001, dtype=torch.float64) / 1000
        abar = p.sde.marginal(t)[0] ** 2
        betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = getattr(diffusers, cls_name)(trained_betas=betas.numpy(), timestep_spacing="trailing", **kw)
        sched.set_timesteps(steps)
        eps = Counted(p.pm.epsilon)
        x = x_T * sched.init_noise_sigma
        gen = torch.Generator().manual_seed(seed)
        for ts in sched.timesteps:
            xin = sched.scale_model_input(x, ts)
            tt = ((ts.to(torch.float64) + 1) / 1000).expand(x.shape[0])
            e = eps(xin, tt)
            try:
                x = sched.step(e, ts, x, generator=gen).prev_sample
            except TypeError:
                x = sched.step(e, ts, x).prev_sample
        return x, eps.calls, "p0"

    return run


# sdegen methods run at the solver's default grid (labels "(default)"; options may be set, the grid is the
# solver's own): "the best sdegen solver at its default grid"
DEFAULT = "(default)"


def methods() -> dict[str, tuple[str, Run]]:
    """``label -> (owner, run)``; owner is ``"sdegen"`` or a peer's name; sdegen labels ending in ``(default)``
    use the solver's default grid."""
    m: dict[str, tuple[str, Run]] = {}
    for name, per in (("ipndm", 1), ("unipc", 1), ("dpmpp_3m", 1), ("dpmpp_2m", 1), ("lms", 1), ("ddim", 1),
                      ("euler_maruyama", 1), ("heun", 2), ("edm", 2)):
        m[f"sdegen {name} {DEFAULT}"] = ("sdegen", _sdegen(name, None, per))
    m |= {
        f"sdegen unipc predictor=ipndm order=2 {DEFAULT}": ("sdegen", _sdegen("unipc", None, predictor="ipndm",
                                                                               order=2)),
        f"sdegen ipndm {DEFAULT} +tweedie": ("sdegen", _sdegen("ipndm", None, final="tweedie")),
        f"sdegen unipc {DEFAULT} +tweedie": ("sdegen", _sdegen("unipc", None, final="tweedie")),
        "sdegen unipc (order 2)": ("sdegen", _sdegen("unipc", None, order=2)),
        "sdegen ipndm (log_snr)": ("sdegen", _sdegen("ipndm", "log_snr")),
        "sdegen ipndm (quadratic)": ("sdegen", _sdegen("ipndm", "quadratic")),
        "sdegen unipc (log_snr)": ("sdegen", _sdegen("unipc", "log_snr")),
        "sdegen lms (log_snr variable, log_snr)": ("sdegen", _sdegen("lms", "log_snr", variable="log_snr")),
        "sdegen dpmpp_2m (log_snr)": ("sdegen", _sdegen("dpmpp_2m", "log_snr")),
        "sdegen dpmpp_2m (edm grid)": ("sdegen", _sdegen("dpmpp_2m", "edm")),
        "sdegen dpmpp_2m (uniform)": ("sdegen", _sdegen("dpmpp_2m", "uniform")),
        "sdegen dpmpp_2m (quadratic)": ("sdegen", _sdegen("dpmpp_2m", "quadratic")),
        "sdegen dpmpp_3m (log_snr)": ("sdegen", _sdegen("dpmpp_3m", "log_snr")),
        "sdegen dpmpp_3m (edm grid)": ("sdegen", _sdegen("dpmpp_3m", "edm")),
        "sdegen euler_maruyama SDE (uniform)": ("sdegen", _sdegen("euler_maruyama", "uniform", noise_scale=1.0)),
    }
    if k_diffusion() is not None:
        for sched in ("karras", "exponential"):
            tag = "" if sched == "karras" else " (exponential σ)"
            m |= {
                f"k-diffusion euler{tag}": ("k-diffusion", _kd("sample_euler", schedule=sched)),
                f"k-diffusion heun{tag}": ("k-diffusion", _kd("sample_heun", heun_like=True, schedule=sched)),
                f"k-diffusion dpm_2{tag}": ("k-diffusion", _kd("sample_dpm_2", heun_like=True, schedule=sched)),
                f"k-diffusion lms{tag}": ("k-diffusion", _kd("sample_lms", schedule=sched)),
                f"k-diffusion dpmpp_2m{tag}": ("k-diffusion", _kd("sample_dpmpp_2m", schedule=sched)),
                f"k-diffusion dpmpp_3m (eta=0){tag}": ("k-diffusion", _kd("sample_dpmpp_3m_sde", eta=0.0,
                                                                          schedule=sched)),
            }
        m["k-diffusion dpm_fast"] = ("k-diffusion", _kd_fast())
        m["k-diffusion euler_ancestral"] = ("k-diffusion", _kd("sample_euler_ancestral"))
    if optional("torchsde") is not None:
        m["torchsde euler (reverse SDE)"] = ("torchsde", _torchsde_euler())
    if optional("diffusers") is not None:
        m |= {
            "diffusers DDIM": ("diffusers", _diffusers("DDIMScheduler", clip_sample=False)),
            "diffusers DPMSolverMultistep": ("diffusers", _diffusers("DPMSolverMultistepScheduler")),
            "diffusers UniPC": ("diffusers", _diffusers("UniPCMultistepScheduler")),
            "diffusers Euler": ("diffusers", _diffusers("EulerDiscreteScheduler")),
            "diffusers Heun": ("diffusers", _diffusers("HeunDiscreteScheduler", heun_like=True)),
        }
    return m


ADAPTIVE_TOLS = {  # (rtol, atol) per method
    "sdegen dpm_adaptive": [(r, r) for r in (0.04, 0.02, 0.01, 0.005, 0.0025, 0.001, 3e-4)],
    "sdegen dpm_adaptive (shared steps)": [(r, r) for r in (0.02, 0.01, 0.005, 0.0025)],
    "sdegen dpm_adaptive (time control)": [(r, r) for r in (0.02, 0.01, 0.005, 0.0025)],
    "k-diffusion dpm_adaptive": [(0.05, 0.0078), (0.02, 0.002), (1e-2, 1e-3), (5e-3, 5e-4), (1e-3, 1e-4)],
    "sdegen rk45": [(r, r) for r in (1e-1, 1e-2, 1e-3, 1e-4)],
    "torchdiffeq dopri5": [(r, r) for r in (1e-1, 1e-2, 1e-3, 1e-4)],
}
KD_TOLERANCE = (1e-2, 1e-3)  # the k-diffusion setting dpm_adaptive is measured against (issue 13)


def adaptive_methods(quick: bool) -> dict[str, tuple[str, list[tuple[float, Run]]]]:
    """Adaptive methods, run once per tolerance (their NFE is an output)."""
    tols = dict(ADAPTIVE_TOLS)
    if quick:
        tols = {k: v[1:4] for k, v in tols.items()}
        tols["k-diffusion dpm_adaptive"] = [(0.02, 0.002), KD_TOLERANCE, (5e-3, 5e-4)]
    m: dict = {
        "sdegen dpm_adaptive": ("sdegen", [(r, _sdegen_adaptive("dpm_adaptive", r, a))
                                           for r, a in tols["sdegen dpm_adaptive"]]),
        "sdegen dpm_adaptive (shared steps)": ("sdegen", [(r, _sdegen_adaptive("dpm_adaptive", r, a, shared_steps=True))
                                                          for r, a in tols["sdegen dpm_adaptive (shared steps)"]]),
        "sdegen dpm_adaptive (time control)": ("sdegen", [
            (r, _sdegen_adaptive("dpm_adaptive", r, a, step_control="time"))
            for r, a in tols["sdegen dpm_adaptive (time control)"]]),
        "sdegen rk45": ("sdegen", [(r, _sdegen_rk45(r)) for r, _ in tols["sdegen rk45"]]),
    }
    if optional("torchdiffeq") is not None:
        m["torchdiffeq dopri5"] = ("torchdiffeq", [(r, _dopri5(r)) for r, _ in tols["torchdiffeq dopri5"]])
    if k_diffusion() is not None:
        m["k-diffusion dpm_adaptive"] = ("k-diffusion", [(r, _kd_adaptive(r, a))
                                                         for r, a in tols["k-diffusion dpm_adaptive"]])
    return m


def run(quick: bool = False, log=print) -> dict:
    n = 1000 if quick else 4000
    nfes = [5, 10, 20, 50] if quick else [5, 10, 15, 20, 25, 50, 100]
    probs = [problem(mx, s) for mx in ("ring8", "aniso16") for s in ("vp", "edm")]
    fixed, adaptive = methods(), adaptive_methods(quick)
    out: dict = {"n_samples": n, "nfe": nfes, "problems": {}}
    for p in probs:
        x_T = p.sde.prior_sample((n, p.dim), generator=torch.Generator().manual_seed(1), dtype=torch.float32)
        refs = {
            "p0": p.mixture.sample(n, seed=11, dtype=torch.float32),
            "ptmin": p.pm.sample(n, p.sde.t_min, seed=11, dtype=torch.float32),
        }
        coupled, check = _coupled_reference(p, x_T)
        # distance between independent exact samples of this size (mean of 3 pairs): below it, noise
        floor = sum(sliced_w2(p.mixture.sample(n, seed=20 + 2 * k), p.mixture.sample(n, seed=21 + 2 * k))
                    for k in range(3)) / 3
        res: dict = {"floor_sw2": floor, "reference_check": check, "methods": {}}
        for label, (owner, fn) in fixed.items():
            pts = []
            for nfe in nfes:
                r = fn(p, x_T, nfe, 5)
                if r is None:
                    continue
                x, used, target = r
                pts.append(_point(x, used, target, refs, coupled, p))
            res["methods"][label] = {"owner": owner, "adaptive": False, "points": pts}
        for label, (owner, runs) in adaptive.items():
            pts = []
            for tol, fn in runs:
                x, used, target, *work = fn(p, x_T, 0, 5)
                pts.append(_point(x, used, target, refs, coupled, p, work[0] if work else None) | {"tol": tol})
            res["methods"][label] = {"owner": owner, "adaptive": True, "points": pts}
        budgets = [b for b in (10, 20) if b in nfes]
        res["targets"] = _targets(res["methods"], budgets)
        res["targets_default_vs_k_diffusion"] = _targets(res["methods"], budgets, "path", sdegen_default_only=True,
                                                         peers=("k-diffusion",))
        res["targets_sw2"] = _targets(res["methods"], budgets, "sw2_coupled")
        res["targets_independent"] = _targets(res["methods"], budgets, "sw2")
        res["adaptive_vs_k_diffusion"] = _adaptive_target(res["methods"])
        out["problems"][p.name] = res
        t = res["targets_default_vs_k_diffusion"]
        a = res["adaptive_vs_k_diffusion"]
        log(f"  accuracy {p.name}: " + ", ".join(
            f"NFE {b}: sdegen {v['sdegen_best']:.3g} ({v['sdegen_method']}) vs k-diffusion {v['peer_best']:.3g} "
            f"({v['peer_method']})" for b, v in t.items())
            + f"; dpm_adaptive {a.get('work_ratio', math.nan):.2f}x the evaluations of k-diffusion's")
    return out


def _coupled_reference(p: Problem, x_T: torch.Tensor) -> tuple[dict, dict]:
    """Exact probability-flow images of ``x_T`` at ``t_min`` (and denoised to ``p_0``), float64."""
    tdq = optional("torchdiffeq")
    x64 = x_T.double()
    ts = torch.tensor([p.sde.T, p.sde.t_min], dtype=torch.float64)
    ours = reverse_sample(p.sde, p.pm.score, x_T=x64, solver="rk45", noise_scale=0.0, rtol=1e-9, atol=1e-9)
    if tdq is not None:
        ref = tdq.odeint(_pf_drift(p, p.pm.score), x64, ts, rtol=1e-9, atol=1e-9, method="dopri5")[-1]
    else:
        ref = ours
    check = {"reference": "torchdiffeq dopri5 1e-9" if tdq is not None else "sdegen rk45 1e-9",
             "max_abs_diff_sdegen_rk45": float((ours - ref).abs().max())}
    x0 = p.pm.denoiser(ref, torch.tensor(p.sde.t_min, dtype=torch.float64))
    return {"ptmin": ref.float(), "p0": x0.float()}, check


def _point(x, used, target, refs, coupled, p, work=None) -> dict:
    x = x.reshape(x.shape[0], -1).float()
    ok = bool(torch.isfinite(x).all())
    ref = coupled[target].reshape(x.shape[0], -1)
    return {
        "nfe": int(used),
        "work": float(used if work is None else work),
        "target": target,
        "path": float((x - ref).norm(dim=1).median()) if ok else math.inf,
        "sw2": sliced_w2(x, refs[target]) if ok else math.inf,
        "sw2_coupled": sliced_w2(x, coupled[target]) if ok else math.inf,
        "weight_error": weight_error(x, p.mixture) if ok else math.inf,
    }


def _targets(methods: dict, budgets: list[int], metric: str = "path", sdegen_default_only: bool = False,
             peers: tuple[str, ...] | None = None) -> dict:
    """Best sdegen vs best peer with at most ``b`` evaluations per sample (adaptive runs count if they used
    <= b); optionally sdegen at default grids only and only the named peers."""
    out = {}
    for b in budgets:
        best = {"sdegen": (math.inf, ""), "peer": (math.inf, "")}
        for label, rec in methods.items():
            side = "sdegen" if rec["owner"] == "sdegen" else "peer"
            if side == "sdegen" and sdegen_default_only and (DEFAULT not in label or rec["adaptive"]):
                continue
            if side == "peer" and peers is not None and rec["owner"] not in peers:
                continue
            for pt in rec["points"]:
                if pt["work"] <= b and pt[metric] < best[side][0]:
                    best[side] = (pt[metric], f"{label} @ {pt['nfe']}")
        out[b] = {
            "metric": metric,
            "sdegen_best": best["sdegen"][0], "sdegen_method": best["sdegen"][1],
            "peer_best": best["peer"][0], "peer_method": best["peer"][1],
            "ratio": best["sdegen"][0] / best["peer"][0] if best["peer"][0] > 0 else math.nan,
            "met": best["sdegen"][0] <= best["peer"][0],
        }
    return out


def _adaptive_target(methods: dict) -> dict:
    """Evaluations per sample ``dpm_adaptive`` needs to reach the path error of k-diffusion's
    ``sample_dpm_adaptive`` at rtol 1e-2 / atol 1e-3 (log-log interpolation over its tolerance sweep)."""
    kd = methods.get("k-diffusion dpm_adaptive")
    ours = methods.get("sdegen dpm_adaptive")
    if kd is None or ours is None:
        return {}
    ref = next(pt for pt in kd["points"] if pt["tol"] == KD_TOLERANCE[0])
    pts = sorted(((pt["work"], pt["path"], pt["nfe"]) for pt in ours["points"]), key=lambda q: -q[1])
    work = math.nan
    for (w1, e1, _), (w2, e2, _) in zip(pts, pts[1:], strict=False):
        if e2 <= ref["path"] <= e1:
            f = math.log(e1 / ref["path"]) / math.log(e1 / e2) if e1 != e2 else 0.0
            work = math.exp(math.log(w1) + f * math.log(w2 / w1))
            break
    return {"k_diffusion_path": ref["path"], "k_diffusion_evaluations": ref["work"],
            "sdegen_evaluations": work, "work_ratio": work / ref["work"],
            "sdegen_points": [{"tol": pt["tol"], "work": pt["work"], "nfe": pt["nfe"], "path": pt["path"]}
                              for pt in ours["points"]]}


PLOT_LABELS = (
    f"sdegen ipndm {DEFAULT}", f"sdegen unipc predictor=ipndm order=2 {DEFAULT}", f"sdegen unipc {DEFAULT}",
    f"sdegen dpmpp_3m {DEFAULT}", f"sdegen dpmpp_2m {DEFAULT}", f"sdegen lms {DEFAULT}", f"sdegen heun {DEFAULT}",
    "sdegen dpm_adaptive", "sdegen rk45", "k-diffusion lms", "k-diffusion dpmpp_3m (eta=0)",
    "k-diffusion dpmpp_3m (eta=0) (exponential σ)", "k-diffusion dpmpp_2m", "k-diffusion dpm_fast",
    "k-diffusion heun", "k-diffusion dpm_adaptive", "diffusers UniPC", "torchdiffeq dopri5",
)


def plot(result: dict, folder) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, res in result["problems"].items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 7))
        for ax, metric, title in ((axes[0], "path", "median path error to the exact flow of the same x_T"),
                                  (axes[1], "sw2", "sliced W2 to independent exact samples")):
            colors = plt.cm.tab20.colors + plt.cm.Dark2.colors
            for label, rec in res["methods"].items():
                if label not in PLOT_LABELS:
                    continue
                pts = sorted(rec["points"], key=lambda q: q["work"])
                if not pts:
                    continue
                style = "-" if rec["owner"] == "sdegen" else "--"
                marker = "s" if rec["adaptive"] else "o"
                ax.plot([q["work"] for q in pts], [q[metric] for q in pts], style, marker=marker, ms=3, label=label,
                        lw=2 if rec["owner"] == "sdegen" else 1, color=colors[PLOT_LABELS.index(label) % len(colors)])
            if metric == "sw2":
                ax.axhline(res["floor_sw2"], color="k", ls=":", lw=1, label="Monte-Carlo floor")
            ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample", ylabel=title,
                   title=f"{name} ({result['n_samples']} samples)")
            ax.set_ylim(top=min(ax.get_ylim()[1], 10.0))
        handles, labels = axes[0].get_legend_handles_labels()
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
        path = folder / f"accuracy_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(str(path))
    return files


__all__ = ["run", "plot", "methods"]
