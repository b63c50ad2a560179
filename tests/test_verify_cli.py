"""``tpg verify`` / ``tpg probe`` through tpg.cli.main: JSON fields, exit codes, bad input, the suite."""

import json
import textwrap

import pytest

import tpg.verify.suite as suite
from tpg.cli import main

MDP = "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=0"


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_json_fields(capsys):
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", "grpo:std_norm=false",
                       "--group-size", "3", "--json")
    assert code == 0
    recs = json.loads(out)
    assert [r["verdict"] for r in recs] == ["unbiased", "scaled"]
    assert abs(recs[1]["scale"] - 2 / 3) < 1e-12
    for key in ("estimator", "options", "mode", "group_size", "verdict", "scale", "cosine", "rel_bias", "p_value",
                "n_samples", "variance_trace", "tokens_per_batch"):
        assert key in recs[0]
    assert recs[1]["options"]["std_norm"] is False and recs[0]["group_size"] == 3


def test_verify_text_table_and_fail_on_bias(capsys):
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "grpo", "--estimator", "reinforce",
                       "--fail-on-bias")
    assert code == 1
    assert "biased" in out and "unbiased" in out and "verdict" in out.splitlines()[1]
    code, _, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--fail-on-bias")
    assert code == 0


def test_verify_monte_carlo(capsys):
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "reinforce", "--mode", "mc", "--samples", "800",
                       "--seed", "3", "--json")
    rec = json.loads(out)[0]
    assert code == 0 and rec["mode"] == "mc" and rec["n_samples"] == 800 and rec["p_value"] is not None
    for key in ("p_value_adjusted", "p_value_direction_adjusted", "holm_family", "scale_ci_level", "mde_rel_bias",
                "mde_cosine", "mde_scale", "power", "target_cosine", "n_for_cosine"):
        assert rec[key] is not None, key


def test_verify_monte_carlo_text_and_exit_codes(capsys):
    """Monte Carlo text output: no 'unbiased' (a non-rejection is 'consistent'), the Holm family named,
    the power stated; --fail-on-bias exits 1 on 'biased' only (not on consistent or consistent-scaled)."""
    mc = ["--mode", "mc", "--samples", "2000", "--group-size", "3", "--fail-on-bias"]
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", "grpo:std_norm=false", *mc)
    assert code == 0
    assert "unbiased" not in out and "consistent-scaled" in out and " consistent " in out
    assert "Holm: the 4 tests of this run (c = 1 and direction, for each of 2 estimators) form one family" in out
    assert "could have missed" in out and "verdicts (Monte Carlo mode" in out
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", "grpo", *mc)
    assert code == 1 and "biased" in out


@pytest.mark.parametrize("argv", [
    ["verify", "--mdp", MDP, "--estimator", "nope"],
    ["verify", "--mdp", MDP, "--estimator", "grpo:std_norm=maybe"],
    ["verify", "--mdp", "bogus:vocab=3", "--estimator", "rloo"],
    ["verify", "--mdp", MDP],
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--group-size", "4", "--max-rows", "100"],
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--mode", "mc", "--samples", "3"],
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--mode", "sideways"],
    ["verify", "--suite", "standard", "--mdp", MDP],
    ["verify", "--suite", "standard", "--estimator", "rloo"],
    ["verify", "--case", "/nonexistent/case.json", "--estimator", "rloo"],
    ["probe", "/nonexistent/plugin.py:fn"],
])
def test_bad_input_exits_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("tpg: error:") and len(err.strip().splitlines()) == 1


def test_all_records_refusals_as_rows(capsys):
    """Estimators expanded from 'all' that cannot run become rows with verdict 'error'."""
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "all", "--group-size", "4", "--max-rows", "200",
                       "--json")
    recs = json.loads(out)
    assert code == 0
    assert {r["verdict"] for r in recs if r["layout"] is None} == {"error"}
    assert any(r["verdict"] == "unbiased" for r in recs)


def test_plugin_and_probe(tmp_path, capsys):
    path = tmp_path / "adv.py"
    path.write_text(textwrap.dedent('''
        import torch

        def grpo_like(rewards, group_ids):
            """simple form: GRPO with the group std."""
            out = torch.zeros_like(rewards)
            for g in group_ids.unique():
                m = group_ids == g
                r = rewards[m]
                out[m] = (r - r.mean()) / (r.std() + 1e-6) if r.numel() > 1 else r
            return out
    '''))
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", f"{path}:grpo_like", "--estimator", "grpo",
                       "--json")
    recs = json.loads(out)
    assert code == 0 and recs[0]["verdict"] == recs[1]["verdict"] == "biased"
    assert abs(recs[0]["cosine"] - recs[1]["cosine"]) < 1e-9
    code, out, _ = run(capsys, "probe", f"{path}:grpo_like")
    assert code == 0 and "identical" in out and "float32" in out
    code, out, _ = run(capsys, "probe", f"{path}:grpo_like", "--dtype", "float32", "--json")
    assert code == 0 and isinstance(json.loads(out), list)


def test_suite_command(capsys, monkeypatch):
    monkeypatch.setattr(suite, "SETTINGS", suite.SETTINGS[4:5])
    monkeypatch.setattr(suite, "ENTRIES", tuple(e for e in suite.ENTRIES if e.spec in ("rloo", "grpo", "dr_grpo")))
    code, out, _ = run(capsys, "verify", "--suite", "standard")
    assert code == 0
    assert "3 of 3 verdicts as expected" in out and "scaled 0.75" in out
    code, out, _ = run(capsys, "verify", "--suite", "standard", "--json")
    result = json.loads(out)
    assert code == 0 and result["disagreements"] == [] and len(result["records"]) == 3
    bad = suite.Entry("rloo", lambda f: ("biased", None), "a wrong expectation")
    monkeypatch.setattr(suite, "ENTRIES", (bad,))
    code, out, _ = run(capsys, "verify", "--suite", "standard")
    assert code == 1 and "!" in out
