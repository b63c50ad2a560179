"""``tpg verify`` / ``tpg probe`` through tpg.cli.main: JSON fields, exit codes, bad input, the suite."""

import json
import textwrap

import pytest

import tpg.verify.suite as suite
from tpg.cli import main

from _helpers import run_cli

MDP = "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=0"


def run(capsys, *argv):
    return run_cli(capsys, main, *argv)


def test_verify_json_fields(capsys):
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", "grpo:std_norm=false",
                       "--group-size", "3", "--json")
    assert code == 0
    recs = json.loads(out)["records"]
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
    rec = json.loads(out)["records"][0]
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
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--plugin-timeout", "-1"],
    ["verify", "--mdp", MDP, "--estimator", "rloo", "--plugin-timeout", "nan"],
    ["probe", "rloo", "--plugin-timeout", "inf"],
])
def test_bad_input_exits_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("tpg: error:") and len(err.strip().splitlines()) == 1


def test_all_records_refusals_as_rows(capsys):
    """Estimators expanded from 'all' that cannot run become rows with verdict 'error', and the
    run exits 3, not 0."""
    code, out, err = run(capsys, "verify", "--mdp", MDP, "--estimator", "all", "--group-size", "4", "--max-rows",
                         "200", "--json")
    recs = json.loads(out)["records"]
    assert code == 3 and "estimators errored" in err and "exit status 3" in err
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
    recs = json.loads(out)["records"]
    assert code == 0 and recs[0]["verdict"] == recs[1]["verdict"] == "biased"
    assert abs(recs[0]["cosine"] - recs[1]["cosine"]) < 1e-9
    # GRPO with an epsilon: flagged at reward scale 1e-6 and in float32 (identical groups get |A| ~ 0.056)
    code, out, _ = run(capsys, "probe", f"{path}:grpo_like")
    assert code == 1 and "identical" in out and "float32" in out
    assert out.splitlines()[-1] == "2 of 7 cases flagged: scale_1e-06, float32_vs_float64"
    code, out, _ = run(capsys, "probe", f"{path}:grpo_like", "--dtype", "float32", "--json")
    rep = json.loads(out)
    assert code == 1 and rep["schema"] == "tpg-probe/1" and rep["ok"] is False and rep["dtype"] == "float32"
    assert [f["case"] for f in rep["flagged"]] == ["identical", "scale_1e-06", "float32_vs_float64"]
    assert len(rep["cases"]) == 7 and rep["cases"][0]["status"] == "flagged"
    code, out, _ = run(capsys, "probe", "rloo", "--json")
    assert code == 0 and json.loads(out)["ok"] is True and json.loads(out)["flagged"] == []


def test_suite_command(capsys, monkeypatch):
    monkeypatch.setattr(suite, "SETTINGS", suite.SETTINGS[4:5])
    monkeypatch.setattr(suite, "ENTRIES", tuple(e for e in suite.ENTRIES if e.spec in ("rloo", "grpo", "dr_grpo")
                                                and e.behaviour is None and e.loss is None))
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


def test_probe_exits_1_on_errored_cases(tmp_path, capsys):
    path = tmp_path / "quits.py"
    path.write_text("import sys\ndef adv(rewards, group_ids):\n    sys.exit(0)\n")
    code, out, _ = run(capsys, "probe", f"{path}:adv", "--json")
    rep = json.loads(out)
    assert code == 1 and {f["status"] for f in rep["flagged"]} == {"error"} and len(rep["flagged"]) == 7
    assert "SystemExit" in rep["flagged"][0]["flag"]


def test_verify_plugin_failures_are_error_rows_exit_3(tmp_path, capsys):
    """A plug-in that calls sys.exit, raises a BaseException or runs past --plugin-timeout is an
    error row; the other estimators still run; the exit status is 3 (also with --fail-on-bias)."""
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent('''
        import sys, time
        class Stop(BaseException):
            pass
        def exits(rewards, group_ids):
            sys.exit(0)
        def custom(rewards, group_ids):
            raise Stop("no")
        def sleeps(rewards, group_ids):
            time.sleep(30)
    '''))
    exits_at_import = tmp_path / "quits.py"
    exits_at_import.write_text("import sys\nsys.exit(0)\n")
    code, out, err = run(capsys, "verify", "--mdp", MDP, "--estimator", f"{path}:exits", "--estimator",
                         f"{path}:custom", "--estimator", f"{path}:sleeps", "--estimator", f"{exits_at_import}:f",
                         "--estimator", "rloo", "--estimator", "grpo", "--plugin-timeout", "0.3", "--fail-on-bias",
                         "--json")
    recs = json.loads(out)["records"]
    assert code == 3 and "4 of 6 estimators errored" in err
    assert [r["verdict"] for r in recs] == ["error", "error", "error", "error", "unbiased", "biased"]
    assert "SystemExit" in recs[0]["error"] and "Stop: no" in recs[1]["error"]
    assert "time limit of 0.3 s" in recs[2]["error"] and "importing" in recs[3]["error"]
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", f"{path}:exits", "--estimator", "rloo")
    assert code == 3 and "errors:" in out and "sys.exit was called" in out


def test_verify_text_table_shows_layout(capsys):
    import pathlib

    rpp = pathlib.Path(__file__).resolve().parents[1] / "examples/plugins/reinforce_pp_verl.py"
    code, out, _ = run(capsys, "verify", "--mdp", "dense:vocab=2,horizon=2,eos=0,prompts=2,seed=3", "--group-size",
                       "3", "--estimator", f"{rpp}:compute_advantage:layout=batch:2×2", "--estimator", "reinforce_pp",
                       "--estimator", "grpo")
    lines = out.splitlines()
    assert code == 0 and lines[1].split()[:3] == ["estimator", "G", "layout"]
    assert lines[3].split()[1:3] == ["2", "batch:2x2"] and lines[4].split()[:3] == ["reinforce_pp", "3", "independent"]
    assert lines[5].split()[:3] == ["grpo", "3", "group"]
    code, out, _ = run(capsys, "verify", "--mdp", "dense:vocab=2,horizon=2,eos=0,prompts=2,seed=3", "--estimator",
                       f"{rpp}:compute_advantage:layout=batch:2x2", "--json")
    rec = json.loads(out)["records"][0]
    assert rec["layout"] == "batch:2x2" and rec["group_size"] == 2 and rec["options"]["layout"] == "batch:2x2"
