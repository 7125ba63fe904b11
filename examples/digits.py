"""Real data: a score model of scikit-learn's 8×8 handwritten digits, samples and test-set bits/dim.

The digits (``sklearn.datasets.load_digits``: 1,797 images of 8×8 pixels shipped with scikit-learn, no
download) have **17 grey levels** ``k ∈ {0, …, 16}``. This script

1. splits them 80/20 into train and test (``train_test_split(random_state=0)``, stratified by label);
2. scales level ``k`` to ``x = a + (b − a) k / 16 = k/8 − 1 ∈ [−1, 1]`` — the grid that
   :func:`sdegen.likelihood.bits_per_dim` expects with ``n_bins=17, data_range=(−1, 1)``;
3. trains an ε-prediction MLP (64 pixels + a sinusoidal time embedding) with
   :func:`sdegen.losses.dsm_loss` on the VP SDE, on **uniformly dequantised** training data
   ``y = −1 + 2 (k + u)/17``, ``u ~ U[0, 1)`` drawn afresh every batch — the same map ``bits_per_dim``
   uses, so the model learns the continuous density whose integral over a bin is ``P(k)``; weights
   are averaged (EMA 0.999), everything seeded;
4. samples an 8×8 grid of digits with the reverse SDE (Euler–Maruyama, final Tweedie denoising) and
   maps them back to the 17 levels;
5. reports the test-set negative log-likelihood in **bits/dim** with the exact probability-flow
   likelihood (``trace="exact"``: 64 vector–Jacobian products per evaluation; the library's defaults —
   per-sample RK45 in the ``vp_t`` time variable, which is ``t`` for this VP SDE — at ``rtol = atol = 1e-4``,
   ``t_min = 1e-5``) and one uniform-dequantisation draw per image, next to two baselines in the same units:
   the uniform model over 17 levels (``log2 17 ≈ 4.09`` bits/dim) and a full-covariance Gaussian fitted to
   the dequantised training data.

All numbers are upper bounds on ``−log2 P(k)/64`` of the discrete data (Jensen over ``u``; see
:func:`sdegen.likelihood.bits_per_dim`). Every phase shows a progress bar (training, sampling, each chunk of
the likelihood).

**The tolerance.** ``rtol = 1e-4`` instead of score_sde's 1e-5: the test-set standard error is 0.017
bits/dim, and at 1e-4 the ODE's error is far below it — against a solve at 1e-5 the mean over the test set
moved by less than 1e-4 bits/dim and each image by 1.4e-3 on average (at most 1.1e-2), for 0.38x the time.
``--compare-old`` runs the configuration used before (``t``, ``rtol = 1e-5``, all 64 products of a chunk in
one batched backward pass) in the same process and prints both; ``--old-likelihood`` runs only that.

**Time** (torch 2.13, one thread of a 2-core machine shared with other jobs): training 135 s, sampling 2 s,
likelihood of the 360 test images 166 s (0.46 s per image) — about 5 minutes in all, up to twice that under
heavy load; the old configuration takes 438 s more (``--compare-old``). Run::

    python examples/digits.py                 # ~5 minutes of CPU; writes the figure and a JSON of results
    python examples/digits.py --compare-old   # + the old likelihood configuration (~7 more minutes)
    python examples/digits.py --quick         # smoke test (~15 s): 200 iterations, 16 test images, rtol 1e-3

Outputs go to ``$SDEGEN_EXAMPLES_OUT`` (default ``examples/out``): ``digits_samples.png``, ``digits_results.json``.
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

from sdegen import VPSDE, from_epsilon, reverse_sample
from sdegen.likelihood import bits_per_dim, dequantization_offset
from sdegen.losses import dsm_loss

OUT = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go
N_BINS = 17  # grey levels 0..16
RANGE = (-1.0, 1.0)
RTOL = 1e-4  # likelihood ODE tolerance (rtol = atol); see the docstring for why


# -- data --------------------------------------------------------------------------------------------------
def load(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test images as integer levels ``(n, 64)`` in ``0..16`` (float64 tensors)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    k_train, k_test = train_test_split(d.data, test_size=0.2, random_state=seed, stratify=d.target)
    return torch.as_tensor(k_train, dtype=torch.float64), torch.as_tensor(k_test, dtype=torch.float64)


def to_grid(k: torch.Tensor) -> torch.Tensor:
    """Level ``k`` → ``a + (b − a) k / (n_bins − 1)``: ``k/8 − 1`` (what ``bits_per_dim`` takes)."""
    a, b = RANGE
    return a + (b - a) * k / (N_BINS - 1)


def dequantise(k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``y = a + (b − a)(k + u)/n_bins``, ``u ~ U[0, 1)``: bin ``k`` ↦ ``[−1 + 2k/17, −1 + 2(k+1)/17)``."""
    a, b = RANGE
    return a + (b - a) * (k + torch.rand(k.shape, generator=g, dtype=k.dtype)) / N_BINS


def to_levels(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dequantise` for display: the bin ``y`` falls in, clamped to ``0..16``."""
    a, b = RANGE
    return torch.floor((y - a) / (b - a) * N_BINS).clamp(0, N_BINS - 1)


# -- model --------------------------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``1000 t`` (DDPM's timestep embedding)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(dim // 2) / (dim // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = 1000.0 * t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([a.sin(), a.cos()], 1)


class EpsMLP(nn.Module):
    """``ε̂(x, t)`` for flattened 8×8 images: residual MLP on ``[x, emb(t)]``."""

    def __init__(self, dim: int = 64, hidden: int = 512, emb: int = 64, depth: int = 3):
        super().__init__()
        self.emb = TimeEmbedding(emb)
        self.inp = nn.Linear(dim + emb, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden + emb, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.emb(t).to(x.dtype)
        h = self.inp(torch.cat([x, e], 1))
        for blk in self.blocks:
            h = h + blk(torch.cat([h, e], 1))
        return self.out(h)


def _bar(total: int, desc: str, unit: str = "it"):
    """A tqdm progress bar (a no-op stand-in when tqdm is not installed)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the extras
        class _NoBar:
            def update(self, n: int = 1) -> None: ...
            def set_postfix_str(self, s: str) -> None: ...
            def close(self) -> None: ...

        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)


def train(sde, k_train: torch.Tensor, *, iters: int, batch: int, hidden: int, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = EpsMLP(hidden=hidden)
    ema = copy.deepcopy(net).requires_grad_(False)
    score = from_epsilon(net, sde)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.05)
    data = k_train.float()
    running = None
    bar = _bar(iters, "training")
    for it in range(iters):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        y = dequantise(data[idx], g)
        loss = dsm_loss(sde, score, y, generator=g) / y.shape[1]  # per dimension, for the printout
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + it) / (10 + it))
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        val = float(loss.detach())
        running = val if running is None else 0.99 * running + 0.01 * val
        bar.update()
        if (it + 1) % 50 == 0 or it + 1 == iters:
            bar.set_postfix_str(f"loss/dim {running:.4f}")
    bar.close()
    return ema.eval()


# -- baselines ----------------------------------------------------------------------------------------------
def gaussian_bpd(k_train: torch.Tensor, k_test: torch.Tensor, seed: int) -> float:
    """Bits/dim of a full-covariance Gaussian fitted (max. likelihood) to the dequantised train data."""
    g = torch.Generator().manual_seed(seed)
    y_tr, y_te = dequantise(k_train, g), dequantise(k_test, g)
    mu = y_tr.mean(0)
    cov = torch.cov(y_tr.T, correction=0)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    d = y_te.shape[1]
    return float((-dist.log_prob(y_te) / (d * math.log(2))).mean()) + dequantization_offset(N_BINS, RANGE)


def _tile(levels: torch.Tensor) -> torch.Tensor:
    """``(n², 64)`` levels -> one ``(8n, 8n)`` image, row-major."""
    n = int(math.isqrt(levels.shape[0]))
    return levels[: n * n].reshape(n, n, 8, 8).permute(0, 2, 1, 3).reshape(8 * n, 8 * n)


def save_grids(panels: dict[str, torch.Tensor], path: Path) -> None:
    """Side-by-side 8×8 grids of digits (levels 0..16), one panel per entry of ``panels``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the figure (pip install 'sdegen[examples]')")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 5.0), squeeze=False)
    for ax, (title, levels) in zip(axes[0], panels.items(), strict=True):
        img = _tile(levels)
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
        for i in range(1, img.shape[0] // 8):
            ax.axhline(8 * i - 0.5, c="w", lw=1.5)
            ax.axvline(8 * i - 0.5, c="w", lw=1.5)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# the likelihood configuration before issue 14 (kept for the comparison: --compare-old / --old-likelihood):
# integrated in t, all 64 vector-Jacobian products of a chunk of 128 images in one batched backward, rtol 1e-5
OLD_LIKELIHOOD = dict(time_variable="t", exact_mode="vjp", chunk_size=64, rtol=1e-5, atol=1e-5)


def test_bits_per_dim(sde, score, x_test: torch.Tensor, options: dict, seed: int, label: str) -> dict:
    """Test-set bits/dim with the exact trace; progress bars per chunk of 128 images."""
    print(f"likelihood ({label}): {x_test.shape[0]} test images in chunks of 128, {options}", flush=True)
    t0 = time.perf_counter()
    bpd, info = bits_per_dim(sde, score, x_test, n_bins=N_BINS, data_range=RANGE, trace="exact", t_min=1e-5,
                             seed=seed, max_batch=128, progress=True, return_info=True, **options)
    seconds = time.perf_counter() - t0
    n = x_test.shape[0]
    # batched network evaluations per chunk of 128 images (each chunk runs until its slowest image is done)
    nfe = info.network_calls / math.ceil(n / 128)
    return {"bpd": bpd, "mean": float(bpd.mean()), "se": float(bpd.std() / math.sqrt(n)), "seconds": seconds,
            "seconds_per_image": seconds / n, "nfe_per_chunk": nfe, "time_variable": info.time_variable,
            "options": dict(options)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--rtol", type=float, default=RTOL, help=f"likelihood ODE rtol = atol (default {RTOL:g})")
    ap.add_argument("--old-likelihood", action="store_true",
                    help="the likelihood configuration before issue 14 (t, rtol 1e-5, one batched backward per chunk)")
    ap.add_argument("--compare-old", action="store_true",
                    help="also run the old likelihood configuration and report both (time, NFE, bits/dim)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 iterations, 16 test images, rtol 1e-3")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: these small networks gain nothing from more threads, and "
                         "on a busy machine extra threads slow them down by 10-50x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.iters, args.test_limit, args.rtol = 200, 16, 1e-3

    k_train, k_test = load(args.seed)
    if args.test_limit:
        k_test = k_test[: args.test_limit]
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    print(f"digits: {k_train.shape[0]} train / {k_test.shape[0]} test images, 64 pixels, {N_BINS} levels")
    print(f"training an ε-MLP (hidden {args.hidden}) for {args.iters} iterations on dequantised data")
    t0 = time.perf_counter()
    net = train(sde, k_train, iters=args.iters, batch=args.batch, hidden=args.hidden, lr=args.lr, seed=args.seed)
    train_s = time.perf_counter() - t0
    print(f"trained in {train_s:.0f}s")
    score = from_epsilon(net, sde)

    # samples: reverse SDE, Euler-Maruyama, 1000 steps, per-sample seeds, x̂0 at the end
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = reverse_sample(sde, score, (64, 64), solver="euler_maruyama", steps=100 if args.quick else 1000,
                             seed=args.seed, final_step="tweedie", progress=True, return_info=True)
    sample_s = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    save_grids({"64 test images (17 grey levels)": k_test[:64],
                f"64 samples: reverse VP SDE, Euler–Maruyama + Tweedie, NFE={sol.nfe}": to_levels(sol.x)},
               OUT / "digits_samples.png")
    print(f"sampled 64 digits with NFE={sol.nfe} in {sample_s:.1f}s -> {OUT / 'digits_samples.png'}")

    # exact likelihood on the test split
    x_test = to_grid(k_test).float()
    new_options = dict(rtol=args.rtol, atol=args.rtol)  # everything else: the library's defaults
    runs = {}
    if args.old_likelihood:
        runs["old"] = test_bits_per_dim(sde, score, x_test, OLD_LIKELIHOOD, args.seed, "before issue 14")
    else:
        runs["new"] = test_bits_per_dim(sde, score, x_test, new_options, args.seed, "sdegen defaults")
        if args.compare_old:
            runs["old"] = test_bits_per_dim(sde, score, x_test, OLD_LIKELIHOOD, args.seed, "before issue 14")
    n_test = x_test.shape[0]
    uniform = math.log2(N_BINS)
    gauss = gaussian_bpd(k_train, k_test, args.seed)

    rows = [("uniform over 17 levels", uniform, None),
            ("Gaussian (full cov., fitted to dequantised train)", gauss, None)]
    for key, r in runs.items():
        what = "before issue 14: t, rtol 1e-5" if key == "old" else f"{r['time_variable']}, rtol {args.rtol:g}"
        rows.append((f"sdegen VP ε-MLP, exact trace ({what})", r["mean"], r))
    print(f"\n{'model':58s} {'NLL test (bits/dim)':>20s} {'NFE':>6s} {'time':>7s} {'/image':>8s}")
    print("-" * 104)
    for name, val, r in rows:
        if r is None:
            print(f"{name:58s} {val:12.3f}")
        else:
            print(f"{name:58s} {val:12.3f} ± {r['se']:.3f} {r['nfe_per_chunk']:6.0f} {r['seconds']:6.0f}s "
                  f"{r['seconds_per_image']:7.2f}s")
    comparison = None
    if "new" in runs and "old" in runs:
        new, old = runs["new"], runs["old"]
        diff = (new["bpd"] - old["bpd"]).abs()
        comparison = {"time_ratio": new["seconds"] / old["seconds"], "bpd_difference": new["mean"] - old["mean"],
                      "per_image_mean_abs_difference": float(diff.mean()),
                      "per_image_max_abs_difference": float(diff.max()), "standard_error": old["se"]}
        print(f"\nnew / old likelihood time: {comparison['time_ratio']:.2f}; bits/dim difference "
              f"{comparison['bpd_difference']:+.4f} (standard error {old['se']:.3f}); per image mean |difference| "
              f"{comparison['per_image_mean_abs_difference']:.1e}, "
              f"max {comparison['per_image_max_abs_difference']:.1e}")

    results = {
        "command": "python examples/digits.py" + (" --quick" if args.quick else ""),
        "args": vars(args),
        "n_train": k_train.shape[0],
        "n_test": n_test,
        "bits_per_dim": {"uniform": uniform, "gaussian": gauss}
        | {f"sdegen_{k}": r["mean"] for k, r in runs.items()} | {f"sdegen_{k}_se": r["se"] for k, r in runs.items()},
        "likelihood": {k: {key: v for key, v in r.items() if key != "bpd"} for k, r in runs.items()},
        "comparison": comparison,
        "sampling": {"solver": "euler_maruyama", "nfe": sol.nfe, "seconds": sample_s},
        "train_seconds": train_s,
        "torch": torch.__version__,
    }
    (OUT / "digits_results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT / 'digits_results.json'}")


if __name__ == "__main__":
    main()
