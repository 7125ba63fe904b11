"""Reverse-time dynamics derived from a forward SDE and a score: the ``λ`` family.

For ``dx = f dt + G dw`` with ``D = G Gᵀ`` and noise scale ``λ ∈ [0, 1]`` (``docs/concepts.md``)::

    dx = [f − (1 + λ²)/2 · (∇·D + D ∇log p_t)] dt + λ G dw̄        (integrated from T down to t_min)

``λ = 1`` is the reverse SDE of Anderson (1982) / Song et al. (2021, eq. 6); ``λ = 0`` is the
probability-flow ODE (eq. 13). All members share the marginals ``p_t`` of the forward SDE. (``λ`` here
is the *noise scale*; the log-SNR is always called ``log_snr`` in sdegen.)

:class:`ReverseSDE` is a plain object implementing the :class:`~sdegen.equation.Equation` protocol (and
:class:`~sdegen.equation.AffineEquation` when the forward SDE has a Gaussian kernel): solvers call
``drift(x, t)``, ``diffusion(x, t)`` and, for exponential integrators, ``marginal``/``score``/``denoise``.
It counts network evaluations (``nfe``) and records, without synchronising with the device, the first
evaluation at which the score model returned a non-finite value, so the integrator can report it after
the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._batching import select_model
from ._utils import as_batch_time, bcast, time_dtype
from .equation import DEFAULT_NOISE_SCALE, EquationBase
from .errors import NotDifferentiableError
from .models import DenoisingModel, FlowModel, ScoreModel, implements

if TYPE_CHECKING:
    from .sde import SDE

__all__ = ["ReverseSDE", "ScoreFn"]

_NOT_DIFFERENTIABLE = (
    "the score model's output does not depend on x through autograd, so its divergence cannot "
    "be computed: the model runs under torch.no_grad()/torch.inference_mode() or detaches its "
    "input. Remove that (sdegen takes gradients only inside each evaluation; memory stays bounded)."
)

ScoreFn = Callable[..., Tensor]
"""A score model: ``score(x, t) -> ∇_x log p_t(x)`` with ``x`` ``(batch, *dims)``, ``t`` ``(batch,)``."""


class ReverseSDE(EquationBase):
    """Reverse-time SDE (or probability-flow ODE when ``noise_scale == 0``) of ``sde`` under ``score``.

    Args:
        sde: the forward :class:`~sdegen.SDE`.
        score: ``score(x, t)`` returning ``∇ log p_t(x)`` shaped like ``x``; ``t`` is ``(batch,)``.
        noise_scale: ``λ ∈ [0, 1]``.
        model_kwargs: extra keyword arguments passed to every ``score`` call (conditioning).

    Attributes:
        nfe: number of score evaluations so far (a batched call counts once).
        T, t_min: the forward SDE's time range.
    """

    def __init__(
        self, sde: SDE, score: ScoreFn, noise_scale: float = DEFAULT_NOISE_SCALE, *, model_kwargs: dict | None = None
    ):
        from .sde import SDE, LinearSDE

        super().__init__()

        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
        if not callable(score):
            raise TypeError("score must be a callable score(x, t)")
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, int | float):
            raise TypeError(f"noise_scale must be a number in [0, 1], got {noise_scale!r}")
        if not 0.0 <= float(noise_scale) <= 1.0:
            raise ValueError(f"noise_scale must lie in [0, 1], got {noise_scale}")
        self.sde = sde
        self.noise_scale = float(noise_scale)
        self.T = sde.T
        self.t_min = sde.t_min
        # the whole batch's model and conditioning; score_fn/model_kwargs are those of the selected samples
        self._all = (score, dict(model_kwargs or {}))
        self.score_fn, self.model_kwargs = self._all
        self._predicts = implements(score, DenoisingModel)  # x̂0 from the model itself (checked once)
        self._denoises = self._predicts and callable(getattr(score, "denoise", None))  # ... and x̂0 alone
        # affine drift a(t) x and additive g(t) not overridden anywhere: drift_from_score may then
        # compute the per-step coefficients on a scalar time directly (fewer ops per step)
        cls = type(sde)
        self._affine = (
            isinstance(sde, LinearSDE)
            and not sde.state_dependent
            and cls.drift is SDE.drift
            and cls.diffusion is SDE.diffusion
            and cls._linear_drift is LinearSDE._linear_drift
            and cls._linear_diffusion is LinearSDE._linear_diffusion
            and getattr(sde._drift, "__func__", None) is LinearSDE._linear_drift
            and getattr(sde._diffusion, "__func__", None) is LinearSDE._linear_diffusion
        )
        self._grid: dict[int, tuple] | None = None  # see prepare_grid
        self._tweedie_coef: tuple | None = None
        # interpolant SDEs (flow matching): the drift in velocity form, finite where α = 0 (see _flow_drift)
        from .interpolant import InterpolantSDE

        self._interpolant = self._affine and isinstance(sde, InterpolantSDE)

    # -- structure the solvers may use -------------------------------------------------------------
    @property
    def is_ode(self) -> bool:
        """True for the probability-flow ODE (``λ = 0``): no noise is drawn."""
        return self.noise_scale == 0.0

    @property
    def state_dependent(self) -> bool:
        """True when the diffusion depends on ``x`` (multiplicative noise)."""
        return self.sde.state_dependent

    @property
    def is_affine(self) -> bool:
        """True when the forward SDE is affine with a Gaussian kernel ``(m(t), s(t))``."""
        return hasattr(self.sde, "marginal")

    def select_samples(self, index: Tensor | None, batch: int) -> None:
        """Evaluate the model for the samples at ``index`` of the ``batch`` only (None: all of them).

        Tensor ``model_kwargs`` whose leading dimension is ``batch`` (class labels, embeddings) and the
        per-sample parameters of a :class:`~sdegen.models.PerSampleModel` (e.g. a ``(batch,)`` guidance
        weight) follow the selection. Adaptive solvers call this when finished samples leave the batch.
        """
        score, kwargs = self._all
        if index is not None:
            score, kwargs = select_model(score, kwargs, batch, index)
        self.score_fn, self.model_kwargs = score, kwargs
        self._predicts = implements(score, DenoisingModel)
        self._denoises = self._predicts and callable(getattr(score, "denoise", None))

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel ``(m(t), s(t))`` of an affine forward SDE (for exponential integrators)."""
        if not self.is_affine:
            raise TypeError(f"{type(self.sde).__name__} has no closed-form marginal (m, s)")
        return self.sde.marginal(t)

    def prepare_grid(self, times: Sequence[Tensor] | None, x: Tensor | None = None) -> None:
        """Precompute per-time values for a fixed-step loop over ``times`` (``None``: forget them).

        ``times`` are the 0-d grid tensors the loop will pass as ``t`` (the same objects); ``x`` a
        state of the loop's batch, dtype and device. For each grid time this stores the ``(batch,)``
        time given to the network and, for an affine SDE, ``a(t)`` and ``g(t)²`` in ``x``'s dtype,
        all computed in one vectorised pass. Evaluations at these exact tensors then skip that
        arithmetic (the values are the same); any other time takes the general path. Called by
        :func:`sdegen.integrate.integrate`; purely an optimisation of per-step overhead.
        """
        if times is None or x is None or len(times) == 0:
            self._grid = None
            return
        grid = torch.stack(list(times))
        tt = grid.to(device=x.device, dtype=grid.dtype if grid.dtype == torch.float64 else time_dtype(x.dtype))
        n = len(times)
        batch_t = tt[:, None].expand(n, x.shape[0]).unbind()
        none: Sequence = (None,) * n
        linear = self._linear_rows(tt, x, n)
        a = g2 = flow = none
        if linear is None and self._affine:  # (fused updates need neither a(t), g(t)² nor the velocity form)
            a = self.sde.drift_coef(tt).to(x.dtype).unbind()
            g = self.sde.diffusion_coef(tt).to(x.dtype)
            g2 = (g * g).unbind()
            if self._interpolant:  # the velocity-form coefficients (α̇, c) of _flow_drift
                da, c = self.sde.flow_coefficients(tt, self.noise_scale)
                flow = list(zip(da.to(x.dtype).unbind(), c.to(x.dtype).unbind(), strict=True))
        rows = zip(times, batch_t, a, g2, flow, none if linear is None else linear, strict=True)
        self._grid = {id(v): (v, bt, ai, gi, k, fi, li) for k, (v, bt, ai, gi, fi, li) in enumerate(rows)}
        self._grid_key = (x.shape[0], x.dtype, x.device)
        self._grid_tt = tt
        self._tweedie_coef = None  # (1/m, s²/m) per grid time, made on the first denoise() from a score

    def _linear_rows(self, tt: Tensor, x: Tensor, n: int) -> list[tuple] | None:
        """Per grid time ``(A, B, U, V)``: drift ``= A x + B out`` and ``x̂0 = U x + V out`` for the raw output
        ``out`` of a :class:`~sdegen.models.ScoreModel` (its :meth:`~sdegen.models.ScoreModel.linear_coefficients`
        folded with the SDE's coefficients; ``U = V = None`` for ``x̂0 = out``), or None when the model offers
        none."""
        # exactly these classes: a subclass may override how the output becomes a score
        if not (self._affine and type(self.score_fn) in (ScoreModel, FlowModel)):
            return None
        if tt.device.type != "mps":  # float64 coefficients where the device has it: one rounding at the cast
            tt = tt.to(torch.float64)
        pq = self.score_fn.linear_coefficients(tt)
        if pq is None:
            return None
        p, q, u, v = pq
        if self._interpolant and self._predicts:  # velocity form: α̇ x̂0 − c score (finite where α = 0)
            da, c = self.sde.flow_coefficients(tt, self.noise_scale)
            uu, vv = (torch.zeros_like(p), torch.ones_like(p)) if u is None else (u, v)
            big_a, big_b = da * uu - c * p, da * vv - c * q
        else:  # a x − (1 + λ²)/2 g² score
            k = -0.5 * (1.0 + self.noise_scale**2) * self.sde.diffusion_coef(tt) ** 2
            big_a, big_b = self.sde.drift_coef(tt) + k * p, k * q
        cols = [big_a, big_b] if u is None else [big_a, big_b, u, v]
        # one cast and one unbind for the whole table: n rows of len(cols) 0-d tensors
        flat = torch.stack(torch.broadcast_tensors(*cols), dim=1).to(x.dtype).reshape(-1).unbind()
        rows = list(zip(*[iter(flat)] * len(cols), strict=True))
        return rows if u is not None else [(ai, bi, None, None) for ai, bi in rows]

    def _raw_output(self, x: Tensor, tb: Tensor, differentiable: bool) -> Tensor:
        """The model's raw network output (one evaluation, checked and counted), for the fused grid updates."""
        out = self._check_output(x, self.score_fn.prediction(x, tb, **self.model_kwargs))
        if differentiable and not out.requires_grad:
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        self.record_evaluation(out)
        return out

    def _grid_hit(self, x: Tensor, t: Tensor) -> tuple | None:
        if self._grid is None:
            return None
        hit = self._grid.get(id(t))
        if hit is None or hit[0] is not t or self._grid_key != (x.shape[0], x.dtype, x.device):
            return None
        return hit

    # -- evaluations ----------------------------------------------------------------------------
    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Evaluate the score model once (counted in :attr:`nfe`), checked for shape and device."""
        return self._evaluate(x, t, predict=False)[0]

    def _evaluate(self, x: Tensor, t: Tensor, *, predict: bool) -> tuple[Tensor, Tensor | None]:
        """One network evaluation: the score, and with ``predict`` the model's ``x̂0`` too (checked, counted)."""
        hit = self._grid_hit(x, t)
        tb = hit[1] if hit is not None else as_batch_time(t, x)
        if predict:
            out, x0 = self.score_fn.predict(x, tb, **self.model_kwargs)
            if x0 is None:  # the model knows no x̂0 of its own (e.g. guidance around a plain score function)
                x0 = self._tweedie(x, tb, self._check_output(x, out))
            x0 = self._check_output(x, x0)
        else:
            out, x0 = self.score_fn(x, tb, **self.model_kwargs), None
        out = self._check_output(x, out)
        self.record_evaluation(out if x0 is None else x0)
        return out, x0

    def _check_output(self, x: Tensor, out: Tensor) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"score model must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(
                f"score model returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                "it must return the score with the shape of x"
            )
        if out.device != x.device:
            raise ValueError(f"score model returned a tensor on {out.device}, but x is on {x.device}")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)  # mixed precision: a bf16 network under an fp32 solver state
        return out

    def drift_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Reverse drift given an already computed score (no network call)."""
        coef = 0.5 * (1.0 + self.noise_scale**2)
        hit = self._grid_hit(x, t) if self._affine else None
        if hit is not None and hit[2] is not None:  # a(t), g(t)² precomputed for this grid time
            return torch.addcmul(hit[2] * x, hit[3], score, value=-coef)
        if self._affine and isinstance(t, Tensor) and t.ndim == 0:
            # fast path, same values: a(t) x − coef g(t)² score with 0-d coefficients (no bcast)
            tt = t.to(device=x.device, dtype=t.dtype if t.dtype == torch.float64 else time_dtype(x.dtype))
            a = self.sde.drift_coef(tt).to(x.dtype)
            g = self.sde.diffusion_coef(tt).to(x.dtype)
            return torch.addcmul(a * x, g * g, score, value=-coef)
        tb = as_batch_time(t, x)
        scale = (-coef) * self.sde.diffusion(x, tb) ** 2  # per-sample for additive noise: cheap
        drift = self.sde.drift(x, tb)
        div = self.sde.diffusion_divergence(x, tb)
        if div is not None:
            drift = drift - coef * div
        return torch.addcmul(drift, scale, score)  # f − coef (g² score + ∇·D), one pass over x

    def drift(self, x: Tensor, t: Tensor, *, differentiable: bool = False) -> Tensor:
        """``f − (1+λ²)/2 (∇·D + D ∇log p_t)``, shaped like ``x`` (one network evaluation).

        With ``differentiable=True`` (the likelihood's divergence) a model output without an autograd graph
        to ``x`` raises :class:`~sdegen.errors.NotDifferentiableError` instead of giving a wrong divergence.
        """
        hit = self._grid_hit(x, t)
        if hit is not None and hit[6] is not None:  # a ScoreModel on a grid time: one fused update
            big_a, big_b = hit[6][0], hit[6][1]
            return torch.addcmul(big_a * x, big_b, self._raw_output(x, hit[1], differentiable))
        if self._interpolant and self._predicts:
            return self._flow_drift(x, t, differentiable)
        score = self.score(x, t)
        if differentiable and not score.requires_grad:
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        return self.drift_from_score(x, t, score)

    def _flow_drift(self, x: Tensor, t: Tensor, differentiable: bool) -> Tensor:
        """The drift of an interpolant SDE in velocity form, ``α̇ x̂0 − c ∇log p_t`` (one network evaluation).

        With Tweedie's ``x = α x̂0 − σ² ∇log p_t`` the drift ``(α̇/α) x − (1 + λ²)/2 · g² ∇log p_t`` becomes
        ``α̇ x̂0 − c ∇log p_t`` with ``c = (1 + λ²) σσ̇ − λ² (α̇/α) σ²``
        (:meth:`~sdegen.interpolant.InterpolantSDE.flow_coefficients`). For ``λ = 0`` it is the velocity
        ``α̇ x̂0 + σ̇ ε̂``: finite at ``α = 0``, where ``α̇/α`` and ``g²`` are not. ``x̂0`` and the score come from
        the model's one prediction (:class:`~sdegen.models.DenoisingModel`).
        """
        hit = self._grid_hit(x, t)
        tb = hit[1] if hit is not None else as_batch_time(t, x)
        score, x0 = self._evaluate(x, tb, predict=True)
        if differentiable and not (score.requires_grad or x0.requires_grad):
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        if hit is not None and hit[5] is not None:
            da, c = hit[5]
        else:
            if isinstance(t, Tensor) and t.ndim == 0:
                tt = t.to(device=x.device, dtype=t.dtype if t.dtype == torch.float64 else time_dtype(x.dtype))
            else:
                tt = tb
            da, c = (bcast(v.to(x.dtype), x) for v in self.sde.flow_coefficients(tt, self.noise_scale))
        return torch.addcmul(da * x0, c, score, value=-1.0)

    def check_start(self, solver: object, t_start: Tensor) -> None:
        """Refuse, before any work, a solver that cannot start at ``t_start`` (a 0-d CPU tensor) on this equation.

        Only where the signal is gone (``α(t_start) = 0``: ``t = 1`` of a flow-matching path,
        :mod:`sdegen.interpolant`) is there anything to check; the solver's
        :attr:`~sdegen.solvers.Solver.zero_signal_start` says what its first step evaluates there. Called by
        :func:`sdegen.integrate.integrate`; reads ``t_start`` only for such SDEs.
        """
        if not (self._interpolant and self.sde.signal_vanishes_at_T):
            return
        t0 = float(t_start)
        if t0 < self.T or float(self.sde.marginal(torch.tensor(t0, dtype=torch.float64))[0]) != 0.0:
            return
        name = getattr(solver, "name", type(solver).__name__)
        kind = getattr(solver, "zero_signal_start", "drift")
        where = f"t={t0:g}, where the signal coefficient α(t) of {self.sde!r} is 0"
        wrap = (
            "the score model gives no data prediction x̂0 of its own, and Tweedie's x̂0 = (x + σ² score)/α divides "
            "by α = 0: wrap the network with sdegen.from_flow (a flow-matching velocity), from_velocity, "
            "from_epsilon or from_denoiser, or start below: t_max=1 - 1e-3"
        )
        if kind == "none":
            return
        if kind == "denoise":
            if not self._predicts:
                raise ValueError(f"solver {name!r} cannot start at {where}: {wrap}")
            return
        if kind == "drift":
            if self.noise_scale > 0.0:
                raise ValueError(
                    f"solver {name!r} evaluates the drift and diffusion of the reverse SDE (noise_scale="
                    f"{self.noise_scale:g}) at {where}: both are infinite there (g² = 2σ²(σ̇/σ − α̇/α)). Use "
                    "solver='ddim' (noise_scale=λ) or 'ancestral' (noise_scale=1), which step from there with the "
                    "exact Gaussian kernel; or the probability-flow ODE (noise_scale=0); or start below T "
                    "(t_max=1 - 1e-3, prior N(0, t_max²))"
                )
            if not self._predicts:
                raise ValueError(f"solver {name!r} cannot start the probability-flow ODE at {where}: {wrap}")
            return
        raise ValueError(
            f"solver {name!r} cannot start at {where} (its first step is not defined there): start below T "
            "(t_max=1 - 1e-3), or use 'euler_maruyama', 'heun', 'rk45', 'ddim' or 'dpmpp_2m', which start there"
        )

    def diffusion(self, x: Tensor, t: Tensor) -> Tensor:
        """``λ G(x, t)``, broadcastable to ``x`` (zero for the probability-flow ODE, also where ``G`` is infinite)."""
        g = self.sde.diffusion(x, as_batch_time(t, x))
        return torch.zeros_like(g) if self.noise_scale == 0.0 else self.noise_scale * g

    def denoise(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        """``x̂0 = E[x_0 | x_t]`` (affine SDEs only): one network evaluation unless ``score`` is given.

        A :class:`~sdegen.models.DenoisingModel` (every :class:`~sdegen.models.ScoreModel`) gives ``x̂0``
        from its own parametrisation; otherwise, or with ``score`` given, Tweedie's formula
        ``(x + s² ∇log p_t) / m``.
        """
        hit = self._grid_hit(x, t)
        if score is None and hit is not None and hit[6] is not None:  # a ScoreModel on a grid time
            out = self._raw_output(x, hit[1], False)
            u, v = hit[6][2], hit[6][3]
            return out if u is None else torch.addcmul(u * x, v, out)  # x̂0 = U x + V out
        if score is None and self._denoises:  # the model's x̂0 alone: no score computed
            tb = hit[1] if hit is not None else as_batch_time(t, x)
            x0 = self._check_output(x, self.score_fn.denoise(x, tb, **self.model_kwargs))
            self.record_evaluation(x0)
            return x0
        if score is None and self._predicts:
            _, x0 = self._evaluate(x, t, predict=True)
            return x0
        if hit is not None:  # a grid time: x/m + (s²/m) score with 0-d coefficients made once per grid
            if self._tweedie_coef is None:
                m, s = self.marginal(self._grid_tt)
                self._tweedie_coef = ((1.0 / m).to(x.dtype).unbind(), (s * s / m).to(x.dtype).unbind())
            inv_m, s2_m = self._tweedie_coef[0][hit[4]], self._tweedie_coef[1][hit[4]]
            return torch.addcmul(x * inv_m, s2_m, self.score(x, t) if score is None else score)
        tb = as_batch_time(t, x)
        return self._tweedie(x, tb, self.score(x, tb) if score is None else score)

    def _tweedie(self, x: Tensor, tb: Tensor, score: Tensor) -> Tensor:
        m, s = self.marginal(tb)
        return (x + bcast(s.to(x.dtype) ** 2, x) * score) / bcast(m.to(x.dtype), x)

    def __repr__(self) -> str:
        kind = "ProbabilityFlowODE" if self.is_ode else f"ReverseSDE(noise_scale={self.noise_scale})"
        return f"{kind} of {self.sde!r}"
