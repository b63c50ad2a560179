"""Every column of every table the commands print has a line in the legend under it
(:func:`tpg._tables.missing_legend_entries`), in verify's exact and Monte Carlo tables, the suite's matrix,
the probe, prove, the memory table and the claims table."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from tpg._tables import legend_lines, missing_legend_entries, table_header
from tpg.cli import main

ROOT = Path(__file__).resolve().parents[1]
MDP = "dense:vocab=3,horizon=2,eos=0,prompts=2,seed=1"
PLUGIN = str(ROOT / "examples" / "plugins" / "grpo_verl.py") + ":compute_advantage"


def _out(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    return out.getvalue()


def test_the_checker_finds_a_missing_entry():
    table = "name  long column  x\n----  -----------  -\na     b            c\n"
    assert table_header(table.splitlines()) == ["name", "long column", "x"]
    text = table + "\n".join(legend_lines({"name": "n", "long column": "l"}))
    assert missing_legend_entries(text) == ["x"]
    assert missing_legend_entries(text + "\n  x  the third") == []
    assert missing_legend_entries(table) == ["name", "long column", "x"]  # no legend at all


@pytest.mark.parametrize("argv", [
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", "grpo"],
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--mode", "mc", "--samples", "100"],
    ["verify", "--mdp", MDP, "--estimator", PLUGIN, "--dtype", "float32", "--behaviour", "temperature:1.3",
     "--loss", "is_seq"],
    ["probe", PLUGIN],
    ["prove", "--statement", "lemma1"],
    ["train", "--report-memory", "--mdp", MDP, "--estimator", "grpo", "--estimator", "ppo"],
], ids=["verify-exact", "verify-mc", "verify-offpolicy", "probe", "prove", "train-memory"])
def test_every_column_of_a_command_table_is_explained(argv):
    text = _out(argv)
    assert missing_legend_entries(text) == [], text


def test_every_column_of_the_suite_matrix_is_explained(monkeypatch):
    from tpg.verify import suite

    monkeypatch.setattr(suite, "SETTINGS", suite.SETTINGS[:3])
    monkeypatch.setattr(suite, "ENTRIES", tuple(e for e in suite.ENTRIES if e.spec in ("rloo", "grpo"))[:2]
                        + tuple(e for e in suite.ENTRIES if e.behaviour)[:1])
    text = _out(["verify", "--suite", "standard"])
    header = table_header(text.splitlines())
    assert header[0] == "estimator" and header[1:] == [s.name for s in suite.SETTINGS[:3]]
    assert missing_legend_entries(text) == [], text
    assert "cells: the verdict in exact mode" in text


def test_every_column_of_the_claims_table_is_explained():
    from tpg.experiments.report import format_table

    rows = [{"id": "thm1", "status": "confirmed", "number": 1e-15, "unit": "relative bias"},
            {"id": "claim3", "status": "not run", "number": None}]
    text = format_table(rows)
    assert missing_legend_entries(text) == [], text
