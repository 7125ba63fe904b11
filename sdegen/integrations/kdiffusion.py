"""k-diffusion / EDM denoisers ``D(x, σ)`` as sdegen score models, and EDM preconditioning.

k-diffusion (Crowson) and EDM (Karras et al. 2022) parametrise a model as a *denoiser*
``D(x, σ) ≈ E[x_0 | x = x_0 + σ z]`` called with the noise level ``σ`` of shape ``(batch,)``. On
:class:`~sdegen.EDMSDE` time *is* the noise level (``m = 1``, ``s = σ(t) = t``), so the score is
``(D(x, t) − x)/t²`` and every sdegen solver applies. This module never imports ``k_diffusion``.

EDM preconditioning (Karras et al. 2022, Table 1, "Ours"; §5 and App. B.6) builds ``D`` from a raw
network ``F``::

    D(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)),
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ,

with ``σ_d = sigma_data`` the data standard deviation (0.5 for images in ``[−1, 1]``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._utils import bcast
from ..models import ScoreModel
from ..sde import EDMSDE

__all__ = ["from_k_diffusion", "edm_precondition", "EDMPreconditioner"]


class EDMPreconditioner(nn.Module):
    """``D(x, σ) = c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022, Table 1).

    Args:
        raw_net: ``F(x_in, c_noise, **kwargs)`` with ``c_noise`` of shape ``(batch,)``; registered as a
            submodule when it is an ``nn.Module`` (so ``.parameters()``, ``.to()`` and training work).
        sigma_data: ``σ_d > 0``, the standard deviation of the data.

    Call as ``D(x, sigma, **kwargs)``; ``sigma`` is a number or a ``(batch,)`` tensor; returns ``x``'s shape.
    The coefficients are computed in float32 or better and cast to ``x.dtype``.
    """

    def __init__(self, raw_net: Any, sigma_data: float = 0.5):
        super().__init__()
        if not callable(raw_net):
            raise TypeError("raw_net must be callable as raw_net(x, c_noise)")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, int | float) or not sigma_data > 0:
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
        self.raw_net = raw_net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at noise levels ``sigma`` (any shape, same shapes back)."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), 0.25 * torch.log(sigma)

    def forward(self, x: Tensor, sigma: Tensor | float, **kwargs: Any) -> Tensor:
        if not isinstance(sigma, Tensor):
            sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = self.raw_net(bcast(c_in.to(x.dtype), x) * x, c_noise, **kwargs)
        return bcast(c_skip.to(x.dtype), x) * x + bcast(c_out.to(x.dtype), x) * f.to(x.dtype)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}"


def edm_precondition(raw_net: Any, sigma_data: float = 0.5) -> EDMPreconditioner:
    """Wrap a raw network ``F(x_in, c_noise)`` into the EDM denoiser ``D(x, σ)`` (Karras et al. 2022, Table 1)."""
    return EDMPreconditioner(raw_net, sigma_data)


def from_k_diffusion(
    denoiser: Any,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    precondition: str | None = None,
    sigma_data: float = 0.5,
) -> tuple[EDMSDE, ScoreModel]:
    """Wrap a k-diffusion/EDM denoiser ``D(x, σ, **kwargs)`` into ``(sde, score)`` on :class:`~sdegen.EDMSDE`.

    Args:
        denoiser: ``D(x, sigma, **kwargs) -> x̂0`` with ``sigma`` of shape ``(batch,)`` (k-diffusion's
            model convention, e.g. a ``k_diffusion.layers.Denoiser`` or ``external.CompVisDenoiser``).
            With ``precondition="edm"`` it is instead the raw network ``F(c_in x, c_noise)``.
        sigma_min, sigma_max: the SDE's range (``t_min`` and ``T``); default: the denoiser's own
            ``sigma_min``/``sigma_max`` attributes when it has them (k-diffusion's discrete wrappers),
            else EDM's 0.002 and 80.
        precondition: ``None`` (``denoiser`` already is ``D``) or ``"edm"`` (wrap it with
            :func:`edm_precondition` and ``sigma_data``).
        sigma_data: ``σ_d`` for ``precondition="edm"``.

    Returns:
        ``(sde, score)``: ``EDMSDE(sigma_min, sigma_max)`` (``t = σ``) and the score
        ``(D(x, t) − x)/t²`` as a :class:`~sdegen.models.ScoreModel`; conditioning kwargs pass through.

    Example — sdegen's ``heun`` with ``grid="edm"`` and ``final_step="tweedie"`` reproduces
    ``k_diffusion.sampling.sample_heun(D, x, get_sigmas_karras(n, σ_min, σ_max))`` with ``steps = n − 1``
    (k-diffusion's last step, from ``σ_min`` to 0, is an Euler step, which lands exactly on ``D(x, σ_min)``)::

        sde, score = from_k_diffusion(D)
        x = reverse_sample(sde, score, x_T=sigma_max * z, solver="heun", steps=n - 1, grid="edm",
                           noise_scale=0.0, final_step="tweedie")
    """
    if precondition not in (None, "edm"):
        raise ValueError(f"precondition must be None or 'edm', got {precondition!r}")
    if not callable(denoiser):
        raise TypeError("denoiser must be callable as denoiser(x, sigma)")
    net = edm_precondition(denoiser, sigma_data) if precondition == "edm" else denoiser
    lo = sigma_min if sigma_min is not None else _attr_float(denoiser, "sigma_min", 0.002)
    hi = sigma_max if sigma_max is not None else _attr_float(denoiser, "sigma_max", 80.0)
    sde = EDMSDE(sigma_min=lo, sigma_max=hi)
    return sde, ScoreModel(net, sde, "denoiser")


def _attr_float(obj: Any, name: str, default: float) -> float:
    v = getattr(obj, name, None)
    if v is None:
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        return default
