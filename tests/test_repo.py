"""Repository hygiene that CI must enforce: lint, the documentation build, the main example."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, timeout=300, out=None, **kw):
    # examples write their figures to SDEGEN_EXAMPLES_OUT: a temporary folder, never the source tree
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    if out is not None:
        env["SDEGEN_EXAMPLES_OUT"] = str(out)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_clean():
    res = _run(["ruff", "check", "sdegen", "tests", "examples", "benchmarks", "conftest.py"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    res = _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def test_quickstart_example_runs(tmp_path):
    res = _run([sys.executable, "examples/quickstart.py"], out=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "heun (probability-flow ODE)" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        ["examples/toy_2d.py", "--quick"],
        ["examples/digits.py", "--quick"],
        ["examples/diffusers_unet.py"],
        ["examples/flow_matching.py", "--quick"],
        ["examples/diffusers_flow.py"],
        ["examples/distributed_sampling.py"],
    ],
    ids=lambda s: s[0].split("/")[-1],
)
def test_example_scripts_run(script, tmp_path):
    """Every example runs end to end as a script (smoke runs where it has a --quick mode)."""
    if "diffusers" in script[0]:
        pytest.importorskip("diffusers")
    res = _run([sys.executable, *script], timeout=600, out=tmp_path)
    assert not (ROOT / "examples" / "out").exists() or _untouched(ROOT / "examples" / "out", tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def _untouched(folder: Path, since: Path) -> bool:
    """No file in ``folder`` is newer than ``since`` (made at the start of the test): nothing was written there."""
    start = since.stat().st_mtime
    return all(f.stat().st_mtime < start for f in folder.rglob("*") if f.is_file())


def test_cross_check_peers_are_installed():
    """The cross-checks against peers must run, not skip: the README's test command installs them all."""
    import importlib.util

    missing = [m for m in ("diffusers", "torchdiffeq", "torchsde", "torchode", "flow_matching", "k_diffusion",
                           "mkdocs", "sklearn", "hypothesis") if importlib.util.find_spec(m) is None]
    assert not missing, f"install the test extras (pip install -e '.[test]' and k-diffusion --no-deps): {missing}"
