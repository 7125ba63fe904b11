"""``"rk45"``: adaptive Dormand–Prince 5(4) with per-sample step-size control and dense output.

Dormand & Prince (1980), *J. Comp. Appl. Math.* 6 (tableau :data:`~sdegen.solvers.tableaux.DOPRI5`):
7 stages, the 7th at the new solution (FSAL), so an accepted step costs 6 evaluations; the 5th-order
solution is propagated. The stepper is :class:`~sdegen.solvers.embedded_rk.EmbeddedRungeKutta`, the
step sizes come from :class:`~sdegen.controllers.PIController` (Hairer's DOPRI5 PI rule), per sample.
"""

from __future__ import annotations

from .embedded_rk import EmbeddedRungeKutta
from .tableaux import DOPRI5

__all__ = ["RK45"]


class RK45(EmbeddedRungeKutta):
    """Dormand–Prince 5(4) with per-sample error control.

    Options: see :class:`~sdegen.solvers.embedded_rk.EmbeddedRungeKutta`.
    """

    name = "rk45"
    tableau = DOPRI5
