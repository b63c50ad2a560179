"""Smoke test of benchmarks/verify_bench.py (no timing assertions)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "verify_bench.py"


def test_verify_bench_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("verify_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "verify.json"
    result = mod.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["monte_carlo"] and saved["machine"]["cores"] >= 1
    for row in result["monte_carlo"]:
        assert row["tpg_samples_per_s"] > 0 and row["reference_samples_per_s"] > 0 and row["verdict"]
    assert "gradient stage" in capsys.readouterr().out
