"""Guidance: classifier-free (Ho & Salimans 2022) and classifier (Dhariwal & Nichol 2021) guided scores.

Both return an ordinary score function ``score(x, t, **kwargs)``, so every solver, ``reverse_sample``
and ``log_likelihood`` accept them; conditioning reaches them through ``model_kwargs=`` (e.g.
``reverse_sample(..., model_kwargs={"class_labels": y})``).

**Classifier-free guidance.** With ``s_c = ∇ log p_t(x | c)`` and ``s_u = ∇ log p_t(x)``::

    s_w = s_u + w (s_c − s_u)                                            (this module's ``w``)

``w`` is diffusers' ``guidance_scale``: ``w = 0`` unconditional, ``w = 1`` conditional, ``w > 1``
guided. Ho & Salimans (2022, eq. 6) write ``(1 + w̃) ε_c − w̃ ε_u``: their ``w̃ = w − 1``. Because
ε, x̂0 and v are affine in the score with the same coefficients for both terms (at the same ``x, t``),
the combination is identical whichever parametrisation it is applied to. The conditional and
unconditional evaluations run as **one** network call on a doubled batch, so a guided evaluation
counts as one NFE (``ReverseSDE`` counts score calls) while costing twice the compute.

**Classifier guidance.** ``s(x, t) + scale · ∇_x log p_t(y | x)`` with the gradient taken by autograd
through the user's ``log_prob_y(x, t, **kwargs)`` on a detached copy of ``x`` (a local graph: nothing
flows into the solver's state) — unless ``x`` itself carries a graph, as inside the likelihood's
divergence, where the gradient is built with ``create_graph=True`` so that ``∇·`` sees the guidance
term. ``scale = 1`` with the exact ``p_t(y | x)`` is the exact conditional score ``∇ log p_t(x | y)``;
larger scales sharpen. Not usable under ``torch.inference_mode()`` (autograd is needed);
``torch.no_grad()`` is fine.

**Likelihoods.** The probability-flow ODE of a guided score is a valid ODE and ``log_likelihood``
computes the exact log-density *of the distribution that ODE transports the prior to*. That is
``log p(x | c)`` only when the guided score is the conditional score (CFG with ``w = 1``; classifier
guidance with ``scale = 1`` and a Bayes classifier). For ``w ≠ 1`` the guided scores are not the
scores of one diffusion (``p_t(x|c)^w p_t(x)^{1−w}`` is not the diffused version of its ``t = 0``
member), so the number is the log-density of the guided ODE sampler's output, not of a tilted target.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._utils import as_batch_time, bcast
from .models import DenoisingModel, PerSampleModel, implements

__all__ = ["classifier_free", "classifier_guidance", "ClassifierFreeGuidance", "ClassifierGuidance"]


def _per_sample(name: str, w: float | Tensor, like: Tensor) -> float | Tensor:
    """A guidance weight broadcast against ``like``; a tensor weight must have one entry per sample."""
    if not isinstance(w, Tensor):
        return w
    if w.ndim == 1 and w.shape[0] != like.shape[0]:
        raise ValueError(
            f"the guidance weight {name} has {w.shape[0]} entries but the batch evaluated has {like.shape[0]}; "
            "a per-sample weight must have shape (batch,) of the whole batch passed to sdegen"
        )
    return bcast(w.to(device=like.device, dtype=like.dtype), like)


def _restricted(obj: Any, index: slice | Tensor, batch: int, weight: str, inner: str) -> Any:
    """A shallow copy of a guidance object with its per-sample weight and inner model restricted."""
    out = copy.copy(obj)
    w = getattr(obj, weight)
    if isinstance(w, Tensor) and w.ndim == 1 and w.shape[0] == batch:
        setattr(out, weight, w[index])
    model = getattr(obj, inner)
    if implements(model, PerSampleModel):
        setattr(out, inner, model.for_samples(index, batch))
    return out


def _weight(name: str, w: float | Tensor) -> float | Tensor:
    if isinstance(w, Tensor):
        if w.ndim > 1:
            raise ValueError(f"{name} must be a number or a (batch,) tensor, got shape {tuple(w.shape)}")
        return w
    if isinstance(w, bool) or not isinstance(w, int | float):
        raise TypeError(f"{name} must be a number or a (batch,) tensor, got {w!r}")
    return float(w)


class ClassifierFreeGuidance:
    """Classifier-free guided score ``s_u + w (s_c − s_u)`` from one batched call (see the module doc).

    Args:
        model: a score function ``model(x, t, **kwargs)`` (e.g. a :class:`~sdegen.models.ScoreModel`
            or the ``score`` of ``from_diffusers``) taking the condition as the keyword ``cond_kwarg``.
        w: guidance scale (diffusers' ``guidance_scale``): a number or a ``(batch,)`` tensor.
        cond_kwarg: name of the conditioning keyword (``"class_labels"``, ``"encoder_hidden_states"``, ...).
        uncond: the "null" condition of the unconditional half — a number (filled into the shape
            of the condition, e.g. the null class index) or a tensor broadcastable to it (e.g. the
            empty-prompt embedding of shape ``(1, L, D)``).

    Call as ``guided(x, t, **kwargs)`` with ``kwargs[cond_kwarg]`` the condition, its first dimension
    the batch. Other tensor kwargs whose first dimension is the batch are duplicated; the rest pass as is.
    """

    def __init__(
        self, model: Callable[..., Tensor], w: float | Tensor, *, cond_kwarg: str = "class_labels", uncond: Any
    ):
        if not callable(model):
            raise TypeError("model must be a score function model(x, t, **kwargs)")
        if not isinstance(cond_kwarg, str) or not cond_kwarg:
            raise TypeError(f"cond_kwarg must be a keyword name, got {cond_kwarg!r}")
        if uncond is None:
            raise ValueError("uncond is required: the null condition of the unconditional half")
        self.model = model
        self.w = _weight("w", w)
        self.cond_kwarg = cond_kwarg
        self.uncond = uncond

    def _null(self, cond: Tensor) -> Tensor:
        u = self.uncond
        if not isinstance(u, Tensor):
            return torch.full_like(cond, u)
        return torch.broadcast_to(u.to(device=cond.device, dtype=cond.dtype), cond.shape)

    def _doubled(self, x: Tensor, t: Tensor, kwargs: dict) -> tuple[Tensor, Tensor, dict]:
        """The conditional and unconditional halves as one batch: ``(x, t, kwargs)`` of size ``2 · batch``."""
        if self.cond_kwarg not in kwargs:
            raise TypeError(
                f"classifier-free guidance needs the condition as keyword {self.cond_kwarg!r}: "
                f"pass model_kwargs={{{self.cond_kwarg!r}: ...}}"
            )
        b = x.shape[0]
        cond = torch.as_tensor(kwargs[self.cond_kwarg], device=x.device)
        if cond.ndim == 0:
            cond = cond.expand(b)
        if cond.shape[0] != b:
            raise ValueError(f"{self.cond_kwarg} must have the batch ({b}) as first dimension, got {tuple(cond.shape)}")
        tb = as_batch_time(t, x)
        both_kwargs = {
            k: (torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v)
            for k, v in kwargs.items()
            if k != self.cond_kwarg
        }
        both_kwargs[self.cond_kwarg] = torch.cat([cond, self._null(cond)])
        return torch.cat([x, x]), torch.cat([tb, tb]), both_kwargs

    def _combine(self, out: Tensor, b: int) -> Tensor:
        c, u = out[:b], out[b:]
        return u + _per_sample("w", self.w, c) * (c - u)

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        x2, t2, kw2 = self._doubled(x, t, kwargs)
        return self._combine(self.model(x2, t2, **kw2), x.shape[0])

    def predict(self, x: Tensor, t: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """``(guided score, guided x̂0)`` from one batched call: guidance is linear, so the guided ``x̂0`` is
        ``x̂0_u + w (x̂0_c − x̂0_u)`` (None when the model gives no ``x̂0`` of its own)."""
        if not implements(self.model, DenoisingModel):
            return self(x, t, **kwargs), None
        x2, t2, kw2 = self._doubled(x, t, kwargs)
        score, x0 = self.model.predict(x2, t2, **kw2)
        b = x.shape[0]
        return self._combine(score, b), None if x0 is None else self._combine(x0, b)

    def for_samples(self, index: slice | Tensor, batch: int) -> ClassifierFreeGuidance:
        """This guidance restricted to the samples at ``index`` of a ``batch`` (a ``(batch,)`` ``w`` is indexed)."""
        return _restricted(self, index, batch, "w", "model")

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(w={self.w}, cond_kwarg={self.cond_kwarg!r})"


def classifier_free(
    model: Callable[..., Tensor], w: float | Tensor, *, cond_kwarg: str = "class_labels", uncond: Any
) -> ClassifierFreeGuidance:
    """Classifier-free guidance ``s_u + w (s_c − s_u)``, one batched network call per evaluation.

    ``w`` is diffusers' ``guidance_scale`` (Ho & Salimans' ``w̃ = w − 1``); see :class:`ClassifierFreeGuidance`.
    """
    return ClassifierFreeGuidance(model, w, cond_kwarg=cond_kwarg, uncond=uncond)


class ClassifierGuidance:
    """``score(x, t) + scale · ∇_x log p_t(y | x)`` with the gradient by autograd (see the module doc).

    Args:
        score: score function ``score(x, t, **kwargs)``.
        log_prob_y: ``log_prob_y(x, t, **kwargs) -> (batch,)``, the classifier's log-probability of
            the wanted label (read from the kwargs, e.g. ``class_labels``) at the noisy ``x``.
        scale: guidance scale (number or ``(batch,)`` tensor); 1 targets ``p(x | y)``.
        score_kwargs: also pass the kwargs to ``score`` (default False: an unconditional score model
            rarely accepts the label).
    """

    def __init__(
        self,
        score: Callable[..., Tensor],
        log_prob_y: Callable[..., Tensor],
        scale: float | Tensor = 1.0,
        *,
        score_kwargs: bool = False,
    ):
        if not callable(score):
            raise TypeError("score must be a score function score(x, t)")
        if not callable(log_prob_y):
            raise TypeError("log_prob_y must be callable as log_prob_y(x, t, **kwargs) -> (batch,)")
        self.score = score
        self.log_prob_y = log_prob_y
        self.scale = _weight("scale", scale)
        self.score_kwargs = bool(score_kwargs)

    def gradient(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """``∇_x log p_t(y | x)``, shaped like ``x``.

        When ``x`` is not part of an autograd graph (sampling) the gradient is taken on a detached copy
        and returned without a graph. When it is (e.g. the likelihood's divergence ``∇·F`` differentiates
        the guided score), it is taken with ``create_graph=True`` so the guidance term is differentiated too.
        """
        outer = x.requires_grad and torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if outer else x.detach().requires_grad_(True)
            lp = self.log_prob_y(xg, t, **kwargs)
            if not isinstance(lp, Tensor) or lp.shape != (x.shape[0],):
                got = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
                raise ValueError(f"log_prob_y must return shape (batch,)={(x.shape[0],)}, got {got}")
            (grad,) = torch.autograd.grad(lp.sum(), xg, create_graph=outer)
        return grad.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        base = self.score(x, t, **kwargs) if self.score_kwargs else self.score(x, t)
        return base + _per_sample("scale", self.scale, x) * self.gradient(x, t, **kwargs)

    def for_samples(self, index: slice | Tensor, batch: int) -> ClassifierGuidance:
        """This guidance restricted to the samples at ``index`` of a ``batch`` (a ``(batch,)`` scale is indexed)."""
        return _restricted(self, index, batch, "scale", "score")

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale})"


def classifier_guidance(
    score: Callable[..., Tensor],
    log_prob_y: Callable[..., Tensor],
    scale: float | Tensor = 1.0,
    *,
    score_kwargs: bool = False,
) -> ClassifierGuidance:
    """Classifier guidance ``score + scale · ∇_x log p_t(y | x)`` (Dhariwal & Nichol 2021, §4; Song et al. 2021, §5)."""
    return ClassifierGuidance(score, log_prob_y, scale, score_kwargs=score_kwargs)
