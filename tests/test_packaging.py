"""The built wheel carries the figure scripts and the proof checks, and both work from it outside a
checkout: ``tpg figures`` finds its scripts in the installed package, ``tpg prove`` its checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _ci import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    """``(wheel, installed)``: a wheel built from a copy of the source (the checkout gets no build/)
    and its contents unpacked as ``pip install --target`` lays them out (a pure-Python wheel)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    shutil.copytree(ROOT / "tpg", src / "tpg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = base / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        skip_unless_ci(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    (wheel,) = out.glob("tpg-*.whl")
    installed = base / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(installed)
    return wheel, installed


def _run_outside(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m tpg ARGS`` from ``cwd`` with only the unpacked wheel on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, "-m", "tpg", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_wheel_holds_the_figure_scripts_and_the_proof_checks(wheel_dir):
    wheel, _ = wheel_dir
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("paper_repro", "proofs_checks"):
        want = {f"tpg/{folder}/{p.name}" for p in (ROOT / "tpg" / folder).glob("*.py")}
        assert len(want) >= 8 and want <= names, sorted(want - names)
    # no top-level packages under the old names
    assert not any(n.startswith(("paper_repro/", "proofs_checks/")) for n in names)


def test_figures_and_prove_run_from_the_installed_package_outside_a_checkout(wheel_dir, tmp_path):
    _, installed = wheel_dir
    where = tmp_path / "elsewhere"
    where.mkdir()
    probe = subprocess.run(
        [sys.executable, "-c", "import tpg; from tpg.experiments.cli import figure_scripts; "
                               "print(tpg.__file__); print(*figure_scripts(), sep='\\n')"],
        cwd=where, env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.split()
    assert Path(lines[0]).is_relative_to(installed)
    scripts = [Path(s) for s in lines[1:]]
    assert {s.stem for s in scripts} >= {"bias_heatmap", "gamma_bias", "learning_curves"}
    assert all(s.is_relative_to(installed / "tpg" / "paper_repro") for s in scripts)

    # a figure script runs from the wheel: with no cached results it gets as far as asking for them
    proc = _run_outside(installed, where, "figures", "gamma_bias", "--cache-dir", str(tmp_path / "cache"),
                        "--out-dir", str(tmp_path / "figs"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "gamma_bias: skipped (no cached results of study 'gamma'" in proc.stdout

    proc = _run_outside(installed, where, "prove", "--statement", "lemma1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "tpg-prove/1" and doc["ok"] and all(r["passed"] for r in doc["rows"])


@pytest.mark.slow
def test_a_figure_is_drawn_from_the_installed_package(wheel_dir, tmp_path):
    """The whole path outside a checkout: a quick study cached by the wheel's tpg, then its figure drawn by the
    wheel's script (about 15 s on 2 cores)."""
    _, installed = wheel_dir
    cache, figs = tmp_path / "cache", tmp_path / "figs"
    proc = _run_outside(installed, tmp_path, "study", "gamma", "--quick", "--backend", "sequential", "--cache-dir",
                        str(cache), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = _run_outside(installed, tmp_path, "figures", "gamma_bias", "--cache-dir", str(cache), "--out-dir",
                        str(figs), "--no-progress")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (figs / "gamma_bias.png").stat().st_size > 0 and "gamma_bias: wrote" in proc.stdout
