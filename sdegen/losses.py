"""Training losses: denoising score matching for affine-drift SDEs.

The objective (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 7; Vincent 2011)
is ω-weighted denoising score matching, averaged uniformly over ``t ∈ [t_eps, T]``::

    J(θ; ω) = E_{t ~ U(t_eps, T)} E_{x0, z} [ ω(t) ‖ s_θ(x_t, t) − ∇ log p(x_t | x0) ‖² ],
    x_t = m(t) x0 + s(t) z,    ∇ log p(x_t | x0) = −z / s(t),

with ``‖·‖²`` summed over every non-batch dimension. Two weightings are provided:

* ``ω(t) = s(t)²`` (default) — the "ε-matching" weighting of DDPM (Ho et al. 2020, "L_simple") and
  score_sde (``reduce_mean=False``): for an ε-network it is exactly ``‖ε̂ − z‖²``.
* ``ω(t) = g(t)²`` (``likelihood_weighting=True``) — Song, Durkan, Murray & Ermon 2021, "Maximum
  likelihood training of score-based diffusion models", Thm 1: ``½ ∫ ω E‖s_θ − ∇log p_t‖² dt``
  with ``ω = g²`` bounds ``KL(p_0 ‖ p_θ)`` up to ``KL(p_T ‖ π)``, so
  ``(T − t_eps)/2 · J(θ; g²)`` is (up to a θ-independent constant) the negative ELBO in nats.

**Every parametrisation optimises the same J**; only the network head differs. Writing
``w(t) = ω(t) / s(t)²`` (``1`` for the default weighting, ``g²/s²`` for likelihood weighting), the
regression actually computed, per sample, is:

| parametrisation | network predicts | regression target | weight on ``‖pred − target‖²`` |
|---|---|---|---|
| ``"epsilon"`` | ``ε̂(x_t, t)`` | ``z`` | ``w`` |
| ``"score"`` | ``ŝ(x_t, t)`` | ``−z / s`` | ``w · s²`` |
| ``"denoiser"`` | ``x̂0(x_t, t)`` | ``x0`` | ``w · m² / s²`` (``w · SNR``) |
| ``"velocity"`` | ``v̂ = m ε̂ − s x̂0`` | ``m z − s x0`` | ``w · m² / (m² + s²)²`` |
| ``"flow"`` | ``v̂ = ṁ x̂0 + ṡ ε̂`` | ``ṁ x0 + ṡ z`` | ``w · m² / (m ṡ − ṁ s)²`` |

(the conversions of :mod:`sdegen.models` turn each row into the first: ``ε̂ − z = m(x̂0 − x0)/s``,
``ε̂ − z = m (v̂ − v)/(m² + s²)`` and, for a flow-matching velocity (:func:`sdegen.from_flow`),
``ε̂ − z = m (v̂ − v)/(m ṡ − ṁ s)``). Consequently an exact model has the same loss in every
parametrisation, and the loss of a perfect model is not zero but the conditional-variance term
``E[w(t) tr Cov(z | x_t)]`` — the regression target is noisy.

**Likelihood weighting and importance sampling.** For any affine SDE ``g² = m² dσ²/dt`` with
``σ = s/m`` (differentiate ``s² = m² σ²`` and use ``d s²/dt = 2a s² + g²``), so
``w(t) = g²/s² = d log σ²(t)/dt = −d log-SNR/dt``: it blows up like ``1/t`` near ``t = 0`` for VP,
making the uniform-``t`` estimator very noisy. With ``importance_sampling=True`` times are drawn
with density ``∝ w(t)``, i.e. **uniformly in log-SNR** between ``t_eps`` and ``T`` (Song et al. 2021b,
§5), and the per-sample weight becomes the constant ``Z / (T − t_eps)``,
``Z = log-SNR(t_eps) − log-SNR(T)``: the same expectation ``J(θ; g²)``, much lower variance.

**Flow matching.** :func:`flow_matching_loss` is the conditional flow-matching objective (Lipman et al.
2023, eq. 9; Liu et al. 2023) ``E_t E ‖v̂(x_t, t) − (α̇ x0 + σ̇ z)‖²`` on an interpolant path
(:mod:`sdegen.interpolant`) — the ``"flow"`` row with the weight ``(m ṡ − ṁ s)²/m²`` instead of ``w`` —
with the time distributions used to train rectified flows: uniform, or logit-normal (Esser et al. 2024,
§3.1), optionally shifted (:func:`sdegen.grids.shift_time`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._utils import as_batch_time, bcast, flat_sum, time_dtype
from .models import ScoreModel
from .noise import make_noise

__all__ = ["dsm_loss", "flow_matching_loss", "PARAMETRISATIONS", "DEFAULT_TRAIN_T_MIN", "TIME_SAMPLING"]

PARAMETRISATIONS = ("epsilon", "score", "denoiser", "velocity", "flow")
DEFAULT_TRAIN_T_MIN = 1e-5
"""Smallest training time by default (score_sde's ``eps = 1e-5`` for every SDE), capped at ``sde.t_min``."""

_REDUCE = ("mean", "sum", "none")


def _check_args(sde, model, x0, parametrisation, reduce, t_min, t) -> tuple[str, Callable[..., Tensor], float]:
    from .sde import LinearSDE

    if not isinstance(sde, LinearSDE):
        raise TypeError(
            f"sde must be an affine sdegen.LinearSDE (VPSDE, VESDE, SubVPSDE, EDMSDE, ...) with a Gaussian "
            f"kernel, got {type(sde).__name__}"
        )
    if not callable(model):
        raise TypeError("model must be callable as model(x_t, t, **model_kwargs)")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {type(x0).__name__}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (batch, *dims) with batch >= 1, got {tuple(x0.shape)}")
    if isinstance(model, ScoreModel):
        if parametrisation is not None and parametrisation != model.parametrisation:
            raise ValueError(
                f"parametrisation={parametrisation!r} contradicts the ScoreModel's {model.parametrisation!r}"
            )
        parametrisation, net = model.parametrisation, model.prediction
    else:
        parametrisation = "epsilon" if parametrisation is None else parametrisation
        net = model
    if parametrisation not in PARAMETRISATIONS:
        raise ValueError(f"parametrisation must be one of {PARAMETRISATIONS}, got {parametrisation!r}")
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    if t_min is None:
        t_eps = min(DEFAULT_TRAIN_T_MIN, sde.t_min)
    else:
        if isinstance(t_min, bool) or not isinstance(t_min, int | float):
            raise TypeError(f"t_min must be a number, got {t_min!r}")
        t_eps = float(t_min)
        if not 0.0 < t_eps < sde.T:
            raise ValueError(f"t_min must lie in (0, T={sde.T}), got {t_min}")
    if t is not None:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a (batch,) tensor or None, got {type(t).__name__}")
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape (batch,)={(x0.shape[0],)}, got {tuple(t.shape)}")
    return parametrisation, net, t_eps


def _sample_times(sde, n, t_eps, importance, noise, device, dtype) -> tuple[Tensor, Tensor | None]:
    """Training times ``(n,)`` and, for importance sampling, the constant weight ``Z / (T − t_eps)``."""
    u = noise.uniform((n,), device=device, dtype=dtype)
    if not importance:
        return t_eps + u * (sde.T - t_eps), None
    ends = torch.tensor([t_eps, sde.T], device=device, dtype=torch.float64)
    lam = sde.log_snr(ends).to(torch.float64)  # decreasing: lam[0] > lam[1]
    log_snr = lam[0] + u.to(torch.float64) * (lam[1] - lam[0])
    t = sde.t_from_log_snr(log_snr).to(device=device, dtype=dtype).clamp(t_eps, sde.T)
    return t, ((lam[0] - lam[1]) / (sde.T - t_eps)).to(dtype)


def dsm_loss(
    sde,
    model: Callable[..., Tensor] | ScoreModel,
    x0: Tensor,
    *,
    parametrisation: str | None = None,
    likelihood_weighting: bool = False,
    importance_sampling: bool = False,
    t_min: float | None = None,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    reduce: str = "mean",
) -> Tensor:
    """Denoising score-matching loss ``J(θ; ω)`` of a network on a batch of data (see module docstring).

    Draws ``t ~ U(t_eps, T)`` (one time per sample), ``x_t = m x0 + s z`` with
    :meth:`~sdegen.LinearSDE.forward_sample`, calls ``model(x_t, t, **model_kwargs)`` and returns the
    weighted squared error of the table above, summed over the non-batch dimensions.

    Args:
        sde: an affine SDE (:class:`~sdegen.VPSDE`, :class:`~sdegen.VESDE`, :class:`~sdegen.SubVPSDE`,
            :class:`~sdegen.EDMSDE` or any :class:`~sdegen.LinearSDE`).
        model: the network, called as ``model(x_t, t, **model_kwargs)`` with ``x_t`` ``(batch, *dims)``
            and ``t`` ``(batch,)`` (float32, or float64 for float64 data); returns a tensor shaped like
            ``x_t`` in the given ``parametrisation``. A :class:`~sdegen.ScoreModel` is accepted too: its
            raw :meth:`~sdegen.ScoreModel.prediction` (with its ``time_input``) and its parametrisation
            are used, so the object you train is the object you sample with.
        x0: clean data ``(batch, *dims)``.
        parametrisation: ``"epsilon"`` (default for plain networks), ``"score"``, ``"denoiser"``,
            ``"velocity"`` (Salimans & Ho) or ``"flow"`` (a flow-matching velocity, :func:`sdegen.from_flow`).
        likelihood_weighting: use ``ω = g(t)²`` (maximum-likelihood weighting) instead of ``ω = s(t)²``.
        importance_sampling: with ``likelihood_weighting``, draw ``t`` uniformly in log-SNR instead of
            uniformly in ``t`` (same expected loss, lower variance). Requires ``likelihood_weighting``.
        t_min: ``t_eps``, the smallest training time; default ``min(1e-5, sde.t_min)`` (score_sde's
            training ``eps``). For :class:`~sdegen.EDMSDE`, where uniform ``t = σ`` is a poor training
            distribution, pass your own times with ``t=`` (e.g. EDM's log-normal σ).
        t: explicit training times ``(batch,)`` (overrides sampling; the weight is then ``ω(t)/s²``
            per the table, without any importance-sampling factor).
        generator: ``torch.Generator`` on ``x0``'s device for ``t`` and ``z``.
        model_kwargs: extra keyword arguments for the network (class labels, embeddings).
        reduce: ``"mean"`` (default) or ``"sum"`` over the batch, or ``"none"`` for the per-sample
            losses ``(batch,)``.

    Returns:
        A scalar tensor (or ``(batch,)`` with ``reduce="none"``) in ``x0``'s dtype, differentiable
        with respect to the model's parameters.

    Raises:
        TypeError: ``sde`` is not affine, ``model`` not callable, ``x0`` not a float tensor.
        ValueError: unknown ``parametrisation``/``reduce``, bad ``t_min``/``t`` shape, a model output of
            the wrong shape, or ``importance_sampling`` without ``likelihood_weighting``.
    """
    parametrisation, net, t_eps = _check_args(sde, model, x0, parametrisation, reduce, t_min, t)
    if importance_sampling and not likelihood_weighting:
        raise ValueError("importance_sampling=True needs likelihood_weighting=True (it samples t ∝ g²/s²)")
    if importance_sampling and t is not None:
        raise ValueError("give either explicit times t= or importance_sampling=True, not both")
    noise = make_noise(generator)
    tdt = time_dtype(x0.dtype)
    is_weight = None
    if t is None:
        t, is_weight = _sample_times(sde, x0.shape[0], t_eps, importance_sampling, noise, x0.device, tdt)
    else:
        t = as_batch_time(t, x0)
    xt, z = sde.forward_sample(x0, t, noise=noise, return_noise=True)
    m, s = sde.marginal(t)
    m, s = m.to(x0.dtype), s.to(x0.dtype)

    pred = net(xt, t, **(model_kwargs or {}))
    if not isinstance(pred, Tensor) or pred.shape != x0.shape:
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"model returned {got} for an input of shape {tuple(x0.shape)}")

    if parametrisation == "epsilon":
        target, c = z, torch.ones_like(s)
    elif parametrisation == "score":
        target, c = -z / bcast(s, z), s**2
    elif parametrisation == "denoiser":
        target, c = x0, (m / s) ** 2
    elif parametrisation == "velocity":
        target, c = bcast(m, z) * z - bcast(s, x0) * x0, (m / (m**2 + s**2)) ** 2
    else:  # flow: v = ṁ x0 + ṡ z (sdegen.from_flow)
        dm, ds = (r.to(x0.dtype) for r in _kernel_rates(sde, t)[2:])
        target, c = bcast(dm, x0) * x0 + bcast(ds, z) * z, (m / (m * ds - dm * s)) ** 2
    if likelihood_weighting:
        if is_weight is not None:
            w = is_weight.to(x0.dtype)
        else:
            g = sde.diffusion_coef(t).to(x0.dtype)
            w = (g / s) ** 2
        c = c * w
    per_sample = c * flat_sum((pred - target) ** 2)
    if reduce == "mean":
        return per_sample.mean()
    if reduce == "sum":
        return per_sample.sum()
    return per_sample


# -- conditional flow matching ------------------------------------------------------------------------------
TIME_SAMPLING = ("uniform", "logit_normal")


def _kernel_rates(sde, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .interpolant import kernel_rates

    return kernel_rates(sde, t)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def flow_matching_loss(
    sde,
    model: Callable[..., Tensor] | ScoreModel,
    x0: Tensor,
    *,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float | None = None,
    t_min: float | None = None,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    reduce: str = "mean",
) -> Tensor:
    """Conditional flow matching: ``‖v̂(x_t, t) − (α̇ x0 + σ̇ z)‖²`` with ``x_t = α x0 + σ z`` (see module docstring).

    Draws one time per sample, ``z ~ N(0, I)``, calls ``model(x_t, t, **model_kwargs)`` and returns the squared
    error to the conditional velocity ``α̇(t) x0 + σ̇(t) z``, summed over the non-batch dimensions (for rectified
    flow, :class:`~sdegen.FlowMatchingSDE`, the target is ``z − x0``). Its minimiser over all functions is the
    marginal velocity ``E[α̇ x0 + σ̇ z | x_t]``, the probability-flow drift (Lipman et al. 2023, Thm. 2): what
    :func:`sdegen.from_flow` turns into a score for every solver and for the likelihood.

    Args:
        sde: the path: an :class:`~sdegen.interpolant.InterpolantSDE` (e.g. ``FlowMatchingSDE()``), or any
            affine :class:`~sdegen.LinearSDE` (its kernel's rates ``ṁ``, ``ṡ`` then define ``v``).
        model: ``model(x_t, t, **model_kwargs) -> v̂`` shaped like ``x_t`` (``t`` ``(batch,)``, float32 or float64
            for float64 data), or a :class:`~sdegen.models.FlowModel` (its raw prediction and ``time_input``).
        x0: clean data ``(batch, *dims)``.
        time_sampling: ``"uniform"`` — ``t ~ U(t_min, T)`` (rectified flow, Lipman et al.); ``"logit_normal"`` —
            ``t = T · sigmoid(logit_mean + logit_std · n)``, ``n ~ N(0, 1)`` (SD3's ``lognorm(0, 1)``; more
            weight on the middle of the path), clamped to ``[t_min, T]``.
        logit_mean, logit_std: the logit-normal's location and scale (``logit_std > 0``).
        shift: optional time shift applied to the sampled times, ``σ(t') = shift · σ(t)``
            (:func:`sdegen.grids.shift_time`; SD3 trains and samples high resolutions with ``shift = 3``).
        t_min: smallest training time; default 0 for interpolant SDEs (the velocity is finite at ``t = 0``)
            and ``min(1e-5, sde.t_min)`` otherwise.
        t: explicit times ``(batch,)`` instead of sampling (no shift is applied to them).
        generator: ``torch.Generator`` on ``x0``'s device for ``t`` and ``z``.
        model_kwargs: extra keyword arguments of the network (class labels, embeddings).
        reduce: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-sample losses ``(batch,)``).

    Returns:
        A scalar (or ``(batch,)``) tensor in ``x0``'s dtype, differentiable with respect to the model's parameters.
    """
    from .interpolant import InterpolantSDE
    from .models import FlowModel
    from .sde import LinearSDE

    if not isinstance(sde, LinearSDE):
        got = type(sde).__name__
        raise TypeError(f"sde must be an affine sdegen.LinearSDE (e.g. sdegen.FlowMatchingSDE()), got {got}")
    if isinstance(model, ScoreModel) and not isinstance(model, FlowModel):
        raise ValueError(
            f"model is a ScoreModel with parametrisation {model.parametrisation!r}; flow_matching_loss trains a "
            "flow-matching velocity: pass the network itself or sdegen.from_flow(network, sde) (or use dsm_loss)"
        )
    net = model.prediction if isinstance(model, FlowModel) else model
    if not callable(net):
        raise TypeError("model must be callable as model(x_t, t, **model_kwargs)")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {type(x0).__name__}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (batch, *dims) with batch >= 1, got {tuple(x0.shape)}")
    if time_sampling not in TIME_SAMPLING:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLING}, got {time_sampling!r}")
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    logit_mean, logit_std = _number("logit_mean", logit_mean), _number("logit_std", logit_std)
    if logit_std <= 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    if shift is not None and _number("shift", shift) <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if t_min is None:
        t_eps = 0.0 if isinstance(sde, InterpolantSDE) else min(DEFAULT_TRAIN_T_MIN, sde.t_min)
    else:
        t_eps = _number("t_min", t_min)
        if not 0.0 <= t_eps < sde.T:
            raise ValueError(f"t_min must lie in [0, T={sde.T}), got {t_min}")
    noise = make_noise(generator)
    n, tdt = x0.shape[0], time_dtype(x0.dtype)
    if t is None:
        if time_sampling == "uniform":
            t = t_eps + noise.uniform((n,), device=x0.device, dtype=tdt) * (sde.T - t_eps)
        else:
            logit = logit_mean + logit_std * noise.normal((n,), device=x0.device, dtype=tdt)
            t = (sde.T * torch.sigmoid(logit)).clamp(t_eps, sde.T)
        if shift is not None:
            from .grids import shift_time

            t = shift_time(t, float(shift), sde).to(device=x0.device, dtype=tdt).clamp(t_eps, sde.T)
    else:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a (batch,) tensor or None, got {type(t).__name__}")
        if t.shape != (n,):
            raise ValueError(f"t must have shape (batch,)={(n,)}, got {tuple(t.shape)}")
        t = as_batch_time(t, x0)
    m, s, dm, ds = (bcast(r.to(x0.dtype), x0) for r in _kernel_rates(sde, t))
    z = noise.normal(tuple(x0.shape), device=x0.device, dtype=x0.dtype)
    xt = m * x0 + s * z
    pred = net(xt, t, **(model_kwargs or {}))
    if not isinstance(pred, Tensor) or pred.shape != x0.shape:
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"model returned {got} for an input of shape {tuple(x0.shape)}")
    per_sample = flat_sum((pred - (dm * x0 + ds * z)) ** 2)
    if reduce == "mean":
        return per_sample.mean()
    if reduce == "sum":
        return per_sample.sum()
    return per_sample
