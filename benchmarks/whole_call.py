"""(e) Whole calls, setup included: ``reverse_sample`` against a complete k-diffusion sampling call.

The per-step slope of ``benchmarks/overhead.py`` cancels fixed costs; a user pays them on every call. Here
each measured call does everything a user's call does: sdegen's ``reverse_sample(sde, score, shape,
solver=..., steps=n, grid="edm", noise_scale=0)`` (argument checks, grid, prior draw, solver set-up, the
loop, the NaN check) against k-diffusion's ``get_sigmas_karras`` + ``randn · σ_max`` + ``sample_*``. Both
integrate the EDM probability-flow ODE (``σ(t) = t``) on the same Karras ρ-grid in float32, with a model
of ~zero cost (sdegen: the score 0; k-diffusion: the denoiser ``D(x, σ) = x``) or a tiny conv net. The
two are timed interleaved, best of several repeats each round, and the ratio is sdegen / k-diffusion
(below 1: sdegen is faster).
"""

from __future__ import annotations

import time

import torch

from sdegen import EDMSDE, reverse_sample

from .common import k_diffusion
from .overhead import TinyConv

PAIRS = [("euler_maruyama", "sample_euler"), ("heun", "sample_heun"), ("dpmpp_2m", "sample_dpmpp_2m")]


def _interleaved(a, b, rounds: int, reps: int) -> tuple[float, float]:
    """Best time of ``a`` and of ``b`` over ``rounds`` alternating rounds of ``reps`` calls each."""
    ta = tb = float("inf")
    for _ in range(rounds):
        for fn, which in ((a, 0), (b, 1)):
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if which == 0:
                    ta = min(ta, dt)
                else:
                    tb = min(tb, dt)
    return ta, tb


def _cases(quick: bool):
    zero = ("zero-cost", None)
    shapes = [(1, 2), (1024, 2), (64, 3, 32, 32)] if quick else [(1, 2), (1024, 2), (64, 3, 32, 32),
                                                                  (1024, 3, 32, 32)]
    cases = [(s, *zero) for s in shapes]
    cases.append(((64, 3, 32, 32), "tiny conv", TinyConv().eval()))
    return cases


def run(quick: bool = False, log=print) -> dict:
    kd = k_diffusion()
    if kd is None:
        log("  k-diffusion unavailable: skipped")
        return {"rows": []}
    torch.manual_seed(0)
    sde = EDMSDE()
    rows = []
    for shape, label, net in _cases(quick):
        numel = torch.Size(shape).numel()
        rounds, reps = (2, 2) if numel >= 1 << 20 else (3, 5)
        if net is None:
            score = lambda x, t: torch.zeros_like(x)  # noqa: E731
            denoiser = lambda x, s: x  # noqa: E731
        else:
            score = lambda x, t, net=net: net(x, t)  # noqa: E731 - a "score" network (the cost is what counts)
            denoiser = lambda x, s, net=net: net(x, s)  # noqa: E731
        for ours, theirs in PAIRS:
            if quick and ours == "dpmpp_2m" and net is not None:
                continue
            for n in (10, 50):
                def a(n=n, ours=ours, score=score, shape=shape):
                    reverse_sample(sde, score, shape, solver=ours, steps=n, grid="edm", noise_scale=0.0,
                                   generator=torch.Generator().manual_seed(0), progress=False)

                def b(n=n, theirs=theirs, denoiser=denoiser, shape=shape):
                    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 80.0
                    sig = kd.get_sigmas_karras(n + 1, 0.002, 80.0)[:-1]  # n steps ending at σ_min, as sdegen
                    getattr(kd, theirs)(denoiser, x, sig, disable=True)

                with torch.no_grad():
                    a()
                    b()  # warm up
                    ta, tb = _interleaved(a, b, rounds, reps)
                row = {"shape": list(shape), "model": label, "solver": ours, "steps": n, "sdegen_ms": 1e3 * ta,
                       "k_diffusion_ms": 1e3 * tb, "ratio": ta / tb}
                rows.append(row)
                log(f"  whole call {tuple(shape)} {label} {ours} n={n}: sdegen {row['sdegen_ms']:.2f} ms, "
                    f"k-diffusion {row['k_diffusion_ms']:.2f} ms, ratio {row['ratio']:.2f}")
    return {"rows": rows}
