"""(c) Time spent around each network evaluation: sdegen's step loop vs k-diffusion's.

A model of ~zero cost (it returns a preallocated tensor) isolates the solver: the per-step time is
the slope of wall time against the number of steps, ``(T(n2) − T(n1)) / (n2 − n1)``, each ``T`` the
best of several runs, so fixed costs (grid, prior, setup) cancel. Both libraries integrate the
same EDM probability-flow ODE (``σ(t) = t``) on the same Karras ρ-grid in float32; k-diffusion's
model is its denoiser ``D(x, σ) = x`` and sdegen's the score 0 — the same dynamics (``dx/dσ = 0``).
The dispatched ATen operations per step are counted too (a noise-free measure of the same thing).

With a real network (a small MLP on ``(B, 2)``, a tiny conv net on ``(B, 3, 32, 32)``) the solver
overhead is reported as a fraction of network time: the per-step time with the zero-cost model at
that shape over the network time of one step (``overhead_fraction``), and, noisier, the directly
measured (step time − network time) / network time (``overhead_fraction_direct``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdegen import EDMSDE, ReverseSDE, from_denoiser, from_epsilon, get_solver, integrate, make_grid, reverse_sample

from .common import best_time, k_diffusion


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(fn, n1: int, n2: int) -> float:
    with _OpCounter() as a:
        fn(n1)
    with _OpCounter() as b:
        fn(n2)
    return (b.n - a.n) / (n2 - n1)


def _per_step(fn, n1: int, n2: int, repeats: int) -> float:
    fn(n1)  # warm up
    return (best_time(lambda: fn(n2), repeats) - best_time(lambda: fn(n1), repeats)) / (n2 - n1)


def _sdegen(sde, score, x, solver):
    s = get_solver(solver)

    def run(n):
        integrate(ReverseSDE(sde, score, 0.0), x, make_grid("edm", sde, n), s, None)

    return run


def _kdiff(kd, model, x, name):
    fn = getattr(kd, name)

    def run(n):
        sig = kd.get_sigmas_karras(n, 0.002, 80.0)[:-1]  # no appended 0: n Heun steps, 2n NFE
        fn(model, x, sig, disable=True)

    return run


PAIRS = [("euler", "euler_maruyama", "sample_euler"), ("heun", "heun", "sample_heun"),
         ("edm (Heun in σ)", "edm", "sample_heun"), ("dpmpp_2m", "dpmpp_2m", "sample_dpmpp_2m")]


def zero_cost(quick: bool = False, log=print) -> list[dict]:
    kd = k_diffusion()
    sde = EDMSDE()
    shapes = [(1, 2), (1024, 2), (65536, 2), (1, 3, 32, 32), (1024, 3, 32, 32)]
    # (65536, 3, 32, 32) is skipped: 805 MB per state tensor, ~6 live tensors per Heun step, and
    # seconds per step on a 2-core CPU — it measures the memory system, not the solver.
    if quick:
        shapes = [(1, 2), (1024, 2), (1024, 3, 32, 32)]
    rows = []
    for shape in shapes:
        numel = torch.Size(shape).numel()
        big = numel >= 1 << 20
        n1, n2, reps = (2, 6, 3) if big else ((4, 16, 3) if numel >= 1 << 16 else (10, 60, 5))
        if quick:
            reps = 2 if big else 3
        x = torch.randn(shape) * 80
        zero = torch.zeros(shape)
        for label, ours, theirs in PAIRS:
            if quick and label not in ("euler", "heun"):
                continue
            a = _sdegen(sde, lambda x, t, z=zero: z, x, ours)
            row = {"shape": list(shape), "solver": label, "sdegen_us": 1e6 * _per_step(a, n1, n2, reps)}
            row["sdegen_ops"] = _ops(a, 3, 5)
            if kd is not None:
                b = _kdiff(kd, lambda x, s: x, x, theirs)
                row["k_diffusion_us"] = 1e6 * _per_step(b, n1, n2, reps)
                row["k_diffusion_ops"] = _ops(b, 3, 5)
                row["ratio"] = row["sdegen_us"] / row["k_diffusion_us"]
            rows.append(row)
            log(f"  overhead {shape} {label}: sdegen {row['sdegen_us']:.1f} us ({row['sdegen_ops']:.0f} ops), "
                f"k-diffusion {row.get('k_diffusion_us', float('nan')):.1f} us "
                f"({row.get('k_diffusion_ops', float('nan')):.0f} ops), ratio {row.get('ratio', float('nan')):.2f}")
    return rows


# -- with a network -------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    """2 -> 128 -> 128 -> 2 with a sinusoidal embedding of log σ added to the first layer."""

    def __init__(self, d: int = 2, width: int = 128):
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.emb = nn.Linear(16, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, d)

    def forward(self, x, t):
        f = torch.arange(8, dtype=x.dtype) + 1
        e = torch.log(t.to(x.dtype))[:, None] * f
        h = torch.nn.functional.silu(self.inp(x) + self.emb(torch.cat([e.sin(), e.cos()], 1)))
        return self.out(torch.nn.functional.silu(self.mid(h)))


class TinyConv(nn.Module):
    """3 -> 16 -> 16 -> 3 channels, 3x3 convolutions, a per-channel embedding of log σ."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.c1 = nn.Conv2d(3, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c3 = nn.Conv2d(ch, 3, 3, padding=1)
        self.emb = nn.Linear(1, ch)

    def forward(self, x, t):
        e = self.emb(torch.log(t.to(x.dtype))[:, None])[:, :, None, None]
        h = torch.nn.functional.silu(self.c1(x) + e)
        h = torch.nn.functional.silu(self.c2(h))
        return self.c3(h)


def with_network(quick: bool = False, log=print) -> list[dict]:
    torch.manual_seed(0)
    sde = EDMSDE()
    cases = [("MLP (1024, 2)", TinyMLP(), (1024, 2)), ("conv (1024, 3, 32, 32)", TinyConv(), (1024, 3, 32, 32))]
    if quick:
        cases = [("MLP (1024, 2)", TinyMLP(), (1024, 2)), ("conv (64, 3, 32, 32)", TinyConv(), (64, 3, 32, 32))]
    kd = k_diffusion()
    rows = []
    for label, net, shape in cases:
        net.eval()
        x = torch.randn(shape) * 80
        t = torch.full((shape[0],), 3.0)
        big = torch.Size(shape).numel() >= 1 << 20
        n1, n2, reps = (1, 3, 2) if big else (5, 25, 3)
        zero = torch.zeros(shape)
        z1, z2, zreps = (2, 6, 3) if big else (10, 60, 5)
        with torch.no_grad():
            net_s = best_time(lambda net=net, x=x, t=t: net(x, t), reps * 2)
            for solver, kname in (("euler_maruyama", "sample_euler"), ("heun", "sample_heun")):
                nfe = get_solver(solver).nfe_per_step
                work = nfe * net_s
                step = _per_step(_sdegen(sde, lambda x, t, net=net: net(x, t), x, solver), n1, n2, reps)
                bare = _per_step(_sdegen(sde, lambda x, t, z=zero: z, x, solver), z1, z2, zreps)
                row = {"case": label, "solver": solver, "network_ms": 1e3 * net_s, "step_ms": 1e3 * step,
                       "zero_cost_step_ms": 1e3 * bare, "overhead_fraction": bare / work,
                       "overhead_fraction_direct": (step - work) / work}
                if kd is not None:
                    kstep = _per_step(_kdiff(kd, lambda x, s, net=net: net(x, s), x, kname), n1, n2, reps)
                    kbare = _per_step(_kdiff(kd, lambda x, s: x, x, kname), z1, z2, zreps)
                    row |= {"k_diffusion_step_ms": 1e3 * kstep, "k_diffusion_zero_cost_step_ms": 1e3 * kbare,
                            "k_diffusion_overhead_fraction": kbare / work,
                            "k_diffusion_overhead_fraction_direct": (kstep - work) / work}
                rows.append(row)
                log(f"  network {label} {solver}: net {row['network_ms']:.2f} ms, step {row['step_ms']:.2f} ms, "
                    f"overhead {100 * row['overhead_fraction']:.1f}% "
                    f"(direct {100 * row['overhead_fraction_direct']:.1f}%; k-diffusion "
                    f"{100 * row.get('k_diffusion_overhead_fraction', float('nan')):.1f}%)")
    return rows


# -- whole calls ------------------------------------------------------------------------------------
def _interleaved_rounds(a, b, rounds: int, reps: int) -> tuple[float, float]:
    """Best wall time of ``a()`` and of ``b()`` over ``rounds`` alternating rounds of ``reps`` calls each (the
    same machine state for both)."""
    ta = tb = float("inf")
    for _ in range(rounds):
        ta = min(ta, best_time(a, reps))
        tb = min(tb, best_time(b, reps))
    return ta, tb


def whole_calls(quick: bool = False, log=print) -> list[dict]:
    """Whole sampling calls (grid, per-grid coefficients, prior handling, loop) with a zero-cost model, given
    to both libraries in the same parametrisation (k-diffusion: the identity denoiser; diffusers: ε = 0).

    sdegen's new multistep samplers at their default grid vs the same method in k-diffusion (Karras grid,
    its default) or diffusers (its scheduler loop): ``reverse_sample(x_T=...)`` against ``sample_*`` /
    ``scheduler.set_timesteps`` + ``step``. k-diffusion's SDE samplers build a Brownian tree (their default
    noise); sdegen draws per-sample counter-based noise (``seed=``).
    """
    from sdegen import reverse_sample

    kd = k_diffusion()
    diffusers = _optional("diffusers")
    sde = EDMSDE()
    identity = lambda y, s: y  # noqa: E731 - the zero-cost denoiser, the same for both libraries
    same_denoiser = from_denoiser(identity, sde)  # sdegen's view of it (EDM: t = σ)
    shapes = [(1024, 2), (64, 3, 32, 32)] if not quick else [(1024, 2)]
    rows = []
    for shape in shapes:
        x = torch.randn(shape) * 80
        zero = torch.zeros(shape)
        for nfe in (10, 20):
            pairs = []
            if kd is not None:
                sig = kd.get_sigmas_karras(nfe, 0.002, 80.0)
                pairs += [
                    ("lms", "k-diffusion sample_lms",
                     lambda x=x, sig=sig: kd.sample_lms(identity, x, sig, disable=True), {}, same_denoiser),
                    ("dpmpp_3m", "k-diffusion sample_dpmpp_3m_sde(eta=0)",
                     lambda x=x, sig=sig: kd.sample_dpmpp_3m_sde(identity, x, sig, eta=0.0, disable=True), {},
                     same_denoiser),
                    ("dpmpp_2m_sde", "k-diffusion sample_dpmpp_2m_sde",
                     lambda x=x, sig=sig: kd.sample_dpmpp_2m_sde(identity, x, sig, disable=True), {"seed": 0},
                     same_denoiser),
                ]
            if diffusers is not None:
                def unipc(n=nfe, x=x, zero=zero):
                    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000)
                    sched.set_timesteps(n)
                    y = x
                    for ts in sched.timesteps:
                        y = sched.step(zero, ts, y).prev_sample
                    return y

                pairs.append(("unipc", "diffusers UniPCMultistepScheduler", unipc, {},
                              from_epsilon(lambda y, t, zero=zero: zero, sde)))  # the same ε-prediction
            for ours, theirs, peer, kw, model in pairs:
                def mine(ours=ours, kw=kw, n=nfe, x=x, model=model):
                    return reverse_sample(sde, model, x_T=x, solver=ours, steps=n, **kw)

                mine()
                peer()  # warm up
                ta, tb = _interleaved_rounds(mine, peer, 3 if quick else 7, 1)
                row = {"shape": list(shape), "nfe": nfe, "sdegen": ours, "peer": theirs, "sdegen_ms": 1e3 * ta,
                       "peer_ms": 1e3 * tb, "ratio": ta / tb}
                rows.append(row)
                log(f"  whole call {tuple(shape)} NFE {nfe}: sdegen {ours} {row['sdegen_ms']:.1f} ms, {theirs} "
                    f"{row['peer_ms']:.1f} ms, ratio {row['ratio']:.2f}")
    return rows


BASIC_PAIRS = [("euler", "sample_euler"), ("heun", "sample_heun"), ("dpmpp_2m", "sample_dpmpp_2m")]


def _basic_cases(quick: bool):
    zero = ("zero-cost", None)
    shapes = [(1, 2), (1024, 2), (64, 3, 32, 32)] if quick else [(1, 2), (1024, 2), (64, 3, 32, 32),
                                                                  (1024, 3, 32, 32)]
    cases = [(s, *zero) for s in shapes]
    cases.append(((64, 3, 32, 32), "tiny conv", TinyConv().eval()))
    return cases


def whole_calls_basic(quick: bool = False, log=print) -> list[dict]:
    """Whole calls of 10 and 50 steps, setup included: Euler, Heun, DPM-Solver++(2M) against k-diffusion's
    ``get_sigmas_karras`` + ``randn · σ_max`` + ``sample_*``, with a zero-cost denoiser (the identity) and a tiny
    conv net, the same denoiser for both (sdegen: ``from_denoiser``)."""
    kd = k_diffusion()
    if kd is None:
        log("  k-diffusion unavailable: skipped")
        return []
    torch.manual_seed(0)
    sde = EDMSDE()
    rows = []
    for shape, label, net in _basic_cases(quick):
        numel = torch.Size(shape).numel()
        rounds, reps = (2, 2) if numel >= 1 << 20 else (3, 5)
        # the same denoiser D(x, σ) for both libraries: k-diffusion calls it directly, sdegen through
        # from_denoiser (EDM: t = σ), so each pays its own conversion to its update
        denoiser = (lambda x, s: x) if net is None else (lambda x, s, net=net: net(x, s))  # noqa: E731
        score = from_denoiser(denoiser, sde)
        for ours, theirs in BASIC_PAIRS:
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
                    ta, tb = _interleaved_rounds(a, b, rounds, reps)
                row = {"shape": list(shape), "model": label, "solver": ours, "steps": n, "sdegen_ms": 1e3 * ta,
                       "k_diffusion_ms": 1e3 * tb, "ratio": ta / tb}
                rows.append(row)
                log(f"  whole call {tuple(shape)} {label} {ours} n={n}: sdegen {row['sdegen_ms']:.2f} ms, "
                    f"k-diffusion {row['k_diffusion_ms']:.2f} ms, ratio {row['ratio']:.2f}")
    return rows


def _optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def run(quick: bool = False, log=print) -> dict:
    return {"zero_cost": zero_cost(quick, log), "with_network": with_network(quick, log),
            "whole_calls_basic": whole_calls_basic(quick, log), "whole_calls": whole_calls(quick, log)}


def plot(result: dict, folder) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["zero_cost"] if "ratio" in r]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{tuple(r['shape'])}\n{r['solver']}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color=["C0" if r["ratio"] <= 1 else "C3" for r in rows])
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=5, rotation=90)
    ax.set_ylabel("sdegen / k-diffusion time per step")
    ax.set_title("Per-step overhead with a zero-cost model (lower is better)")
    fig.tight_layout()
    path = folder / "overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
