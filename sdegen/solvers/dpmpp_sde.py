"""DPM-Solver++(2M) SDE and (3M) SDE: stochastic multistep exponential integrators of the reverse SDE.

Lu et al. (2022b), *DPM-Solver++*, §5 ("SDE-DPM-Solver++"); the multistep forms are k-diffusion's
``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde`` and diffusers' ``DPMSolverMultistepScheduler(
algorithm_type="sde-dpmsolver++")``, written here for any affine SDE and any noise scale ``λ``.

**The equation.** With ``y = x/m``, ``σ = s/m``, ``ℓ = −log σ`` and the data prediction ``D = x̂0``, the
reverse dynamics of noise scale ``λ`` (``docs/concepts.md``) read::

    dy = −(1 + η) (y − D) dℓ + √(2η) σ dW_ℓ,        η = λ²,

(the score is ``(m D − x)/s²``; the drift coefficient ``(1 + λ²)/2`` doubles the probability-flow
rate at ``λ = 1``). Its variation-of-constants solution over a step ``h = ℓ_{i+1} − ℓ_i`` is, with
``H = (1 + η) h``::

    x_{i+1} = (s_{i+1}/s_i) e^{−ηh} x_i + m_{i+1} (1 + η) ∫_0^h e^{−(1+η)(h−u)} D(ℓ_i + u) du
              + s_{i+1} √(1 − e^{−2ηh}) z,                                   z ~ N(0, I)

— the linear part and the noise are integrated exactly. Replacing ``D`` by its multistep Taylor
polynomial gives the DPM-Solver++ weights of :mod:`sdegen.solvers.dpmpp` at ``H`` instead of ``h``:
``φ1(H)`` on ``D_0``; on the divided difference ``D1 = (D_0 − D_1)/r_1`` the midpoint weight ``φ1(H)/2``
(Alg. 1, ``variant="midpoint"``) or the exact weight ``φ2(H)`` (``variant="heun"``); and, for 3M,
``φ2(H) D1 − 2 φ3(H) D2`` (``d2_weight="exact"``; ``"halved"`` is the reference implementations'
``−φ3``, see :mod:`sdegen.solvers.dpmpp`). At ``λ = 0`` they are ``dpmpp_2m`` / ``dpmpp_3m``.

**Noise scale.** ``noise_scale = λ`` is sdegen's one meaning of the word; k-diffusion's and diffusers'
``eta`` is ``η = λ²`` (the rate above). The two agree at 0 (probability-flow ODE) and 1 (the reverse SDE,
diffusers' ``sde-dpmsolver++``); k-diffusion's ``eta=0.5`` is ``noise_scale=√0.5``. Noise comes from the
integrator's :class:`~sdegen.noise.NoiseSource` (one draw per step), so ``seed=`` gives per-sample,
batch-size-independent results (k-diffusion's default Brownian tree does not: diffusers issue 4875).

**Last step.** The peers end their grids at ``σ = 0`` with ``x = D(x)``; sdegen's grids end at ``t_min``:
``final_step="tweedie"`` is that last step (one more evaluation, no noise).

Options: ``variant`` (``"midpoint"`` default for 2M, as k-diffusion and diffusers; ``"heun"``),
``lower_order_final`` (default True: grids of fewer than 15 steps lower the order of their last steps,
as diffusers), ``d2_weight`` (3M). One network evaluation per step; every coefficient is computed once
per grid on the device. Affine SDEs only. Orders: the ODE order of ``dpmpp_2m`` / ``dpmpp_3m`` at
``λ = 0``; for ``λ > 0`` the weak order measured on Gaussian data (``tests/test_samplers.py``) is 1.
"""

from __future__ import annotations

from typing import ClassVar

from .dpmpp import _DPMSolverPPMultistep

__all__ = ["DPMSolverPP2MSDE", "DPMSolverPP3MSDE"]


class _SDEMultistep(_DPMSolverPPMultistep):
    supports_sde: ClassVar[bool] = True
    supports_ode: ClassVar[bool] = True
    weak_order: ClassVar[float | None] = 1.0
    needs_additive_noise: ClassVar[bool] = False
    default_noise_scale = 1.0  # type: ignore[assignment]
    default_steps: ClassVar[int] = 50


class DPMSolverPP2MSDE(_SDEMultistep):
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``; diffusers ``sde-dpmsolver++``, order 2).

    Args:
        variant: ``"midpoint"`` (default) or ``"heun"`` (k-diffusion's ``solver_type``).
        lower_order_final: see :mod:`sdegen.solvers.dpmpp`.
        d2_weight: unused (accepted for symmetry with 3M).
    """

    name = "dpmpp_2m_sde"
    order = 2.0


class DPMSolverPP3MSDE(_SDEMultistep):
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``).

    Args:
        variant: the second-order formula of the warm-up and final steps; ``"heun"`` (default, as k-diffusion).
        lower_order_final: see :mod:`sdegen.solvers.dpmpp`.
        d2_weight: ``"exact"`` (default, order 3 at ``λ = 0``) or ``"halved"`` (k-diffusion's weight).
    """

    name = "dpmpp_3m_sde"
    order = 3.0

    def __init__(self, lower_order_final: bool = True, variant: str = "heun", d2_weight: str = "exact"):
        super().__init__(lower_order_final=lower_order_final, variant=variant, d2_weight=d2_weight)
