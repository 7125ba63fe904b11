"""``"tsit5"``: adaptive Tsitouras 5(4) with per-sample step-size control and dense output.

Tsitouras (2011), *Comput. Math. Appl.* 62 (tableau :data:`~sdegen.solvers.tableaux.TSIT5`): 7 stages,
FSAL (6 evaluations per accepted step), with smaller error constants than Dormand–Prince for the same
cost; the default adaptive method of diffrax and OrdinaryDiffEq.jl. Stepper and controller as ``"rk45"``.
"""

from __future__ import annotations

from .embedded_rk import EmbeddedRungeKutta
from .tableaux import TSIT5

__all__ = ["Tsit5"]


class Tsit5(EmbeddedRungeKutta):
    """Tsitouras 5(4) with per-sample error control.

    Options: see :class:`~sdegen.solvers.embedded_rk.EmbeddedRungeKutta`.
    """

    name = "tsit5"
    tableau = TSIT5
