"""Butcher tableaux of embedded explicit Runge–Kutta pairs, with their continuous extensions.

An adaptive method is data: :class:`ButcherTableau` holds ``c``, ``a``, ``b`` (the propagated
solution), ``b_error`` (``b − b̂``, the embedded error weights), the orders, and the dense-output
polynomials ``P`` with ``y(t + θh) = y + h Σ_i k_i Σ_j P[i][j] θ^(j+1)``. One generic stepper
(:mod:`sdegen.solvers.embedded_rk`) runs them all.

* :data:`DOPRI5` — Dormand & Prince (1980), *J. Comp. Appl. Math.* 6, 5(4), 7 stages, FSAL; tableau as
  Hairer, Nørsett & Wanner, *Solving ODEs I* (2nd ed., 1993), Table II.5.2; 4th-order continuous
  extension of Shampine (1986), *Math. Comp.* 46 (coefficients as SciPy's ``RK45``).
* :data:`TSIT5` — Tsitouras (2011), "Runge–Kutta pairs of order 5(4) satisfying only the first column
  simplifying assumption", *Comput. Math. Appl.* 62, 5(4), 7 stages, FSAL, with its 4th-order
  interpolant; the error weights as corrected in OrdinaryDiffEq.jl (the last weight is ``−1/66``; the
  paper prints it with the wrong sign) and used by diffrax and torchode.
* :data:`BOSH3` — Bogacki & Shampine (1989), "A 3(2) pair of Runge–Kutta formulas", *Appl. Math. Lett.*
  2, 4 stages, FSAL; cubic Hermite dense output (third order, from ``y``, ``y_new`` and the FSAL
  derivatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ButcherTableau", "DOPRI5", "TSIT5", "BOSH3", "TABLEAUX"]


@dataclass(frozen=True)
class ButcherTableau:
    """An embedded explicit Runge–Kutta pair.

    Attributes:
        name: short name.
        c: ``(s,)`` nodes.
        a: lower-triangular rows; ``a[i]`` has ``i`` entries.
        b: ``(s,)`` weights of the propagated solution (order ``order``).
        b_error: ``(s,)`` ``b − b̂``: the local error estimate is ``h Σ b_error_i k_i`` (order ``error_order``).
        order: order of the propagated solution; error_order: order of the embedded one.
        fsal: the last stage is evaluated at the new solution (``a[-1] == b``, ``c[-1] == 1``), so an
            accepted step reuses it as the next step's first stage.
        dense: ``(s, deg)`` polynomial coefficients ``P[i][j]`` of the continuous extension.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    order: int
    error_order: int
    fsal: bool
    dense: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows")
        if len(self.b) != s or len(self.b_error) != s or len(self.dense) != s:
            raise ValueError(f"{self.name}: b, b_error and dense need {s} entries")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"{self.name}: row {i} of a does not sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > 1e-12 or abs(sum(self.b_error)) > 1e-12:
            raise ValueError(f"{self.name}: b must sum to 1 and b_error to 0")
        if self.fsal and (
            self.c[-1] != 1.0 or any(abs(x - y) > 1e-15 for x, y in zip(self.a[-1], self.b, strict=False))
        ):
            raise ValueError(f"{self.name}: an FSAL tableau's last row must equal b, with c = 1")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def passive_stages(self) -> frozenset[int]:
        """Stages whose derivative only feeds later stages (zero weight in ``b``, ``b_error`` and ``dense``):
        an equation may skip the integral components it never reads there (``Equation.passive_drift``)."""
        return frozenset(
            i for i in range(1, self.stages)
            if self.b[i] == 0.0 and self.b_error[i] == 0.0 and not any(self.dense[i])
        )


def _ascending(poly: np.ndarray) -> tuple[float, ...]:
    """Coefficients of ``θ^1 … θ^d`` of a polynomial with zero constant term (ascending order)."""
    if abs(poly[0]) > 1e-12:
        raise ValueError("a continuous-extension weight must vanish at θ = 0")
    return tuple(float(v) for v in poly[1:])


def _hermite_dense(b: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Cubic Hermite interpolation through ``y``, ``y_new`` and the FSAL derivatives ``k_1``, ``k_s``.

    ``y(θ) = y + h [(3θ² − 2θ³) Σ b_i k_i + (θ − 2θ² + θ³) k_1 + (θ³ − θ²) k_s]``.
    """
    rows = []
    for i, bi in enumerate(b):
        p = np.array([0.0, 0.0, 3.0 * bi, -2.0 * bi])
        if i == 0:
            p += np.array([0.0, 1.0, -2.0, 1.0])
        if i == len(b) - 1:
            p += np.array([0.0, 0.0, -1.0, 1.0])
        rows.append(_ascending(p))
    return tuple(rows)


def _tsit5_dense() -> tuple[tuple[float, ...], ...]:
    """Tsitouras' seven interpolation weights ``b_i(θ)`` (degree 4), expanded to ascending coefficients."""
    P = np.polynomial.polynomial

    def prod(scale: float, *factors: list[float]) -> np.ndarray:
        out = np.array([scale])
        for f in factors:
            out = P.polymul(out, np.array(f))
        return np.pad(out, (0, 5 - len(out)))

    t, t2 = [0.0, 1.0], [0.0, 0.0, 1.0]
    weights = [
        prod(-1.0530884977290216, t, [-1.3299890189751412, 1.0], [0.7139816917074209, -1.4364028541716351, 1.0]),
        prod(0.1017, t2, [1.2949852507374631, -2.1966568338249754, 1.0]),
        prod(2.490627285651252793, t2, [1.57803468208092486, -2.38535645472061657, 1.0]),
        prod(-16.54810288924490272, [-1.21712927295533244, 1.0], [-0.61620406037800089, 1.0], t2),
        prod(47.37952196281928122, [-1.203071208372362603, 1.0], [-0.658047292653547382, 1.0], t2),
        prod(-34.87065786149660974, [-1.2, 1.0], [-0.666666666666666667, 1.0], t2),
        prod(2.5, [-1.0, 1.0], [-0.6, 1.0], t2),
    ]
    return tuple(_ascending(w) for w in weights)


DOPRI5 = ButcherTableau(
    name="dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_error=(-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40),
    order=5,
    error_order=4,
    fsal=True,
    dense=(
        (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
        (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
        (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632),
        (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
        (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
    ),
)

_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)

TSIT5 = ButcherTableau(
    name="tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    b_error=(
        0.00178001105222577714,
        0.0008164344596567469,
        -0.007880878010261995,
        0.1447110071732629,
        -0.5823571654525552,
        0.45808210592918697,
        -1 / 66,
    ),
    order=5,
    error_order=4,
    fsal=True,
    dense=_tsit5_dense(),
)

_BOSH3_B = (2 / 9, 1 / 3, 4 / 9, 0.0)

BOSH3 = ButcherTableau(
    name="bosh3",
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), _BOSH3_B[:3]),
    b=_BOSH3_B,
    # b̂ = (7/24, 1/4, 1/3, 1/8)
    b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    order=3,
    error_order=2,
    fsal=True,
    dense=_hermite_dense(_BOSH3_B),
)

TABLEAUX = {t.name: t for t in (DOPRI5, TSIT5, BOSH3)}
