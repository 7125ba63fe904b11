"""diffusers' flow-matching schedulers and transformers through ``from_diffusers``, cross-checked against diffusers.

What is proved:
* the timestep convention: a diffusers-style model returning the exact velocity of a Gaussian-mixture oracle at
  ``σ = timestep / N`` becomes the exact score (so ``timestep = σ · N`` and ``σ = t``);
* with a randomly initialised ``SD3Transformer2DModel`` in float64 and the scheduler's own timesteps, sdegen's
  ``euler_maruyama`` (``noise_scale=0``) reproduces ``FlowMatchEulerDiscreteScheduler`` (shift 1, shift 3,
  Flux-style dynamic shifting with ``mu``) and sdegen's ``heun`` reproduces ``FlowMatchHeunDiscreteScheduler`` —
  full loops, to 1e-12 relative (measured ~1e-15). diffusers' ``step`` upcasts to float32; the test runs its
  arithmetic in float64 instead (the same operations; see ``_float64_schedulers``);
* ``make_grid("shift", sde, ...)`` is the scheduler's spacing (static shift and dynamic ``mu``, exponential and
  linear), and ``sde.shift_for(image_seq_len=...)`` is the Flux pipeline's ``calculate_shift``;
* argument errors.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdegen import from_diffusers, make_grid, reverse_sample
from sdegen.integrations.diffusers_flow import DiffusersFlowSDE, is_flow_scheduler
from sdegen.testing import GaussianMixture

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_flow_match_euler_discrete as fm_euler  # noqa: E402
from diffusers.schedulers import scheduling_flow_match_heun_discrete as fm_heun  # noqa: E402

F64 = torch.float64
GM = GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.5, -0.5]], [[0.3, 0.2], [0.25, 0.4]])
B = 2


class _Torch64:
    """``torch`` as diffusers' flow schedulers see it, with ``torch.float32`` meaning float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def _float64_schedulers(monkeypatch):
    """Run the FlowMatch schedulers' arithmetic in float64, like sdegen's (their ``step`` upcasts to float32)."""
    monkeypatch.setattr(fm_euler, "torch", _Torch64())
    monkeypatch.setattr(fm_heun, "torch", _Torch64())


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8,
    )
    return net.double().eval()


def _cond():
    g = torch.Generator().manual_seed(2)
    return dict(encoder_hidden_states=torch.randn(B, 5, 16, dtype=F64, generator=g),
                pooled_projections=torch.randn(B, 8, dtype=F64, generator=g))


def _x_T():
    return torch.randn(B, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))


def _diffusers_loop(net, sched, cond):
    x = _x_T()
    with torch.no_grad():
        for ts in sched.timesteps:
            v = net(hidden_states=x, timestep=ts.expand(B), **cond).sample
            x = sched.step(v, ts, x).prev_sample
    return x


def _flux_calculate_shift():
    """diffusers' own ``calculate_shift`` of the Flux pipeline, read from its source (the pipeline module imports
    ``transformers``, which these tests do not need)."""
    import ast
    from pathlib import Path

    path = Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py"
    tree = ast.parse(path.read_text())
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "calculate_shift"]
    namespace: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["calculate_shift"]


def _close(a, b):
    scale = b.abs().max()
    assert (a - b).abs().max() <= 1e-12 * scale, f"max diff {(a - b).abs().max():.3g} at scale {scale:.3g}"


def test_timestep_convention_gives_the_exact_score():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    probe = DiffusersFlowSDE(1000, shift=None, t_min=1e-3)
    pm = GM.perturbed(probe)
    calls = []

    def model(sample, timestep, **kw):  # a UNet-style positional model: x, timestep
        calls.append(timestep)
        return SimpleNamespace(sample=pm.flow_velocity(sample, probe.timesteps_to_times(timestep)))

    sde, score = from_diffusers(model, sched)
    assert isinstance(sde, DiffusersFlowSDE) and sde.shift == 3.0 and sde.num_timesteps == 1000
    assert sde.t_min == pytest.approx(float(sched.sigma_min))
    x = 1.5 * torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(32, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    torch.testing.assert_close(score(x, t), pm.score(x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(calls[-1], 1000 * t)  # float timesteps σ · N
    torch.testing.assert_close(sde.timesteps_to_times(torch.tensor([1000.0, 250.0])),
                               torch.tensor([1.0, 0.25], dtype=F64))
    assert is_flow_scheduler(sched) and not is_flow_scheduler(diffusers.DDPMScheduler())
    # Flux pipelines pass σ itself: timestep_scale=1
    calls.clear()
    _, score1 = from_diffusers(model, sched, timestep_scale=1)
    score1(x, t)
    torch.testing.assert_close(calls[-1], t)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_reproduces_flow_match_euler_scheduler(transformer, _float64_schedulers, shift):
    sched = fm_euler.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(8)
    assert sched.sigmas.dtype == F64
    cond = _cond()
    ref = _diffusers_loop(transformer, sched, cond)
    sde, score = from_diffusers(transformer, sched)
    with torch.no_grad():
        sol = reverse_sample(sde, score, x_T=_x_T(), times=sde.timesteps_to_times(sched.timesteps),
                             solver="euler_maruyama", noise_scale=0.0, final_step="tweedie", model_kwargs=cond,
                             return_info=True, progress=False)
    _close(sol.x, ref)  # the last Euler step to σ = 0 is x − σ v = x̂0: final_step="tweedie"
    assert sol.nfe == 8
    # sdegen's own shifted grid is the scheduler's spacing
    grid = make_grid("shift", sde, 7, t_min=float(sched.sigmas[-2]))
    torch.testing.assert_close(grid, sched.sigmas[:-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(make_grid("shift", sde, 7, t_min=float(sched.sigmas[-2])),
                               make_grid("shift", sde, 7, shift=shift, t_min=float(sched.sigmas[-2])))


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_euler_reproduces_dynamic_shifting(transformer, _float64_schedulers, shift_type):
    sched = fm_euler.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=shift_type)
    n, seq_len = 6, 16  # 16 latent tokens: (8/2)² patches
    sde, score = from_diffusers(transformer, sched, image_seq_len=seq_len)
    mu = _flux_calculate_shift()(seq_len)
    assert sde.shift == pytest.approx(math.exp(mu) if shift_type == "exponential" else mu, rel=1e-12)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)  # as the Flux pipeline does
    cond = _cond()
    ref = _diffusers_loop(transformer, sched, cond)
    with torch.no_grad():
        x = reverse_sample(sde, score, x_T=_x_T(), times=sde.timesteps_to_times(sched.timesteps),
                           solver="euler_maruyama", noise_scale=0.0, final_step="tweedie", model_kwargs=cond,
                           progress=False)
    _close(x, ref)
    grid = make_grid("shift", sde, n - 1, t_min=float(sched.sigmas[-2]))
    # set_timesteps(sigmas=...) rounds the given sigmas to numpy float32 and shifts them in float32
    torch.testing.assert_close(grid, sched.sigmas[:-1], rtol=3e-7, atol=0)
    # without mu the sde has no shift: grids ask for one
    bare, _ = from_diffusers(transformer, sched)
    assert bare.shift is None
    with pytest.raises(ValueError, match="needs shift"):
        make_grid("shift", bare, 5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_reproduces_flow_match_heun_scheduler(transformer, _float64_schedulers, shift):
    sched = fm_heun.FlowMatchHeunDiscreteScheduler(shift=shift)
    sched.set_timesteps(5)
    cond = _cond()
    ref = _diffusers_loop(transformer, sched, cond)
    sde, score = from_diffusers(transformer, sched)
    assert sde.shift == shift
    # diffusers repeats each interior timestep for Heun's second stage; its last step is Euler to σ = 0
    times = sde.timesteps_to_times(sched.timesteps[::2])
    with torch.no_grad():
        sol = reverse_sample(sde, score, x_T=_x_T(), times=times, solver="heun", noise_scale=0.0, final_step="tweedie",
                             model_kwargs=cond, return_info=True, progress=False)
    _close(sol.x, ref)
    assert sol.nfe == len(sched.timesteps)


def test_sampling_a_transformer_with_sdegen_solvers(transformer):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sde, score = from_diffusers(transformer, sched)
    cond = _cond()
    for kw in (dict(solver="dpmpp_2m", grid="shift", steps=6), dict(solver="ddim", noise_scale=1.0, steps=6),
               dict(solver="rk45", rtol=1e-3, atol=1e-3)):
        with torch.no_grad():
            x = reverse_sample(sde, score, (B, 4, 8, 8), seed=0, dtype=F64, model_kwargs=cond, progress=False, **kw)
        assert torch.isfinite(x).all(), kw


def test_flow_scheduler_errors(transformer):
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="timestep_rounding"):
        from_diffusers(transformer, sched, timestep_rounding="interpolate")
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(transformer, sched, prediction_type="epsilon")
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        from_diffusers(transformer, sched, mu=1.0)
    with pytest.raises(ValueError, match="invert_sigmas"):
        from_diffusers(transformer, diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    with pytest.raises(TypeError, match="flow schedulers only"):
        from_diffusers(transformer, diffusers.DDPMScheduler(), mu=1.0)
    with pytest.raises(ValueError, match="timestep_scale"):
        from_diffusers(transformer, sched, timestep_scale=0)
    dyn, _ = from_diffusers(transformer, diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="exactly one"):
        dyn.shift_for()
