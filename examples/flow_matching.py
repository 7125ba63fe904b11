"""Flow matching / rectified flow with sdegen: train a velocity network, sample it with any solver, get bits/dim.

A flow-matching model predicts the velocity ``v = ε − x0`` of the straight path ``x_t = (1 − t) x0 + t ε``
(:class:`sdegen.FlowMatchingSDE`; ``t = 1`` is pure noise). This script

1. trains a velocity MLP with :func:`sdegen.flow_matching_loss` on 2-D data (two moons) and on
   scikit-learn's 8×8 digits (17 grey levels, dequantised; logit-normal training times as in SD3);
2. wraps it with :func:`sdegen.from_flow` — now it is a score model like any other — and samples from exactly
   ``t = 1`` with Euler (the probability-flow ODE: diffusers' ``FlowMatchEulerDiscreteScheduler``), Heun,
   DPM-Solver++(2M), adaptive RK45, and stochastic samplers that keep the model's marginals: DDIM with
   ``noise_scale=1`` (exact Gaussian-kernel steps from ``t = 1``) and Euler–Maruyama on the reverse SDE from
   ``t_max = 0.99`` (the reverse SDE's drift is infinite at ``t = 1``, where sdegen refuses it);
3. reports sliced Wasserstein-2 distances to held-out points (2-D), the held-out negative log-likelihood (2-D,
   nats/dim) and the test-set **bits/dim** of the digits with the exact probability-flow likelihood — the same
   :func:`sdegen.bits_per_dim` as for diffusion models; the prior ``N(0, I)`` at ``t = 1`` is exact here.

Run::

    python examples/flow_matching.py            # a few minutes of CPU; writes examples/out/flow_matching_*.png
    python examples/flow_matching.py --quick    # smoke run (< 1 min): tiny training, 16 test digits
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from sdegen import FlowMatchingSDE, bits_per_dim, flow_matching_loss, from_flow, log_likelihood, reverse_sample
from sdegen.likelihood import dequantization_offset

OUT = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go
N_BINS, RANGE = 17, (-1.0, 1.0)  # digits: 17 grey levels mapped to [-1, 1]


# -- the network -------------------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``1000 t``."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(dim // 2) / (dim // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = 1000.0 * t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([a.sin(), a.cos()], 1)


class VelocityMLP(nn.Module):
    """``v̂(x, t) ≈ E[ε − x0 | x_t]``: a residual MLP on ``[x, emb(t)]``."""

    def __init__(self, dim: int, hidden: int = 256, emb: int = 32, depth: int = 3):
        super().__init__()
        self.emb = TimeEmbedding(emb)
        self.inp = nn.Linear(dim + emb, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden + emb, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.emb(t).to(x.dtype)
        h = self.inp(torch.cat([x, e], 1))
        for blk in self.blocks:
            h = h + blk(torch.cat([h, e], 1))
        return self.out(h)


def train(sde, draw_batch, dim: int, *, iters: int, hidden: int, lr: float, seed: int, **loss_kw) -> nn.Module:
    """Adam + one-cycle LR on ``flow_matching_loss``, EMA weights (0.999) returned."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = VelocityMLP(dim, hidden=hidden)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.05)
    t0, running = time.perf_counter(), None
    for it in range(iters):
        x0 = draw_batch(g)
        loss = flow_matching_loss(sde, net, x0, generator=g, **loss_kw) / dim  # per dimension, for the printout
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + it) / (10 + it))
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        val = float(loss.detach())
        running = val if running is None else 0.98 * running + 0.02 * val
        if (it + 1) % max(1, iters // 4) == 0:
            print(f"  iter {it + 1:6d}/{iters}  loss/dim {running:.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return ema.eval()


# -- solvers ----------------------------------------------------------------------------------------------
def solver_settings(quick: bool, sde) -> list[tuple[str, dict]]:
    """(label, reverse_sample keywords): the probability-flow ODE from t = 1, and two stochastic samplers."""
    k = 0.2 if quick else 1.0

    def n(steps: int) -> int:
        return max(4, int(steps * k))

    return [
        (f"euler, {n(50)} steps (= diffusers' FlowMatchEuler)",
         dict(solver="euler_maruyama", noise_scale=0.0, steps=n(50), final_step="tweedie")),
        (f"heun, {n(20)} steps", dict(solver="heun", noise_scale=0.0, steps=n(20), final_step="tweedie")),
        (f"dpmpp_2m, {n(15)} steps", dict(solver="dpmpp_2m", steps=n(15), final_step="tweedie")),
        ("rk45, rtol=atol=1e-4", dict(solver="rk45", rtol=1e-4, atol=1e-4)),
        (f"ddim noise_scale=1, {n(100)} steps (stochastic)",
         dict(solver="ddim", noise_scale=1.0, steps=n(100), final_step="tweedie")),
        (f"euler_maruyama noise_scale=1 from t=0.99, {n(250)} steps",
         dict(solver="euler_maruyama", noise_scale=1.0, steps=n(250), t_max=0.99, final_step="tweedie")),
    ]


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds (Rabin et al. 2011)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.double() @ d, dim=0)
    py, _ = torch.sort(y.double() @ d, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


# -- part 1: 2-D ----------------------------------------------------------------------------------------------
def moons(n: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=seed)
    return (torch.as_tensor(x, dtype=torch.float32) - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])


def two_d(args, sde) -> dict:
    n = 256 if args.quick else 2000
    data, held_out = moons(20_000, args.seed), moons(n, args.seed + 1)
    iters = 200 if args.quick else 6000
    print(f"[2-D] training a velocity MLP on two moons for {iters} iterations (flow_matching_loss, uniform t)")

    def draw(g):
        return data[torch.randint(0, data.shape[0], (512,), generator=g)]

    net = train(sde, draw, 2, iters=iters, hidden=256, lr=3e-3, seed=args.seed)
    model = from_flow(net, sde)
    header = f"{'sampler':58s} {'NFE':>5s} {'sliced W2':>9s}"
    print(header + "\n" + "-" * len(header))
    baseline = sliced_w2(moons(n, args.seed + 2), held_out)
    print(f"{'(another held-out sample of the data)':58s} {'-':>5s} {baseline:9.4f}")
    rows, panels = {}, {"data": data[:n]}
    for label, kw in solver_settings(args.quick, sde):
        with torch.no_grad():
            sol = reverse_sample(sde, model, (n, 2), seed=args.seed, return_info=True, progress=False, **kw)
        w2 = sliced_w2(sol.x, held_out)
        rows[label] = {"nfe": sol.nfe, "sliced_w2": w2}
        panels[f"{label.replace(', ', chr(10), 1)}\nNFE={sol.nfe}, SW2={w2:.3f}"] = sol.x
        print(f"{label:58s} {sol.nfe:5d} {w2:9.4f}")
    tol = 1e-3 if args.quick else 1e-5
    nll = -log_likelihood(sde, model, held_out[:128], rtol=tol, atol=tol, progress=False) / 2
    print(f"held-out NLL (exact probability-flow likelihood): {float(nll.mean()):.3f} nats/dim\n")
    scatter(panels, OUT / "flow_matching_2d.png")
    return {"samplers": rows, "heldout_nll_nats_per_dim": float(nll.mean())}


def scatter(panels: dict, path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the figure (pip install 'sdegen[examples]')")
        return None
    return plt


# -- part 2: digits ---------------------------------------------------------------------------------------------
def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test images as integer levels ``(n, 64)`` in ``0..16`` (80/20, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    k_tr, k_te = train_test_split(d.data, test_size=0.2, random_state=seed, stratify=d.target)
    return torch.as_tensor(k_tr, dtype=torch.float32), torch.as_tensor(k_te, dtype=torch.float64)


def dequantise(k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``y = −1 + 2 (k + u)/17``, ``u ~ U[0, 1)``: the map ``bits_per_dim`` integrates over."""
    a, b = RANGE
    return a + (b - a) * (k + torch.rand(k.shape, generator=g, dtype=k.dtype)) / N_BINS


def to_levels(y: torch.Tensor) -> torch.Tensor:
    a, b = RANGE
    return torch.floor((y - a) / (b - a) * N_BINS).clamp(0, N_BINS - 1)


def digits(args, sde) -> dict:
    k_train, k_test = load_digits_split(args.seed)
    if args.quick:
        k_test = k_test[:16]
    iters, hidden = (150, 256) if args.quick else (6000, 512)
    print(f"[digits] training a velocity MLP (hidden {hidden}) for {iters} iterations, logit-normal times")

    def draw(g):
        return dequantise(k_train[torch.randint(0, k_train.shape[0], (256,), generator=g)], g)

    net = train(sde, draw, 64, iters=iters, hidden=hidden, lr=1e-3, seed=args.seed, time_sampling="logit_normal")
    model = from_flow(net, sde)
    with torch.no_grad():
        ode = reverse_sample(sde, model, (64, 64), solver="dpmpp_2m", steps=20, seed=args.seed, final_step="tweedie",
                             return_info=True, progress=False)
        sde_x = reverse_sample(sde, model, (64, 64), solver="ddim", noise_scale=1.0, steps=100, seed=args.seed,
                               final_step="tweedie", return_info=True, progress=False)
    save_digit_grids({"64 test images": k_test[:64],
                      f"DPM-Solver++(2M) from t = 1, NFE={ode.nfe}": to_levels(ode.x),
                      f"DDIM noise_scale=1 (stochastic), NFE={sde_x.nfe}": to_levels(sde_x.x)},
                     OUT / "flow_matching_digits.png")
    rtol = 1e-3 if args.quick else 1e-5
    x_test = (RANGE[0] + (RANGE[1] - RANGE[0]) * k_test / (N_BINS - 1)).float()
    t0 = time.perf_counter()
    bpd, info = bits_per_dim(sde, model, x_test, n_bins=N_BINS, data_range=RANGE, trace="exact", rtol=rtol,
                             atol=rtol, t_min=1e-5, seed=args.seed, max_batch=128, return_info=True, progress=False)
    seconds = time.perf_counter() - t0
    model_bpd, se = float(bpd.mean()), float(bpd.std() / math.sqrt(bpd.numel()))
    gauss = gaussian_bpd(k_train.double(), k_test, args.seed)
    print(f"\n{'model':58s} {'NLL test (bits/dim)':>20s}")
    print(f"{'uniform over 17 levels':58s} {math.log2(N_BINS):12.3f}")
    print(f"{'Gaussian (full covariance, fitted to dequantised train)':58s} {gauss:12.3f}")
    label = f"flow matching, exact-trace PF likelihood, rtol={rtol:g}"
    print(f"{label:58s} {model_bpd:12.3f} ± {se:.3f}   ({bpd.numel()} test images, {seconds:.0f}s)")
    return {"bits_per_dim": model_bpd, "bits_per_dim_se": se, "gaussian": gauss, "uniform": math.log2(N_BINS),
            "n_test": bpd.numel(), "rtol": rtol, "sample_nfe": {"dpmpp_2m": ode.nfe, "ddim_noise_scale_1": sde_x.nfe}}


def gaussian_bpd(k_train: torch.Tensor, k_test: torch.Tensor, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    y_tr, y_te = dequantise(k_train, g), dequantise(k_test, g)
    dist = torch.distributions.MultivariateNormal(y_tr.mean(0), covariance_matrix=torch.cov(y_tr.T, correction=0))
    bpd = -dist.log_prob(y_te) / (y_te.shape[1] * math.log(2))
    return float(bpd.mean()) + dequantization_offset(N_BINS, RANGE)


def save_digit_grids(panels: dict, path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, levels) in zip(axes[0], panels.items(), strict=True):
        m = int(math.isqrt(levels.shape[0]))
        img = levels[: m * m].reshape(m, m, 8, 8).permute(0, 2, 1, 3).reshape(8 * m, 8 * m)
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min): tiny training, 16 test digits")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: small networks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sde = FlowMatchingSDE()
    t0 = time.perf_counter()
    results = {"command": "python examples/flow_matching.py" + (" --quick" if args.quick else ""),
               "two_moons": two_d(args, sde), "digits": digits(args, sde)}
    results["seconds"] = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "flow_matching_results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT / 'flow_matching_results.json'} ({results['seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
