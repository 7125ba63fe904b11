"""Sample with several processes and get the very same tensor as with one.

Draws ``N`` samples of a 2-D Gaussian-mixture ring with its exact score, split over the ranks of a
``torch.distributed`` process group by :func:`sdegen.distributed.sample`, gathers them on rank 0,
and checks there that they are bit-identical to the single-process
``reverse_sample(..., seed=SEED)``. Run either of::

    torchrun --nproc_per_node=2 examples/distributed_sampling.py      # 2 processes, gloo on CPU
    python examples/distributed_sampling.py                           # world size 1, no process group

On a machine with GPUs, ``torchrun --nproc_per_node=<gpus>`` uses nccl and one GPU per rank.
Writes ``examples/out/distributed_sampling.png`` (needs matplotlib).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sdegen import VPSDE, reverse_sample
from sdegen import distributed as sdist
from sdegen.testing import GaussianMixture

N = 2000  # samples in total, over all ranks
SEED = 0
MAX_BATCH = 512  # samples per network call on each rank: bounds memory, does not change the result
SOLVER = dict(solver="heun", steps=100, noise_scale=1.0, dtype=torch.float64)


def ring(k: int = 8, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    """Eight isotropic Gaussians on a circle: the exact score is elementwise per sample (batch-invariant)."""
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(k), means, torch.full((k,), std**2))


def setup() -> torch.device:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if "RANK" not in os.environ:  # plain `python`: world size 1, nothing to initialise
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> None:
    device = setup()
    rank, world = sdist.world_info()
    data = ring()
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    score = data.to(device).perturbed(sde).score  # exact ∇ log p_t(x); any (batch-invariant) network fits here

    t0 = time.perf_counter()
    x = sdist.sample(N, sde, score, 2, seed=SEED, max_batch=MAX_BATCH, gather="rank0", device=device, **SOLVER)
    elapsed = time.perf_counter() - t0
    mine = sdist.shard(N)
    print(f"rank {rank}/{world}: samples {mine.start}..{mine.stop - 1} in {elapsed:.2f} s", flush=True)

    if rank == 0:
        t0 = time.perf_counter()
        ref = reverse_sample(sde, score, (N, 2), seed=SEED, device=device, **SOLVER)
        single = time.perf_counter() - t0
        same = torch.equal(x, ref)
        print(f"world size {world}: {N} samples, identical to the single-process run: {same} "
              f"(max |diff| = {float((x - ref).abs().max()):.3g}; single process {single:.2f} s)")
        if not same:
            raise SystemExit("distributed samples differ from the single-process ones")
        plot(x.cpu(), data, world)
    if dist.is_initialized():
        dist.destroy_process_group()


def plot(x: torch.Tensor, data: GaussianMixture, world: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install 'sdegen[examples]')")
        return
    exact = data.sample(x.shape[0], seed=1)
    out = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].scatter(exact[:, 0], exact[:, 1], s=1)
    axes[0].set_title("exact samples")
    for r in range(world):  # colour each sample by the rank that drew it
        block = sdist.shard(x.shape[0], r, world)
        axes[1].scatter(x[block.start : block.stop, 0], x[block.start : block.stop, 1], s=1, label=f"rank {r}")
    axes[1].set_title(f"sdegen.distributed.sample, world size {world}\n(bit-identical to one process)", fontsize=9)
    axes[1].legend(markerscale=8, fontsize=8, loc="upper right")
    for ax in axes:
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "distributed_sampling.png", dpi=80)
    print(f"wrote {out / 'distributed_sampling.png'}")


if __name__ == "__main__":
    main()
