"""Train a small score network on 2-D toy data, then sample it with every sdegen solver.

The workflow users expect from a diffusion library, end to end, in about a minute of CPU:

1. data: two moons (``sklearn.datasets.make_moons``), a checkerboard or a Gaussian ring (torch);
2. model: a 3-layer MLP with a sinusoidal time embedding, predicting the noise ``ε`` (DDPM);
3. training: :func:`sdegen.losses.dsm_loss` (denoising score matching, ``ω(t) = s(t)²``) on the VP SDE;
4. sampling: :func:`sdegen.reverse_sample` with each solver in :func:`sdegen.available_solvers`, each
   with settings that suit it (reverse SDE or probability-flow ODE, steps, grid), and a few
   trajectories saved with ``save_at="all"``;
5. a figure (samples on top, trajectories below, NFE in every title) and a table with the sliced
   Wasserstein-2 distance of each solver's samples to held-out data.

Run::

    python examples/toy_2d.py                     # ~1-2 min of CPU; writes examples/out/toy_2d.png
    python examples/toy_2d.py --data ring         # or checkerboard
    python examples/toy_2d.py --quick             # smoke test: a few seconds, same code path
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from sdegen import VPSDE, available_solvers, from_epsilon, get_solver, reverse_sample
from sdegen.losses import dsm_loss

OUT = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go


# -- data ----------------------------------------------------------------------------------------------
def make_data(kind: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of a toy distribution, roughly standardised (std ≈ 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05, random_state=seed)
        x = torch.as_tensor(x, dtype=torch.float32)
        return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])
    if kind == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
        x2 = x2 + (torch.floor(x1) % 2)
        return torch.stack([x1, x2], 1) / 1.15
    if kind == "ring":
        k = torch.randint(0, 8, (n,), generator=g).float()
        ang = k * (2 * math.pi / 8)
        x = 2.0 * torch.stack([ang.cos(), ang.sin()], 1) + 0.15 * torch.randn(n, 2, generator=g)
        return x / 1.45
    raise ValueError(f"unknown data {kind!r}; use moons, checkerboard or ring")


# -- model -----------------------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``1000 t`` (Vaswani et al. 2017; DDPM's timestep embedding)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(dim // 2) / (dim // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = 1000.0 * t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([a.sin(), a.cos()], 1)


class EpsMLP(nn.Module):
    """``ε̂(x, t)``: an MLP on ``[x, emb(t)]`` — networks take ``(x, t)`` with ``t`` of shape ``(batch,)``."""

    def __init__(self, dim: int = 2, hidden: int = 256, emb: int = 32):
        super().__init__()
        self.emb = TimeEmbedding(emb)
        self.net = nn.Sequential(
            nn.Linear(dim + emb, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self.emb(t)], 1))


def train(sde, data: torch.Tensor, iters: int, batch: int, seed: int) -> EpsMLP:
    torch.manual_seed(seed)
    net = EpsMLP()
    score = from_epsilon(net, sde)  # the object we train is the object we sample with
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    g = torch.Generator().manual_seed(seed)
    t0, running = time.perf_counter(), None
    for it in range(iters):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        loss = dsm_loss(sde, score, data[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        val = float(loss.detach())
        running = val if running is None else 0.98 * running + 0.02 * val
        if (it + 1) % max(1, iters // 5) == 0:
            print(f"  iter {it + 1:5d}/{iters}  loss {running:.4f}  ({time.perf_counter() - t0:.1f}s)")
    return net.eval()


# -- solvers ----------------------------------------------------------------------------------------------
# Settings per solver: (label, reverse_sample keyword arguments). SDE solvers integrate the reverse SDE
# (noise_scale=1) and need more steps; ODE solvers integrate the probability-flow ODE (noise_scale=0).
SETTINGS = {
    "euler_maruyama": ("reverse SDE", dict(noise_scale=1.0, steps=500, final_step="tweedie")),
    "heun": ("PF-ODE", dict(noise_scale=0.0, steps=25)),
    "rk45": ("PF-ODE, rtol=atol=1e-3", dict(rtol=1e-3, atol=1e-3)),
    "tsit5": ("PF-ODE, rtol=atol=1e-3", dict(rtol=1e-3, atol=1e-3)),
    "bosh3": ("PF-ODE, rtol=atol=1e-3", dict(rtol=1e-3, atol=1e-3)),
    "pc": ("reverse SDE + Langevin", dict(noise_scale=1.0, steps=200, final_step="tweedie")),
    "ancestral": ("DDPM ancestral", dict(noise_scale=1.0, steps=200, final_step="tweedie")),
    "ddim": ("η=0", dict(noise_scale=0.0, steps=25, grid="quadratic")),
    "dpmpp_2m": ("PF-ODE, log-SNR grid", dict(noise_scale=0.0, steps=15, grid="log_snr")),
    "dpmpp_3m": ("PF-ODE, log-SNR grid", dict(noise_scale=0.0, steps=15, grid="log_snr")),
    "edm": ("EDM's 18 steps", dict(noise_scale=0.0, steps=17, grid="edm", final_step="tweedie")),
    "reverse_diffusion": ("reverse SDE", dict(noise_scale=1.0, steps=200, final_step="tweedie")),
    "langevin": ("annealed Langevin, snr=0.3", dict(noise_scale=1.0, steps=50, n_steps_each=6, snr=0.3,
                                                    final_step="tweedie")),
}


def settings_for(name: str, quick: bool) -> tuple[str, dict]:
    """Known settings, or a generic guess for a solver this example does not know yet."""
    if name in SETTINGS:
        label, kw = SETTINGS[name]
        kw = dict(kw)
    else:  # the solver's own defaults (noise scale, grid and steps)
        slv = get_solver(name)
        label, kw = ("reverse SDE" if slv.default_noise_scale > 0 else "PF-ODE"), {}
        if not slv.adaptive:
            kw["steps"] = min(slv.default_steps, 200)
    if quick and "steps" in kw:
        kw["steps"] = max(4, kw["steps"] // 10)
        if "n_steps_each" in kw:
            kw["n_steps_each"] = 2
    return label, kw


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds (Rabin et al. 2011)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.double() @ d, dim=0)
    py, _ = torch.sort(y.double() @ d, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="moons", choices=["moons", "checkerboard", "ring"])
    ap.add_argument("--iters", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: few iterations, samples and steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: these small networks gain nothing from more threads, and "
                         "on a busy machine extra threads slow them down by 10-50x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    iters = 150 if args.quick else args.iters
    n = 256 if args.quick else args.samples

    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    data = make_data(args.data, 20_000, args.seed)
    held_out = make_data(args.data, n, args.seed + 1)
    print(f"training an ε-MLP on {args.data} for {iters} iterations (VP SDE, dsm_loss)")
    t0 = time.perf_counter()
    net = train(sde, data, iters, batch=512, seed=args.seed)
    print(f"trained in {time.perf_counter() - t0:.1f}s\n")
    score = from_epsilon(net, sde)

    results = []
    header = f"{'solver':17s} {'setting':28s} {'NFE':>5s} {'sliced W2':>9s} {'time':>7s}"
    print(header + "\n" + "-" * len(header))
    print(f"{'(held-out data)':17s} {'':28s} {'-':>5s} "
          f"{sliced_w2(make_data(args.data, n, args.seed + 2), held_out):9.4f} {'-':>7s}")
    for name in available_solvers():
        label, kw = settings_for(name, args.quick)
        t1 = time.perf_counter()
        try:
            with torch.no_grad():
                sol = reverse_sample(sde, score, (n, 2), solver=name, seed=args.seed, save_at="all",
                                     return_info=True, **kw)
        except (ValueError, TypeError) as err:  # a solver that does not fit this problem: say so, go on
            print(f"{name:17s} skipped: {err}")
            continue
        dt = time.perf_counter() - t1
        w2 = sliced_w2(sol.x, held_out)
        results.append((name, label, sol, w2))
        print(f"{name:17s} {label:28s} {sol.nfe:5d} {w2:9.4f} {dt:6.2f}s")
    plot(args.data, data[:n], results)


def plot(kind: str, data: torch.Tensor, results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the figure (pip install 'sdegen[examples]')")
        return
    per_row = 6
    cells = [None, *results]  # the data first, then one cell per solver
    lines = math.ceil(len(cells) / per_row)
    fig, axes = plt.subplots(2 * lines, per_row, figsize=(2.5 * per_row, 5.0 * lines), squeeze=False)
    for ax in axes.flat:
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for c, cell in enumerate(cells):
        top, bottom = axes[2 * (c // per_row), c % per_row], axes[2 * (c // per_row) + 1, c % per_row]
        if cell is None:
            top.scatter(data[:, 0], data[:, 1], s=1, c="k")
            top.set_title(f"data ({kind})", fontsize=9)
            bottom.axis("off")
            note = "below each sample plot:\n8 trajectories from\nt = T (noise, yellow) to\nt_min (data, red dot)"
            bottom.text(0.02, 0.5, note, fontsize=8, va="center", transform=bottom.transAxes)
            continue
        name, label, sol, w2 = cell
        top.scatter(sol.x[:, 0], sol.x[:, 1], s=1)
        top.set_title(f"{name}\n{label}\nNFE={sol.nfe}, SW2={w2:.3f}", fontsize=8)
        if sol.trajectory is not None:
            k = sol.trajectory.shape[0]
            keep = torch.unique(torch.linspace(0, k - 1, min(k, 60)).round().long())  # at most 60 points
            traj = sol.trajectory[keep, :8]  # (<=60, 8, 2)
            tt = sol.trajectory_times[keep].float()  # (<=60,), or (<=60, batch): adaptive solvers' own steps
            for i in range(traj.shape[1]):
                ti = tt[:, i] if tt.ndim == 2 else tt
                bottom.plot(traj[:, i, 0], traj[:, i, 1], lw=0.5, c="0.65", zorder=1)
                bottom.scatter(traj[:, i, 0], traj[:, i, 1], c=ti, cmap="viridis", s=2, zorder=2, vmin=0, vmax=1)
            bottom.scatter(traj[-1, :, 0], traj[-1, :, 1], c="r", s=8, zorder=3)
        bottom.set_title(f"trajectories, NFE={sol.nfe}", fontsize=8)
    for c in range(len(cells), lines * per_row):  # empty cells of the last line
        axes[2 * (c // per_row), c % per_row].axis("off")
        axes[2 * (c // per_row) + 1, c % per_row].axis("off")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "toy_2d.png", dpi=90)
    print(f"\nwrote {OUT / 'toy_2d.png'}")


if __name__ == "__main__":
    main()
