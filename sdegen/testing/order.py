"""Empirical convergence orders: fit the log-log slope of a solver's error against its step size.

``measure_order(solver, problem, steps=[...], kind=...)`` runs a fixed-step solver on a problem
with a known answer at several step counts ``N`` (step ``h = |t1 − t0| / N``) and fits
``log error = p log h + c`` by least squares (as diffrax's ``test_ode_order``; Higham 2001,
*SIAM Review* 43(3), §5, for the SDE orders):

* ``kind="strong"`` — ``E‖X_N − X(t1)‖``, pathwise: every step count is driven by the **same**
  Brownian paths (:class:`~sdegen.testing.BrownianPath` summed onto each grid).
* ``kind="weak"`` — ``Σ_{p=1,2} mean_i |E[X_N^p]_i − E[X(t1)^p]_i|`` (first two moments per coordinate).
  By default the exact solution on the same paths is a control variate,
  ``E[φ(X_N)] − E[φ(X)] ≈ mean(φ(X_N) − φ(X_exact))``, unbiased and far less noisy than comparing
  with the exact moments (``control_variate=False``).
* ``kind="ode"`` — deterministic: ``mean ‖X_N − X_ref(t1)‖`` over a few initial points.

Problems (strings or instances): ``"ou"`` (:class:`OUProblem`, additive noise), ``"gbm"``
(:class:`GBMProblem`, multiplicative noise), ``"linear_ode"`` (:class:`LinearODEProblem`) and
``"pf_ode"`` (:class:`ProbabilityFlowProblem`: the probability-flow ODE of a Gaussian mixture,
reference by SciPy's DOP853 at ``rtol = atol = 1e-12``).

Expected slopes: Euler–Maruyama strong ½ on GBM and 1 on OU, weak 1; Heun 2 on ODEs. Pick step
counts in the asymptotic regime (errors well above the reference's and the Monte-Carlo noise):
``OrderResult.r2`` close to 1 and ``standard_errors`` small against ``errors`` say the fit is sound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..integrate import integrate
from ..sde import SDE, VPSDE, LinearSDE
from ..solvers import AdaptiveSolver, PathSolver, Solver, get_solver
from .linear_sdes import BrownianPath, ForwardEquation, GeometricBrownianMotion, OrnsteinUhlenbeck
from .mixture import GaussianMixture

__all__ = [
    "measure_order",
    "fit_order",
    "OrderResult",
    "OrderProblem",
    "OUProblem",
    "GBMProblem",
    "LinearODEProblem",
    "ProbabilityFlowProblem",
    "PROBLEMS",
]

KINDS = ("strong", "weak", "ode")


@dataclass
class OrderResult:
    """What :func:`measure_order` returns.

    Attributes:
        slope: fitted order ``p`` in ``error ≈ C h^p``.
        intercept: fitted ``log C``.
        r2: coefficient of determination of the log-log fit (1 = a perfect power law).
        steps: step counts ``N``; step_sizes: ``h = |t1 − t0| / N``; errors: measured errors.
        standard_errors: Monte-Carlo standard errors of ``errors`` (zeros for ``kind="ode"``).
        kind, solver, problem: what was measured.
    """

    slope: float
    intercept: float
    r2: float
    steps: list[int]
    step_sizes: list[float]
    errors: list[float]
    standard_errors: list[float] = field(default_factory=list)
    kind: str = "ode"
    solver: str = ""
    problem: str = ""

    def __str__(self) -> str:
        rows = ", ".join(f"N={n}: {e:.3e}" for n, e in zip(self.steps, self.errors, strict=True))
        return (
            f"{self.solver} {self.kind} order on {self.problem}: slope {self.slope:.3f} "
            f"(r² = {self.r2:.4f}); errors {rows}"
        )


def fit_order(step_sizes: Sequence[float], errors: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit of ``log error = slope · log h + intercept``.

    Returns:
        ``(slope, intercept, r2)``. Raises ``ValueError`` for fewer than 2 points or a
        non-positive error (an exact answer has no order to measure).
    """
    h = torch.as_tensor(list(step_sizes), dtype=torch.float64)
    e = torch.as_tensor(list(errors), dtype=torch.float64)
    if h.ndim != 1 or h.shape != e.shape or h.shape[0] < 2:
        raise ValueError("need at least two (step size, error) pairs of equal length")
    if not (torch.isfinite(e).all() and (e > 0).all() and (h > 0).all()):
        raise ValueError(f"errors and step sizes must be finite and > 0, got errors {e.tolist()}")
    lx, ly = h.log(), e.log()
    xm, ym = lx.mean(), ly.mean()
    sxx = ((lx - xm) ** 2).sum()
    if sxx <= 0:
        raise ValueError("step sizes must not all be equal")
    slope = ((lx - xm) * (ly - ym)).sum() / sxx
    intercept = ym - slope * xm
    resid = ly - (slope * lx + intercept)
    sst = ((ly - ym) ** 2).sum()
    r2 = 1.0 - float((resid**2).sum() / sst) if sst > 0 else 1.0
    return float(slope), float(intercept), r2


# -- problems -------------------------------------------------------------------------------------
class OrderProblem:
    """A problem with a known answer for :func:`measure_order`.

    Subclasses set ``name``, ``kind`` (the default kind), ``t0``, ``t1`` and implement
    :meth:`equation` and :meth:`initial_state`; SDE problems implement :meth:`exact_solution`
    (and :meth:`exact_moments` for ``control_variate=False``), ODE problems :meth:`reference`.
    """

    name: str = "problem"
    kind: str = "ode"
    t0: float = 0.0
    t1: float = 1.0
    fine_factor: int = 1  # Brownian path resolution relative to the finest grid (SDE problems)

    def equation(self, *, ode: bool = False) -> Any:
        """A fresh equation object (with ``nfe``) the solvers integrate."""
        raise NotImplementedError

    def initial_state(self, n: int, *, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
        """``n`` initial states ``(n, *dims)`` at ``t0``."""
        raise NotImplementedError

    def grid(self, steps: int) -> Tensor:
        """The ``steps + 1`` point float64 grid from ``t0`` to ``t1`` (uniform by default)."""
        return torch.linspace(self.t0, self.t1, steps + 1, dtype=torch.float64)

    def exact_solution(self, x0: Tensor, times: Tensor, increments: Tensor) -> Tensor:
        """The solution on ``times`` given the Brownian increments: ``(len(times), *x0.shape)``."""
        raise NotImplementedError(f"{type(self).__name__} is not an SDE problem")

    def exact_moments(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``(E[X(t1)], E[X(t1)²])`` per coordinate, shaped like ``x0``."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form moments")

    def reference(self, x0: Tensor) -> Tensor:
        """The deterministic solution at ``t1`` (ODE problems; SDE problems: the drift-only flow)."""
        times = torch.tensor([self.t0, self.t1], dtype=torch.float64)
        return self.exact_solution(x0, times, torch.zeros_like(x0)[None])[-1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _LinearSDEProblem(OrderProblem):
    kind = "strong"
    sde: Any

    def equation(self, *, ode: bool = False) -> ForwardEquation:
        return ForwardEquation(self.sde, ode=ode)

    def initial_state(self, n, *, generator, dtype, device):
        return torch.full((n, self.dim), self.x0, dtype=dtype, device=device)

    def exact_solution(self, x0, times, increments):
        return self.sde.exact_solution(x0, times, increments)

    def exact_moments(self, x0):
        return self.sde.mean(x0, self.t1 - self.t0), self.sde.second_moment(x0, self.t1 - self.t0)

    def reference(self, x0):
        # the drift-only flow of a linear SDE is its conditional mean (no Itô correction)
        return self.sde.mean(x0, self.t1 - self.t0).to(x0.device)


class OUProblem(_LinearSDEProblem):
    """Ornstein–Uhlenbeck ``dx = −θ x dt + σ dw`` from ``x0`` over ``[0, t1]`` (additive noise).

    The reference is the conditional mean of the solution given the increments of a path 16 times
    finer than the finest grid (see :meth:`OrnsteinUhlenbeck.exact_solution`). Defaults:
    ``θ = 2, σ = 1, x0 = 1, t1 = 1``, ``dim = 1``.
    """

    name = "ou"
    fine_factor = 16

    def __init__(self, theta: float = 2.0, sigma: float = 1.0, x0: float = 1.0, t1: float = 1.0, dim: int = 1):
        self.sde = OrnsteinUhlenbeck(theta, sigma, T=t1)
        self.x0, self.t1, self.dim = float(x0), float(t1), int(dim)


class GBMProblem(_LinearSDEProblem):
    """Geometric Brownian motion ``dx = μ x dt + σ x dw`` from ``x0`` over ``[0, t1]``.

    Exact pathwise reference. Defaults ``μ = 1, σ = 1, x0 = 1, t1 = 1`` (Higham 2001 uses
    ``λ = 2, μ = 1``); ``dim`` independent coordinates.
    """

    name = "gbm"

    def __init__(self, mu: float = 1.0, sigma: float = 1.0, x0: float = 1.0, t1: float = 1.0, dim: int = 1):
        self.sde = GeometricBrownianMotion(mu, sigma, T=t1)
        self.x0, self.t1, self.dim = float(x0), float(t1), int(dim)


class LinearODEProblem(OrderProblem):
    """``dx/dt = A x`` over ``[0, t1]``, reference ``x(t1) = exp(t1 A) x0``.

    Default ``A = [[−0.5, 2], [−2, −0.5]]`` (a damped rotation); initial points standard normal.
    """

    name = "linear_ode"
    kind = "ode"

    def __init__(self, A: Tensor | Sequence[Sequence[float]] | None = None, t1: float = 1.0):
        a = torch.as_tensor([[-0.5, 2.0], [-2.0, -0.5]] if A is None else A, dtype=torch.float64)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(a.shape)}")
        self.A, self.t1, self.dim = a, float(t1), a.shape[0]

    def equation(self, *, ode: bool = True) -> ForwardEquation:
        a = self.A
        sde = SDE(lambda x, t: x @ a.to(x).T, lambda x, t: torch.zeros((), dtype=x.dtype), T=max(self.t1, 1e-6))
        return ForwardEquation(sde, ode=True)

    def initial_state(self, n, *, generator, dtype, device):
        gdev = generator.device if generator is not None else device
        return torch.randn(n, self.dim, generator=generator, dtype=dtype, device=gdev).to(device)

    def reference(self, x0):
        return x0.to(torch.float64) @ torch.linalg.matrix_exp(self.t1 * self.A).to(x0.device).T


class ProbabilityFlowProblem(OrderProblem):
    """The probability-flow ODE of a Gaussian mixture under an affine SDE, from ``t_start`` down to ``t_end``.

    Initial points are exact samples of ``p_{t_start}``; the reference is SciPy's ``solve_ivp``
    (DOP853, ``rtol = atol = 1e-12``) on the same exact score.

    Args:
        mixture: a :class:`GaussianMixture` (default: 2-D, two components with full covariances).
        sde: an affine :class:`~sdegen.LinearSDE` (default ``VPSDE(0.1, 20)``).
        t_start: default ``sde.T``. t_end: default ``0.05 · sde.T`` (away from the stiff end).
        grid: a grid of :mod:`sdegen.grids` (``"uniform"``, ``"edm"``, ...); the step size reported is
            ``|t_start − t_end| / N`` whatever the grid.
    """

    name = "pf_ode"
    kind = "ode"

    def __init__(
        self,
        mixture: GaussianMixture | None = None,
        sde: LinearSDE | None = None,
        t_start: float | None = None,
        t_end: float | None = None,
        grid: str = "uniform",
    ):
        if mixture is None:
            mixture = GaussianMixture(
                [0.35, 0.65],
                [[-1.0, 0.5], [1.0, -0.5]],
                [[[0.30, 0.10], [0.10, 0.20]], [[0.15, -0.05], [-0.05, 0.40]]],
            )
        self.mixture = mixture
        self.sde = sde if sde is not None else VPSDE(0.1, 20.0)
        self.t0 = float(self.sde.T if t_start is None else t_start)
        self.t1 = float(0.05 * self.sde.T if t_end is None else t_end)
        if not 0 < self.t1 < self.t0 <= self.sde.T:
            raise ValueError(f"need 0 < t_end < t_start <= T, got t_end={self.t1}, t_start={self.t0}")
        self.perturbed = mixture.perturbed(self.sde)
        self.grid_kind = grid
        self.dim = mixture.dim

    def equation(self, *, ode: bool = True):
        return self.sde.probability_flow(self.perturbed.score)

    def grid(self, steps):
        from ..grids import make_grid

        return make_grid(self.grid_kind, self.sde, steps, t_min=self.t1, t_max=self.t0)

    def initial_state(self, n, *, generator, dtype, device):
        gdev = generator.device if generator is not None else device
        x = self.perturbed.sample(n, self.t0, generator=generator, device=gdev)
        return x.to(device=device, dtype=dtype)

    def reference(self, x0):
        from scipy.integrate import solve_ivp

        eq = self.equation()
        shape = x0.shape

        def rhs(t, y):
            x = torch.as_tensor(y, dtype=torch.float64).reshape(shape)
            return eq.drift(x, torch.tensor(t, dtype=torch.float64)).reshape(-1).numpy()

        y0 = x0.detach().to("cpu", torch.float64).reshape(-1).numpy()
        sol = solve_ivp(rhs, (self.t0, self.t1), y0, method="DOP853", rtol=1e-12, atol=1e-12)
        if not sol.success:
            raise RuntimeError(f"reference solve failed: {sol.message}")
        return torch.as_tensor(sol.y[:, -1], dtype=torch.float64).reshape(shape).to(x0.device)

    def __repr__(self):
        return f"ProbabilityFlowProblem({self.mixture!r}, {self.sde!r}, t_start={self.t0}, t_end={self.t1})"


PROBLEMS: dict[str, type[OrderProblem]] = {
    "ou": OUProblem,
    "gbm": GBMProblem,
    "linear_ode": LinearODEProblem,
    "pf_ode": ProbabilityFlowProblem,
}

_DEFAULT_PATHS = {"strong": 1000, "weak": 4000, "ode": 16}


def _uniform_steps(steps: Sequence[int]) -> list[int]:
    out = sorted({int(n) for n in steps})
    if len(out) < 2 or any(isinstance(n, bool) or n < 1 for n in steps):
        raise ValueError(f"steps must hold at least two distinct positive ints, got {list(steps)}")
    return out


def measure_order(
    solver: str | Solver,
    problem: str | OrderProblem,
    steps: Sequence[int] = (8, 16, 32, 64),
    *,
    kind: str | None = None,
    n_paths: int | None = None,
    fine_steps: int | None = None,
    control_variate: bool = True,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    **solver_options: Any,
) -> OrderResult:
    """Measure a fixed-step solver's empirical order of convergence on ``problem``.

    Args:
        solver: a solver name (:func:`sdegen.available_solvers`) or a :class:`~sdegen.solvers.Solver`
            instance (your own subclass); ``solver_options`` go to its constructor.
        problem: ``"ou"``, ``"gbm"``, ``"linear_ode"``, ``"pf_ode"`` or an :class:`OrderProblem`.
        steps: step counts ``N`` (at least two). For strong/weak kinds the Brownian path lives on
            ``fine_steps`` intervals, a common multiple of all ``N`` (default ``lcm(steps)`` times the
            problem's ``fine_factor``: 1 for GBM, 16 for OU).
        kind: ``"strong"``, ``"weak"`` or ``"ode"``; default the problem's own (SDE problems
            ``"strong"``, ODE problems ``"ode"``; ``"ode"`` on an SDE problem drops the noise).
        n_paths: Monte-Carlo paths (strong 1000, weak 4000) or ODE initial points (16).
        control_variate: weak kind only — subtract the exact solution on the same paths (default);
            else compare with the exact moments.
        seed / generator: randomness of the initial points and Brownian paths (default seed 0).
        dtype, device: of the state (default float64 on the CPU: round-off should not limit the fit).

    Returns:
        :class:`OrderResult` (slope, intercept, r², errors, their standard errors).

    Only solvers that draw one Brownian increment per step can be driven pathwise (strong/weak);
    others raise ``RuntimeError``. Adaptive solvers and backends choose their own steps and are refused
    with ``TypeError``.
    """
    slv = get_solver(solver, **solver_options)
    if isinstance(slv, PathSolver | AdaptiveSolver):
        raise TypeError(f"measure_order needs a fixed-step solver; {slv.name!r} chooses its own steps")
    if isinstance(problem, str):
        if problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {sorted(PROBLEMS)} or an OrderProblem, got {problem!r}")
        problem = PROBLEMS[problem]()
    if not isinstance(problem, OrderProblem):
        raise TypeError(f"problem must be a name or an OrderProblem, got {type(problem).__name__}")
    kind = problem.kind if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "ode" and problem.kind == "ode":
        raise ValueError(f"problem {problem.name!r} is deterministic: use kind='ode'")
    ns = _uniform_steps(steps)
    n_paths = _DEFAULT_PATHS[kind] if n_paths is None else int(n_paths)
    if n_paths < 2:
        raise ValueError(f"n_paths must be >= 2, got {n_paths}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None:
        generator = torch.Generator(device).manual_seed(seed)
    x0 = problem.initial_state(n_paths, generator=generator, dtype=dtype, device=device)
    span = abs(problem.t1 - problem.t0)
    errors: list[float] = []
    ses: list[float] = []

    if kind == "ode":
        ref = problem.reference(x0)
        for n in ns:
            eq = problem.equation(ode=True)
            x = integrate(eq, x0, problem.grid(n), slv, None).x
            errors.append(float((x.to(ref) - ref).reshape(n_paths, -1).norm(dim=1).mean()))
            ses.append(0.0)
    else:
        lcm = math.lcm(*ns)
        fine = lcm * problem.fine_factor if fine_steps is None else int(fine_steps)
        if any(fine % n for n in ns):
            raise ValueError(f"fine_steps={fine} must be a multiple of every step count in {ns}")
        path = BrownianPath(problem.grid(fine), tuple(x0.shape), generator=generator, device=device)
        fine_t = path.times
        exact = problem.exact_solution(x0, fine_t, path.increments)[-1]
        if kind == "weak" and not control_variate:
            mean_ex, sq_ex = (v.to(exact) for v in problem.exact_moments(x0))
        for n in ns:
            times = fine_t[:: fine // n]
            noise = path.noise(times)
            eq = problem.equation()
            x = integrate(eq, x0, times, slv, noise).x.to(exact)
            if noise.draws != n:
                raise RuntimeError(
                    f"solver {slv.name!r} drew {noise.draws} normals in {n} steps; pathwise measurement "
                    "needs exactly one Brownian increment per step"
                )
            if kind == "strong":
                err = (x - exact).reshape(n_paths, -1).norm(dim=1)
                errors.append(float(err.mean()))
                ses.append(float(err.std() / math.sqrt(n_paths)))
            else:
                flat, ex = x.reshape(n_paths, -1), exact.reshape(n_paths, -1)
                if control_variate:
                    d1, d2 = flat - ex, flat**2 - ex**2
                else:
                    d1 = flat - mean_ex.reshape(n_paths, -1)
                    d2 = flat**2 - sq_ex.reshape(n_paths, -1)
                total = d1.mean(0).abs() + d2.mean(0).abs()
                errors.append(float(total.mean()))
                se = (d1.std(0) + d2.std(0)) / math.sqrt(n_paths)
                ses.append(float(se.mean()))
    hs = [span / n for n in ns]
    slope, intercept, r2 = fit_order(hs, errors)
    return OrderResult(
        slope=slope,
        intercept=intercept,
        r2=r2,
        steps=ns,
        step_sizes=hs,
        errors=errors,
        standard_errors=ses,
        kind=kind,
        solver=slv.name or type(slv).__name__,
        problem=problem.name,
    )
