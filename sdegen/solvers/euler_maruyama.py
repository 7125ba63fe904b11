"""Euler–Maruyama (Maruyama 1955; Kloeden & Platen 1992, §9.1).

``x_{n+1} = x_n + f(x_n, t_n) h + G(x_n, t_n) ΔW``, ``ΔW ~ N(0, |h| I)``; plain Euler on ODEs.
Orders: ODE 1; SDE strong ½ (1 for additive noise), weak 1. One network evaluation per step.
"""

from __future__ import annotations

import torch

from .base import Solver, brownian_increment


class EulerMaruyama(Solver):
    """Euler–Maruyama for SDEs, explicit Euler for the probability-flow ODE."""

    name = "euler_maruyama"
    order = 1.0
    strong_order = 0.5
    weak_order = 1.0
    nfe_per_step = 1
    default_grid = ("edm", "uniform")  # measured: docs/performance.md, "Time grids"
    default_steps = 250

    def step(self, eq, x, t, t_next, noise, state):
        h = t_next - t
        x_next = torch.addcmul(x, h.to(x.dtype), eq.drift(x, t))  # x + h f, one pass
        if not eq.is_ode:
            dw = brownian_increment(noise, x, h)
            if dw is not None:
                x_next = x_next + eq.diffusion(x, t) * dw
        return x_next, state


class Euler(EulerMaruyama):
    """Explicit Euler on the probability-flow ODE (``noise_scale=0``): k-diffusion's ``sample_euler`` and
    diffusers' ``EulerDiscreteScheduler`` without churn. For the reverse SDE use ``"euler_maruyama"``."""

    name = "euler"
    supports_sde = False
    strong_order = None
    weak_order = None
