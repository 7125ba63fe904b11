"""Exceptions raised by sdegen's integrators."""

from __future__ import annotations

__all__ = ["NonFiniteError", "MaxStepsExceeded", "NotDifferentiableError"]


class NonFiniteError(FloatingPointError):
    """The state or a score evaluation became NaN/Inf; the message names solver, step and time."""


class MaxStepsExceeded(RuntimeError):
    """An adaptive solver used up ``max_steps`` before reaching the end time."""


class NotDifferentiableError(RuntimeError):
    """The score model's output has no autograd graph to its input ``x`` (a divergence cannot be taken)."""
