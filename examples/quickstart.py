"""sdegen quick start: sample a 2-D Gaussian-mixture ring with its exact score.

The exact score of the perturbed data distribution is known in closed form for Gaussian mixtures
(``sdegen.testing.GaussianMixture``), so we can sample with several solvers and check the result
against exact samples. Run:

    python examples/quickstart.py            # prints a table, writes examples/out/quickstart.png
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from sdegen import VPSDE, reverse_sample
from sdegen.testing import GaussianMixture


def ring(k: int = 8, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(k), means, torch.full((k,), std**2))


def mode_weights(x: torch.Tensor, k: int = 8) -> torch.Tensor:
    """Fraction of samples nearest to each of the k ring modes."""
    angle = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    mode = torch.round(angle / (2 * math.pi / k)).long() % k
    return torch.bincount(mode, minlength=k).double() / x.shape[0]


def main() -> None:
    torch.manual_seed(0)
    data = ring()
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    score_model = data.perturbed(sde).score  # exact ∇ log p_t(x); any score network fits here
    n = 4000
    runs = {
        "euler_maruyama (reverse SDE)": dict(solver="euler_maruyama", steps=500),
        "heun (probability-flow ODE)": dict(solver="heun", steps=50, noise_scale=0.0),
        "heun (reverse SDE)": dict(solver="heun", steps=250),
    }
    exact = data.sample(n, generator=torch.Generator().manual_seed(1))
    print(f"{'solver':32s} {'NFE':>5s} {'max |weight err|':>17s} {'radius':>7s} {'time':>6s}")
    print(f"{'exact samples':32s} {'-':>5s} {float((mode_weights(exact) - 1 / 8).abs().max()):17.4f} "
          f"{float(exact.norm(dim=1).mean()):7.3f} {'-':>6s}")
    results = {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        sol = reverse_sample(sde, score_model, shape=(n, 2), generator=torch.Generator().manual_seed(0),
                             return_info=True, **kw)
        dt = time.perf_counter() - t0
        x = sol.x
        results[name] = (sol.nfe, x)
        print(f"{name:32s} {sol.nfe:5d} {float((mode_weights(x) - 1 / 8).abs().max()):17.4f} "
              f"{float(x.norm(dim=1).mean()):7.3f} {dt:5.2f}s")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install 'sdegen[examples]')")
        return
    out = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4 * (len(results) + 1), 4))
    axes[0].scatter(exact[:, 0], exact[:, 1], s=1)
    axes[0].set_title("exact samples")
    for ax, (name, (nfe, x)) in zip(axes[1:], results.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1)
        ax.set_title(f"{name}\nNFE={nfe}", fontsize=9)
    for ax in axes:
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "quickstart.png", dpi=80)
    print(f"wrote {out / 'quickstart.png'}")


if __name__ == "__main__":
    main()
