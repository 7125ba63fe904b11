"""No silent wrong answers: hostile and careless inputs get the right answer or a prompt error naming the fix.

Each test here failed (wrong value, raw torch error, hang or abort) before the foundation rework; the
distributed case (unequal per-rank data) lives in ``tests/test_distributed.py``, the noise-collision
statistics in ``tests/test_noise.py``.
"""

import math
import threading
import time

import pytest
import torch

from sdegen import (
    VESDE,
    VPSDE,
    MaxStepsExceeded,
    NonFiniteError,
    NotDifferentiableError,
    available_solvers,
    bits_per_dim,
    classifier_free,
    forward_sample,
    from_epsilon,
    get_solver,
    log_likelihood,
    reverse_sample,
)
from sdegen.testing import GaussianMixture

F64 = torch.float64
GM = GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.2])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the likelihood needs a score differentiable in x ---------------------------------------------------
def _x():
    return GM.sample(4, generator=_gen(1))


def test_likelihood_of_a_model_under_no_grad_raises():
    sde = VPSDE()
    pm = GM.perturbed(sde)

    def frozen(x, t):  # a model evaluated under no_grad inside: its output has no graph to x
        with torch.no_grad():
            return pm.score(x, t)

    with pytest.raises(NotDifferentiableError, match="no_grad"):
        log_likelihood(sde, frozen, _x())
    with pytest.raises(NotDifferentiableError, match="detaches its input"):
        bits_per_dim(sde, lambda x, t: pm.score(x.detach(), t), torch.full((2, 2), -1.0, dtype=F64))
    with pytest.raises(NotDifferentiableError, match="inference_mode"), torch.inference_mode():
        log_likelihood(sde, pm.score, _x())
    # the right answer for the same model without the no_grad, and for data made in inference mode
    with torch.inference_mode():
        x_inf = _x()
    ll = log_likelihood(sde, pm.score, x_inf, rtol=1e-6, atol=1e-6, prior_log_prob=lambda z: pm.log_prob(z, 1.0))
    assert (ll - GM.log_prob(x_inf)).abs().max() < 1e-4


# -- t_max < T: the prior at t_max, the same in sampling and likelihood --------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 50.0)], ids=["vp", "ve"])
def test_prior_at_t_max_in_sampling_and_likelihood(sde):
    t_max = 0.4
    sol = reverse_sample(sde, GM.perturbed(sde).score, (4000, 2), solver="euler_maruyama", steps=4, t_max=t_max,
                         dtype=F64, generator=_gen(2), save_at=[t_max], return_info=True)
    start = sol.trajectory[0]
    std = sde.prior_std_at(t_max)
    assert std < sde.prior_std or isinstance(sde, VPSDE)
    # 4000 x 2 draws of N(0, std²): the sample std is within 5 standard errors (false failure ~1e-6)
    assert abs(float(start.std()) / std - 1) < 5 / math.sqrt(2 * 8000)
    x = _x()
    default = log_likelihood(sde, GM.perturbed(sde).score, x, t_max=t_max)
    explicit = log_likelihood(sde, GM.perturbed(sde).score, x, t_max=t_max,
                              prior_log_prob=lambda z: sde.prior_log_prob(z, t=t_max))
    assert torch.equal(default, explicit)


# -- sampling does not keep the autograd graph of a trainable model ------------------------------------
def test_sampling_runs_without_a_graph_unless_asked():
    sde = VPSDE()
    net = torch.nn.Linear(2, 2).double()  # parameters require grad

    def score(x, t):
        return net(x) - x

    x = reverse_sample(sde, score, (8, 2), solver="heun", steps=20, dtype=F64, generator=_gen())
    assert not x.requires_grad and x.grad_fn is None
    y = reverse_sample(sde, score, (8, 2), solver="heun", steps=3, dtype=F64, generator=_gen(), differentiable=True)
    y.sum().backward()  # backpropagation through the sampler when asked for
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


# -- bad states and times -------------------------------------------------------------------------------
def test_bad_states_get_named_errors():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    with pytest.raises(ValueError, match="x_T contains NaN"):
        reverse_sample(sde, score, x_T=torch.tensor([[0.0, math.nan]]))
    with pytest.raises(TypeError, match=r"x_T must be a floating-point tensor.*x_T.float\(\)"):
        reverse_sample(sde, score, x_T=torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x_T must have shape \(batch, \*dims\)"):
        reverse_sample(sde, score, x_T=torch.tensor(1.0))
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        forward_sample(sde, torch.ones(3, 2, dtype=torch.int64), 0.5)
    for t in (1.5, -0.1, torch.tensor([0.5, 2.0])):
        with pytest.raises(ValueError, match=r"t must lie in \[0, T=1.0\]"):
            forward_sample(sde, torch.ones(2, 2), t)
    with pytest.raises(ValueError, match="x contains NaN"):
        log_likelihood(sde, score, torch.tensor([[0.0, math.nan]]))


def test_empty_batches_return_empty_results():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    for solver in ("euler_maruyama", "dpmpp_2m", "rk45"):
        assert reverse_sample(sde, score, (0, 2), solver=solver).shape == (0, 2)
        assert reverse_sample(sde, score, x_T=torch.empty(0, 2), solver=solver).shape == (0, 2)
    ll = log_likelihood(sde, score, torch.empty(0, 2, dtype=F64))
    assert ll.shape == (0,)
    assert bits_per_dim(sde, score, torch.empty(0, 2)).shape == (0,)


# -- bounded work with the same default everywhere ------------------------------------------------------
def _stiff(x, t):
    return -2000.0 * x  # a score whose probability-flow ODE is too stiff for an explicit method


@pytest.mark.parametrize("solver", ["rk45", "tsit5", "bosh3", "torchdiffeq:dopri5"])
def test_stiff_model_stops_at_the_same_bounded_default(solver):
    assert get_solver(solver).max_steps == 10_000  # the same bound in every entry point
    sde = VPSDE()
    start = time.perf_counter()
    with pytest.raises(MaxStepsExceeded, match="max_steps=200"):
        reverse_sample(sde, _stiff, (2, 2), solver=solver, max_steps=200, dtype=F64)
    with pytest.raises(MaxStepsExceeded, match="max_steps=200"):
        log_likelihood(sde, _stiff, torch.zeros(2, 2, dtype=F64) + 0.1, solver=solver, max_steps=200)
    assert time.perf_counter() - start < 60


# -- per-sample guidance weights follow chunks and the active set ---------------------------------------
def test_per_sample_guidance_weight_with_chunks_adaptive_and_likelihood():
    sde = VPSDE()
    pm = GM.perturbed(sde)

    def model(x, t, class_labels):  # a toy conditional score: the label shifts the data
        shift = class_labels.to(x.dtype)[:, None] * torch.exp(-0.5 * sde.integrated_beta(t))[:, None]
        return pm.score(x - shift, t)

    n = 5
    w = torch.linspace(0.0, 3.0, n, dtype=F64)
    labels = torch.arange(n)
    guided = classifier_free(model, w, uncond=0)
    z = sde.prior_sample((n, 2), generator=_gen(3), dtype=F64)
    kw = dict(model_kwargs={"class_labels": labels})

    def one(i, fn, **extra):
        return fn(classifier_free(model, w[i : i + 1], uncond=0), i, **extra)

    for solver, extra in (("heun", dict(steps=10, noise_scale=0.0)), ("rk45", dict(rtol=1e-7, atol=1e-7))):
        full = reverse_sample(sde, guided, x_T=z, solver=solver, max_batch=2, **extra, **kw)

        def sample_one(g, j, solver=solver, extra=extra):
            cond = {"class_labels": labels[j : j + 1]}
            return reverse_sample(sde, g, x_T=z[j : j + 1], solver=solver, model_kwargs=cond, **extra)

        for i in range(n):
            torch.testing.assert_close(full[i : i + 1], one(i, sample_one), rtol=0, atol=1e-10)
    x = GM.sample(n, generator=_gen(4))
    ll = log_likelihood(sde, guided, x, max_batch=3, rtol=1e-6, atol=1e-6, **kw)
    for i in range(n):
        alone = one(i, lambda g, j: log_likelihood(sde, g, x[j : j + 1], rtol=1e-6, atol=1e-6,
                                                  model_kwargs={"class_labels": labels[j : j + 1]}))
        torch.testing.assert_close(ll[i : i + 1], alone, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="guidance weight w has 3 entries"):
        reverse_sample(sde, classifier_free(model, w[:3], uncond=0), x_T=z, solver="heun", steps=2, **kw)


# -- the solver registry under two threads ---------------------------------------------------------------
def test_solver_registry_discovery_is_thread_safe(monkeypatch):
    import importlib

    from sdegen import solvers

    monkeypatch.setattr(solvers, "_REGISTRY", {})
    slow_import = importlib.import_module

    def slow(name, *a, **k):  # widen the window in which a second thread could see a half-filled registry
        time.sleep(0.01)
        return slow_import(name, *a, **k)

    monkeypatch.setattr(solvers.importlib, "import_module", slow)
    results, errors = [], []

    def work():
        try:
            results.append(solvers.get_solver("tsit5").name)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and results == ["tsit5"] * 4


# -- misspelt options -----------------------------------------------------------------------------------
def test_misspelt_options_suggest_the_right_word():
    sde = VPSDE()
    score = GM.perturbed(sde).score
    with pytest.raises(TypeError, match="unknown option 'stpes' \\(did you mean 'steps'\\?\\)"):
        reverse_sample(sde, score, (2, 2), solver="heun", stpes=20)
    with pytest.raises(TypeError, match="did you mean 'rtol'"):
        reverse_sample(sde, score, (2, 2), solver="rk45", rtl=1e-3)
    with pytest.raises(TypeError, match="did you mean 'max_batch'"):
        log_likelihood(sde, score, _x(), max_bacth=2)
    with pytest.raises(ValueError, match="did you mean 'dpmpp_2m'"):
        reverse_sample(sde, score, (2, 2), solver="dpmpp2m")


# -- newcomers' first calls work with the defaults --------------------------------------------------------
@pytest.mark.parametrize("solver", available_solvers())
def test_first_natural_call_works(solver):
    """Every registered solver with its defaults only (grid, steps, noise scale), on a plain score function
    and on a wrapped ε-network (the fused fixed-grid path): finite samples of the right shape."""
    sde = VPSDE()
    score = GM.perturbed(sde).score
    x = reverse_sample(sde, score, (16, 2), solver=solver, generator=_gen())
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    eps_net = from_epsilon(lambda y, t: -score(y, t) * sde.marginal(t)[1][:, None], sde)
    x = reverse_sample(sde, eps_net, (16, 2), solver=solver, generator=_gen())
    assert x.shape == (16, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "ddim"])
def test_nan_from_a_wrapped_network_is_blamed_on_the_network(solver):
    """A NaN from the network on the fused fixed-grid path of a ScoreModel is reported as the model's, at
    the evaluation it happened."""
    sde = VPSDE()
    calls = {"n": 0}

    def eps(y, t):
        calls["n"] += 1
        out = 0.1 * y
        return out * math.nan if calls["n"] == 3 else out

    with pytest.raises(NonFiniteError, match="score model returned NaN/Inf \\(network evaluation 3\\)"):
        reverse_sample(sde, from_epsilon(eps, sde), (4, 2), solver=solver, steps=6, generator=_gen())


def test_nan_in_initial_state_of_integrate_is_not_blamed_on_the_model():
    from sdegen import ReverseSDE, integrate, make_grid

    sde = VPSDE()
    eq = ReverseSDE(sde, GM.perturbed(sde).score, 0.0)
    x = torch.tensor([[0.0, math.nan]])
    for solver in ("heun", "rk45"):
        with pytest.raises(NonFiniteError, match="initial state"):
            integrate(eq, x, make_grid("uniform", sde, 4), get_solver(solver))


def test_long_calls_show_progress_by_default(capsys, monkeypatch):
    """progress=None (the default) shows a bar once a call has run AUTO_PROGRESS_AFTER seconds."""
    import importlib

    integrate_module = importlib.import_module("sdegen.integrate")  # the module (sdegen.integrate is the function)

    sde = VPSDE()
    score = GM.perturbed(sde).score
    reverse_sample(sde, score, (4, 2), solver="heun", steps=5)
    assert "sdegen heun" not in capsys.readouterr().err  # a short call stays quiet
    monkeypatch.setattr(integrate_module, "AUTO_PROGRESS_AFTER", 0.0)
    reverse_sample(sde, score, (4, 2), solver="heun", steps=5)
    log_likelihood(sde, score, _x(), rtol=1e-3, atol=1e-3)
    err = capsys.readouterr().err
    assert "sdegen heun" in err and "5/5" in err and "sdegen rk45" in err and "100%" in err
    reverse_sample(sde, score, (4, 2), solver="heun", steps=5, progress=False)
    assert capsys.readouterr().err == ""
