"""A ``diffusers`` flow-matching transformer (Stable Diffusion 3's architecture) sampled through sdegen.

``from_diffusers(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))`` returns ``(sde, score)``: the
rectified-flow path in diffusers' time (``sigma = t``, ``timestep = 1000 t``) with the scheduler's shift, and
the transformer's velocity as a score model. The transformer here is tiny and **randomly initialised** (no
download, a few seconds of CPU), so the pictures are noise; with a trained model replace the constructors by
``SD3Transformer2DModel.from_pretrained(..., subfolder="transformer")`` and
``FlowMatchEulerDiscreteScheduler.from_pretrained(..., subfolder="scheduler")`` and pass the pipeline's text
embeddings as ``model_kwargs``. This script

1. runs diffusers' own Euler loop and sdegen's ``euler_maruyama`` (``noise_scale=0``) on the scheduler's
   timesteps from the same noise, and prints their difference (float rounding);
2. samples with sdegen's DPM-Solver++(2M) on the shifted grid (``grid="shift"`` uses the scheduler's shift),
   adaptive RK45, and stochastic DDIM (``noise_scale=1``) — solvers diffusers has no flow-matching version of.

Run::

    python examples/diffusers_flow.py             # writes examples/out/diffusers_flow.png
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from sdegen import from_diffusers, reverse_sample

OUT = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go


def main() -> None:
    torch.manual_seed(0)
    # -- the user code: a diffusers flow transformer and its scheduler -----------------------------------
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's setting at 1024²
    sde, score = from_diffusers(transformer, scheduler)  # FlowMatchingSDE in diffusers' time + velocity model
    batch = 4
    g = torch.Generator().manual_seed(1)
    cond = dict(encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),  # stand-ins for text embeddings
                pooled_projections=torch.randn(batch, 16, generator=g))
    x_T = torch.randn(batch, 4, 16, 16, generator=g)
    # -------------------------------------------------------------------------------------------------------
    print(f"{sde!r}: sigma = t, timestep = {sde.num_timesteps} t, shift = {sde.shift}")
    print("The transformer has random weights: every sample below is noise, not an image. This shows the")
    print("plumbing (the same numbers as diffusers, NFE, solvers), not quality.\n")

    # 1. diffusers' loop and sdegen's Euler on the same timesteps
    scheduler.set_timesteps(20)
    with torch.no_grad():
        ref = x_T.clone()
        for ts in scheduler.timesteps:
            v = transformer(hidden_states=ref, timestep=ts.expand(batch), **cond).sample
            ref = scheduler.step(v, ts, ref).prev_sample
        euler = reverse_sample(sde, score, x_T=x_T, times=sde.timesteps_to_times(scheduler.timesteps),
                               solver="euler_maruyama", noise_scale=0.0, final_step="tweedie", model_kwargs=cond,
                               return_info=True, progress=False)
    diff = float((euler.x - ref).abs().max() / ref.abs().max())
    print(f"diffusers FlowMatchEulerDiscreteScheduler, 20 steps vs sdegen euler_maruyama on its timesteps: "
          f"max relative difference {diff:.1e} (float32 rounding), NFE {euler.nfe}")

    # 2. sdegen's solvers
    runs = {"diffusers Euler (20 steps)": (ref, 20)}
    for label, kw in [
        ("dpmpp_2m, shifted grid", dict(solver="dpmpp_2m", grid="shift", steps=10, final_step="tweedie")),
        ("rk45, rtol=atol=1e-3", dict(solver="rk45", rtol=1e-3, atol=1e-3)),
        ("ddim noise_scale=1", dict(solver="ddim", noise_scale=1.0, steps=20, final_step="tweedie")),
    ]:
        with torch.no_grad():
            sol = reverse_sample(sde, score, x_T=x_T, model_kwargs=cond, seed=0, return_info=True, progress=False,
                                 **kw)
        runs[label] = (sol.x, sol.nfe)
        print(f"{label:28s} NFE {sol.nfe:4d}, sample range [{sol.x.min():.2f}, {sol.x.max():.2f}]")
    _save(runs)


def _save(runs: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the figure")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.6), squeeze=False)
    for ax, (name, (x, nfe)) in zip(axes[0], runs.items(), strict=True):
        img = x[:, :3]  # the first three latent channels as RGB, per-image min-max scaled
        lo = img.amin(dim=(1, 2, 3), keepdim=True)
        hi = img.amax(dim=(1, 2, 3), keepdim=True)
        img = ((img - lo) / (hi - lo)).permute(0, 2, 3, 1)
        ax.imshow(torch.cat(list(img), dim=1).numpy())
        ax.set_title(f"{name}\nNFE {nfe}", fontsize=8)
        ax.axis("off")
    fig.suptitle("random SD3Transformer2DModel via sdegen.from_diffusers (noise: random weights)", fontsize=9)
    fig.tight_layout()
    path = OUT / "diffusers_flow.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
