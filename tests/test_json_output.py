"""Every --json output is one JSON object with a ``schema`` key, and its keys are the ones docs/JSON.md
documents: no undocumented key, every "always" key present, and every documented key seen in some run."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from tpg.cli import main

ROOT = Path(__file__).resolve().parents[1]
MDP = "dense:vocab=3,horizon=2,eos=0,prompts=2,seed=1"
PLUGIN = str(ROOT / "examples" / "plugins" / "grpo_verl.py") + ":compute_advantage"


def documented() -> dict[str, dict[str, dict[str, str]]]:
    """schema -> table ('' for the top level, else the key holding the list or object) -> key -> present."""
    schemas: dict[str, dict[str, dict[str, str]]] = {}
    current, sub = None, ""
    for line in (ROOT / "docs" / "JSON.md").read_text().splitlines():
        m = re.match(r"^## `(tpg-[\w-]+/\d+)`", line)
        if m:
            current, sub = m[1], ""
            schemas[current] = {"": {}}
            continue
        m = re.match(r"^### `(\w+)(?:\[\])?`", line)
        if m and current:
            sub = m[1]
            schemas[current].setdefault(sub, {})
            continue
        if current and line.startswith("Every key of a [`tpg-verify/1` record]"):
            schemas[current][sub].update(schemas["tpg-verify/1"]["records"])
        m = re.match(r"^\| `(\w+)` \| ([^|]+) \|", line)
        if m and current:
            schemas[current][sub][m[1]] = m[2].strip()
    return schemas


def _run(argv: list[str]) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    text = out.getvalue()
    doc = json.loads(text)  # one document: json.loads refuses trailing data
    assert isinstance(doc, dict) and text.count("\n") == 1, argv
    return code, doc


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """(schema, exit code, document) of every command with --json, in the forms that show every key."""
    raises = tmp_path_factory.mktemp("plug") / "raises.py"
    raises.write_text("def adv(rewards, group_ids):\n    raise RuntimeError('no')\n")
    runs = [
        ["exact", "--mdp", MDP, "--json"],
        ["exact", "--mdp", MDP + ",compact=true,policy=shared", "--engine", "markov", "--json"],
        ["prove", "--statement", "lemma1", "--json"],
        ["verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", f"{raises}:adv", "--json"],
        ["verify", "--mdp", MDP, "--estimator", "rloo", "--mode", "mc", "--samples", "100", "--json"],
        ["verify", "--mdp", MDP, "--estimator", PLUGIN, "--dtype", "float32", "--behaviour", "temperature:1.3",
         "--loss", "is_seq", "--json"],
        ["probe", PLUGIN, "--json"],
        ["train", "--report-memory", "--mdp", MDP, "--estimator", "grpo", "--estimator", "ppo", "--json"],
    ]
    out = []
    for argv in runs:
        code, doc = _run(argv)
        out.append((doc["schema"], code, doc))
    from tpg.verify import suite

    with pytest.MonkeyPatch.context() as mp:  # a corner of the standard suite, with an off-policy row
        mp.setattr(suite, "SETTINGS", suite.SETTINGS[:2])
        mp.setattr(suite, "ENTRIES", tuple(e for e in suite.ENTRIES if e.spec == "rloo")[:2]
                   + tuple(e for e in suite.ENTRIES if e.behaviour)[:1])
        code, doc = _run(["verify", "--suite", "standard", "--json"])
        out.append((doc["schema"], code, doc))
    return out


def _check(obj: dict, table: dict[str, str], where: str) -> None:
    undocumented = set(obj) - set(table)
    assert not undocumented, f"{where}: keys not in docs/JSON.md: {sorted(undocumented)}"
    missing = {k for k, present in table.items() if present == "always"} - set(obj)
    assert not missing, f"{where}: 'always' keys missing: {sorted(missing)}"


def test_every_schema_is_documented_and_printed(documents):
    docs = documented()
    assert set(docs) == {"tpg-exact/1", "tpg-prove/1", "tpg-verify/1", "tpg-suite/1", "tpg-probe/1",
                         "tpg-train-memory/1"}
    assert {schema for schema, _, _ in documents} == set(docs)


def test_every_document_has_exactly_the_documented_keys(documents):
    docs = documented()
    seen: dict[tuple[str, str], set[str]] = {}
    for schema, _, doc in documents:
        tables = docs[schema]
        _check(doc, tables[""], schema)
        seen.setdefault((schema, ""), set()).update(doc)
        for sub, table in tables.items():
            if not sub:
                continue
            value = doc[sub]
            items = value if isinstance(value, list) else [] if value is None else [value]
            for i, item in enumerate(items):
                _check(item, table, f"{schema} {sub}[{i}]")
                seen.setdefault((schema, sub), set()).update(item)
    # both ways: every documented key shows up in one of the runs above
    for schema, tables in docs.items():
        for sub, table in tables.items():
            never = set(table) - seen.get((schema, sub), set())
            if schema == "tpg-suite/1" and sub == "records":  # a verify record's keys: checked there
                never -= set(docs["tpg-verify/1"]["records"])
            assert not never, f"{schema} {sub or 'top level'}: documented but never printed: {sorted(never)}"


def test_the_documents_say_what_the_exit_status_says(documents):
    by = {}
    for schema, code, doc in documents:
        by.setdefault(schema, []).append((code, doc))
        assert doc["schema"] == schema
        if "exit_status" in doc:
            assert doc["exit_status"] == code
        if "ok" in doc:
            assert doc["ok"] == (code == 0)
    (errored, _), (mc, _), _ = [(c, d) for c, d in by["tpg-verify/1"]]
    assert errored == 3 and mc == 0
    first = by["tpg-verify/1"][0][1]
    assert first["errored"] == [first["records"][1]["spec"]] and first["holm"] is None
    holm = by["tpg-verify/1"][1][1]["holm"]
    assert holm["family_size"] == 2 and 0 <= holm["rejections"] <= 2 and holm["alpha"] == 0.01
    assert [d["engine"] for _, d in by["tpg-exact/1"]] == ["tree", "markov"]


def test_every_json_flag_names_its_schema_in_help():
    import argparse

    from tpg.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented_schemas = set(documented())
    for name, p in sub.choices.items():
        for act in p._actions:
            if "--json" in act.option_strings:
                m = re.search(r'"schema": "(tpg-[\w-]+/\d+)"', act.help)
                assert m and m[1] in documented_schemas, name
