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
* ``weight_error``: total variation between the mixture weights and the mean responsibilities.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from sdegen import reverse_sample
from sdegen.solvers import available_solvers

from .common import Counted, Problem, k_diffusion, kd_denoiser, optional, problem, sliced_w2, weight_error

Run = Callable[[Problem, torch.Tensor, int, int], tuple[torch.Tensor, int, str] | None]


# -- sdegen ----------------------------------------------------------------------------------------
def _sdegen(solver: str, grid: str, per_step: int = 1, noise_scale: float = 0.0, final: str = "none", **opts) -> Run:
    def run(p, x_T, nfe, seed):
        extra = 1 if final == "tweedie" else 0
        steps = (nfe - extra) // per_step
        if steps < 1:
            return None
        sol = reverse_sample(
            p.sde, p.pm.score, x_T=x_T, solver=solver, steps=steps, grid=grid, noise_scale=noise_scale,
            final_step=final, generator=torch.Generator().manual_seed(seed), return_info=True, **opts,
        )
        return sol.x, sol.nfe, "p0" if final == "tweedie" else "ptmin"

    return run


def _sdegen_rk45(rtol: float) -> Run:
    def run(p, x_T, nfe, seed):
        sol = reverse_sample(p.sde, p.pm.score, x_T=x_T, solver="rk45", noise_scale=0.0, rtol=rtol, atol=rtol,
                             return_info=True)
        return sol.x, sol.nfe, "ptmin"

    return run


# -- k-diffusion -----------------------------------------------------------------------------------
def _kd(name: str, heun_like: bool = False, **kw) -> Run:
    def run(p, x_T, nfe, seed):
        kd = k_diffusion()
        steps = (nfe + 1) // 2 if heun_like else nfe
        if steps < 1:
            return None
        smin, smax = p.sigma(p.sde.t_min), p.sigma(p.sde.T)
        sigmas = kd.get_sigmas_karras(steps, smin, smax, device=x_T.device).to(x_T.dtype)
        y = x_T / p.m(p.sde.T)
        model = Counted(kd_denoiser(p))
        torch.manual_seed(seed)
        out = getattr(kd, name)(model, y, sigmas, disable=True, **kw)
        return out, model.calls, "p0"

    return run


def _kd_adaptive(rtol: float) -> Run:
    def run(p, x_T, nfe, seed):
        kd = k_diffusion()
        smin, smax = p.sigma(p.sde.t_min), p.sigma(p.sde.T)
        model = Counted(kd_denoiser(p))
        out = kd.sample_dpm_adaptive(model, x_T / p.m(p.sde.T), smin, smax, rtol=rtol, atol=rtol / 10, disable=True)
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


def methods() -> dict[str, tuple[str, Run]]:
    """``label -> (owner, run)``; owner is ``"sdegen"`` or a peer's name."""
    m: dict[str, tuple[str, Run]] = {
        "sdegen euler (edm grid)": ("sdegen", _sdegen("euler_maruyama", "edm")),
        "sdegen heun (edm grid)": ("sdegen", _sdegen("heun", "edm", 2)),
        "sdegen edm (edm grid)": ("sdegen", _sdegen("edm", "edm", 2)),
        "sdegen dpmpp_2m (log_snr)": ("sdegen", _sdegen("dpmpp_2m", "log_snr")),
        "sdegen dpmpp_2m (edm grid)": ("sdegen", _sdegen("dpmpp_2m", "edm")),
        "sdegen dpmpp_2m (uniform)": ("sdegen", _sdegen("dpmpp_2m", "uniform")),
        "sdegen dpmpp_2m (quadratic)": ("sdegen", _sdegen("dpmpp_2m", "quadratic")),
        "sdegen dpmpp_3m (log_snr)": ("sdegen", _sdegen("dpmpp_3m", "log_snr")),
        "sdegen dpmpp_3m (edm grid)": ("sdegen", _sdegen("dpmpp_3m", "edm")),
        "sdegen dpmpp_3m (log_snr) +tweedie": ("sdegen", _sdegen("dpmpp_3m", "log_snr", final="tweedie")),
        "sdegen euler_maruyama SDE (uniform)": ("sdegen", _sdegen("euler_maruyama", "uniform", noise_scale=1.0)),
    }
    if "ddim" in available_solvers():
        m["sdegen ddim (log_snr)"] = ("sdegen", _sdegen("ddim", "log_snr"))
    if k_diffusion() is not None:
        m |= {
            "k-diffusion euler": ("k-diffusion", _kd("sample_euler")),
            "k-diffusion heun": ("k-diffusion", _kd("sample_heun", heun_like=True)),
            "k-diffusion dpmpp_2m": ("k-diffusion", _kd("sample_dpmpp_2m")),
            "k-diffusion dpmpp_3m (eta=0)": ("k-diffusion", _kd("sample_dpmpp_3m_sde", eta=0.0)),
            "k-diffusion euler_ancestral": ("k-diffusion", _kd("sample_euler_ancestral")),
        }
    if optional("torchsde") is not None:
        m["torchsde euler (reverse SDE)"] = ("torchsde", _torchsde_euler())
    if optional("diffusers") is not None:
        m |= {
            "diffusers DDIM": ("diffusers", _diffusers("DDIMScheduler", clip_sample=False)),
            "diffusers DPMSolverMultistep": ("diffusers", _diffusers("DPMSolverMultistepScheduler")),
            "diffusers Euler": ("diffusers", _diffusers("EulerDiscreteScheduler")),
            "diffusers Heun": ("diffusers", _diffusers("HeunDiscreteScheduler", heun_like=True)),
        }
    return m


def adaptive_methods(quick: bool) -> dict[str, tuple[str, list[tuple[float, Run]]]]:
    """Adaptive methods, run once per tolerance (their NFE is an output)."""
    tols = [1e-2, 1e-3] if quick else [1e-1, 1e-2, 1e-3, 1e-4]
    m = {"sdegen rk45": ("sdegen", [(r, _sdegen_rk45(r)) for r in tols])}
    if optional("torchdiffeq") is not None:
        m["torchdiffeq dopri5"] = ("torchdiffeq", [(r, _dopri5(r)) for r in tols])
    if k_diffusion() is not None:
        kd_tols = [0.2, 0.05] if quick else [0.2, 0.05, 0.01, 0.002]
        m["k-diffusion dpm_adaptive"] = ("k-diffusion", [(r, _kd_adaptive(r)) for r in kd_tols])
    return m


def run(quick: bool = False, log=print) -> dict:
    n = 1000 if quick else 4000
    nfes = [5, 10, 20, 50] if quick else [5, 10, 20, 50, 100, 200]
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
                x, used, target = fn(p, x_T, 0, 5)
                pts.append(_point(x, used, target, refs, coupled, p) | {"tol": tol})
            res["methods"][label] = {"owner": owner, "adaptive": True, "points": pts}
        budgets = [b for b in (10, 20) if b in nfes]
        res["targets"] = _targets(res["methods"], budgets)
        res["targets_independent"] = _targets(res["methods"], budgets, "sw2")
        out["problems"][p.name] = res
        log(f"  accuracy {p.name} (floor {floor:.3f}): " + ", ".join(
            f"NFE {b}: sdegen {t['sdegen_best']:.3g} ({t['sdegen_method']}) vs peer {t['peer_best']:.3g} "
            f"({t['peer_method']})" for b, t in res["targets"].items()))
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


def _point(x, used, target, refs, coupled, p) -> dict:
    x = x.reshape(x.shape[0], -1).float()
    ok = bool(torch.isfinite(x).all())
    return {
        "nfe": int(used),
        "target": target,
        "sw2": sliced_w2(x, refs[target]) if ok else math.inf,
        "sw2_coupled": sliced_w2(x, coupled[target]) if ok else math.inf,
        "weight_error": weight_error(x, p.mixture) if ok else math.inf,
    }


def _targets(methods: dict, budgets: list[int], metric: str = "sw2_coupled") -> dict:
    """Best sdegen vs best peer with at most ``b`` NFE (adaptive runs count if they used <= b)."""
    out = {}
    for b in budgets:
        best = {"sdegen": (math.inf, ""), "peer": (math.inf, "")}
        for label, rec in methods.items():
            side = "sdegen" if rec["owner"] == "sdegen" else "peer"
            for pt in rec["points"]:
                if pt["nfe"] <= b and pt[metric] < best[side][0]:
                    best[side] = (pt[metric], f"{label} @ {pt['nfe']}")
        out[b] = {
            "metric": metric,
            "sdegen_best": best["sdegen"][0], "sdegen_method": best["sdegen"][1],
            "peer_best": best["peer"][0], "peer_method": best["peer"][1],
            "met": best["sdegen"][0] <= best["peer"][0],
        }
    return out


def plot(result: dict, folder) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, res in result["problems"].items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
        for ax, metric, title in ((axes[0], "sw2_coupled", "to the exact flow of the same x_T"),
                                  (axes[1], "sw2", "to independent exact samples")):
            colors = plt.cm.tab20.colors + plt.cm.Dark2.colors
            for k, (label, rec) in enumerate(res["methods"].items()):
                pts = sorted(rec["points"], key=lambda q: q["nfe"])
                if not pts:
                    continue
                style = "-" if rec["owner"] == "sdegen" else "--"
                marker = "s" if rec["adaptive"] else "o"
                ax.plot([q["nfe"] for q in pts], [q[metric] for q in pts], style, marker=marker, ms=3, label=label,
                        lw=2 if rec["owner"] == "sdegen" else 1, color=colors[k % len(colors)])
            if metric == "sw2":
                ax.axhline(res["floor_sw2"], color="k", ls=":", lw=1, label="Monte-Carlo floor")
            ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel=f"sliced W2 {title}",
                   title=f"{name} ({result['n_samples']} samples)")
            ax.set_ylim(top=min(ax.get_ylim()[1], 10.0))
        axes[0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = folder / f"accuracy_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(str(path))
    return files


__all__ = ["run", "plot", "methods"]
