"""``"bosh3"``: adaptive Bogacki–Shampine 3(2) with per-sample step-size control and dense output.

Bogacki & Shampine (1989), *Appl. Math. Lett.* 2 (tableau :data:`~sdegen.solvers.tableaux.BOSH3`):
4 stages, FSAL (3 evaluations per accepted step), third order; cheaper than the 5(4) pairs at loose
tolerances (``rtol ≳ 1e-3``). Stepper and controller as ``"rk45"``; cubic Hermite dense output.
"""

from __future__ import annotations

from .embedded_rk import EmbeddedRungeKutta
from .tableaux import BOSH3

__all__ = ["Bosh3"]


class Bosh3(EmbeddedRungeKutta):
    """Bogacki–Shampine 3(2) with per-sample error control.

    Options: see :class:`~sdegen.solvers.embedded_rk.EmbeddedRungeKutta`.
    """

    name = "bosh3"
    tableau = BOSH3
