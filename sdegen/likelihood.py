"""Exact log-likelihood through the instantaneous change of variables, in nats and bits/dim.

Along the probability-flow ODE ``dx/dt = F(x, t) = f(x, t) − ½ g(t)² ∇log p_t(x)`` (Song et al.
2021, eq. 13), the density obeys ``d log p_t(x(t)) / dt = −∇·F(x(t), t)`` (Chen et al. 2018,
"Neural ODEs", Thm. 1). Integrating the augmented state ``[x, Δ]`` with ``dΔ/dt = ∇·F`` from
``t_min`` up to ``T`` gives (Song et al. 2021, eq. 39 / App. D.2)::

    log p_{t_min}(x) = log p_T(x(T)) + ∫_{t_min}^{T} ∇·F(x(t), t) dt

The divergence is computed *exactly* (``trace="exact"``: ``D`` vector–Jacobian products, batched
and chunked, :func:`sdegen.divergence.divergence_exact`) or estimated with Hutchinson's estimator
(``trace="hutchinson"``: ``E[εᵀ (∂F/∂x) ε]`` with ``probes`` Rademacher or Gaussian vectors drawn
once per solve and held fixed along the path, Grathwohl et al. 2019, "FFJORD", eq. 7).

The ODE is integrated under ``torch.no_grad``; gradients are taken only inside each divergence
evaluation and never kept across steps, so memory does not grow with the number of steps.
Defaults follow Song et al. (2021), App. D.2: ``t_min = 1e-5``, ``rtol = atol = 1e-5``, RK45.

See ``docs/likelihood.md`` for the derivations, including the bits/dim conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._batching import batch_noise, chunk_kwargs, chunk_noise, chunks
from ._utils import time_dtype
from .divergence import divergence_exact, divergence_hutchinson
from .errors import MaxStepsExceeded, NonFiniteError
from .noise import NoiseSource, normal_like, rademacher_like
from .reverse import ReverseSDE, ScoreFn
from .sde import SDE
from .solvers.rk45 import check_tolerances, equation_field, rms_norm, solve_ivp_per_sample

__all__ = [
    "log_likelihood",
    "bits_per_dim",
    "dequantization_offset",
    "encode",
    "decode",
    "LikelihoodInfo",
]

TRACES = ("exact", "hutchinson")
PROBE_NOISES = ("rademacher", "gaussian")
# torchdiffeq methods with adaptive steps: they accept ``step_t`` (so no step crosses the end time)
_TORCHDIFFEQ_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass
class LikelihoodInfo:
    """Diagnostics of a likelihood / encode / decode solve (chunks merged).

    Attributes:
        nfe: batched evaluations of the probability-flow drift (score-network calls), summed over
            ``max_batch`` chunks. With ``trace="exact"`` each evaluation also costs
            ``ceil(D / chunk_size)`` batched backward passes; with Hutchinson one.
        accepted, rejected: steps over all samples (``"rk45"``; None for torchdiffeq backends).
        steps_per_sample: ``(batch,)`` accepted steps of each sample (``"rk45"``), else None.
        latent: the probability-flow latent ``x(T)`` ``(batch, *dims)`` (for bits/dim: of the last draw).
        prior_logp: ``log p_T(x(T))`` ``(batch,)`` nats (None for encode/decode).
        delta_logp: ``∫ ∇·F dt`` ``(batch,)`` nats (None for encode/decode).
        solver: the solver used.
        bpd_draws: ``(repeats, batch)`` bits/dim of each dequantisation draw (bits_per_dim only).
    """

    nfe: int
    accepted: int | None
    rejected: int | None
    steps_per_sample: Tensor | None
    latent: Tensor
    prior_logp: Tensor | None
    delta_logp: Tensor | None
    solver: str
    bpd_draws: Tensor | None = None


# -- validation -------------------------------------------------------------------------------------
def _check_x(x: Any, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape (batch, *dims), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 2 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (batch, *dims) with batch >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")


def _check_solver(solver: Any) -> str:
    if not isinstance(solver, str):
        raise TypeError(f"solver must be 'rk45' or 'torchdiffeq:<method>', got {type(solver).__name__}")
    if solver == "rk45":
        return solver
    if solver.startswith("torchdiffeq:"):
        method = solver.split(":", 1)[1]
        try:
            from torchdiffeq._impl.odeint import SOLVERS
        except ImportError as err:  # pragma: no cover - torchdiffeq is an optional extra
            raise ImportError("solver='torchdiffeq:...' needs torchdiffeq (pip install torchdiffeq)") from err
        if method not in SOLVERS:
            raise ValueError(f"unknown torchdiffeq method {method!r}; available: {', '.join(sorted(SOLVERS))}")
        return solver
    raise ValueError(f"solver must be 'rk45' or 'torchdiffeq:<method>', got {solver!r}")


def _interval(sde: SDE, t_min: float, t_max: float | None) -> tuple[float, float]:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    hi = sde.T if t_max is None else t_max
    for name, v in (("t_min", t_min), ("t_max", hi)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
    if not 0 < t_min < hi <= sde.T * (1 + 1e-12):
        raise ValueError(f"need 0 < t_min < t_max <= T={sde.T}, got t_min={t_min}, t_max={hi}")
    return float(t_min), float(hi)


# -- the ODE solve ------------------------------------------------------------------------------------
def _ode_solve(
    func: Callable[..., Tensor],
    y0: Tensor | tuple[Tensor, ...],
    t0: float,
    t1: float,
    *,
    solver: str,
    rtol: float,
    atol: float,
    args: tuple[Tensor, ...],
    norm: Callable[[Tensor], Tensor] | None,
    solver_options: dict[str, Any],
    split: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Integrate ``dy/dt = func(y, t, *args)`` from ``t0`` to ``t1``; return ``y(t1)`` and stats.

    ``t`` reaches ``func`` as a ``(n,)`` tensor inside ``[min(t0,t1), max(t0,t1)]``. ``split`` (the
    number of state columns before the log-density column) makes torchdiffeq see a tuple state so its
    mixed norm controls both parts, as the rk45 ``norm`` does.
    """
    y = y0
    tdt = time_dtype(y.dtype)
    if solver == "rk45":
        times = torch.tensor([t0, t1], dtype=tdt, device=y.device)
        states, stats = solve_ivp_per_sample(
            func, y, times, rtol=rtol, atol=atol, args=args, norm=norm, **solver_options
        )
        return states[-1], stats

    import torchdiffeq

    method = solver.split(":", 1)[1]
    lo, hi = min(t0, t1), max(t0, t1)
    n = y.shape[0]

    def tfunc(t: Tensor, state):
        tb = t.to(torch.float64).clamp(lo, hi).to(tdt).expand(n)  # never evaluate outside [lo, hi]
        full = torch.cat(state, 1) if split is not None else state
        out = func(full, tb, *args)
        return (out[:, :split], out[:, split:]) if split is not None else out

    opts = dict(solver_options)
    if method in _TORCHDIFFEQ_ADAPTIVE and "step_t" not in opts:
        opts["step_t"] = torch.tensor([t1], dtype=torch.float64, device=y.device)
    state0 = (y[:, :split], y[:, split:]) if split is not None else y
    nfe0 = _CallCounter(tfunc)
    try:
        out = torchdiffeq.odeint(
            nfe0, state0, torch.tensor([t0, t1], dtype=torch.float64, device=y.device),
            rtol=rtol, atol=atol, method=method, options=opts,
        )
    except AssertionError as err:  # torchdiffeq signals failures with assertions
        msg = str(err)
        if "max_num_steps" in msg:
            raise MaxStepsExceeded(f"solver {solver!r}: {msg}") from err
        raise NonFiniteError(f"solver {solver!r} failed: {msg}") from err
    end = torch.cat([o[-1] for o in out], 1) if split is not None else out[-1]
    if not torch.isfinite(end).all():
        raise NonFiniteError(f"solver {solver!r}: the solution became NaN/Inf between t={t0:.6g} and t={t1:.6g}")
    return end, {"nfe": nfe0.calls}


class _CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.fn(t, y)


def _mixed_norm(split: int) -> Callable[[Tensor], Tensor]:
    """``max(RMS over the state, |Δ error|)``: the log-density column is held to the tolerance too."""

    def norm(e: Tensor) -> Tensor:
        return torch.maximum(rms_norm(e[:, :split]), e[:, split].abs())

    return norm


def _ll_chunk(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    noise: NoiseSource,
    *,
    trace: str,
    probes: int,
    noise_kind: str,
    solver: str,
    rtol: float,
    atol: float,
    t0: float,
    t1: float,
    prior: Callable[[Tensor], Tensor],
    model_kwargs: dict,
    chunk_size: int | None,
    solver_options: dict,
) -> tuple[Tensor, LikelihoodInfo]:
    """Log-likelihood of one chunk (no validation)."""
    eq = ReverseSDE(sde, score, 0.0, model_kwargs=model_kwargs)
    batch, dims = x.shape[0], tuple(x.shape[1:])
    d = math.prod(dims)
    with torch.no_grad():
        x = x.detach()
        eps = None
        if trace == "hutchinson":
            template = x.new_empty((batch, probes, *dims))  # batch first: per-sample noise keys on dim 0
            eps = rademacher_like(noise, template) if noise_kind == "rademacher" else normal_like(noise, template)
        field, kw_args = equation_field(eq, batch)
        n_probe_args = 0 if eps is None else 1

        def augmented(y: Tensor, t: Tensor, *a: Tensor) -> Tensor:
            n = y.shape[0]
            xs = y[:, :d].reshape(n, *dims)
            kw = a[n_probe_args:]

            def fn(z: Tensor) -> Tensor:
                return field(z, t, *kw)

            if eps is None:
                box: list[Tensor] = []

                def capture(z: Tensor) -> Tensor:
                    out = fn(z)
                    box.append(out)
                    return out

                div = divergence_exact(capture, xs, chunk_size=chunk_size)
                fx = box[0].detach()
                box.clear()
            else:
                div, fx = divergence_hutchinson(fn, xs, a[0].transpose(0, 1))
            return torch.cat([fx.reshape(n, d), div.reshape(n, 1).to(fx.dtype)], dim=1)

        y0 = torch.cat([x.reshape(batch, d), x.new_zeros(batch, 1)], dim=1)
        args = ((eps,) if eps is not None else ()) + kw_args
        y_end, stats = _ode_solve(
            augmented, y0, t0, t1, solver=solver, rtol=rtol, atol=atol, args=args,
            norm=_mixed_norm(d), solver_options=solver_options, split=d,
        )
        latent = y_end[:, :d].reshape(x.shape)
        delta = y_end[:, d]
        prior_logp = prior(latent)
        if not isinstance(prior_logp, Tensor) or prior_logp.shape != (batch,):
            raise ValueError(f"prior_log_prob must return a tensor of shape (batch,)={(batch,)}")
        ll = prior_logp.to(delta.dtype) + delta
    return ll, _info(eq.nfe, stats, latent, prior_logp, delta, solver)


def _info(nfe, stats, latent, prior_logp, delta, solver) -> LikelihoodInfo:
    return LikelihoodInfo(
        nfe=nfe, accepted=stats.get("accepted"), rejected=stats.get("rejected"),
        steps_per_sample=stats.get("steps_per_sample"), latent=latent, prior_logp=prior_logp,
        delta_logp=delta, solver=solver,
    )


def _merge(infos: list[LikelihoodInfo]) -> LikelihoodInfo:
    if len(infos) == 1:
        return infos[0]

    def cat(name):
        vals = [getattr(i, name) for i in infos]
        return None if any(v is None for v in vals) else torch.cat(vals, dim=-1 if name == "bpd_draws" else 0)

    def total(name):
        vals = [getattr(i, name) for i in infos]
        return None if any(v is None for v in vals) else sum(vals)

    return LikelihoodInfo(
        nfe=sum(i.nfe for i in infos), accepted=total("accepted"), rejected=total("rejected"),
        steps_per_sample=cat("steps_per_sample"), latent=cat("latent"), prior_logp=cat("prior_logp"),
        delta_logp=cat("delta_logp"), solver=infos[0].solver, bpd_draws=cat("bpd_draws"),
    )


def _common(sde, score, x, trace, probes, noise, solver, rtol, atol, t_min, t_max, prior_log_prob,
            model_kwargs, chunk_size, solver_options):
    _check_x(x)
    if not callable(score):
        raise TypeError("score must be a callable score(x, t)")
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if noise not in PROBE_NOISES:
        raise ValueError(f"noise must be one of {PROBE_NOISES}, got {noise!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    solver = _check_solver(solver)
    check_tolerances(rtol, atol)
    t0, t1 = _interval(sde, t_min, t_max)
    if prior_log_prob is None:
        if not hasattr(sde, "prior_log_prob"):
            raise ValueError(f"{type(sde).__name__} has no prior: pass prior_log_prob=")
        prior_log_prob = sde.prior_log_prob
    elif not callable(prior_log_prob):
        raise TypeError("prior_log_prob must be a callable z -> (batch,) log-density")
    if solver_options is not None and not isinstance(solver_options, dict):
        raise TypeError("solver_options must be a dict or None")
    return dict(
        trace=trace, probes=probes, noise_kind=noise, solver=solver, rtol=float(rtol), atol=float(atol),
        t0=t0, t1=t1, prior=prior_log_prob, chunk_size=chunk_size, solver_options=dict(solver_options or {}),
    ), dict(model_kwargs or {})


# -- public API ---------------------------------------------------------------------------------------
def log_likelihood(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    *,
    trace: str = "exact",
    probes: int = 1,
    noise: str = "rademacher",
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float = 1e-5,
    t_max: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    solver_options: dict[str, Any] | None = None,
    return_latent: bool = False,
    return_info: bool = False,
) -> Tensor | tuple:
    """``log p_{t_min}(x)`` per sample, in nats, by the probability-flow ODE.

    Integrates ``[x, Δ]`` with ``dx/dt = F(x, t)`` (the probability-flow drift of ``sde`` under
    ``score``) and ``dΔ/dt = ∇·F`` from ``t_min`` to ``t_max`` and returns
    ``prior_log_prob(x(t_max)) + Δ(t_max)`` (Song et al. 2021, eq. 39).

    Args:
        sde: the forward SDE (any :class:`~sdegen.SDE`; without ``prior_log_prob`` it needs a prior).
        score: ``score(x, t) -> ∇ log p_t(x)``; must be differentiable in ``x`` (autograd).
        x: data ``(batch, *dims)``, finite, floating point (float64 for tight checks).
        trace: ``"exact"`` (``D`` batched vector–Jacobian products per evaluation, chunked by
            ``chunk_size``; no variance) or ``"hutchinson"`` (one batched VJP with ``probes`` probes).
        probes: Hutchinson probes per sample (``>= 1``), averaged; drawn once per solve.
        noise: probe distribution, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        solver: ``"rk45"`` (sdegen's per-sample Dormand–Prince: each sample has its own steps, so its
            value does not depend on its batch-mates) or ``"torchdiffeq:<method>"`` (one step size for
            the batch; adaptive methods get ``step_t=[t_max]`` so no step crosses ``t_max``, and the time
            passed to the model is clamped to ``[t_min, t_max]`` because torchdiffeq's initial-step
            heuristic may probe beyond it).
        rtol, atol: ODE tolerances (default 1e-5 each, Song et al. 2021). The log-density column is
            controlled too: the error norm is ``max(RMS over x, |error of Δ|)``.
        t_min: start time (default 1e-5, as Song et al. 2021 for likelihoods); ``0 < t_min < t_max``.
        t_max: end time (default ``sde.T``).
        prior_log_prob: ``z -> log p(z)`` ``(batch,)`` nats at ``t_max`` (default ``sde.prior_log_prob``);
            pass the exact ``p_T`` to isolate the solver error.
        generator, seed, sample_ids: source of the Hutchinson probes (see :func:`sdegen.noise.make_noise`);
            with ``seed=`` each sample's probes depend only on ``(seed, sample_id)``.
        max_batch: solve at most this many samples at once. With ``trace="exact"`` or ``seed=`` the
            result equals the unchunked one; with ``generator=`` the probes differ.
        model_kwargs: keyword arguments for ``score`` (tensors with a leading batch dimension follow
            the chunks and the active set).
        chunk_size: basis vectors per batched VJP of the exact trace (memory bound).
        solver_options: extra options: for ``"rk45"`` ``first_step``, ``max_steps``, ``safety``; for
            torchdiffeq its ``options`` dict (e.g. ``{"step_size": 0.01}`` for fixed-grid methods).
        return_latent: also return the latent ``x(t_max)``.
        return_info: also return a :class:`LikelihoodInfo` (NFE, steps, latent, prior and Δ terms).

    Returns:
        ``ll`` ``(batch,)`` in nats (dtype of ``x``), then ``latent`` if ``return_latent``, then
        ``info`` if ``return_info`` (a tuple when either is set).
    """
    opts, model_kwargs = _common(sde, score, x, trace, probes, noise, solver, rtol, atol, t_min, t_max,
                                 prior_log_prob, model_kwargs, chunk_size, solver_options)
    src = batch_noise(generator, seed, sample_ids, x.shape[0], x.device)
    batch = x.shape[0]
    lls, infos = [], []
    for sl in chunks(batch, max_batch):
        ll, info = _ll_chunk(sde, score, x[sl], chunk_noise(src, sl, batch),
                             model_kwargs=chunk_kwargs(model_kwargs, batch, sl), **opts)
        lls.append(ll)
        infos.append(info)
    ll = torch.cat(lls)
    info = _merge(infos)
    out: tuple = (ll,)
    if return_latent:
        out += (info.latent,)
    if return_info:
        out += (info,)
    return out if len(out) > 1 else ll


def dequantization_offset(n_bins: int, data_range: Sequence[float] = (-1.0, 1.0)) -> float:
    """Bits/dim added to ``−log p / (D ln 2)`` for data on an ``n_bins`` grid scaled to ``[a, b]``.

    ``log2(n_bins) − log2(b − a)``: 7 for 8-bit data on ``[-1, 1]``, 8 on ``[0, 1]`` (derivation in
    :func:`bits_per_dim`).
    """
    a, b = _check_range(data_range)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    return math.log2(n_bins) - math.log2(b - a)


def _check_range(data_range) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (a, b), got {data_range!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(f"data_range must be finite with a < b, got {data_range!r}")
    return a, b


def bits_per_dim(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    *,
    n_bins: int = 256,
    data_range: Sequence[float] = (-1.0, 1.0),
    dequantize: bool = True,
    repeats: int = 1,
    trace: str = "exact",
    probes: int = 1,
    noise: str = "rademacher",
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float = 1e-5,
    t_max: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sample_ids: Tensor | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    solver_options: dict[str, Any] | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Bits per dimension of discrete data under the model, with uniform dequantisation.

    **Conventions.** ``x`` holds discrete data already scaled to ``data_range = (a, b)``: level
    ``k ∈ {0, …, n_bins−1}`` is stored as ``x = a + (b − a) k / (n_bins − 1)`` — the usual ``k / 255``
    (``[0, 1]``) or ``2k / 255 − 1`` (``[-1, 1]``) for 8-bit images, ``n_bins = 17`` for
    scikit-learn's digits. Values off this grid (e.g. a wrong ``data_range``) raise ``ValueError``.
    Each level is dequantised to ``v = k + u``, ``u ~ U[0, 1)^D`` (the ``(255 x + u) / 256`` rule for
    ``[0, 1]`` data), and mapped back to the data scale, ``y = a + (b − a) v / n_bins ∈ [a, b)^D``,
    where the model density ``p = p_{t_min}`` is evaluated.

    **Derivation.** The discrete model is ``P(k) = ∫_{[0,1)^D} q(k + u) du`` with ``q`` the model
    density in ``v`` space. The change of variables ``y = a + (b − a) v / n`` gives
    ``q(v) = p(y) · ((b − a)/n)^D``, and Jensen's inequality gives
    ``log P(k) ≥ E_u[log p(y)] + D log((b − a)/n)`` (Theis et al. 2016, "A note on the evaluation
    of generative models", §3.1; Ho et al. 2019, "Flow++", §3.1). Hence the bound, in bits/dim::

        bpd(k) = −log2 P(k) / D ≤ E_u[−log p(y)] / (D ln 2) + log2(n) − log2(b − a)

    The offset ``log2(n) − log2(b − a)`` (:func:`dequantization_offset`) is 7 for ``n = 256`` on
    ``[-1, 1]`` and 8 on ``[0, 1]``; it is derived here for any ``n`` and range instead of being
    hard-coded (score_sde's ``7 − inverse_scaler(−1)``).

    **Repeats.** ``repeats`` independent draws of ``u``; the result is the *mean of the per-draw
    bits/dim* (i.e. the average of log-likelihoods, an unbiased estimate of the bound above), not
    the bits/dim of the averaged likelihood (a log-mean-exp, tighter but biased). All draws are in
    ``info.bpd_draws``. ``dequantize=False`` evaluates at the bin centres (``u = 1/2``): a
    deterministic midpoint approximation, *not* a bound.

    Args:
        x: ``(batch, *dims)`` discrete data scaled to ``data_range``.
        n_bins: number of discrete levels per dimension (256 for 8-bit data).
        data_range: ``(a, b)`` the data were scaled to.
        dequantize: draw ``u ~ U[0, 1)`` (True) or use ``u = 1/2``.
        repeats: dequantisation draws averaged (``>= 1``).
        generator, seed, sample_ids: source of the dequantisation noise and Hutchinson probes; per
            chunk and repeat, ``u`` is drawn before the probes. ``seed=`` makes each sample's result
            independent of the batch and of ``max_batch``.
        other arguments: as :func:`log_likelihood`.

    Returns:
        ``(batch,)`` bits/dim (mean over draws), and a :class:`LikelihoodInfo` with ``return_info``.
    """
    opts, model_kwargs = _common(sde, score, x, trace, probes, noise, solver, rtol, atol, t_min, t_max,
                                 prior_log_prob, model_kwargs, chunk_size, solver_options)
    offset = dequantization_offset(n_bins, data_range)
    a, b = _check_range(data_range)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    level = (x.to(torch.float64) - a) / (b - a) * (n_bins - 1)
    k = level.round()
    if (level - k).abs().max() > 1e-3 or k.min() < 0 or k.max() > n_bins - 1:
        raise ValueError(
            f"x is not on the grid a + (b - a) k / (n_bins - 1), k in 0..{n_bins - 1}, with data_range={data_range} "
            f"and n_bins={n_bins}: check data_range and n_bins (data must be scaled, not dequantised)"
        )
    src = batch_noise(generator, seed, sample_ids, x.shape[0], x.device)
    batch, d = x.shape[0], math.prod(x.shape[1:])
    bpds, infos = [], []
    for sl in chunks(batch, max_batch):
        part_noise = chunk_noise(src, sl, batch)
        draws, chunk_infos = [], []
        for _ in range(repeats):
            kk = k[sl]
            u = part_noise.uniform(tuple(kk.shape), device=x.device, dtype=torch.float64) if dequantize else 0.5
            y = (a + (b - a) * (kk + u) / n_bins).to(x.dtype)
            ll, info = _ll_chunk(sde, score, y, part_noise, model_kwargs=chunk_kwargs(model_kwargs, batch, sl),
                                 **opts)
            draws.append(-ll / (d * math.log(2.0)) + offset)
            chunk_infos.append(info)
        draws_t = torch.stack(draws)
        info = chunk_infos[-1]
        info.nfe = sum(i.nfe for i in chunk_infos)
        info.accepted = None if info.accepted is None else sum(i.accepted for i in chunk_infos)
        info.rejected = None if info.rejected is None else sum(i.rejected for i in chunk_infos)
        info.bpd_draws = draws_t
        bpds.append(draws_t.mean(0))
        infos.append(info)
    bpd = torch.cat(bpds)
    return (bpd, _merge(infos)) if return_info else bpd


def _flow(sde, score, x, t0, t1, *, solver, rtol, atol, max_batch, model_kwargs, solver_options, return_info,
          name="x"):
    """Integrate the probability-flow ODE from ``t0`` to ``t1`` (either direction)."""
    _check_x(x, name)
    if not callable(score):
        raise TypeError("score must be a callable score(x, t)")
    solver = _check_solver(solver)
    check_tolerances(rtol, atol)
    if solver_options is not None and not isinstance(solver_options, dict):
        raise TypeError("solver_options must be a dict or None")
    model_kwargs = dict(model_kwargs or {})
    batch = x.shape[0]
    outs, infos = [], []
    for sl in chunks(batch, max_batch):
        eq = ReverseSDE(sde, score, 0.0, model_kwargs=chunk_kwargs(model_kwargs, batch, sl))
        func, args = equation_field(eq, sl.stop - sl.start)
        with torch.no_grad():
            end, stats = _ode_solve(func, x[sl].detach(), t0, t1, solver=solver, rtol=float(rtol), atol=float(atol),
                                    args=args, norm=None, solver_options=dict(solver_options or {}))
        outs.append(end)
        infos.append(_info(eq.nfe, stats, end, None, None, solver))
    out = torch.cat(outs)
    return (out, _merge(infos)) if return_info else out


def encode(
    sde: SDE,
    score: ScoreFn,
    x: Tensor,
    *,
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float = 1e-5,
    t_max: float | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Probability-flow latent: integrate ``dx/dt = F(x, t)`` from ``t_min`` up to ``t_max`` (default ``T``).

    ``x`` ``(batch, *dims)`` data at ``t_min``; returns ``x(t_max)`` of the same shape (and info).
    Options as :func:`log_likelihood`; :func:`decode` is its inverse up to the ODE tolerance.
    """
    t0, t1 = _interval(sde, t_min, t_max)
    return _flow(sde, score, x, t0, t1, solver=solver, rtol=rtol, atol=atol, max_batch=max_batch,
                 model_kwargs=model_kwargs, solver_options=solver_options, return_info=return_info)


def decode(
    sde: SDE,
    score: ScoreFn,
    z: Tensor,
    *,
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_min: float = 1e-5,
    t_max: float | None = None,
    max_batch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    solver_options: dict[str, Any] | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Data from a probability-flow latent: integrate from ``t_max`` (default ``T``) down to ``t_min``.

    The same computation as ``reverse_sample(sde, score, x_T=z, solver="rk45", noise_scale=0,
    t_min=t_min)`` with these tolerances; the inverse of :func:`encode`.
    """
    t0, t1 = _interval(sde, t_min, t_max)
    return _flow(sde, score, z, t1, t0, solver=solver, rtol=rtol, atol=atol, max_batch=max_batch,
                 model_kwargs=model_kwargs, solver_options=solver_options, return_info=return_info, name="z")
