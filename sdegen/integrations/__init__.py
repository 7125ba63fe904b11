"""Adapters for third-party score models (optional dependencies, imported lazily).

* :mod:`sdegen.integrations.diffusers` — ``from_diffusers(model, scheduler) -> (sde, score)`` for
  ``diffusers`` models trained with a DDPM-style discrete schedule (ε, ``v_prediction`` or ``sample``).
* :mod:`sdegen.integrations.kdiffusion` — ``from_k_diffusion(denoiser) -> (sde, score)`` for
  k-diffusion/EDM denoisers ``D(x, σ)``, and :func:`~sdegen.integrations.kdiffusion.edm_precondition`.

Neither module imports ``diffusers`` or ``k_diffusion``: they only call the objects you pass in, so
``import sdegen`` never needs the optional packages. The same functions are reachable as
``sdegen.models.from_diffusers``, ``sdegen.models.from_k_diffusion`` and ``sdegen.models.edm_precondition``.
"""

from .diffusers import from_diffusers
from .kdiffusion import EDMPreconditioner, edm_precondition, from_k_diffusion

__all__ = ["from_diffusers", "from_k_diffusion", "edm_precondition", "EDMPreconditioner"]
