"""benchmarks/gpu.py end to end at its tiny CPU size (no timing assertions), and the GPU run script."""

import importlib
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_bench_tiny(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    out = tmp_path / "gpu.json"
    assert importlib.import_module("gpu").main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert not result["errors"] and not result["skipped"]
    assert [(r["K"], r["H"]) for r in result["exact"]] == [(4, 3), (3, 3)]
    for r in result["exact"]:
        assert r["prefix_s"] > 0 and r["naive_full_head_s"] > 0 and r["speedup_vs_naive"] > 0
        assert r["naive_full_head_J_abs_diff"] < 1e-4 and r["naive_full_head_grad_cos"] > 0.9999  # float32
        assert r["shared_tokens"] < r["naive_tokens"]
    s = result["sampling"][0]
    assert s["restricted_tokens_per_s"] > 0 and s["generate_tokens_per_s"] > 0 and s["cuda_graph"] is False
    assert {"torch", "transformers", "card", "date"} <= set(result["env"])
    assert set(result["targets"]) == {"exact_vs_naive", "sampling_vs_generate"}


def test_run_gpu_script_is_valid_bash():
    script = BENCH / "run_gpu.sh"
    assert script.exists()
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "pip install" not in text and "benchmarks/gpu.py" in text and "test_hf" in text
