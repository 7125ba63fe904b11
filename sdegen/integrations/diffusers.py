"""``diffusers`` models as sdegen score models: ``from_diffusers(model, scheduler) -> (sde, score)``.

A ``diffusers`` UNet (or any model called as ``model(sample, timestep, **kwargs)`` returning an object
with ``.sample``, a tuple, or a tensor) trained on a discrete schedule ``ᾱ_0 … ᾱ_{N−1}`` becomes a
score on the matching :class:`~sdegen.discrete.DiscreteVPSDE`: timestep ``i`` sits at time
``t_i = (i + 1)/N`` (``sde.timesteps_to_times``), and ``m(t)² = ᾱ(t)``, ``s(t)² = 1 − ᾱ(t)``.

The prediction is converted with :mod:`sdegen.models` at the *continuous* time ``t`` of the state:
``epsilon`` → ``score = −ε̂/s``, ``v_prediction`` → velocity ``v = m ε − s x0`` (the diffusers
convention ``v = √ᾱ ε − √(1−ᾱ) x0``), ``sample`` → denoiser ``x̂0``. Conditioning keyword arguments
given to ``reverse_sample(model_kwargs=...)`` (``class_labels``, ``encoder_hidden_states``, ...) reach the
model unchanged. This module never imports ``diffusers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..discrete import DiscreteVPSDE
from ..models import ScoreModel, Thresholding

__all__ = ["from_diffusers", "DiffusersNetwork", "TIMESTEP_ROUNDING", "PREDICTION_TYPES", "scheduler_thresholding"]

TIMESTEP_ROUNDING = ("round", "interpolate", "continuous")
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "velocity", "sample": "denoiser"}


def _output_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, a tuple, or an object with .sample")


def _repeat_batch(value: Any, batch: int) -> Any:
    """Duplicate a conditioning kwarg along the batch (tensors whose first dimension is the batch)."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value])
    return value


class DiffusersNetwork:
    """``network(x, timestep, **kwargs) -> prediction`` around a diffusers-style model.

    Args:
        model: called as ``model(x, timestep, **kwargs)``; its output is unwrapped (``.sample``,
            first tuple element, or the tensor itself).
        num_timesteps: ``N``; fractional timesteps are clamped to ``[0, N − 1]``.
        rounding: see :func:`from_diffusers`.
        learned_variance: the model outputs ``2C`` channels (mean and variance, ``variance_type``
            ``"learned"``/``"learned_range"``): keep the first ``C`` (the prediction), as diffusers does.

    ``timestep`` is the fractional timestep ``N t − 1`` of shape ``(batch,)``.
    """

    def __init__(self, model: Any, num_timesteps: int, rounding: str = "round", *, learned_variance: bool = False):
        if not callable(model):
            raise TypeError("model must be callable as model(sample, timestep)")
        if rounding not in TIMESTEP_ROUNDING:
            raise ValueError(f"timestep_rounding must be one of {TIMESTEP_ROUNDING}, got {rounding!r}")
        self.model = model
        self.num_timesteps = int(num_timesteps)
        self.rounding = rounding
        self.learned_variance = bool(learned_variance)

    def _call(self, x: Tensor, timestep: Tensor, kwargs: dict) -> Tensor:
        out = _output_tensor(self.model(x, timestep, **kwargs))
        if self.learned_variance and out.ndim >= 2 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    def __call__(self, x: Tensor, timestep: Tensor, **kwargs: Any) -> Tensor:
        u = timestep.clamp(0.0, self.num_timesteps - 1)
        if self.rounding == "round":
            return self._call(x, torch.round(u).long(), kwargs)
        if self.rounding == "continuous":
            return self._call(x, u, kwargs)
        # "interpolate": one call on the doubled batch at floor(u) and floor(u) + 1, linear weights
        lo = torch.floor(u).clamp(max=self.num_timesteps - 2) if self.num_timesteps > 1 else torch.floor(u)
        w = (u - lo).to(x.dtype)
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        b = x.shape[0]
        both = self._call(
            torch.cat([x, x]),
            torch.cat([lo, hi]).long(),
            {k: _repeat_batch(v, b) for k, v in kwargs.items()},
        )
        w = w.reshape(b, *([1] * (x.ndim - 1)))
        return torch.lerp(both[:b], both[b:], w)

    def __repr__(self) -> str:
        return f"DiffusersNetwork({type(self.model).__name__}, N={self.num_timesteps}, rounding={self.rounding!r})"


def _schedule(scheduler: Any) -> dict[str, Tensor]:
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is not None:
        return {"alphas_cumprod": torch.as_tensor(acp).detach().to("cpu", torch.float64)}
    betas = getattr(scheduler, "betas", None)
    if betas is not None:
        return {"betas": torch.as_tensor(betas).detach().to("cpu", torch.float64)}
    raise TypeError(
        f"scheduler {type(scheduler).__name__} has neither alphas_cumprod nor betas; pass a DDPM-style "
        "diffusers scheduler (DDPMScheduler, DDIMScheduler, ...)"
    )


def _config(scheduler: Any, key: str, default: Any) -> Any:
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def scheduler_thresholding(scheduler: Any) -> Thresholding | None:
    """The ``x̂0`` post-processing a diffusers scheduler's config asks for, as a :class:`~sdegen.models.Thresholding`.

    ``thresholding=True`` → ``Thresholding("dynamic", ratio=dynamic_thresholding_ratio, max_value=sample_max_value)``
    (it takes precedence, as in diffusers); else ``clip_sample=True`` → ``Thresholding("clip",
    clip_range=clip_sample_range)``; else None. Keys a scheduler lacks count as False (diffusers' defaults:
    ``clip_sample=True`` for ``DDPMScheduler`` and ``DDIMScheduler``, ``thresholding=False`` everywhere).
    """
    if bool(_config(scheduler, "thresholding", False)):
        return Thresholding(
            "dynamic",
            ratio=float(_config(scheduler, "dynamic_thresholding_ratio", 0.995)),
            max_value=float(_config(scheduler, "sample_max_value", 1.0)),
        )
    if bool(_config(scheduler, "clip_sample", False)):
        return Thresholding("clip", clip_range=float(_config(scheduler, "clip_sample_range", 1.0)))
    return None


def from_diffusers(
    model: Any,
    scheduler: Any,
    *,
    timestep_rounding: str = "round",
    prediction_type: str | None = None,
    t_min: float | None = None,
    thresholding: str | Thresholding | None = "scheduler",
    **flow_options: Any,
) -> tuple[DiscreteVPSDE, ScoreModel]:
    """Wrap a ``diffusers`` model and its training scheduler into ``(sde, score)``.

    A flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``: Stable
    Diffusion 3, Flux) gives a rectified-flow ``(sde, score)`` instead: see
    :func:`sdegen.integrations.diffusers_flow.from_diffusers_flow` (its options ``mu``, ``image_seq_len``,
    ``timestep_scale`` go in ``**flow_options``).

    Args:
        model: a ``diffusers`` model (``UNet2DModel``, ``UNet2DConditionModel``, ...) or any callable
            ``model(sample, timestep, **kwargs)`` returning ``.sample``, a tuple or a tensor.
        scheduler: the DDPM-style scheduler it was trained with; ``scheduler.alphas_cumprod`` (or
            ``scheduler.betas``) gives the schedule and ``scheduler.config.prediction_type`` the
            parametrisation. Its inference settings (``timestep_spacing``, ``set_timesteps``) are
            irrelevant: sdegen builds its own time grid.
        timestep_rounding: how a continuous time ``t`` reaches the model, via the fractional
            timestep ``u = N t − 1`` clamped to ``[0, N − 1]``:

            * ``"round"`` (default): the nearest integer timestep, as an ``int64`` tensor — exactly
              what the network saw in training and what diffusers' schedulers pass. Piecewise
              constant in ``t`` (the conversion to a score still uses the exact ``m(t), s(t)``).
            * ``"interpolate"``: linear interpolation of the predictions at ``⌊u⌋`` and ``⌊u⌋ + 1``
              (one network call on a doubled batch; counts as one NFE, costs two). Continuous in
              ``t`` and valid for any timestep embedding (including learned lookup tables); equals
              ``"round"`` at the nodes ``t_i``. Prefer it for adaptive solvers and likelihoods.
            * ``"continuous"``: pass ``u`` itself as a float tensor. Smooth for sinusoidal/Fourier
              embeddings (diffusers' UNets), undefined for learned lookup tables.
        prediction_type: override ``scheduler.config.prediction_type`` (``"epsilon"``,
            ``"v_prediction"`` or ``"sample"``).
        t_min: smallest sampling time, default ``1/N`` (timestep 0).
        thresholding: ``"scheduler"`` (default): the scheduler's ``clip_sample`` / ``thresholding`` settings
            (:func:`scheduler_thresholding`), so that sampling matches diffusers' loop with that scheduler;
            None: no post-processing (the raw model: use it for likelihoods); or a
            :class:`~sdegen.models.Thresholding`.

    Returns:
        ``(sde, score)``: a :class:`~sdegen.discrete.DiscreteVPSDE` (``sde.timesteps_to_times(i) =
        (i + 1)/N``) and a :class:`~sdegen.models.ScoreModel` ``score(x, t, **kwargs)``.

    Example::

        sde, score = from_diffusers(unet, DDPMScheduler.from_pretrained(...))
        x = reverse_sample(sde, score, (4, 3, 32, 32), solver="ddim", steps=50, noise_scale=0.0,
                           final_step="tweedie")

    ``DDPMScheduler`` and ``DDIMScheduler`` default to ``clip_sample=True``: their ``x̂0`` is clipped to
    ``[−1, 1]`` and the returned score is consistent with the clipped ``x̂0``. That reproduces
    ``DDPMScheduler``, ``DPMSolverMultistepScheduler(thresholding=True)`` and ``UniPCMultistepScheduler``
    loops, and ``DDIMScheduler.step(..., use_clipped_model_output=True)``; diffusers' DDIM default
    (``use_clipped_model_output=False``) combines the clipped ``x̂0`` with the *unclipped* ``ε̂``, which is not
    one model's prediction (``docs/models.md``).
    """
    from .diffusers_flow import from_diffusers_flow, is_flow_scheduler

    if is_flow_scheduler(scheduler):  # a velocity model on a flow-matching path (diffusers_flow.py)
        if timestep_rounding != "round":
            raise ValueError("timestep_rounding applies to DDPM-style schedulers; flow models take float timesteps")
        return from_diffusers_flow(model, scheduler, t_min=t_min, prediction_type=prediction_type, **flow_options)
    if flow_options:
        raise TypeError(f"from_diffusers() got unexpected options {sorted(flow_options)} (for flow schedulers only)")
    if prediction_type is None:
        prediction_type = _config(scheduler, "prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {prediction_type!r}")
    if isinstance(thresholding, str):
        if thresholding != "scheduler":
            raise ValueError(f"thresholding must be 'scheduler', None or a Thresholding, got {thresholding!r}")
        thresholding = scheduler_thresholding(scheduler)
    sde = DiscreteVPSDE(**_schedule(scheduler), t_min=t_min)
    learned = _config(scheduler, "variance_type", None) in ("learned", "learned_range")
    network = DiffusersNetwork(model, sde.num_timesteps, timestep_rounding, learned_variance=learned)
    score = ScoreModel(
        network, sde, PREDICTION_TYPES[prediction_type], time_input=sde.times_to_timesteps, thresholding=thresholding
    )
    return sde, score
