"""sdegen: numerical SDE/ODE solvers for score-based generative diffusion models.

The shortest program::

    from sdegen import VPSDE, reverse_sample
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    x = reverse_sample(sde, score_model, shape=(16, 2), solver="heun", steps=100)
"""

from .controllers import PIController
from .discrete import DiscreteVPSDE
from .equation import AffineEquation, Equation, EquationBase
from .errors import MaxStepsExceeded, NonFiniteError, NotDifferentiableError
from .grids import make_grid
from .guidance import classifier_free, classifier_guidance
from .integrate import Solution, integrate
from .interpolant import CosineInterpolantSDE, FlowMatchingSDE, InterpolantSDE
from .likelihood import (
    AugmentedFlow,
    LikelihoodInfo,
    bits_per_dim,
    decode,
    dequantization_offset,
    encode,
    log_likelihood,
)
from .losses import dsm_loss, flow_matching_loss
from .models import (
    FlowModel,
    PerSampleModel,
    ScoreModel,
    Thresholding,
    edm_precondition,
    from_denoiser,
    from_diffusers,
    from_epsilon,
    from_flow,
    from_k_diffusion,
    from_score,
    from_velocity,
    thresholded,
)
from .noise import GeneratorNoise, PerSampleNoise
from .reverse import ReverseSDE
from .sample import forward_sample, reverse_sample
from .sde import EDMSDE, SDE, VESDE, VPSDE, LinearSDE, SubVPSDE
from .solvers import AdaptiveSolver, PathSolver, Solver, available_solvers, get_solver

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "LinearSDE",
    "VPSDE",
    "VESDE",
    "SubVPSDE",
    "EDMSDE",
    "DiscreteVPSDE",
    "InterpolantSDE",
    "FlowMatchingSDE",
    "CosineInterpolantSDE",
    "ReverseSDE",
    "reverse_sample",
    "forward_sample",
    "log_likelihood",
    "bits_per_dim",
    "encode",
    "decode",
    "dequantization_offset",
    "LikelihoodInfo",
    "AugmentedFlow",
    "NotDifferentiableError",
    "dsm_loss",
    "flow_matching_loss",
    "integrate",
    "Solution",
    "Equation",
    "AffineEquation",
    "EquationBase",
    "PIController",
    "make_grid",
    "ScoreModel",
    "Thresholding",
    "thresholded",
    "PerSampleModel",
    "from_score",
    "from_epsilon",
    "from_denoiser",
    "from_velocity",
    "from_flow",
    "FlowModel",
    "from_diffusers",
    "from_k_diffusion",
    "edm_precondition",
    "classifier_free",
    "classifier_guidance",
    "GeneratorNoise",
    "PerSampleNoise",
    "Solver",
    "AdaptiveSolver",
    "PathSolver",
    "available_solvers",
    "get_solver",
    "NonFiniteError",
    "MaxStepsExceeded",
]
