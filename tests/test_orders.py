"""Empirical convergence orders against theory (Kloeden & Platen 1992; Higham 2001, SIAM Review 43(3)).

Each test fits the log-log slope of the error over step sizes with ``sdegen.testing.measure_order``
and asserts ``|slope − expected| < 0.25``. Step counts sit in the asymptotic regime, Monte-Carlo
noise is small against the errors (common Brownian paths, control variates), and all randomness is
seeded, so the fits are reproducible; the margins below were measured with the stated seeds.

Solvers registered later are covered too: every fixed-step solver's declared ODE order is checked
on the probability-flow ODE, and every SDE solver's declared strong order on Ornstein–Uhlenbeck.
"""

import pytest

from sdegen.solvers import AdaptiveSolver, available_solvers, get_solver
from sdegen.testing import GBMProblem, OUProblem, measure_order


def _check(result, expected, tol=0.25):
    assert abs(result.slope - expected) < tol, str(result)
    assert result.r2 > 0.95, str(result)


def test_euler_maruyama_strong_order_half_on_multiplicative_noise():
    """GBM dx = x dt + x dw, 1000 shared paths; measured slope 0.48 (r² 0.999)."""
    _check(measure_order("euler_maruyama", "gbm", steps=[16, 32, 64, 128, 256], kind="strong"), 0.5)


def test_euler_maruyama_strong_order_one_on_additive_noise():
    """OU dx = −2x dt + dw; reference 16x finer; measured slope 1.02."""
    _check(measure_order("euler_maruyama", "ou", steps=[8, 16, 32, 64, 128], kind="strong"), 1.0)


def test_euler_maruyama_weak_order_one():
    """First two moments, exact solution on the same paths as control variate; OU and GBM (σ = 0.5)."""
    _check(measure_order("euler_maruyama", OUProblem(), steps=[4, 8, 16, 32, 64], kind="weak"), 1.0)
    _check(measure_order("euler_maruyama", GBMProblem(sigma=0.5), steps=[8, 16, 32, 64, 128], kind="weak"), 1.0)


def test_heun_order_two_on_the_probability_flow_ode():
    """Probability-flow ODE of a 2-D Gaussian mixture under VP, t from 1 to 0.05; measured slope 1.92."""
    _check(measure_order("heun", "pf_ode", steps=[8, 16, 32, 64, 128]), 2.0)


def test_euler_order_one_on_the_probability_flow_ode():
    _check(measure_order("euler_maruyama", "pf_ode", steps=[8, 16, 32, 64, 128]), 1.0)


def test_stochastic_heun_strong_order_one_on_additive_noise():
    _check(measure_order("heun", "ou", steps=[8, 16, 32, 64, 128], kind="strong"), 1.0)


# -- every registered solver meets its declared order ----------------------------------------------------
# What the order tests do with each registered solver. A new or renamed solver fails
# test_every_solver_is_listed until it is listed here: a crash or a refusal is a failure, never a skip.
ODE_ORDER = {
    "euler": "measure",
    "euler_maruyama": "measure",
    "heun": "measure",
    "ddim": "measure",
    "reverse_diffusion": "measure",
    "dpmpp_2m": "measure",
    "dpmpp_3m": "measure",
    "edm": "measure",
    "unipc": "measure",
    "lms": "measure",
    "ipndm": "measure",
    "dpmpp_2m_sde": "measure",  # at noise_scale 0 it is DPM-Solver++(2M)
    "dpmpp_3m_sde": "measure",
    "rk45": "adaptive",  # error tracks rtol: tests/test_adaptive.py
    "tsit5": "adaptive",
    "bosh3": "adaptive",
    "dpm_adaptive": "adaptive",  # error tracks rtol: tests/test_samplers.py
    "ancestral": "sde only",
    "langevin": "sde only",
    "pc": "sde only",
}
STRONG_ORDER = {
    "euler": "none declared",  # ODE only: "euler_maruyama" is its SDE form
    "euler_maruyama": "measure",
    "heun": "measure",
    "reverse_diffusion": "measure",
    "ddim": "affine only",  # needs the Gaussian kernel of a reverse-time equation; not a forward SDE
    "ancestral": "none declared",
    "dpmpp_2m": "none declared",
    "dpmpp_3m": "none declared",
    "edm": "none declared",
    "langevin": "none declared",
    "pc": "none declared",
    "rk45": "none declared",
    "tsit5": "none declared",
    "bosh3": "none declared",
    "unipc": "none declared",
    "lms": "none declared",
    "ipndm": "none declared",
    "dpmpp_2m_sde": "none declared",  # weak order measured exactly on Gaussian data: tests/test_samplers.py
    "dpmpp_3m_sde": "none declared",
    "dpm_adaptive": "none declared",
}


def test_every_solver_is_listed():
    assert set(available_solvers()) == set(ODE_ORDER) == set(STRONG_ORDER)


@pytest.mark.parametrize("name", [n for n, v in ODE_ORDER.items() if v == "measure"])
def test_declared_ode_order_is_reached(name):
    """Measured slope on the probability-flow ODE is at least the declared ``order`` − 0.25 (a
    solver may do better on this smooth problem, never worse). 16..256 steps: multistep methods
    are pre-asymptotic at 8 (dpmpp_3m: 2.69 over 8..128, 3.03 over 16..256)."""
    slv = get_solver(name)
    result = measure_order(slv, "pf_ode", steps=[16, 32, 64, 128, 256])
    assert result.slope > slv.order - 0.25, str(result)


@pytest.mark.parametrize("name", [n for n, v in ODE_ORDER.items() if v != "measure"])
def test_solvers_without_a_measured_ode_order_say_why(name):
    slv = get_solver(name)
    if ODE_ORDER[name] == "adaptive":
        assert isinstance(slv, AdaptiveSolver)
        with pytest.raises(TypeError, match="chooses its own steps"):
            measure_order(slv, "pf_ode", steps=[16, 32])
    else:
        assert not slv.supports_ode


@pytest.mark.parametrize("name", [n for n, v in STRONG_ORDER.items() if v == "measure"])
def test_declared_strong_order_is_reached_on_additive_noise(name):
    """Measured strong slope on OU is at least the declared ``strong_order`` − 0.25."""
    slv = get_solver(name)
    result = measure_order(slv, "ou", steps=[8, 16, 32, 64, 128], kind="strong", n_paths=500)
    assert result.slope > slv.strong_order - 0.25, str(result)


@pytest.mark.parametrize("name", [n for n, v in STRONG_ORDER.items() if v != "measure"])
def test_solvers_without_a_measured_strong_order_say_why(name):
    slv = get_solver(name)
    if STRONG_ORDER[name] == "none declared":
        assert slv.strong_order is None or not slv.supports_sde
    else:
        with pytest.raises(ValueError, match="affine"):
            measure_order(slv, "ou", steps=[8, 16], kind="strong", n_paths=10)
