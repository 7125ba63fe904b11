"""Distributed and chunked sampling/likelihood give the same numbers at any world size.

What is proved, exactly (``torch.equal``, no tolerance):

* ``sdegen.distributed.sample`` / ``log_likelihood`` at world size 1, 2 and 3 (gloo on CPU, processes
  spawned with ``multiprocessing``'s "spawn" context and a ``FileStore``) return the tensor of the
  single-process ``reverse_sample(..., seed=)`` / ``log_likelihood(..., seed=)`` call, for
  ``gather="all"``, ``"rank0"`` and ``None``, with and without ``max_batch`` chunking, and when some
  ranks have empty shards (``n_total < world_size``).
* A run where one rank's samples are much harder (adaptive RK45 takes many more steps there, so that
  rank makes many more network calls) completes under a timeout — the only collectives are the final
  gathers — and still matches the single-process result.
* An error on one rank raises on every rank instead of leaving the others blocked in the gather.
* Every registered solver gives sample ``i`` the same value in a batch of 1, 7 and 64 and under
  ``max_batch`` chunking, when the randomness is counter based (``seed=``).

Bit-identity needs a batch-invariant model: the Gaussian-mixture oracle with *diagonal* covariances
is elementwise per sample (checked below); with full covariances its ``einsum`` goes through batched
BLAS, whose blocking depends on the batch size, and results then agree to rounding only.
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sdegen import VPSDE, reverse_sample
from sdegen import distributed as sdist
from sdegen.solvers import available_solvers, get_solver
from sdegen.testing.mixture import GaussianMixture

SEED = 1234
N = 10  # global number of samples: shards of 4/3/3 at world size 3
JOIN_TIMEOUT = 240.0  # generous under a loaded 2-core CI box; a hang is minutes, a run is seconds
F64 = torch.float64


def _setup():
    sde = VPSDE()
    mix = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.05, 0.1], [0.2, 0.05]])
    return sde, mix.perturbed(sde)


_CALLS = [0]  # network calls made in this process


def _stiff_score(x, t, k):
    """Score ``-k x`` per sample: for ``k >> 1`` the probability-flow ODE decays at rate ``β(t)(k-1)/2``.

    With ``k = 1`` (the exact score of N(0, I) under VP) the ODE is ``dx/dt = 0`` and RK45 needs a
    handful of steps; with ``k = 60`` it is stiff and RK45 needs about a hundred.
    """
    _CALLS[0] += 1
    return -k.to(x.dtype)[:, None] * x


HARD = [8, 9]  # on the last rank at world size 2 (5..9) and 3 (7..9)


def _stiffness() -> torch.Tensor:
    k = torch.ones(N, dtype=F64)
    k[HARD] = 60.0
    return k


def _nan_for_last(x, t, bad):
    return torch.where(bad.to(torch.bool)[:, None], torch.full_like(x, float("nan")), -x)


# -- what every rank runs -------------------------------------------------------------------------
def _checks() -> dict:
    """Run every distributed call once on this rank; return what each rank returned."""
    sde, pm = _setup()
    out: dict = {}
    kw = dict(dtype=F64, solver="euler_maruyama", steps=8)
    out["em_all"] = sdist.sample(N, sde, pm.score, 2, seed=SEED, gather="all", **kw)
    out["em_rank0_chunked"] = sdist.sample(N, sde, pm.score, (2,), seed=SEED, gather="rank0", max_batch=2, **kw)
    out["em_local"] = sdist.sample(N, sde, pm.score, 2, seed=SEED, gather=None, **kw)
    out["heun_tiny"] = sdist.sample(2, sde, pm.score, 2, seed=SEED, solver="heun", steps=4, dtype=F64)
    # one rank fails: every rank must raise, none may hang in the gather
    bad = torch.zeros(N)
    bad[-1] = 1
    try:
        sdist.sample(N, sde, _nan_for_last, 2, seed=SEED, steps=3, dtype=F64, model_kwargs={"bad": bad})
        out["error"] = None
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        out["error"] = type(exc).__name__
    _CALLS[0] = 0
    out["rk45_hard"] = sdist.sample(
        N, sde, _stiff_score, 2, seed=SEED, dtype=F64, solver="rk45", noise_scale=0.0,
        model_kwargs={"k": _stiffness()}, max_batch=3,
    )
    out["rk45_calls"] = _CALLS[0]
    data = _likelihood_data()
    out["ll"] = sdist.log_likelihood(data, sde, pm.score, seed=SEED, **_LL_KW)
    out["ll_chunked_rank0"] = sdist.log_likelihood(
        list(data), sde, pm.score, seed=SEED, max_batch=3, gather="rank0", **_LL_KW
    )
    out["ll_tiny"] = sdist.log_likelihood(data[:2], sde, pm.score, seed=SEED, **_LL_KW)  # empty shards at W=3
    out["bpd"] = sdist.bits_per_dim(_discrete_data(), sde, pm.score, seed=SEED, max_batch=4, **_BPD_KW)
    # the ranks pass data sets of different lengths: every rank raises ValueError, none aborts or hangs
    try:
        sdist.log_likelihood(data[: N - dist_rank()], sde, pm.score, seed=SEED, **_LL_KW)
        out["unequal"] = None
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        out["unequal"] = type(exc).__name__
    # a solver instance with its own options passes through
    out["ll_instance"] = sdist.log_likelihood(data, sde, pm.score, seed=SEED, trace="hutchinson",
                                              solver=get_solver("rk45", rtol=1e-3, atol=1e-3))
    return out


def dist_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_LL_KW = dict(trace="hutchinson", rtol=1e-3, atol=1e-3)  # exactness, not accuracy, is tested


def _likelihood_data() -> torch.Tensor:
    """Points near the modes, and far in the tail at the HARD indices (RK45 works harder there)."""
    x = torch.linspace(-1.0, 1.0, 2 * N, dtype=F64).reshape(N, 2)
    x[HARD] *= 6.0
    return x


_BPD_KW = dict(n_bins=17, data_range=(-1.0, 1.0), repeats=2, rtol=1e-3, atol=1e-3)


def _discrete_data() -> torch.Tensor:
    """17-level data on [-1, 1] (as scikit-learn's digits), dequantised inside bits_per_dim."""
    k = torch.arange(2 * N, dtype=F64).reshape(N, 2) % 17
    return -1.0 + 2.0 * k / 16


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=90),
        )
        res = _checks()
        dist.destroy_process_group()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _spawn(world: int, tmp_path: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    store, out_dir = tmp_path / f"store{world}", tmp_path / f"out{world}"
    out_dir.mkdir()
    procs = [ctx.Process(target=_worker, args=(r, world, str(store), str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    errors = "\n".join(f.read_text() for f in sorted(out_dir.glob("*.err")))
    if hung:
        pytest.fail(f"world size {world}: rank(s) {hung} still running after {JOIN_TIMEOUT:.0f} s (hang)\n{errors}")
    assert all(p.exitcode == 0 for p in procs), f"world size {world}: a rank failed\n{errors}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def _in_process_world1(tmp_path: Path) -> list[dict]:
    """World size 1 twice: without torch.distributed, and with an initialised one-process gloo group."""
    plain = _checks()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store1'}", rank=0, world_size=1)
    try:
        grouped = _checks()
    finally:
        dist.destroy_process_group()
    return [plain, grouped]


# -- single-process references ------------------------------------------------------------------
@functools.cache
def _references() -> dict:
    sde, pm = _setup()
    ref = {}
    kw = dict(dtype=F64, solver="euler_maruyama", steps=8, seed=SEED)
    ref["em"] = reverse_sample(sde, pm.score, (N, 2), **kw)
    ref["heun_tiny"] = reverse_sample(sde, pm.score, (2, 2), seed=SEED, solver="heun", steps=4, dtype=F64)
    ref["rk45_hard"] = reverse_sample(
        sde, _stiff_score, (N, 2), seed=SEED, dtype=F64, solver="rk45", noise_scale=0.0,
        model_kwargs={"k": _stiffness()},
    )
    from sdegen.likelihood import bits_per_dim, log_likelihood

    ref["ll"] = log_likelihood(sde, pm.score, _likelihood_data(), seed=SEED, **_LL_KW)
    ref["bpd"] = bits_per_dim(sde, pm.score, _discrete_data(), seed=SEED, **_BPD_KW)
    return ref


def _check_world(results: list[dict], world: int) -> None:
    """``results[r]`` is what rank ``r`` returned (at world size 1: every entry is a rank-0 run)."""
    ref = _references()
    for i, res in enumerate(results):
        rank = i % world
        where = f"world size {world}, rank {rank}"
        assert torch.equal(res["em_all"], ref["em"]), where
        if rank == 0:
            assert torch.equal(res["em_rank0_chunked"], ref["em"]), where
        else:
            assert res["em_rank0_chunked"] is None, where
        shard = sdist.shard(N, rank, world)
        assert torch.equal(res["em_local"], ref["em"][shard.start : shard.stop]), where
        assert torch.equal(res["heun_tiny"], ref["heun_tiny"]), where
        if world == 1:
            assert res["error"] == "NonFiniteError", where
        else:  # the failing (last) rank re-raises its own error, the others learn of it
            assert res["error"] == ("NonFiniteError" if rank == world - 1 else "RuntimeError"), where
        assert torch.equal(res["rk45_hard"], ref["rk45_hard"]), where
        assert torch.equal(res["ll"], ref["ll"]), where
        assert (res["ll_chunked_rank0"] is None) == (rank != 0), where
        if rank == 0:
            assert torch.equal(res["ll_chunked_rank0"], ref["ll"]), where
        assert torch.equal(res["ll_tiny"], ref["ll"][:2]), where
        assert torch.equal(res["bpd"], ref["bpd"]), where
    if world > 1:
        calls = [res["rk45_calls"] for res in results]
        # the scenario really is unbalanced: the hard rank made several times more network calls
        assert calls[-1] > 3 * max(calls[:-1]), calls


# -- the tests -----------------------------------------------------------------------------------
def test_oracle_used_here_is_bitwise_batch_invariant():
    sde, pm = _setup()
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(64, dtype=F64, generator=torch.Generator().manual_seed(1))
    full = pm.score(x, t)
    assert torch.equal(pm.score(x[30:37], t[30:37]), full[30:37])
    assert torch.equal(pm.score(x[37:38], t[37:38]), full[37:38])


def test_world_size_1_equals_single_process(tmp_path):
    results = _in_process_world1(tmp_path)
    _check_world(results, 1)


@pytest.mark.parametrize("world", [2, 3])
def test_world_sizes_2_and_3_equal_single_process(world, tmp_path):
    _check_world(_spawn(world, tmp_path), world)


def test_shard_split_and_bad_input():
    assert [sdist.shard(10, r, 3) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [len(sdist.shard(2, r, 3)) for r in range(3)] == [1, 1, 0]
    for n in (1, 7, 64):
        for w in (1, 2, 3, 5):
            blocks = [sdist.shard(n, r, w) for r in range(w)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert sdist.world_info() == (0, 1)
    sde, pm = _setup()
    with pytest.raises(ValueError, match="gather"):
        sdist.sample(4, sde, pm.score, 2, seed=0, gather="rank1")
    with pytest.raises(TypeError, match="seed"):
        sdist.sample(4, sde, pm.score, 2, seed=None)
    with pytest.raises(ValueError, match="n_total"):
        sdist.sample(0, sde, pm.score, 2, seed=0)
    with pytest.raises(ValueError, match="max_batch"):
        sdist.sample(4, sde, pm.score, 2, seed=0, max_batch=0)
    with pytest.raises(TypeError, match="sample_ids"):
        sdist.sample(4, sde, pm.score, 2, seed=0, sample_ids=torch.arange(4))
    with pytest.raises(ValueError, match="dims"):
        sdist.sample(4, sde, pm.score, (), seed=0)
    with pytest.raises(ValueError, match="group"):
        sdist.shard(4, group=object())


@pytest.mark.parametrize("solver", available_solvers())
def test_every_solver_is_batch_and_chunk_invariant_with_seed(solver):
    slv = get_solver(solver)  # every registered solver builds with its defaults
    noise_scale = slv.default_noise_scale
    score = lambda x, t: -x * (1.0 + 0.1 * t.to(x.dtype)[:, None])  # noqa: E731 - elementwise, batch-invariant
    kw = dict(solver=solver, noise_scale=noise_scale, seed=SEED, dtype=F64)
    if not slv.adaptive:
        kw["steps"] = 6
    sde = VPSDE()
    full = reverse_sample(sde, score, (64, 3), **kw)
    assert torch.isfinite(full).all()
    alone = reverse_sample(sde, score, (1, 3), sample_ids=torch.tensor([37]), **kw)
    assert torch.equal(alone[0], full[37])
    seven = reverse_sample(sde, score, (7, 3), sample_ids=torch.arange(30, 37), **kw)
    assert torch.equal(seven, full[30:37])
    assert torch.equal(reverse_sample(sde, score, (64, 3), max_batch=10, **kw), full)
    if noise_scale > 0:  # the noise really is per sample: another seed changes every sample
        other = reverse_sample(sde, score, (64, 3), **(kw | {"seed": SEED + 1}))
        assert (other != full).any(dim=1).all()


def test_per_sample_uniform_stays_below_one_in_narrow_dtypes():
    from sdegen.noise import PerSampleNoise

    class TopWords(PerSampleNoise):  # the largest Philox word, 2**32 - 1: (2**32 - 1) * 2**-32 rounds to 1.0 in float32
        def _blocks(self, batch, blocks, device):
            w = torch.full((batch, blocks), 2**32 - 1, dtype=torch.int64, device=device)
            return w, w, w, w

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        u = TopWords(0).uniform((2, 3), device="cpu", dtype=dtype)
        assert float(u.max()) < 1.0, dtype
