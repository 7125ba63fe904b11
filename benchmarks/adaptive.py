"""(d) Per-sample adaptive RK45 vs one shared step size, on a batch of mixed difficulty.

Half the batch follows an easy problem (a single wide Gaussian, nearly linear flow), half a hard
one (ring8 with narrow components, std 0.03, whose flow bends sharply near the data); a model
kwarg tells the exact score which half a sample is in. sdegen's ``"rk45"`` controls the error of
each sample separately and drops finished samples from the batch; torchdiffeq's ``dopri5``
controls one step size for the whole batch. Work = samples evaluated by the network, summed over
calls (``Σ batch size``), at the same tolerance; accuracy = error to a tight reference solution.
"""

from __future__ import annotations

import math

import torch

from sdegen import VPSDE, reverse_sample
from sdegen.testing import GaussianMixture

from .common import Counted, optional


def _problem():
    sde = VPSDE()
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    hard = GaussianMixture(torch.ones(8), 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1),
                           torch.full((8,), 0.03**2)).perturbed(sde)
    easy = GaussianMixture([1.0], [[0.0, 0.0]], [1.0]).perturbed(sde)

    def score(x, t, hard_mask):
        m = hard_mask[:, None]
        return torch.where(m, hard.score(x, t), easy.score(x, t))

    return sde, score


def run(quick: bool = False, log=print) -> dict:
    sde, score = _problem()
    n = 200 if quick else 1000
    hard_mask = torch.arange(n) < n // 2
    x_T = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reverse_sample(sde, score, x_T=x_T, solver="rk45", noise_scale=0.0, rtol=1e-10, atol=1e-10,
                         model_kwargs={"hard_mask": hard_mask})
    tdq = optional("torchdiffeq")
    rows = []
    for tol in ([1e-3] if quick else [1e-3, 1e-5]):
        counted = Counted(score)
        x = reverse_sample(sde, counted, x_T=x_T, solver="rk45", noise_scale=0.0, rtol=tol, atol=tol,
                           model_kwargs={"hard_mask": hard_mask})
        row = {"tol": tol, "sdegen_work": counted.work, "sdegen_calls": counted.calls,
               "sdegen_error": float((x - ref).norm(dim=1).mean())}
        if tdq is not None:
            shared = Counted(score)

            def f(t, y, shared=shared):
                tb = t.to(torch.float64).clamp(sde.t_min, sde.T).reshape(1).expand(n)
                a = sde.drift_coef(tb)[:, None]
                g2 = sde.diffusion_coef(tb)[:, None] ** 2
                return a * y - 0.5 * g2 * shared(y, tb, hard_mask)

            ts = torch.tensor([sde.T, sde.t_min], dtype=torch.float64)
            y = tdq.odeint(f, x_T, ts, rtol=tol, atol=tol, method="dopri5")[-1]
            row |= {"torchdiffeq_work": shared.work, "torchdiffeq_calls": shared.calls,
                    "torchdiffeq_error": float((y - ref).norm(dim=1).mean()),
                    "work_ratio": counted.work / shared.work}
        rows.append(row)
        log(f"  adaptive tol {tol}: sdegen rk45 work {row['sdegen_work']} (error {row['sdegen_error']:.1e}), "
            f"torchdiffeq dopri5 work {row.get('torchdiffeq_work')} "
            f"(error {row.get('torchdiffeq_error', math.nan):.1e}), ratio {row.get('work_ratio', math.nan):.2f}")
    return {"n": n, "rows": rows}
