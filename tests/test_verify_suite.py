"""The standard suite: every verdict agrees with docs/THEORY.md's table (asserted here), within budget."""

import pytest

from tpg.verify.suite import ENTRIES, SETTINGS, format_suite, run_suite


@pytest.fixture(scope="module")
def result():
    return run_suite("standard")


def test_every_verdict_as_expected(result):
    bad = [(r["spec"], r["setting"], r["verdict"], r.get("scale"), r.get("error")) for r in result["disagreements"]]
    assert not bad, bad
    assert len(result["records"]) == len(SETTINGS) * len(ENTRIES)


def test_suite_covers_the_catalog(result):
    from tpg.estimators import CATALOG
    names = {r["estimator"] for r in result["records"]}
    assert set(CATALOG) <= names


def test_suite_scales_are_exact(result):
    for r in result["records"]:
        if r["spec"] in ("grpo:std_norm=false", "dr_grpo"):
            G = next(s.group_size for s in SETTINGS if s.name == r["setting"])
            assert abs(r["scale"] - (1 - 1 / G)) < 1e-12


def test_suite_matrix_text(result):
    text = format_suite(result)
    assert all(s.name in text.splitlines()[0] for s in SETTINGS)
    assert f"{len(result['records'])} of {len(result['records'])} verdicts as expected" in text


def test_suite_settings_cover_the_brief():
    from tpg.cases import mdp_from_spec
    facts = set()
    for s in SETTINGS:
        mdp, _ = mdp_from_spec(s.mdp)
        facts.add(("eos", mdp.eos_token is not None))
        facts.add(("prompts", mdp.num_prompts))
        facts.add(("gamma", mdp.gamma))
        facts.add(("G", s.group_size))
        facts.add(("family", s.mdp.split(":")[0]))
    assert {("eos", True), ("eos", False), ("prompts", 1), ("prompts", 3), ("gamma", 1.0), ("gamma", 0.9),
            ("G", 2), ("G", 4), ("family", "dense"), ("family", "terminal")} <= facts


def test_suite_has_an_offpolicy_section(result):
    """Off-policy rows carry their behaviour and loss in the matrix, and their predictions read the mismatch:
    top-p that cuts no mass on a setting (a vocabulary of 2, where 0.8 keeps both tokens) is mu = pi there."""
    off = [r for r in result["records"] if r.get("behaviour") not in (None, "pi") or r.get("loss") not in (None, "pg")]
    assert {r["loss"] for r in off} >= {"is_seq", "pg", "gspo:0.0004,clip_low=0.0003", "tis:1000,level=seq"}
    top = [r for r in off if r["behaviour"] == "top_p:0.8"]
    assert {r["expected"] for r in top} == {"biased", "unbiased"}
    for r in top:
        assert (r["expected"] == "biased") == ((r["mismatch"]["pi_mass_outside_seq"] or 0) > 0)
    assert " | top_p:0.8 | is_seq" in format_suite(result)
