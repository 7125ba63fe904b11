"""Heun's method: the explicit trapezoidal rule (Süli & Mayers 2003, §12.5) and its stochastic form.

ODE: ``k1 = f(x, t)``, ``x̃ = x + h k1``, ``x_{n+1} = x + h (k1 + f(x̃, t + h)) / 2`` — order 2,
two network evaluations per step (the EDM sampler of Karras et al. 2022, Alg. 1, without churn).

SDE (additive noise only): the stochastic Heun scheme (Kloeden & Platen 1992, §15.1 with additive
noise; Rößler 2010) with one shared ``ΔW``:
``x̃ = x + f h + G ΔW``, ``x_{n+1} = x + (f(x) + f(x̃)) h / 2 + (G(t) + G(t + h)) ΔW / 2``.
Strong order 1 for additive noise. With state-dependent ``G`` it would converge to the
Stratonovich solution, so it refuses such equations.
"""

from __future__ import annotations

import torch

from .base import Solver, brownian_increment


class Heun(Solver):
    """Second-order Heun (ODE) / stochastic Heun (additive-noise SDE)."""

    name = "heun"
    order = 2.0
    strong_order = 1.0
    weak_order = 1.0
    needs_additive_noise = True
    nfe_per_step = 2
    default_grid = ("edm", "uniform")  # measured: docs/performance.md, "Time grids"
    default_steps = 100

    def step(self, eq, x, t, t_next, noise, state):
        h = t_next - t
        hx = h.to(x.dtype)
        k1 = eq.drift(x, t)
        dw = None if eq.is_ode else brownian_increment(noise, x, h)
        if dw is None:
            x_pred = torch.addcmul(x, hx, k1)
            return torch.addcmul(x, 0.5 * hx, k1 + eq.drift(x_pred, t_next)), state
        g1 = eq.diffusion(x, t)
        x_pred = x + hx * k1 + g1 * dw
        k2 = eq.drift(x_pred, t_next)
        g2 = eq.diffusion(x_pred, t_next)
        return x + 0.5 * hx * (k1 + k2) + 0.5 * (g1 + g2) * dw, state
