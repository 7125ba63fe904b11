"""Score adapters: turn a network's parametrisation into a score ``∇ log p_t(x)`` and back.

For an affine SDE with kernel ``x_t = m x_0 + s ε`` (``m = m(t)``, ``s = s(t)``), the
parametrisations a network may predict are related by (``docs/concepts.md``):

* noise ``ε``:            ``score = −ε / s``
* data / denoiser ``x̂0``: ``score = (m x̂0 − x) / s²``        (Tweedie: ``x̂0 = (x + s² score) / m``)
* velocity ``v = m ε − s x̂0`` (Salimans & Ho 2022, generalised to any ``m, s``):
  ``x̂0 = (m x − s v) / (m² + s²)``, ``ε = (s x + m v) / (m² + s²)``.

Every ``from_*`` adapter returns a :class:`ScoreModel`: a callable ``score(x, t, **kwargs)`` that
forwards extra keyword arguments (class labels, embeddings) to the network. Every ``*_from_score``
function is the exact inverse, so round trips are identities up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._utils import as_batch_time, bcast

if TYPE_CHECKING:
    from .sde import LinearSDE

__all__ = [
    "ScoreModel",
    "Thresholding",
    "ThresholdedModel",
    "thresholded",
    "PerSampleModel",
    "DenoisingModel",
    "implements",
    "from_score",
    "from_epsilon",
    "from_denoiser",
    "from_velocity",
    "epsilon_from_score",
    "denoiser_from_score",
    "velocity_from_score",
    "score_from_epsilon",
    "score_from_denoiser",
    "score_from_velocity",
]

Network = Callable[..., Tensor]


def _kernel(sde: LinearSDE, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    if not hasattr(sde, "marginal"):
        raise TypeError(f"parametrisation adapters need an affine SDE with marginal(t); got {type(sde).__name__}")
    m, s = sde.marginal(as_batch_time(t, x))
    return bcast(m.to(x.dtype), x), bcast(s.to(x.dtype), x)


# -- pointwise conversions (exact inverses of one another) --------------------------------------
def score_from_epsilon(sde: LinearSDE, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``score = −ε / s(t)``."""
    _, s = _kernel(sde, x, t)
    return -eps / s


def epsilon_from_score(sde: LinearSDE, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """``ε = −s(t) · score``."""
    _, s = _kernel(sde, x, t)
    return -s * score


def score_from_denoiser(sde: LinearSDE, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """``score = (m x̂0 − x) / s²``."""
    m, s = _kernel(sde, x, t)
    return (m * x0 - x) / s**2


def denoiser_from_score(sde: LinearSDE, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """Tweedie's formula ``x̂0 = E[x_0 | x_t] = (x + s² score) / m``."""
    m, s = _kernel(sde, x, t)
    return (x + s**2 * score) / m


def score_from_velocity(sde: LinearSDE, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """``score = −ε / s`` with ``ε = (s x + m v) / (m² + s²)``."""
    m, s = _kernel(sde, x, t)
    return -(s * x + m * v) / ((m**2 + s**2) * s)


def velocity_from_score(sde: LinearSDE, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """``v = m ε − s x̂0`` computed from the score."""
    m, s = _kernel(sde, x, t)
    eps = -s * score
    x0 = (x + s**2 * score) / m
    return m * eps - s * x0


@runtime_checkable
class PerSampleModel(Protocol):
    """A score model holding per-sample parameters (e.g. a ``(batch,)`` guidance weight).

    sdegen evaluates models on subsets of the batch — ``max_batch`` chunks, adaptive solvers dropping
    finished samples, distributed shards — and restricts such a model with ``for_samples`` so that sample
    ``i`` keeps its own parameters. :class:`~sdegen.guidance.ClassifierFreeGuidance` and
    :class:`~sdegen.guidance.ClassifierGuidance` implement it; implement it on your own wrapper if it holds
    per-sample tensors.
    """

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor: ...

    def for_samples(self, index: slice | Tensor, batch: int) -> Callable[..., Tensor]:
        """The model restricted to the samples at ``index`` of a ``batch`` of the full size."""
        ...


@runtime_checkable
class DenoisingModel(Protocol):
    """A score model that also gives its data prediction ``x̂0 = E[x_0 | x_t]`` from the same network call.

    Exponential integrators work with ``x̂0`` (:meth:`sdegen.ReverseSDE.denoise`). Recovering it from the
    score by Tweedie's formula ``(x + s² score)/m`` divides by ``m(t)``, which vanishes where the signal
    is gone (``t = 1`` on a flow-matching path); a model predicting ``x̂0``, ``ε`` or a velocity knows
    ``x̂0`` without that division. :class:`ScoreModel` implements this protocol.

    A model may also define ``denoise(x, t, **kwargs) -> x̂0`` (the data prediction alone, optional): solvers
    that use only ``x̂0`` (DDIM, DPM-Solver++, UniPC, ...) then skip computing the score.
    """

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor: ...

    def predict(self, x: Tensor, t: Tensor, **kwargs) -> tuple[Tensor, Tensor | None]:
        """``(score, x̂0)``, both shaped like ``x``, from one network evaluation (``x̂0`` None: unknown, use
        Tweedie's formula)."""
        ...


def implements(obj: object, protocol: type) -> bool:
    """``isinstance(obj, protocol)`` for the method-only protocols of this module, without the cost of
    ``typing``'s runtime check (about 20 µs a call; this runs once per equation and chunk)."""
    return all(callable(getattr(obj, name, None)) for name in _PROTOCOL_METHODS[protocol])


_PROTOCOL_METHODS = {PerSampleModel: ("for_samples",), DenoisingModel: ("predict",)}


# -- x̂0 thresholding ---------------------------------------------------------------------------------
THRESHOLDING_MODES = ("clip", "dynamic")


class Thresholding:
    """Post-processing of the data prediction ``x̂0``: static clipping or dynamic thresholding.

    Saharia et al. (2022), *Photorealistic Text-to-Image Diffusion Models with Deep Language
    Understanding* (Imagen), §2.3: at every step the prediction ``x̂0`` of pixel data in ``[−1, 1]`` is

    * ``mode="clip"``: clamped to ``[−clip_range, clip_range]`` (DDPM's "static thresholding"; diffusers'
      ``clip_sample=True``, ``clip_sample_range``);
    * ``mode="dynamic"``: per sample, ``q`` = the ``ratio``-quantile of ``|x̂0|`` over all its entries,
      ``q ← clamp(q, 1, max_value)``, and ``x̂0 ← clamp(x̂0, −q, q)/q`` (diffusers' ``thresholding=True``,
      ``dynamic_thresholding_ratio``, ``sample_max_value``). With ``q`` clamped at 1 it is clipping to
      ``[−1, 1]``; each sample is thresholded on its own (no batch coupling).

    It is not for latent-space models (their latents are not bounded). Apply it with
    ``ScoreModel(..., thresholding=...)`` or :func:`thresholded`: the model's score is then made consistent
    with the processed ``x̂0`` (Tweedie's ``score = (m x̂0 − x)/s²``), so every solver — data-prediction
    (``ddim``, ``dpmpp_*``, ``unipc``, ...) or score-based (``euler_maruyama``, ``heun``, ``rk45``) — sees one
    thresholded model.

    Args:
        mode: ``"clip"`` or ``"dynamic"``.
        clip_range: half-width of the clipping interval (``"clip"``; default 1).
        ratio: quantile of ``|x̂0|`` (``"dynamic"``; default 0.995, in ``(0, 1]``).
        max_value: largest threshold ``q`` (``"dynamic"``; default 1, ``≥ 1``).
    """

    def __init__(self, mode: str = "dynamic", *, clip_range: float = 1.0, ratio: float = 0.995, max_value: float = 1.0):
        if mode not in THRESHOLDING_MODES:
            raise ValueError(f"thresholding mode must be one of {THRESHOLDING_MODES}, got {mode!r}")
        for name, v in (("clip_range", clip_range), ("ratio", ratio), ("max_value", max_value)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise TypeError(f"thresholding {name} must be a finite number, got {v!r}")
        if clip_range <= 0:
            raise ValueError(f"thresholding clip_range must be > 0, got {clip_range}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"thresholding ratio must lie in (0, 1], got {ratio}")
        if max_value < 1.0:
            raise ValueError(f"thresholding max_value must be >= 1, got {max_value}")
        self.mode = mode
        self.clip_range = float(clip_range)
        self.ratio = float(ratio)
        self.max_value = float(max_value)

    def __call__(self, x0: Tensor) -> Tensor:
        """The processed ``x̂0`` ``(batch, *dims)``, same dtype."""
        if self.mode == "clip":
            return x0.clamp(-self.clip_range, self.clip_range)
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64
        q = torch.quantile(flat.abs(), self.ratio, dim=1).clamp(1.0, self.max_value)[:, None]
        out = torch.maximum(torch.minimum(flat, q), -q) / q
        return out.reshape(x0.shape).to(dtype)

    def __repr__(self) -> str:
        if self.mode == "clip":
            return f"Thresholding('clip', clip_range={self.clip_range})"
        return f"Thresholding('dynamic', ratio={self.ratio}, max_value={self.max_value})"


def _check_thresholding(thresholding: Any) -> Thresholding | None:
    if thresholding is not None and not isinstance(thresholding, Thresholding):
        raise TypeError(
            f"thresholding must be a sdegen.models.Thresholding or None, got {type(thresholding).__name__}: "
            "e.g. Thresholding('clip') or Thresholding('dynamic', ratio=0.995)"
        )
    return thresholding


# -- adapters -----------------------------------------------------------------------------------
class ScoreModel:
    """A network wrapped as a score function ``score(x, t, **kwargs) -> ∇ log p_t(x)``.

    Args:
        network: called as ``network(x, t, **kwargs)`` with ``t`` of shape ``(batch,)``.
        sde: the affine SDE whose kernel converts the prediction (unused for ``"score"``).
        parametrisation: ``"score"``, ``"epsilon"``, ``"denoiser"`` or ``"velocity"``.
        time_input: optional map from continuous ``t`` to the network's time input
            (e.g. ``lambda t: 999 * t`` for a DDPM-indexed network); default: ``t`` itself.
        thresholding: a :class:`Thresholding` applied to ``x̂0`` at every evaluation, with the score made
            consistent with it (needs ``sde``); default None.
    """

    _CONVERT = {
        "score": None,
        "epsilon": score_from_epsilon,
        "denoiser": score_from_denoiser,
        "velocity": score_from_velocity,
    }

    def __init__(
        self,
        network: Network,
        sde: LinearSDE | None = None,
        parametrisation: str = "score",
        *,
        time_input: Callable[[Tensor], Tensor] | None = None,
        thresholding: Thresholding | None = None,
    ):
        if not callable(network):
            raise TypeError("network must be callable as network(x, t)")
        if parametrisation not in self._CONVERT:
            raise ValueError(f"parametrisation must be one of {sorted(self._CONVERT)}, got {parametrisation!r}")
        if parametrisation != "score" and sde is None:
            raise ValueError(f"parametrisation {parametrisation!r} needs the sde to convert to a score")
        self.thresholding = _check_thresholding(thresholding)
        if self.thresholding is not None and sde is None:
            raise ValueError(
                "thresholding needs the sde (the kernel m, s of Tweedie's formula): ScoreModel(net, sde, ...)"
            )
        self.network = network
        self.sde = sde
        self.parametrisation = parametrisation
        self.time_input = time_input

    def prediction(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        """The raw network output in its own parametrisation."""
        tb = as_batch_time(t, x)
        t_in = self.time_input(tb) if self.time_input is not None else tb
        return self.network(x, t_in, **kwargs)

    def _output(self, x: Tensor, t: Tensor, kwargs: dict) -> Tensor:
        out = self.prediction(x, t, **kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"network returned {got} for an input of shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        if self.thresholding is not None:
            return self.predict(x, t, **kwargs)[0]
        out = self._output(x, t, kwargs)
        convert = self._CONVERT[self.parametrisation]
        return out if convert is None else convert(self.sde, x, t, out)

    def predict(self, x: Tensor, t: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(score, x̂0)`` from one network call (see :class:`DenoisingModel`).

        ``x̂0`` comes from the network's own parametrisation — directly for ``"denoiser"``,
        ``(m x − s v)/(m² + s²)`` for ``"velocity"``, ``(x − s ε)/m`` for ``"epsilon"`` — and by Tweedie's
        formula only for a ``"score"`` network (which needs ``sde``). With ``thresholding`` the processed
        ``x̂0`` is returned and the score is Tweedie-consistent with it.
        """
        out = self._output(x, t, kwargs)
        x0 = self._data_prediction(x, t, out)
        if self.thresholding is not None:
            x0 = self.thresholding(x0)
            return score_from_denoiser(self.sde, x, t, x0), x0
        convert = self._CONVERT[self.parametrisation]
        return (out if convert is None else convert(self.sde, x, t, out)), x0

    def denoise(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        """``x̂0`` alone (:meth:`predict` without the score), from one network call."""
        x0 = self._data_prediction(x, t, self._output(x, t, kwargs))
        return x0 if self.thresholding is None else self.thresholding(x0)

    def linear_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
        """``(P, Q, U, V)`` with ``score = P x + Q out`` and ``x̂0 = U x + V out`` for the raw network output
        ``out`` at times ``t`` (any shape; each coefficient has that shape): every parametrisation is linear in
        ``(x, out)``. ``U = V = None`` when ``x̂0 = out`` (a denoiser). None when the conversion is not linear
        (``thresholding``) or there is no affine ``sde``.

        :class:`~sdegen.ReverseSDE` folds these into one fused update per step on a fixed grid, computed once
        per grid: the conversion then costs no extra pass over ``x``.
        """
        if self.thresholding is not None or self.sde is None or not hasattr(self.sde, "marginal"):
            return None
        m, s = self.sde.marginal(t)
        p = self.parametrisation
        if p == "score":
            return torch.zeros_like(m), torch.ones_like(m), 1.0 / m, s * s / m
        if p == "denoiser":
            return -1.0 / (s * s), m / (s * s), None, None
        if p == "epsilon":
            return torch.zeros_like(m), -1.0 / s, 1.0 / m, -s / m
        d = m * m + s * s  # velocity: x̂0 = (m x − s v)/d, score = −(s x + m v)/(d s)
        return -1.0 / d, -m / (d * s), m / d, -s / d

    def _data_prediction(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        p = self.parametrisation
        if p == "denoiser":
            return out
        if p == "score":
            if self.sde is None:
                raise ValueError("a score network needs the sde for its data prediction: ScoreModel(net, sde)")
            return denoiser_from_score(self.sde, x, t, out)
        m, s = _kernel(self.sde, x, t)
        if p == "velocity":
            return (m * x - s * out) / (m**2 + s**2)
        return (x - s * out) / m  # epsilon

    def __repr__(self) -> str:
        thr = "" if self.thresholding is None else f", thresholding={self.thresholding!r}"
        return f"ScoreModel({self.parametrisation}, sde={self.sde!r}{thr})"


class ThresholdedModel:
    """Any score model with :class:`Thresholding` applied to its data prediction (see :func:`thresholded`).

    ``predict(x, t)`` returns ``(score, x̂0)`` with ``x̂0`` processed and the score Tweedie-consistent with it;
    ``x̂0`` comes from the inner model's own ``predict`` when it is a :class:`DenoisingModel`, else from
    Tweedie's formula on its score. Per-sample parameters of the inner model follow ``for_samples``.
    """

    def __init__(self, model: Callable[..., Tensor], sde: LinearSDE, thresholding: Thresholding):
        if not callable(model):
            raise TypeError("model must be a score function model(x, t, **kwargs)")
        if not hasattr(sde, "marginal"):
            raise TypeError(f"thresholding needs an affine SDE with marginal(t); got {type(sde).__name__}")
        if _check_thresholding(thresholding) is None:
            raise TypeError("thresholding must be a sdegen.models.Thresholding, got None")
        self.model, self.sde, self.thresholding = model, sde, thresholding

    def predict(self, x: Tensor, t: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        x0 = self.denoise(x, t, **kwargs)
        return score_from_denoiser(self.sde, x, t, x0), x0

    def denoise(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        """The processed ``x̂0`` alone (one network call): the inner model's own ``x̂0`` where it has one, else
        Tweedie's formula on its score."""
        denoise = getattr(self.model, "denoise", None)
        if callable(denoise):
            x0 = denoise(x, t, **kwargs)
        elif implements(self.model, DenoisingModel):
            score, x0 = self.model.predict(x, t, **kwargs)
            if x0 is None:
                x0 = denoiser_from_score(self.sde, x, t, score)
        else:
            x0 = denoiser_from_score(self.sde, x, t, self.model(x, t, **kwargs))
        return self.thresholding(x0)

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        return self.predict(x, t, **kwargs)[0]

    def for_samples(self, index: Any, batch: int) -> ThresholdedModel:
        """This model restricted to the samples at ``index`` of a ``batch`` (the inner model's, if per-sample)."""
        if implements(self.model, PerSampleModel):
            return ThresholdedModel(self.model.for_samples(index, batch), self.sde, self.thresholding)
        return self

    def __repr__(self) -> str:
        return f"ThresholdedModel({self.model!r}, {self.thresholding!r})"


def thresholded(model: Callable[..., Tensor], sde: LinearSDE, thresholding: Thresholding) -> ThresholdedModel:
    """``model`` with its ``x̂0`` clipped or dynamically thresholded (:class:`Thresholding`), score made consistent.

    The explicit form for any score model — a plain score function, guidance, a k-diffusion denoiser::

        guided = thresholded(classifier_free(score, w=7.5, uncond=0), sde, Thresholding("dynamic"))

    (Thresholding the *guided* ``x̂0``, as diffusers' pipelines do, differs from thresholding each branch
    before guidance; a ``ScoreModel(..., thresholding=...)`` inside ``classifier_free`` does the latter.)
    """
    return ThresholdedModel(model, sde, thresholding)


def from_score(network: Network, **kw) -> ScoreModel:
    """A network that already predicts the score."""
    return ScoreModel(network, None, "score", **kw)


def from_epsilon(network: Network, sde: LinearSDE, **kw) -> ScoreModel:
    """A noise-prediction network ``ε̂(x, t)`` (DDPM): ``score = −ε̂ / s(t)``."""
    return ScoreModel(network, sde, "epsilon", **kw)


def from_denoiser(network: Network, sde: LinearSDE, **kw) -> ScoreModel:
    """A data-prediction network ``x̂0(x, t)``: ``score = (m x̂0 − x) / s²``."""
    return ScoreModel(network, sde, "denoiser", **kw)


def from_velocity(network: Network, sde: LinearSDE, **kw) -> ScoreModel:
    """A velocity-prediction network ``v̂ = m ε − s x̂0`` (Salimans & Ho 2022)."""
    return ScoreModel(network, sde, "velocity", **kw)


# -- third-party models and guidance (thin re-exports; the optional packages are never imported here) ---
def from_diffusers(model, scheduler, **kw):
    """``(sde, score)`` for a ``diffusers`` model and its DDPM-style or flow-matching (``FlowMatch*``) scheduler.

    See :func:`sdegen.integrations.diffusers.from_diffusers`.
    """
    from .integrations.diffusers import from_diffusers as impl

    return impl(model, scheduler, **kw)


def from_k_diffusion(denoiser, **kw):
    """``(sde, score)`` on ``EDMSDE`` for a k-diffusion/EDM denoiser ``D(x, σ)``.

    See :func:`sdegen.integrations.kdiffusion.from_k_diffusion`.
    """
    from .integrations.kdiffusion import from_k_diffusion as impl

    return impl(denoiser, **kw)


def edm_precondition(raw_net, sigma_data: float = 0.5):
    """EDM preconditioning ``D = c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022, Table 1).

    See :func:`sdegen.integrations.kdiffusion.edm_precondition`.
    """
    from .integrations.kdiffusion import edm_precondition as impl

    return impl(raw_net, sigma_data)


def classifier_free(model, w, **kw):
    """Classifier-free guidance ``s_u + w (s_c − s_u)`` in one batched call.

    See :func:`sdegen.guidance.classifier_free`.
    """
    from .guidance import classifier_free as impl

    return impl(model, w, **kw)


def classifier_guidance(score, log_prob_y, scale=1.0, **kw):
    """Classifier guidance ``score + scale ∇ log p_t(y | x)``.

    See :func:`sdegen.guidance.classifier_guidance`.
    """
    from .guidance import classifier_guidance as impl

    return impl(score, log_prob_y, scale, **kw)


__all__ += ["from_diffusers", "from_k_diffusion", "edm_precondition", "classifier_free", "classifier_guidance"]


# -- flow-matching velocity models (sdegen.interpolant) -------------------------------------------------
# The flow-matching velocity v = ṁ x0 + ṡ ε (for an interpolant SDE ṁ = α̇, ṡ = σ̇; rectified flow:
# v = ε − x0) is the probability-flow drift. It is NOT Salimans & Ho's v = m ε − s x0 of from_velocity.
def _rates(sde: LinearSDE, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .interpolant import kernel_rates

    if not hasattr(sde, "marginal"):
        raise TypeError(f"flow adapters need an affine SDE with marginal(t); got {type(sde).__name__}")
    rates = kernel_rates(sde, as_batch_time(t, x))
    return tuple(bcast(r.to(x.dtype), x) for r in rates)  # type: ignore[return-value]


def _flow_split(sde: LinearSDE, x: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x̂0, ε̂, s)`` from a flow velocity: solve ``x = m x̂0 + s ε̂``, ``v = ṁ x̂0 + ṡ ε̂``."""
    m, s, dm, ds = _rates(sde, x, t)
    det = m * ds - dm * s  # = m² d(s/m)/dt > 0; 1 for rectified flow, π/2 for the cosine path
    return (ds * x - s * v) / det, (m * v - dm * x) / det, s


def score_from_flow(sde: LinearSDE, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """``score = −ε̂/s`` from a flow-matching velocity ``v = ṁ x̂0 + ṡ ε̂`` (``ε̂ = (m v − ṁ x)/(m ṡ − ṁ s)``)."""
    _, eps, s = _flow_split(sde, x, t, v)
    return -eps / s


def flow_from_score(sde: LinearSDE, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """The flow-matching velocity ``v = ṁ x̂0 + ṡ ε̂`` from the score (Tweedie's ``x̂0``, ``ε̂ = −s · score``).

    This is the probability-flow drift ``a x − ½ g² score`` of the SDE, written in the kernel's rates.
    """
    m, s, dm, ds = _rates(sde, x, t)
    return dm * (x + s**2 * score) / m - ds * s * score


class FlowModel(ScoreModel):
    """A flow-matching network ``v̂(x, t) ≈ E[ṁ x_0 + ṡ ε | x_t]`` as a score model (:func:`from_flow`).

    For an interpolant SDE (:mod:`sdegen.interpolant`) ``ṁ = α̇``, ``ṡ = σ̇``: the velocity of Lipman et al.
    (2023) and Liu et al. (2023) — for rectified flow ``v = ε − x_0``. With ``det = m ṡ − ṁ s``::

        x̂0 = (ṡ x − s v̂)/det,      ε̂ = (m v̂ − ṁ x)/det,      score = −ε̂/s,

    so ``x̂0`` (and the probability-flow drift, which equals ``v̂``) stay finite where ``m = 0`` (``t = 1``).
    :meth:`predict` gives ``(score, x̂0)`` from one network call, so exponential integrators and the
    velocity-form drift of :class:`~sdegen.ReverseSDE` use the network's own prediction.
    """

    _CONVERT = {**ScoreModel._CONVERT, "flow": score_from_flow}

    def __init__(self, network: Network, sde: LinearSDE, *, time_input: Callable[[Tensor], Tensor] | None = None):
        if sde is None or not hasattr(sde, "marginal"):
            raise TypeError(f"from_flow needs an affine SDE (e.g. sdegen.FlowMatchingSDE()), got {sde!r}")
        super().__init__(network, sde, "flow", time_input=time_input)

    def predict(self, x: Tensor, t: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(score, x̂0)`` from one network call: ``x̂0 = (ṡ x − s v̂)/(m ṡ − ṁ s)``, ``score = −ε̂/s``."""
        v = self._output(x, t, kwargs)
        x0, eps, s = _flow_split(self.sde, x, t, v)
        return -eps / s, x0

    def linear_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(P, Q, U, V)`` of :meth:`ScoreModel.linear_coefficients` for a velocity: with ``det = m ṡ − ṁ s``,
        ``score = (ṁ x − m v)/(s det)`` and ``x̂0 = (ṡ x − s v)/det``."""
        from .interpolant import kernel_rates

        m, s, dm, ds = kernel_rates(self.sde, t)
        det = m * ds - dm * s
        return dm / (s * det), -m / (s * det), ds / det, -s / det

    def denoise(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        """``x̂0`` alone (one network call)."""
        v = self._output(x, t, kwargs)
        m, s, dm, ds = _rates(self.sde, x, t)
        return (ds * x - s * v) / (m * ds - dm * s)

    def __repr__(self) -> str:
        return f"FlowModel(sde={self.sde!r})"


def from_flow(network: Network, sde: LinearSDE, **kw) -> FlowModel:
    """A flow-matching velocity network ``v̂ = α̇ x̂0 + σ̇ ε̂`` (rectified flow: ``ε − x0``) as a score model.

    The convention of flow matching / rectified flow (Stable Diffusion 3, Flux, SiT, Meta's ``flow_matching``,
    ``torchcfm`` — in sdegen's time, where ``t = 1`` is noise): the network predicts the time derivative of the
    path ``x_t = α x0 + σ ε``, which is the probability-flow drift. Not to be confused with
    :func:`from_velocity`, Salimans & Ho's ``v = m ε − s x0`` (diffusers' ``v_prediction``). Libraries whose
    time runs the other way (Meta's ``flow_matching``: ``t = 0`` noise) predict ``−v`` at ``1 − t``.

    Args:
        network: ``network(x, t, **kwargs) -> v̂`` shaped like ``x``.
        sde: the path, e.g. :class:`sdegen.FlowMatchingSDE` (any :class:`~sdegen.LinearSDE` works: then ``v``
            means ``ṁ x0 + ṡ ε`` of its kernel).
        time_input: optional map from ``t`` to the network's time input (e.g. ``lambda t: 1000 * t``).
    """
    return FlowModel(network, sde, **kw)


__all__ += ["FlowModel", "from_flow", "score_from_flow", "flow_from_score"]
