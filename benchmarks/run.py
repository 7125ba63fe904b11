"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--only accuracy,overhead,...]``.

Writes ``benchmarks/results/<section>.json``, ``summary.json``, ``summary.md`` and PNG plots, and
prints the summary. Runs with one intra-op thread (``torch.set_num_threads(1)``): on a shared
2-core machine extra threads only add contention noise, and every number is a ratio measured in
this one process anyway. Full run: about 10-15 minutes on 2 cores; ``--quick``: under 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from . import accuracy, adaptive, grids, likelihood, overhead
from .common import RESULTS

SECTIONS = {"accuracy": accuracy, "grids": grids, "likelihood": likelihood, "overhead": overhead,
            "adaptive": adaptive}


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 2 minutes)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results, or results/quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = RESULTS.__class__(args.out) if args.out else (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    meta = {"quick": args.quick, "command": "python -m benchmarks.run" + (" --quick" if args.quick else ""),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}
    results: dict = {}
    t_all = time.perf_counter()
    for name in chosen:
        _log(f"[{name}]")
        t0 = time.perf_counter()
        res = SECTIONS[name].run(quick=args.quick, log=_log)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=_json))
        if hasattr(SECTIONS[name], "plot"):
            try:
                for f in SECTIONS[name].plot(res, out):
                    _log(f"  wrote {f}")
            except ImportError as err:  # matplotlib missing: JSON only
                _log(f"  no plot ({err})")
        _log(f"  ({res['seconds']:.0f} s)")
    meta["seconds"] = time.perf_counter() - t_all
    summary = summarise(results) | {"meta": meta}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json))
    md = to_markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)
    return 0


def _json(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)


def summarise(results: dict) -> dict:
    s: dict = {}
    if "overhead" in results:
        zc = results["overhead"]["zero_cost"]
        s["overhead_ratio"] = [
            {"shape": r["shape"], "solver": r["solver"], "ratio": r.get("ratio"), "sdegen_ops": r["sdegen_ops"],
             "k_diffusion_ops": r.get("k_diffusion_ops")} for r in zc
        ]
        s["overhead_fraction"] = [
            {"case": r["case"], "solver": r["solver"], "sdegen": r["overhead_fraction"],
             "sdegen_direct": r["overhead_fraction_direct"], "k_diffusion": r.get("k_diffusion_overhead_fraction"),
             "k_diffusion_direct": r.get("k_diffusion_overhead_fraction_direct")}
            for r in results["overhead"]["with_network"]
        ]
    if "accuracy" in results:
        probs = results["accuracy"]["problems"]
        s["accuracy_default_vs_k_diffusion"] = {
            name: res["targets_default_vs_k_diffusion"] for name, res in probs.items()
        }
        s["accuracy"] = {name: res["targets"] for name, res in probs.items()}
        s["accuracy_independent"] = {
            name: res["targets_independent"] | {"floor": res["floor_sw2"]} for name, res in probs.items()
        }
        s["dpm_adaptive_vs_k_diffusion"] = {name: res["adaptive_vs_k_diffusion"] for name, res in probs.items()}
    if "grids" in results:
        s["grids"] = results["grids"]
    if "overhead" in results and "whole_calls" in results["overhead"]:
        s["whole_calls"] = results["overhead"]["whole_calls"]
    if "overhead" in results and "whole_calls_basic" in results["overhead"]:
        s["whole_calls_basic"] = results["overhead"]["whole_calls_basic"]
    if "likelihood" in results:
        s["likelihood"] = results["likelihood"]["problems"]
    if "adaptive" in results:
        s["adaptive"] = results["adaptive"]["rows"]
    return s


def to_markdown(s: dict) -> str:
    lines = [f"# Benchmark summary (`{s['meta']['command']}`, {s['meta']['seconds']:.0f} s)", ""]
    if "overhead_ratio" in s:
        lines += ["## Per-step overhead, zero-cost model (sdegen / k-diffusion time per step)", "",
                  "| shape | solver | ratio | ops/step sdegen | ops/step k-diffusion |", "|---|---|---|---|---|"]
        for r in s["overhead_ratio"]:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "n/a"
            lines.append(f"| {tuple(r['shape'])} | {r['solver']} | {ratio} | {r['sdegen_ops']:.0f} | "
                         f"{r['k_diffusion_ops'] if r['k_diffusion_ops'] is None else round(r['k_diffusion_ops'])} |")
        lines += ["", "## Solver overhead as a fraction of network time", "",
                  "zero-cost step time / network time per step (in brackets: measured directly, noisy)", "",
                  "| network | solver | sdegen | k-diffusion |", "|---|---|---|---|"]
        for r in s["overhead_fraction"]:
            kd = "n/a" if r["k_diffusion"] is None else (
                f"{100 * r['k_diffusion']:.1f}% ({100 * r['k_diffusion_direct']:.0f}%)")
            lines.append(f"| {r['case']} | {r['solver']} | {100 * r['sdegen']:.1f}% "
                         f"({100 * r['sdegen_direct']:.0f}%) | {kd} |")
        lines.append("")
    if "accuracy_default_vs_k_diffusion" in s:
        lines += ["## Accuracy at fixed NFE: best sdegen solver at its default grid vs best k-diffusion sampler",
                  "", "median path error to the exact flow of the same prior draw; lower is better", "",
                  "| problem | NFE | best sdegen (default grid) | best k-diffusion (any schedule) | ratio |",
                  "|---|---|---|---|---|"]
        for name, targets in s["accuracy_default_vs_k_diffusion"].items():
            for b, t in targets.items():
                lines.append(f"| {name} | {b} | {t['sdegen_best']:.2e} ({t['sdegen_method']}) | "
                             f"{t['peer_best']:.2e} ({t['peer_method']}) | {t['ratio']:.2f} |")
        lines += ["", "## dpm_adaptive vs k-diffusion's sample_dpm_adaptive (rtol 1e-2, atol 1e-3)", "",
                  "| problem | k-diffusion path error | k-diffusion evaluations | sdegen evaluations at that error "
                  "| ratio |", "|---|---|---|---|---|"]
        for name, a in s["dpm_adaptive_vs_k_diffusion"].items():
            if a:
                lines.append(f"| {name} | {a['k_diffusion_path']:.2e} | {a['k_diffusion_evaluations']:.0f} | "
                             f"{a['sdegen_evaluations']:.1f} | {a['work_ratio']:.2f} |")
        lines.append("")
    if "grids" in s:
        lines.append(grids.to_markdown(s["grids"]))
    if "whole_calls_basic" in s:
        lines += ["## Whole calls of 10 and 50 steps (setup included): sdegen / k-diffusion time", "",
                  "| shape | model | solver | steps | sdegen ms | k-diffusion ms | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["whole_calls_basic"]:
            lines.append(f"| {tuple(r['shape'])} | {r['model']} | {r['solver']} | {r['steps']} | "
                         f"{r['sdegen_ms']:.2f} | {r['k_diffusion_ms']:.2f} | {r['ratio']:.2f} |")
        lines.append("")
    if "whole_calls" in s:
        lines += ["## Whole calls (setup included), zero-cost model: sdegen / peer time", "",
                  "| shape | NFE | sdegen | peer | ratio |", "|---|---|---|---|---|"]
        for r in s["whole_calls"]:
            lines.append(f"| {tuple(r['shape'])} | {r['nfe']} | {r['sdegen']} | {r['peer']} | {r['ratio']:.2f} |")
        lines.append("")
    if "accuracy" in s:
        for key, title in (("accuracy", "median path error, best sdegen (any grid) vs best peer (any library)"),
                           ("accuracy_independent", "sliced W2 to independent exact samples (noisy: see floor)")):
            lines += [f"## Accuracy at fixed NFE: {title}; lower is better", "",
                      "| problem | NFE | best sdegen | best peer | met |", "|---|---|---|---|---|"]
            for name, targets in s[key].items():
                for b, t in targets.items():
                    if not isinstance(t, dict):
                        continue
                    floor = f" (floor {targets['floor']:.3f})" if "floor" in targets else ""
                    lines.append(f"| {name}{floor} | {b} | {t['sdegen_best']:.3f} ({t['sdegen_method']}) | "
                                 f"{t['peer_best']:.3f} ({t['peer_method']}) | {'yes' if t['met'] else 'no'} |")
            lines.append("")
    if "likelihood" in s:
        lines += ["## Likelihood (same tolerance, exact prior)", "",
                  "| problem | method | mean abs error (nats) | NFE | s / 1000 points |", "|---|---|---|---|---|"]
        for name, rows in s["likelihood"].items():
            for label, r in rows.items():
                lines.append(f"| {name} | {label} | {r['mean_abs_error']:.2e} | {r['nfe']} | "
                             f"{r['seconds_per_1000']:.2f} |")
        lines.append("")
    if "adaptive" in s:
        lines += ["## Per-sample RK45 vs shared step (torchdiffeq dopri5), mixed-difficulty batch", "",
                  "| tol | sdegen work | torchdiffeq work | ratio | sdegen error | torchdiffeq error |",
                  "|---|---|---|---|---|---|"]
        for r in s["adaptive"]:
            lines.append(f"| {r['tol']:g} | {r['sdegen_work']} | {r.get('torchdiffeq_work')} | "
                         f"{r.get('work_ratio', math.nan):.2f} | {r['sdegen_error']:.1e} | "
                         f"{r.get('torchdiffeq_error', math.nan):.1e} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
