"""Tools for testing solvers and score models against exact answers.

* :class:`GaussianMixture` — a data distribution whose perturbed marginals under any affine SDE
  are known in closed form (score, log-density, samples, ε / x̂0 / v predictions).
"""

from .mixture import GaussianMixture, PerturbedMixture

__all__ = ["GaussianMixture", "PerturbedMixture"]
