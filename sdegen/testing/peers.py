"""Load peer implementations for cross-checks and benchmarks.

k-diffusion's package ``__init__`` imports its whole training stack (torchvision, kornia,
clean-fid, ...), none of which its samplers need, and torchvision has no CPU-only wheel on some
platforms. :func:`load_k_diffusion_sampling` therefore imports ``k_diffusion.sampling`` normally
when it can, and otherwise executes the installed ``k_diffusion/sampling.py`` file itself under a
minimal package whose ``utils`` provides the one helper the samplers use (``append_dims``).
The sampler code that runs is k-diffusion's own, unmodified.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["load_k_diffusion_sampling"]

_CACHE: dict[str, types.ModuleType] = {}


def _append_dims(x, target_dims):
    """k_diffusion.utils.append_dims: append singleton dimensions up to ``target_dims``."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load_k_diffusion_sampling() -> types.ModuleType:
    """Return the ``k_diffusion.sampling`` module; raise ``ImportError`` if k-diffusion is absent."""
    if "mod" in _CACHE:
        return _CACHE["mod"]
    try:
        mod = importlib.import_module("k_diffusion.sampling")
    except ImportError:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)") from None
        path = Path(spec.submodule_search_locations[0]) / "sampling.py"
        pkg_name = "_sdegen_k_diffusion"
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = []  # a namespace for the relative import `from . import utils`
        utils = types.ModuleType(f"{pkg_name}.utils")
        utils.append_dims = _append_dims
        pkg.utils = utils
        sys.modules[pkg_name] = pkg
        sys.modules[f"{pkg_name}.utils"] = utils
        mod_spec = importlib.util.spec_from_file_location(f"{pkg_name}.sampling", path)
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[f"{pkg_name}.sampling"] = mod
        mod_spec.loader.exec_module(mod)
    _CACHE["mod"] = mod
    return mod
