"""A ``diffusers`` UNet2DModel + DDPMScheduler plugged into sdegen: sampling and exact likelihood.

The UNet is tiny and randomly initialised (no download, < 1 min of CPU), so the pictures are noise;
for a trained model replace the two constructors by e.g.
``UNet2DModel.from_pretrained("google/ddpm-cifar10-32")`` and ``DDPMScheduler.from_pretrained(...)``
and nothing else changes. (The UNet here has no attention layers: the likelihood's batched
vector-Jacobian products run under ``torch.vmap``, which diffusers' attention blocks do not support yet.)
Run::

    python examples/diffusers_unet.py             # writes examples/out/diffusers_unet.png
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from sdegen import reverse_sample
from sdegen.models import from_diffusers

OUT = Path(os.environ.get("SDEGEN_EXAMPLES_OUT", Path(__file__).parent / "out"))  # where figures go


def main() -> None:
    torch.manual_seed(0)
    # -- the user code: a diffusers model and its training scheduler ----------------------------------
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, add_attention=False).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)  # linear betas, prediction_type="epsilon"
    # DiscreteVPSDE + ScoreModel, t_i = (i + 1) / 1000; x̂0 clipped to [-1, 1] as DDPMScheduler(clip_sample=True) does
    sde, score = from_diffusers(unet, scheduler)
    with torch.no_grad():
        ddim = reverse_sample(sde, score, (16, 1, 16, 16), solver="ddim", steps=25, noise_scale=0.0,
                              final_step="tweedie", generator=torch.Generator().manual_seed(0), return_info=True)
        ddpm = reverse_sample(sde, score, (16, 1, 16, 16), solver="ancestral", steps=50,
                              final_step="tweedie", generator=torch.Generator().manual_seed(0), return_info=True)
    # -------------------------------------------------------------------------------------------------
    print("The UNet has random weights: the samples are structured noise far outside the data range [-1, 1]")
    print("and the likelihood below is near its worst. This shows the plumbing (shapes, NFE, time), not quality:")
    print("with a trained checkpoint the same lines give images in [-1, 1] and bits/dim of a few units.\n")
    print(f"ddim:      {ddim.nfe} NFE, sample range [{ddim.x.min():.2f}, {ddim.x.max():.2f}]")
    print(f"ancestral: {ddpm.nfe} NFE, sample range [{ddpm.x.min():.2f}, {ddpm.x.max():.2f}]")
    _likelihood(unet, scheduler, ddim.x[:2])
    _save([("ddim", ddim), ("ancestral (DDPM)", ddpm)])


def _likelihood(unet, scheduler, x) -> None:
    """Bits/dim of a few 8-bit-quantised images through the probability-flow ODE."""
    try:
        from sdegen.likelihood import bits_per_dim
    except ImportError:
        print("bits_per_dim: not available in this version of sdegen")
        return
    t0 = time.perf_counter()
    # "interpolate" makes the network continuous in t, which the adaptive ODE solver prefers; the likelihood is
    # that of the raw model (thresholding=None), not of the sampler's clipped x̂0
    sde, score = from_diffusers(unet, scheduler, timestep_rounding="interpolate", thresholding=None)
    levels = torch.round((x.clamp(-1, 1) + 1) * 127.5)  # 8-bit levels 0..255, stored on [-1, 1]
    bpd, info = bits_per_dim(sde, score, levels / 127.5 - 1, trace="hutchinson", seed=0, rtol=1e-2, atol=1e-2,
                             t_min=sde.t_min, return_info=True)
    print(f"bits/dim (Hutchinson, rtol=1e-2): {[round(float(b), 2) for b in bpd]}, "
          f"{info.nfe} NFE, {time.perf_counter() - t0:.1f} s")
    print("  (8 bits/dim is a uniform model over the 256 levels; a random UNet's score is no density model,")
    print("   so values above 8 are expected here: the probability-flow ODE maps the images to latents the")
    print("   N(0, I) prior finds unlikely)")


def _save(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4.6))
    for ax, (name, sol) in zip(axes, results, strict=True):
        x = sol.x.reshape(16, -1)
        x = (x - x.min(1, keepdim=True).values) / (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values)
        grid = torch.ones(4, 17, 4, 17)  # per-image min-max scaled, with 1-pixel gaps
        grid[:, :16, :, :16] = x.reshape(4, 4, 16, 16).permute(0, 2, 1, 3)
        ax.imshow(grid.reshape(68, 68).numpy(), cmap="gray")
        ax.set_title(f"{name}: {sol.nfe} NFE")
        ax.axis("off")
    fig.suptitle("random UNet2DModel via sdegen.models.from_diffusers")
    fig.tight_layout()
    path = OUT / "diffusers_unet.png"
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
