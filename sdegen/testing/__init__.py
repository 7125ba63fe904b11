"""Tools for testing solvers and score models against exact answers (see ``docs/testing.md``).

* :class:`GaussianMixture` — a data distribution whose perturbed marginals under any affine SDE
  are known in closed form (score, log-density, samples, ε / x̂0 / v predictions).
* :class:`OrnsteinUhlenbeck`, :class:`GeometricBrownianMotion` — linear SDEs with exact pathwise
  solutions and moments; :class:`ForwardEquation`, :class:`BrownianPath`, :class:`ReplayNoise` drive
  any solver forward in time along a shared Brownian path; :class:`PredrawnNoise` serves given normal
  draws in order (identical noise for a cross-check against another implementation).
* :func:`energy_test`, :func:`moment_check`, :func:`mixture_weight_check` — distribution checks with a
  stated false-failure rate.
* :func:`measure_order` — empirical strong / weak / ODE convergence orders.
* :mod:`sdegen.testing.strategies` — hypothesis strategies (imported on demand: needs ``hypothesis``).
"""

from .distances import (
    EnergyTestResult,
    MomentReport,
    WeightReport,
    energy_distance,
    energy_test,
    mixture_weight_check,
    moment_check,
    responsibilities,
)
from .linear_sdes import (
    BrownianPath,
    ForwardEquation,
    GeometricBrownianMotion,
    OrnsteinUhlenbeck,
    PredrawnNoise,
    ReplayNoise,
)
from .mixture import GaussianMixture, PerturbedMixture
from .order import (
    PROBLEMS,
    GBMProblem,
    LinearODEProblem,
    OrderProblem,
    OrderResult,
    OUProblem,
    ProbabilityFlowProblem,
    fit_order,
    measure_order,
)

__all__ = [
    "GaussianMixture",
    "PerturbedMixture",
    "OrnsteinUhlenbeck",
    "GeometricBrownianMotion",
    "ForwardEquation",
    "BrownianPath",
    "ReplayNoise",
    "PredrawnNoise",
    "energy_distance",
    "energy_test",
    "EnergyTestResult",
    "moment_check",
    "MomentReport",
    "mixture_weight_check",
    "WeightReport",
    "responsibilities",
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
