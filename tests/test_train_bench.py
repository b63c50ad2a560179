"""benchmarks/train_bench.py runs end to end at a tiny size (no timing assertions)."""

import importlib
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_train_bench_quick(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("train_bench")
    out, md = tmp_path / "train.json", tmp_path / "TRAIN.md"
    assert bench.main(["--quick", "--algos", "grpo,trepo", "--json", str(out), "--md", str(md)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["problem"], r["method"]) for r in rows] == [
        ("tabular", "grpo"), ("tabular", "trepo"), ("transformer", "grpo"), ("transformer", "trepo")]
    assert all(r["its_per_s"] > 0 and r["its_per_s_meter"] > 0 and r["tokens_per_iter"] > 0 for r in rows)
    assert rows[1]["tokens_per_iter"] > rows[0]["tokens_per_iter"]  # TRePO's continuations
    assert result["command"].startswith("python benchmarks/train_bench.py")
    assert md.read_text().startswith("## Training iterations per second")
    mem = result["memory"]["transformer"]
    assert [r["method"] for r in mem] == ["grpo", "trepo"] and mem[0]["held_bytes"] == mem[1]["held_bytes"]
    assert "### Memory per method" in md.read_text()
