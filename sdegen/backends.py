"""External backends reached by ``solver="torchdiffeq:<method>"`` / ``"torchsde:<method>"``.

Both are :class:`~sdegen.solvers.base.PathSolver` s: they integrate the whole path from ``times[0]``
(the noise end) down to ``times[-1]`` and return the states at every requested time. Network
evaluations are counted by the equation (``eq.nfe``), so ``Solution.nfe`` is exact.

**torchdiffeq** (``odeint``; Chen et al. 2018) — probability-flow ODEs only (``noise_scale=0``), any
method of ``torchdiffeq`` (``dopri5``, ``dopri8``, ``bosh3``, ``adaptive_heun``, ``fehlberg2``;
fixed-grid ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``, ``explicit_adams``,
``implicit_adams``; ``scipy_solver``). ``odeint`` accepts decreasing times itself. The model is never
evaluated outside ``[times[-1], times[0]]``:

* adaptive methods get ``options["step_t"] = times[1:]``, so a step that would cross an output time
  (in particular the final ``t_min``) is shortened to land on it. Without it dopri5 steps past
  ``t_min`` and interpolates back — on VP that evaluates at ``t < 0``, where ``s(t)² < 0``, and the
  solve dies with "underflow in dt";
* the only remaining excursion, the probe of torchdiffeq's initial-step heuristic (Hairer et al.,
  II.4), may reach past the end of a short interval: the time is clamped to the interval there.

Options: ``rtol``, ``atol`` (default 1e-5 each, the likelihood literature's choice), ``step_size``
(fixed-grid methods: the step in ``t``; without it they step on the ``times`` grid only, so at least
one of the two is required), ``max_steps`` (adaptive methods: steps per output interval before
:class:`~sdegen.errors.MaxStepsExceeded`, default 10 000 as sdegen's own adaptive solvers), ``options`` (a dict
passed to torchdiffeq as
its method options, e.g. ``{"first_step": 1e-3}``). ``stats`` reports ``accepted`` / ``rejected``
steps (``accepted_steps``, ``rejected_steps``: ``(batch,)`` tensors, equal for every sample since torchdiffeq
steps the batch together) for adaptive methods.

**torchsde** (``sdeint``; Li et al. 2020, Kidger et al. 2021) — reverse SDEs (``noise_scale > 0``).
``sdeint`` needs increasing times, so the backend integrates in ``u = t_0 − t`` (``t_0 = times[0]``):
``dx = −f_rev(x, t_0 − u) du + λ G(x, t_0 − u) dW_u``, where ``f_rev`` is sdegen's reverse drift. This
is the same Itô equation that Euler–Maruyama discretises with ``h < 0`` (the diffusion is evaluated at
the start of each step, the higher ``t``), so ``torchsde:euler`` is Euler–Maruyama on a different
Brownian path. Methods: Itô ``euler``, ``milstein``, ``srk`` (strong order 1.5 for diagonal noise);
Stratonovich ``midpoint``, ``heun``, ``euler_heun``, ``reversible_heun``, ``log_ode`` — these are the
same equation only when the noise is additive (``G`` independent of ``x``), so they refuse
state-dependent diffusions. Options: ``dt`` (default ``(times[0] − times[-1]) / 1000``),
``adaptive``, ``rtol``, ``atol``, ``dt_min``, ``options`` (torchsde method options).

*Randomness.* torchsde draws from its own ``BrownianInterval``, seeded by an integer ``entropy``. The
backend derives that seed deterministically from the caller's noise source (one draw of two uniform
numbers from the ``generator`` / ``seed`` given to ``reverse_sample``), so a backend run is
reproducible given the seed, but it is **not** bit-equal to sdegen's own solvers (different Brownian
path) and not batch-invariant (the Brownian interval spans the whole batch). With no noise source
(``noise=None``) the diffusion is switched off (a deterministic solve), as in sdegen's fixed-step solvers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .equation import Equation
from .errors import MaxStepsExceeded, NonFiniteError
from .noise import NoiseSource
from .solvers.base import PathSolver, Solver

__all__ = ["get_backend", "backend_options", "TorchDiffEqSolver", "TorchSDESolver"]

_SDE_ITO = ("euler", "milstein", "srk")
_SDE_STRATONOVICH = ("midpoint", "heun", "euler_heun", "reversible_heun", "log_ode")


def get_backend(name: str, **options: Any) -> PathSolver:
    """Instantiate the backend solver ``name`` (``"torchdiffeq:<method>"`` or ``"torchsde:<method>"``).

    Raises ``ValueError`` for an unknown library or method and ``TypeError`` for an unknown option.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string like 'torchdiffeq:dopri5', got {name!r}")
    lib, _, method = name.partition(":")
    classes = {"torchdiffeq": TorchDiffEqSolver, "torchsde": TorchSDESolver}
    if lib not in classes:
        raise ValueError(f"unknown solver backend {name!r}; use 'torchdiffeq:<method>' or 'torchsde:<method>'")
    cls = classes[lib]
    try:
        return cls(method, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"solver {name!r}: {err}; it accepts {cls.accepted_options}") from None
        raise


def backend_options(name: str) -> tuple[str, ...]:
    """The options a backend name accepts (empty for an unknown library)."""
    lib = name.partition(":")[0]
    return {"torchdiffeq": TorchDiffEqSolver, "torchsde": TorchSDESolver}.get(lib, Solver).__dict__.get(
        "accepted_options", ()
    )


def _positive(solver: str, name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"solver {solver!r}: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"solver {solver!r}: {name} must be finite and > 0, got {value}")
    return float(value)


def _check_options(solver: str, options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"solver {solver!r}: options must be a dict of method options, got {type(options).__name__}")
    return dict(options)


def _check_finite(name: str, states: Tensor, times: Tensor) -> None:
    finite = torch.isfinite(states.reshape(states.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise NonFiniteError(f"solver {name!r}: the state became NaN/Inf by output time t={float(times[k]):.6g}")


class TorchDiffEqSolver(PathSolver):
    """The probability-flow ODE solved by ``torchdiffeq.odeint`` (see the module docstring)."""

    accepted_options = ("rtol", "atol", "step_size", "max_steps", "options")
    supports_sde = False
    supports_ode = True
    strong_order = None
    weak_order = None

    def __init__(
        self,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float | None = None,
        max_steps: int = 10_000,
        options: dict[str, Any] | None = None,
    ):
        from torchdiffeq._impl.odeint import SOLVERS
        from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

        self.name = f"torchdiffeq:{method}"
        if method not in SOLVERS:
            raise ValueError(f"unknown torchdiffeq method {method!r}; available: {', '.join(sorted(SOLVERS))}")
        self.method = method
        self.adaptive = issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver)
        self.order = float(getattr(SOLVERS[method], "order", 0) or 0)
        self.rtol = _positive(self.name, "rtol", rtol)
        self.atol = _positive(self.name, "atol", atol)
        self.step_size = _positive(self.name, "step_size", step_size, allow_none=True)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"solver {self.name!r}: max_steps must be a positive int, got {max_steps!r}")
        self.max_steps = max_steps
        self.options = _check_options(self.name, options)

    def solve(
        self, eq: Equation, x: Tensor, times: Tensor, noise: NoiseSource | None, *, monitor: Callable | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        from torchdiffeq import odeint

        t_lo, t_hi = times.min(), times.max()
        stats = {"accepted_steps": 0, "rejected_steps": 0} if self.adaptive else {}

        class _Func:
            def __call__(self, t: Tensor, y: Tensor) -> Tensor:
                tc = t.to(times.dtype).clamp(t_lo, t_hi)
                if monitor is not None:
                    monitor(float(tc))
                return eq.drift(y, tc)

        func = _Func()
        opts = dict(self.options)
        if self.adaptive:
            opts.setdefault("step_t", times[1:])
            opts.setdefault("max_num_steps", self.max_steps)

            def accept(t0, y0, dt):
                stats["accepted_steps"] += 1

            def reject(t0, y0, dt):
                stats["rejected_steps"] += 1

            func.callback_accept_step = accept
            func.callback_reject_step = reject
        elif self.method != "scipy_solver":
            if self.step_size is not None:
                opts.setdefault("step_size", self.step_size)
            elif times.shape[0] < 3 and "grid_constructor" not in opts:
                raise ValueError(
                    f"solver {self.name!r} is a fixed-grid method: give step_size= (in t units) or a grid with "
                    "times=, otherwise it takes a single step"
                )
        try:
            states = odeint(func, x, times, rtol=self.rtol, atol=self.atol, method=self.method, options=opts)
        except AssertionError as err:
            if "max_num_steps" in str(err):
                raise MaxStepsExceeded(f"solver {self.name!r}: more than max_steps={self.max_steps} steps") from err
            raise NonFiniteError(f"solver {self.name!r} failed: {err}") from err
        _check_finite(self.name, states, times)
        # one meaning everywhere: steps per sample (torchdiffeq's steps are shared by the whole batch)
        stats = {k: torch.full((x.shape[0],), v, dtype=torch.long, device=x.device) for k, v in stats.items()}
        return states, stats

    def __repr__(self) -> str:
        return f"TorchDiffEqSolver(method={self.method!r}, rtol={self.rtol}, atol={self.atol})"


def _entropy(noise: NoiseSource, x: Tensor) -> int:
    """A 48-bit integer seed for torchsde drawn from the caller's noise source (one draw)."""
    u = noise.uniform((x.shape[0], 2), device=x.device, dtype=torch.float32)[0]
    hi, lo = (u * 2.0**24).long().tolist()
    return hi * 2**24 + lo


class _FlippedSDE:
    """The reverse-time equation in ``u = t_0 − t`` for torchsde (flat ``(batch, d)`` states)."""

    noise_type = "diagonal"

    def __init__(
        self, eq: Equation, shape: tuple[int, ...], times: Tensor, sde_type: str, stochastic: bool,
        monitor: Callable | None,
    ):
        self.eq, self.shape, self.sde_type, self.stochastic = eq, shape, sde_type, stochastic
        self.t_hi, self.t_lo = times[0], times[-1]
        self.monitor = monitor
        self._cache: tuple[Any, ...] | None = None

    def _t(self, u: Tensor) -> Tensor:
        return (self.t_hi - u.to(self.t_hi.dtype)).clamp(self.t_lo, self.t_hi)

    def f(self, u: Tensor, y: Tensor) -> Tensor:
        # sdeint evaluates f(t_0, y_0) once to check shapes and the first step repeats it: cache it
        key = (id(y), y._version, float(u))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        t = self._t(u)
        if self.monitor is not None:
            self.monitor(float(t))
        out = -self.eq.drift(y.reshape(self.shape), t).reshape(y.shape)
        self._cache = (key, out)
        return out

    def g(self, u: Tensor, y: Tensor) -> Tensor:
        if not self.stochastic:
            return torch.zeros_like(y)
        g = self.eq.diffusion(y.reshape(self.shape), self._t(u))
        return torch.broadcast_to(g, self.shape).reshape(y.shape)


class TorchSDESolver(PathSolver):
    """The reverse-time SDE solved by ``torchsde.sdeint`` in a flipped time variable (see the module docstring)."""

    accepted_options = ("dt", "adaptive", "rtol", "atol", "dt_min", "options")
    supports_sde = True
    supports_ode = False
    order = 1.0
    weak_order = 1.0

    def __init__(
        self,
        method: str = "euler",
        dt: float | None = None,
        adaptive: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-4,
        dt_min: float = 1e-5,
        options: dict[str, Any] | None = None,
    ):
        self.name = f"torchsde:{method}"
        if method not in _SDE_ITO + _SDE_STRATONOVICH:
            raise ValueError(
                f"unknown or unsupported torchsde method {method!r}; available: "
                f"{', '.join(_SDE_ITO + _SDE_STRATONOVICH)}"
            )
        self.method = method
        self.sde_type = "ito" if method in _SDE_ITO else "stratonovich"
        self.strong_order = {"euler": 0.5, "milstein": 1.0, "srk": 1.5}.get(method, 1.0)
        self.weak_order = 1.5 if method == "srk" else 1.0
        self.dt = _positive(self.name, "dt", dt, allow_none=True)
        if not isinstance(adaptive, bool):
            raise TypeError(f"solver {self.name!r}: adaptive must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        self.rtol = _positive(self.name, "rtol", rtol)
        self.atol = _positive(self.name, "atol", atol)
        self.dt_min = _positive(self.name, "dt_min", dt_min)
        self.options = _check_options(self.name, options)

    def check(self, eq: Equation) -> None:
        if eq.is_ode:
            raise ValueError(
                f"solver {self.name!r} integrates SDEs only; for the probability-flow ODE (noise_scale=0) "
                "use 'torchdiffeq:<method>' or an sdegen ODE solver"
            )
        if self.sde_type == "stratonovich" and eq.state_dependent:
            raise ValueError(
                f"solver {self.name!r} is a Stratonovich method; with state-dependent diffusion it would solve "
                f"a different equation. Use an Ito method: {', '.join(_SDE_ITO)}"
            )

    def solve(
        self, eq: Equation, x: Tensor, times: Tensor, noise: NoiseSource | None, *, monitor: Callable | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        import torchsde

        if times[-1] > times[0]:
            raise ValueError(f"solver {self.name!r} integrates the reverse-time SDE: times must decrease")
        shape = tuple(x.shape)
        flat = x.reshape(shape[0], -1)
        us = times[0] - times  # increasing from 0
        sde = _FlippedSDE(eq, shape, times, self.sde_type, noise is not None, monitor)
        dt = self.dt if self.dt is not None else float(us[-1]) / 1000.0
        levy = {"srk": "space-time", "log_ode": "foster"}.get(self.method, "none")
        bm = torchsde.BrownianInterval(
            t0=float(us[0]), t1=float(us[-1]), size=tuple(flat.shape), dtype=x.dtype, device=x.device,
            entropy=_entropy(noise, x) if noise is not None else 0, levy_area_approximation=levy, dt=dt,
        )
        opts = dict(self.options)
        if self.method == "milstein" and not eq.state_dependent:
            opts.setdefault("grad_free", True)  # additive noise: the Milstein correction is 0
        states = torchsde.sdeint(
            sde, flat, us, bm=bm, method=self.method, dt=dt, adaptive=self.adaptive,
            rtol=self.rtol, atol=self.atol, dt_min=self.dt_min, options=opts,
        )
        states = states.reshape(len(times), *shape)
        _check_finite(self.name, states, times)
        return states, {}

    def __repr__(self) -> str:
        return f"TorchSDESolver(method={self.method!r}, dt={self.dt}, adaptive={self.adaptive})"
