"""The claims report: proof-check rules, row gathering, fallbacks, Markdown, and the CLI commands."""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import pandas as pd
import pytest

from tpg.experiments import report
from tpg.experiments.report import collect_rows, format_markdown, format_number, proof_status, proof_summary

ROOT = Path(__file__).resolve().parents[1]


def proof_rows(violate: str | None = None, unflagged: str | None = None) -> list[dict]:
    """Synthetic ``run_checks`` rows: two cases per statement."""
    rows = []
    for name in ("lemma1", "lemma2", "theorem1", "eq26_gamma", "theorem2", "critic_identity", "td_identity",
                 "gae_equality"):
        for case in ("a", "b"):
            bad = name == violate and case == "b"
            rows.append({"statement": name, "case": case, "kind": "statement", "difference": 1e-3 if bad else 1e-16,
                         "threshold": 1e-10, "passed": not bad})
            weak = name == unflagged and case == "a"
            rows.append({"statement": name, "case": case, "kind": "negative control",
                         "difference": 1e-9 if weak else 0.1, "threshold": 1e-6, "passed": not weak})
    return rows


def test_proof_status_branches():
    s = proof_summary(proof_rows())
    assert proof_status(s["lemma1"]) == "confirmed"
    assert s["lemma1"] == {"cases": 2, "hold": 2, "controls": 2, "flagged": 2, "max_difference": 1e-16,
                           "min_control": 0.1}
    assert proof_status(proof_summary(proof_rows(unflagged="lemma2"))["lemma2"]) == "qualified"
    assert proof_status(proof_summary(proof_rows(violate="td_identity"))["td_identity"]) == "refuted"
    assert proof_status({"cases": 0, "hold": 0, "controls": 0, "flagged": 0}) == "refuted"


def test_rows_from_proofs_alone(tmp_path):
    rows, info, summaries = collect_rows(tmp_path, studies=[], proof_rows=proof_rows(violate="lemma2"))
    by = {r["id"]: r for r in rows}
    ids = [r["id"] for r in rows]
    assert ids[:8] == ["lemma1", "lemma2", "thm1", "eq26", "thm2", "critic_identity", "td_identity", "gae"]
    assert ids[8:15] == [f"claim{i}" for i in range(1, 8)]
    assert by["lemma1"]["status"] == "confirmed" and by["lemma2"]["status"] == "refuted"
    # a theorem whose study did not run falls back on its proof check, and says so
    assert by["thm1"]["source"] == "proof checks" and "tpg study bias" in by["thm1"]["detail"]
    assert by["claim3"]["status"] == "not run" and "tpg study centering" in by["claim3"]["rule"]
    assert by["thm1"]["proof"] == "2/2 hold, 2/2 controls fail"
    text = format_markdown(rows, info, summaries, tmp_path)
    assert "| lemma2 |" in text and "**refuted**" in text and "## Proof checks" in text


def test_study_rows_take_precedence_and_further_checks_are_listed(tmp_path, monkeypatch):
    def fake_study_rows(cache_dir, studies=None):
        rows = [{"id": "thm1", "claim": "T1", "status": "qualified", "number": 1e-16, "uncertainty": None,
                 "unit": "max relative bias", "figure": "figures/bias_heatmap.png", "rule": "r", "detail": "",
                 "source": "study bias"},
                {"id": "claim3", "claim": "C3", "status": "refuted", "number": 0.9, "uncertainty": 0.05,
                 "unit": "variance ratio", "figure": "figures/centering.png", "rule": "r2", "source": "study centering"},
                {"id": "extra", "claim": "E", "status": "confirmed", "number": 2.0, "uncertainty": None, "unit": "",
                 "figure": "figures/x.png", "rule": "r3", "source": "study x"}]
        return rows, {"bias": {"status": "ok", "rows": 3, "cells": 1, "grid_cells": 1, "quick": True, "error": ""}}

    monkeypatch.setattr(report, "study_rows", fake_study_rows)
    rows, info, summaries = collect_rows(tmp_path, proof_rows=proof_rows())
    by = {r["id"]: r for r in rows}
    assert by["thm1"]["status"] == "qualified" and by["thm1"]["source"] == "study bias"
    assert by["claim3"]["status"] == "refuted"
    assert by["extra"]["section"] == "further"
    text = format_markdown(rows, info, summaries)
    assert "0.9 ± 0.05 (variance ratio)" in text
    assert "[bias_heatmap.png](bias_heatmap.png)" in text
    assert "## Further checks" in text and "| bias | ok | quick | 1 / 1 | 3 |" in text


def test_format_number():
    assert format_number({"number": 0.123456, "uncertainty": None, "unit": "u"}) == "0.123 (u)"
    assert format_number({"number": 2.0, "uncertainty": 0.25, "unit": ""}) == "2 ± 0.25"
    assert format_number({"number": math.nan, "uncertainty": None, "unit": ""}) == "-"


def test_a_broken_rule_is_reported_not_fatal(tmp_path, monkeypatch):
    from tpg.experiments import runner, studies

    broken = types.SimpleNamespace(NAME="bias", claim_rows=lambda df: 1 / 0)
    monkeypatch.setattr(studies, "load_study", lambda name: broken)
    monkeypatch.setattr(runner, "load_results", lambda name, cache_dir: pd.DataFrame({"cell_key": ["k"], "x": [1]}))
    rows, info = report.study_rows(tmp_path, studies=["bias"])
    assert rows == [] and info["bias"]["status"] == "error" and "ZeroDivisionError" in info["bias"]["error"]


def test_write_report_and_cli_commands_end_to_end(tmp_path, monkeypatch, capsys):
    """`tpg study` (tiny grid), `tpg figures` (one script) and `tpg report` through the CLI module."""
    from tpg.experiments import cli
    from tpg.experiments.studies import gamma

    tiny = [gamma.Cell(family="terminal", vocab=2, horizon=2, gammas=(0.9, 1.0), lambdas=(1.0,))]
    monkeypatch.setattr(gamma, "cells", lambda quick=False: tiny)
    cache, figs = tmp_path / "cache", tmp_path / "figs"
    assert cli.main(["study", "gamma", "--quick", "--backend", "sequential", "--cache-dir", str(cache),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "study gamma: 1 cells" in out and "eq26" in out and "confirmed" in out
    assert cli.main(["figures", "gamma_bias", "--cache-dir", str(cache), "--out-dir", str(figs)]) == 0
    assert (figs / "gamma_bias.png").stat().st_size > 1000
    assert "1 of 1 figure scripts ran" in capsys.readouterr().out
    assert cli.main(["figures", "bias_heatmap", "--cache-dir", str(cache), "--out-dir", str(figs)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert cli.main(["report", "--cache-dir", str(cache), "--out", str(figs / "REPORT.md"), "--no-proofs"]) == 0
    text = (figs / "REPORT.md").read_text()
    assert "| eq26 |" in text and "**confirmed**" in text and "| gamma | ok | quick | 1 / 1 |" in text
    assert "wrote the claims report" in capsys.readouterr().out
    assert cli.main(["study", "nope", "--cache-dir", str(cache)]) == 2
    assert cli.main(["figures", "no_such_figure", "--cache-dir", str(cache)]) == 2


def _partial_gamma_cache(tmp_path, monkeypatch):
    """A gamma study whose latest grid has two cells, one of them no longer cached."""
    from tpg.experiments import cli
    from tpg.experiments.studies import gamma

    grid = [gamma.Cell(family=f, vocab=2, horizon=2, gammas=(0.9, 1.0), lambdas=(1.0,)) for f in ("terminal", "dense")]
    monkeypatch.setattr(gamma, "cells", lambda quick=False: grid)
    cache = tmp_path / "cache"
    assert cli.main(["study", "gamma", "--quick", "--backend", "sequential", "--cache-dir", str(cache),
                     "--no-progress"]) == 0
    files = sorted((cache / "gamma").glob("*.parquet"))
    assert len(files) == 2
    files[0].unlink()  # an interrupted run, or a cell set aside as corrupt
    return cache


def test_a_partial_study_is_never_ok_and_its_claims_are_incomplete(tmp_path, monkeypatch, capsys):
    cache = _partial_gamma_cache(tmp_path, monkeypatch)
    capsys.readouterr()
    assert report.study_progress("gamma", cache) == {"cells": 1, "grid_cells": 2, "quick": True, "complete": False}
    rows, info = report.study_rows(cache, studies=["gamma"])
    assert info["gamma"]["status"] == "incomplete" and (info["gamma"]["cells"], info["gamma"]["grid_cells"]) == (1, 2)
    (row,) = rows
    assert row["id"] == "eq26" and row["status"] == "incomplete"
    assert "1 of 2 cells cached" in row["detail"] and "the rule gives confirmed" in row["detail"]
    rows, info, summaries = collect_rows(cache, studies=["gamma"], proof_rows=proof_rows())
    assert {r["id"]: r["status"] for r in rows}["eq26"] == "incomplete"
    text = format_markdown(rows, info, summaries, cache)
    assert "| gamma | incomplete | quick | 1 / 2 |" in text and "**Incomplete:** gamma" in text
    # cells cached with no run recorded: the grid is unknown, so not ok either
    (cache / "gamma" / "latest.json").unlink()
    assert report.study_progress("gamma", cache)["complete"] is False
    assert report.study_rows(cache, studies=["gamma"])[1]["gamma"]["status"] == "incomplete"


def test_figures_from_a_partial_grid_exit_non_zero_unless_allowed(tmp_path, monkeypatch, capsys):
    from tpg.experiments import cli

    cache = _partial_gamma_cache(tmp_path, monkeypatch)
    capsys.readouterr()
    figs, scripts = tmp_path / "figs", tmp_path / "scripts"
    scripts.mkdir()
    # a stand-in for the real script (drawing is not what is tested): it writes one file
    (scripts / "gamma_bias.py").write_text("from pathlib import Path\n\ndef main(cache_dir, out_dir):\n"
                                           "    p = Path(out_dir) / 'gamma_bias.png'\n    p.parent.mkdir(exist_ok=True)\n"
                                           "    p.write_text('x')\n    return [p]\n")
    base = ["figures", "gamma_bias", "--cache-dir", str(cache), "--out-dir", str(figs), "--scripts-dir", str(scripts)]
    assert cli.main(base) == 1
    captured = capsys.readouterr()
    assert "gamma_bias: drawn from a partial grid: study gamma: partial grid, 1 of 2 cells cached" in captured.out
    assert "1 drawn from partial grids (gamma_bias)" in captured.out and "--allow-partial" in captured.err
    assert (figs / "gamma_bias.png").exists()
    assert cli.main(base + ["--allow-partial"]) == 0
    assert "drawn from a partial grid" in capsys.readouterr().out
    assert cli.main(["report", "--cache-dir", str(cache), "--out", str(figs / "REPORT.md"), "--no-proofs"]) == 0
    assert "incomplete: study gamma: partial grid" in capsys.readouterr().out
    assert cli.figure_studies()["memory_table"] == ["learning"]


def test_register_adds_the_three_commands():
    import argparse

    from tpg.experiments.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "all", "--quick", "--jobs", "3", "--backend", "sequential"])
    assert (args.name, args.quick, args.jobs, args.backend) == ("all", True, 3, "sequential")
    args = parser.parse_args(["report", "--out", "x.md"])
    assert args.out == "x.md" and args.cache_dir == ".tpg-cache"
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "bias", "--backend", "spark"])


# ------------------------------------------------------------------------------ the documents
def _readme_claims_paragraph() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("### Studies, figures and the claims report"):text.index("### Case files")]


def test_readme_names_the_problem_of_every_memory_ratio():
    """A ratio quoted without its problem disagreed with the report's (2.4x transformer vs 7.93 tabular)."""
    para = " ".join(_readme_claims_paragraph().split())
    ratios = list(re.finditer(r"\b\d+(?:\.\d+)?x\b", para))
    assert ratios, "the claims paragraph quotes no memory ratio"
    for m in ratios:
        assert re.search(r"tabular|transformer", para[m.end():m.end() + 60]), f"{m.group()} names no problem"
    assert "incomplete" in para and "--allow-partial" in para and "docs/THEORY.md" in para


def test_every_theory_reference_points_at_docs_theory_md():
    """docs/THEORY.md exists, and every mention of the theory document in the code, tests and docs
    names it by that path, with a section that exists in it."""
    name = "THE" + "ORY"  # spelled in two parts so that this test does not match itself
    theory = (ROOT / "docs" / f"{name}.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", theory, re.M))
    assert {"1", "2", "3", "4", "5", "6", "7", "2.4"} <= sections
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    for folder in ("tpg", "tests", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.md"))
    bad = []
    for path in files:
        if not path.exists():
            continue
        text = path.read_text()
        for m in re.finditer(name, text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            if text[max(0, m.start() - 5):m.start()] != "docs/" or text[m.end():m.end() + 3] != ".md":
                bad.append(f"{where}: not docs/{name}.md")
                continue
            ref = re.match(r" sections? (\d+(?:\.\d+)?)(?:-(\d+))?", text[m.end() + 3:])
            for num in (ref.groups() if ref else ()):
                if num is not None and num not in sections:
                    bad.append(f"{where}: no section {num}")
    assert not bad, "\n".join(bad)
