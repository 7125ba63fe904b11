"""What a solver may ask of an equation: the :class:`Equation` protocol and its affine part.

A solver never sees a network or an SDE class, only an *equation*

    dx = drift(x, t) dt + diffusion(x, t) dW          (Itô, diagonal noise)

integrated by :func:`sdegen.integrate.integrate` in either direction of time. Everything a solver may
use is written down here, as :class:`typing.Protocol` s (diffrax's ``AbstractTerm`` and torchode's
``ODETerm`` play the same role):

* :class:`Equation` — every equation: ``drift``, ``diffusion``, ``is_ode``, ``state_dependent``,
  ``is_affine``, the count of network evaluations ``nfe``, the device-side record of the first
  non-finite evaluation, the error norm adaptive solvers use, and ``select_samples`` (adaptive solvers
  drop finished samples from the batch; per-sample conditioning must follow).
* :class:`AffineEquation` — what *exponential integrators* (DDIM, DPM-Solver++, UniPC, EDM, ancestral
  sampling) may use in addition when ``is_affine`` is true: the Gaussian kernel ``(m(t), s(t))`` of the
  forward SDE (``x_t = m x_0 + s z``), the score / Tweedie denoiser behind the drift, the noise scale
  ``λ`` of the reverse dynamics and the time range.

Implementations in sdegen: :class:`sdegen.reverse.ReverseSDE` (reverse-time SDE / probability-flow ODE
of a score model — affine when its forward SDE is), the likelihood's augmented ``[x, Δ]`` flow
(:mod:`sdegen.likelihood`) and :class:`sdegen.testing.ForwardEquation`. :class:`EquationBase` holds the
defaults once (counting, non-finite tracking, the RMS error norm); subclass it or implement the
protocol yourself.

Times ``t`` reach ``drift``/``diffusion`` as 0-d tensors (fixed-step solvers) or ``(batch,)`` tensors
(adaptive solvers: each sample at its own time), float32 or better, on the state's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._utils import finiteness_probe, first_nonfinite

__all__ = [
    "Equation",
    "AffineEquation",
    "EquationBase",
    "DEFAULT_NOISE_SCALE",
    "rms_norm",
    "require_affine",
]

DEFAULT_NOISE_SCALE = 1.0
"""``λ`` of :meth:`sdegen.SDE.reverse` and :class:`~sdegen.ReverseSDE` when none is given (the reverse SDE).

Entry points that pick a solver (``reverse_sample``) default instead to the solver's natural value,
:attr:`sdegen.solvers.Solver.default_noise_scale` (0 for ODE-only solvers)."""

_FOLD_EVERY = 1024  # evaluations between folds of the non-finite flags (bounds their memory)


def rms_norm(v: Tensor) -> Tensor:
    """Root-mean-square over all but the batch dimension: ``(n, *dims) -> (n,)``."""
    return v.reshape(v.shape[0], -1).pow(2).mean(dim=1).sqrt()


@runtime_checkable
class Equation(Protocol):
    """``dx = drift(x, t) dt + diffusion(x, t) dW`` as the solvers see it.

    Attributes:
        nfe: network evaluations so far (a batched call counts once); solvers never change it.
    """

    nfe: int

    @property
    def is_ode(self) -> bool:
        """True when the diffusion is zero (no noise is drawn)."""
        ...

    @property
    def state_dependent(self) -> bool:
        """True when the diffusion depends on ``x`` (multiplicative noise)."""
        ...

    @property
    def is_affine(self) -> bool:
        """True when the :class:`AffineEquation` members are available (exponential integrators)."""
        ...

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """The drift, shaped like ``x`` (costs one network evaluation for model-driven equations)."""
        ...

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        """``G(x, t)``, broadcastable to ``x`` (diagonal noise)."""
        ...

    def error_norm(self, e: Tensor) -> Tensor:
        """Norm ``(n, *dims) -> (n,)`` of a scaled local error, per sample (adaptive solvers)."""
        ...

    def passive_drift(self, x: Tensor, t: Tensor) -> Tensor:
        """The drift at a *passive* Runge–Kutta stage: one whose derivative only feeds later stages' inputs.

        Such a stage (Dormand–Prince's second: zero weight in the solution, the error estimate and the dense
        output) needs only the components the drift itself reads; *integral* components that it never reads
        (the likelihood's log-density columns) may be returned as zeros — the divergence there is never used.
        """
        ...

    def nonfinite_evaluation(self) -> Tensor | None:
        """Index of the first network evaluation that returned NaN/Inf (``-1``: none), a 0-d device tensor.

        ``None`` when the equation does not track evaluations. Reading it does not synchronise; the
        loop reads it once, after the last step.
        """
        ...

    def prepare_grid(self, times: Sequence[Tensor] | None, x: Tensor | None = None) -> None:
        """Optional per-grid precomputation before a fixed-step loop (``None``: forget it)."""
        ...

    def select_samples(self, index: Tensor | None, batch: int) -> None:
        """Restrict per-sample data (conditioning, probes) to the samples at ``index`` of a ``batch`` (None: all)."""
        ...

    def check_start(self, solver: Any, t_start: Tensor) -> None:
        """Raise ``ValueError`` before any work if ``solver`` cannot start at ``t_start`` (a 0-d CPU tensor).

        E.g. where the signal is gone (``t = 1`` of a flow-matching path) for a solver whose first step
        divides by ``m(t)``; see :meth:`sdegen.ReverseSDE.check_start`.
        """
        ...


@runtime_checkable
class AffineEquation(Equation, Protocol):
    """What exponential integrators may use when ``eq.is_affine`` (see :func:`require_affine`).

    Attributes:
        T: the forward SDE's end time (the network is never evaluated above it).
        t_min: the forward SDE's default smallest time.
        noise_scale: ``λ ∈ [0, 1]`` of the reverse dynamics (0: probability-flow ODE).
    """

    T: float
    t_min: float
    noise_scale: float

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel ``(m(t), s(t))`` of the forward SDE, shaped like ``t``."""
        ...

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """``∇ log p_t(x)``: one network evaluation (counted in ``nfe``)."""
        ...

    def denoise(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        """Tweedie's ``E[x_0 | x_t] = (x + s² score) / m`` (one evaluation unless ``score`` is given)."""
        ...

    def drift_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """The drift given an already computed score (no network call)."""
        ...


def require_affine(eq: Equation, solver: str) -> AffineEquation:
    """``eq`` as an :class:`AffineEquation`, or ``ValueError`` naming the solver and the fix."""
    if not eq.is_affine:
        raise ValueError(
            f"solver {solver!r} needs an affine SDE with a Gaussian kernel (m, s) — VPSDE, VESDE, SubVPSDE, "
            "EDMSDE, DiscreteVPSDE or an interpolant SDE; use 'euler_maruyama', 'heun' or 'rk45' for a general SDE"
        )
    return eq  # type: ignore[return-value]


class EquationBase:
    """Defaults for the :class:`Equation` protocol, defined once.

    Subclasses implement ``drift`` and ``diffusion`` and call :meth:`record_evaluation` on every
    network output: it counts the evaluation and tracks non-finite values on the device (one
    reduction per evaluation, folded into the index of the first bad evaluation), so that no step
    synchronises with the host.
    """

    is_ode: bool = False
    state_dependent: bool = False
    is_affine: bool = False

    def __init__(self) -> None:
        self.nfe = 0
        self._probes: list[Tensor] = []
        self._first_bad: Tensor | None = None

    # -- evaluation accounting --------------------------------------------------------------------
    def record_evaluation(self, out: Tensor) -> None:
        """Count one network evaluation and remember whether ``out`` was finite (no sync)."""
        self._probes.append(finiteness_probe(out))  # detached: never keeps a graph alive
        self.nfe += 1
        if len(self._probes) >= _FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        pending, self._probes = self._probes, []
        if not pending:
            return
        first = first_nonfinite(pending, pending[0].device, offset=self.nfe - len(pending))
        if self._first_bad is None:
            self._first_bad = first
        else:
            self._first_bad = torch.where(self._first_bad >= 0, self._first_bad, first.to(self._first_bad.device))

    def nonfinite_evaluation(self) -> Tensor | None:
        self._fold()
        return self._first_bad

    def first_bad_eval(self) -> int:
        """Index of the first evaluation that returned NaN/Inf, or -1 (synchronises: call after a loop)."""
        bad = self.nonfinite_evaluation()
        return -1 if bad is None else int(bad.item())

    # -- optional parts -----------------------------------------------------------------------------
    def error_norm(self, e: Tensor) -> Tensor:
        return rms_norm(e)

    def passive_drift(self, x: Tensor, t: Tensor) -> Tensor:
        return self.drift(x, t)  # type: ignore[attr-defined]

    def prepare_grid(self, times: Sequence[Tensor] | None, x: Tensor | None = None) -> None:
        return None

    def select_samples(self, index: Tensor | None, batch: int) -> None:
        return None

    def check_start(self, solver: Any, t_start: Tensor) -> None:
        return None
