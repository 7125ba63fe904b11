"""diffusers' flow-matching models (Stable Diffusion 3, Flux, ...) as sdegen score models.

``from_diffusers(model, FlowMatchEulerDiscreteScheduler(...))`` dispatches here and returns ``(sde, score)``:

* ``sde`` is a :class:`DiffusersFlowSDE`, the rectified-flow path ``x_t = (1 − t) x_0 + t ε``
  (:class:`~sdegen.FlowMatchingSDE`) in diffusers' own time: the scheduler's ``sigma`` *is* ``t``, and its
  timesteps are ``timestep = σ · num_train_timesteps``, so ``sde.timesteps_to_times(ts) = ts / N``. It records
  the scheduler's ``shift`` (or, with ``use_dynamic_shifting``, the ``mu`` you give), so
  ``make_grid("shift", sde, steps)`` is the scheduler's spacing — for any solver;
* ``score`` is :func:`sdegen.from_flow` around the network, which predicts the velocity ``v = ε − x_0``
  (what ``FlowMatchEulerDiscreteScheduler.step`` integrates: ``x + (σ_next − σ) v``).

With the scheduler's own timesteps, sdegen's ``euler_maruyama`` (``noise_scale=0``) and ``heun`` reproduce
``FlowMatchEulerDiscreteScheduler`` and ``FlowMatchHeunDiscreteScheduler``: their last step, an Euler step to
``σ = 0``, is ``x − σ v = x̂0``, i.e. ``final_step="tweedie"`` (``tests/test_flow_diffusers.py`` checks the
full loops to float64 rounding). This module never imports ``diffusers``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from ..interpolant import FlowMatchingSDE
from ..models import FlowModel
from .diffusers import _config

__all__ = ["from_diffusers_flow", "is_flow_scheduler", "DiffusersFlowSDE", "DiffusersFlowNetwork"]


def is_flow_scheduler(scheduler: Any) -> bool:
    """True for diffusers' flow-matching schedulers (``FlowMatch*``, or ``prediction_type="flow_prediction"``)."""
    return type(scheduler).__name__.startswith("FlowMatch") or (
        _config(scheduler, "prediction_type", None) == "flow_prediction"
    )


class DiffusersFlowSDE(FlowMatchingSDE):
    """The rectified-flow path with diffusers' timestep convention and the scheduler's time shift.

    Args:
        num_train_timesteps: ``N``: ``timestep = σ · N`` and ``σ = t``.
        shift: the time shift of the scheduler's grid (``σ' = shift σ/(1 + (shift − 1)σ)``), or None (dynamic
            shifting without a ``mu``: give ``shift=``/``mu=`` to :func:`~sdegen.grids.make_grid`).
        t_min: smallest sampling time (default: the scheduler's smallest training ``sigma``).
        dynamic: the scheduler's ``use_dynamic_shifting``, ``base_shift``, ``max_shift``,
            ``base_image_seq_len``, ``max_image_seq_len`` and ``time_shift_type`` (for :meth:`shift_for`).
    """

    def __init__(self, num_train_timesteps: int, *, shift: float | None, t_min: float, dynamic: dict | None = None):
        super().__init__(t_min=t_min)
        self.name = "DiffusersFlowSDE"
        self.num_timesteps = int(num_train_timesteps)
        self.shift = shift
        self.dynamic = dict(dynamic or {})

    def timesteps_to_times(self, timesteps: Tensor) -> Tensor:
        """diffusers timesteps ``σ · N`` → times ``t = σ`` (float64)."""
        return torch.as_tensor(timesteps).detach().to(torch.float64) / self.num_timesteps

    def times_to_timesteps(self, t: Tensor) -> Tensor:
        """Times → the network's (fractional) timestep ``N t``, in ``t``'s dtype."""
        return t * self.num_timesteps

    def shift_for(self, *, mu: float | None = None, image_seq_len: int | None = None) -> float:
        """The shift of the scheduler's dynamic shifting for ``mu`` (or the ``mu`` of ``image_seq_len`` tokens).

        ``time_shift_type="exponential"`` (Flux): ``e^mu``; ``"linear"``: ``mu``.
        """
        from ..grids import dynamic_shift

        if (mu is None) == (image_seq_len is None):
            raise ValueError("give exactly one of mu= and image_seq_len=")
        if mu is None:
            d = self.dynamic
            mu = dynamic_shift(
                int(image_seq_len),
                base_seq_len=d.get("base_image_seq_len", 256),
                max_seq_len=d.get("max_image_seq_len", 4096),
                base_shift=d.get("base_shift", 0.5),
                max_shift=d.get("max_shift", 1.15),
            )
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu):
            raise TypeError(f"mu must be a finite number, got {mu!r}")
        return float(mu) if self.dynamic.get("time_shift_type", "exponential") == "linear" else math.exp(mu)

    def __repr__(self) -> str:
        return f"DiffusersFlowSDE(N={self.num_timesteps}, shift={self.shift}, t_min={self.t_min:.6g})"


def _takes_keywords(model: Any) -> bool:
    """Transformers (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) take ``hidden_states=``, ``timestep=``."""
    fn = getattr(model, "forward", model)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "hidden_states" in params and "timestep" in params


class DiffusersFlowNetwork:
    """``network(x, timestep, **kwargs) -> v̂`` around a diffusers flow model.

    Transformers are called as ``model(hidden_states=x, timestep=timestep, **kwargs)`` (their second positional
    argument is the text embedding), other models as ``model(x, timestep, **kwargs)``; the output is unwrapped
    (``.sample``, first tuple element, or the tensor).
    """

    def __init__(self, model: Any):
        if not callable(model):
            raise TypeError("model must be callable as model(hidden_states, timestep)")
        self.model = model
        self.keywords = _takes_keywords(model)

    def __call__(self, x: Tensor, timestep: Tensor, **kwargs: Any) -> Tensor:
        from .diffusers import _output_tensor

        if self.keywords:
            return _output_tensor(self.model(hidden_states=x, timestep=timestep, **kwargs))
        return _output_tensor(self.model(x, timestep, **kwargs))

    def __repr__(self) -> str:
        return f"DiffusersFlowNetwork({type(self.model).__name__})"


def from_diffusers_flow(
    model: Any,
    scheduler: Any,
    *,
    t_min: float | None = None,
    mu: float | None = None,
    image_seq_len: int | None = None,
    timestep_scale: float | None = None,
    prediction_type: str | None = None,
) -> tuple[DiffusersFlowSDE, FlowModel]:
    """``(sde, score)`` for a diffusers flow-matching model and its ``FlowMatch*`` scheduler.

    Args:
        model: a diffusers flow model (``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...) or any callable
            returning the velocity ``v = ε − x_0`` (``.sample``, a tuple or a tensor).
        scheduler: ``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler`` (or another scheduler
            with ``prediction_type="flow_prediction"``): ``num_train_timesteps`` and the shift come from it.
        t_min: smallest sampling time; default the scheduler's smallest training sigma.
        mu, image_seq_len: with ``use_dynamic_shifting`` (Flux), the ``mu`` of the sampling grid, or the number of
            latent tokens to compute it from (the scheduler's ``base_shift``/``max_shift`` line); sets
            ``sde.shift``. Without either ``sde.shift`` is None and grids need ``shift=``/``mu=``.
        timestep_scale: the network's time input is ``timestep_scale · t``; default ``num_train_timesteps``
            (diffusers' timesteps, as the SD3 pipeline passes them). The Flux pipeline passes ``σ`` itself
            (``timestep / 1000``): use ``timestep_scale=1``.
        prediction_type: None or ``"flow_prediction"`` (the only convention of these schedulers).

    Returns:
        ``(sde, score)``: a :class:`DiffusersFlowSDE` and a :class:`~sdegen.models.FlowModel`.

    Example::

        sde, score = from_diffusers(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))
        x = reverse_sample(sde, score, shape, solver="dpmpp_2m", times=make_grid("shift", sde, 28),
                           model_kwargs=dict(encoder_hidden_states=emb, pooled_projections=pooled))
    """
    if prediction_type not in (None, "flow_prediction"):
        raise ValueError(
            f"prediction_type={prediction_type!r}: flow-matching schedulers' models predict the velocity "
            "ε − x0 ('flow_prediction'); leave it unset"
        )
    if _config(scheduler, "invert_sigmas", False):
        raise ValueError("schedulers with invert_sigmas=True (Mochi) are not supported: their time runs backwards")
    n = int(_config(scheduler, "num_train_timesteps", 1000))
    dynamic_on = bool(_config(scheduler, "use_dynamic_shifting", False))
    dynamic = {
        key: _config(scheduler, key, default)
        for key, default in (
            ("base_shift", 0.5),
            ("max_shift", 1.15),
            ("base_image_seq_len", 256),
            ("max_image_seq_len", 4096),
            ("time_shift_type", "exponential"),
        )
    }
    dynamic["use_dynamic_shifting"] = dynamic_on
    shift = _config(scheduler, "shift", None)
    if shift is None:
        shift = _config(scheduler, "flow_shift", 1.0)
    shift = float(getattr(scheduler, "_shift", shift)) if not dynamic_on else None  # set_shift() changes it
    if t_min is None:
        t_min = float(getattr(scheduler, "sigma_min", 1.0 / n))
    sde = DiffusersFlowSDE(n, shift=shift, t_min=t_min, dynamic=dynamic)
    if mu is not None or image_seq_len is not None:
        if not dynamic_on:
            raise ValueError("mu= / image_seq_len= apply to schedulers with use_dynamic_shifting=True")
        sde.shift = sde.shift_for(mu=mu, image_seq_len=image_seq_len)
    if timestep_scale is None:
        time_input = sde.times_to_timesteps
    else:
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, int | float) or timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be a number > 0, got {timestep_scale!r}")
        scale = float(timestep_scale)

        def time_input(t: Tensor) -> Tensor:
            return t * scale

    return sde, FlowModel(DiffusersFlowNetwork(model), sde, time_input=time_input)
