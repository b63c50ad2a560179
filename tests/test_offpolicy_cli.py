"""``tpg verify --behaviour SPEC --loss SPEC`` through tpg.cli.main: the issue's command on a case file,
JSON fields, the text header, bad specs (one line, exit 2), ``tpg offpolicy-help``, the public API."""

import importlib
import json

import pytest

from tpg.cases import mdp_from_spec, save_case
from tpg.cli import main

from _helpers import run_cli

MDP = "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=0"


def run(capsys, *argv):
    return run_cli(capsys, main, *argv)


def test_the_issue_command_on_a_case_file(capsys, tmp_path):
    case = tmp_path / "case.json"
    save_case(case, *mdp_from_spec(MDP))
    code, out, _ = run(capsys, "verify", "--behaviour", "top_p:0.9", "--loss", "tis:2", "--estimator", "grpo",
                       "--case", str(case), "--group-size", "3", "--json")
    assert code == 0
    rec = json.loads(out)["records"][0]
    assert rec["behaviour"] == "top_p:0.9" and rec["loss"] == "tis:2" and rec["verdict"] == "biased"
    assert rec["mismatch"]["pi_mass_outside_seq"] > 0 and rec["mismatch"]["kl_pi_mu_seq"] is None
    # the Python equivalent gives the same record
    from tpg.cases import load_case
    from tpg.verify import verify
    mdp, pol = load_case(case)
    py = verify(mdp, pol, "grpo", group_size=3, behaviour="top_p:0.9", loss="tis:2")[0]
    assert py["cosine"] == pytest.approx(rec["cosine"], abs=1e-15) and py["verdict"] == rec["verdict"]


def test_text_output_names_the_setting_and_fail_on_bias(capsys):
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--estimator", "reinforce",
                       "--group-size", "3", "--behaviour", "logit_noise:0.5,1", "--loss", "is_seq", "--fail-on-bias")
    assert code == 0, out
    assert "behaviour mu = logit_noise:0.5,1; loss = is_seq; hooks from mu" in out and "KL(mu||pi)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("rloo", "reinforce"))]
    assert [r[0] for r in rows] == ["rloo", "reinforce"] and all("unbiased" in r for r in rows)
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "rloo", "--group-size", "3",
                       "--behaviour", "logit_noise:0.5,1", "--fail-on-bias")
    assert code == 1 and "loss = pg" in out and "biased" in out


def test_mc_mode_and_hooks_flag(capsys):
    code, out, _ = run(capsys, "verify", "--mdp", MDP, "--estimator", "reinforce_baseline", "--mode", "mc",
                       "--samples", "500", "--behaviour", "temperature:1.3", "--loss", "is_seq", "--hooks-from",
                       "policy", "--json")
    assert code == 0
    rec = json.loads(out)["records"][0]
    assert rec["mode"] == "mc" and rec["hooks"] == "policy" and rec["p_value"] is not None


@pytest.mark.parametrize("flag,value,msg", [
    ("--behaviour", "top_p:2", "behaviour top_p: option 'p': must be a number in (0, 1]"),
    ("--behaviour", "nucleus:0.9", "unknown behaviour 'nucleus'"),
    ("--loss", "tis:2,level=word", "loss tis: option 'level' must be token | seq | geo"),
    ("--loss", "ppo", "unknown loss 'ppo'"),
])
def test_bad_specs_exit_2_with_one_line(capsys, flag, value, msg):
    code, out, err = run(capsys, "verify", "--mdp", MDP, "--estimator", "grpo", flag, value)
    assert code == 2 and out == ""
    assert err.startswith("tpg: error: ") and msg in err and err.count("\n") == 1


def test_suite_refuses_a_behaviour(capsys):
    code, _, err = run(capsys, "verify", "--suite", "standard", "--behaviour", "top_p:0.9")
    assert code == 2 and "--suite runs on-policy" in err


def test_offpolicy_help_and_verify_help(capsys):
    code, out, _ = run(capsys, "offpolicy-help")
    assert code == 0
    for word in ("temperature:T", "top_p:p", "stale:k", "mix:w,SPEC1,SPEC2", "is_seq", "tis:C", "ppo_clip:eps",
                 "gspo", "cispo", "FILE.py:FUNCTION"):
        assert word in out
    code, out, _ = run(capsys, "verify", "--help")
    assert code == 0 and "--behaviour" in out and "--loss" in out and "--hooks-from" in out


def test_public_api():
    mod = importlib.import_module("tpg.offpolicy")
    assert mod.__all__ and not [n for n in mod.__all__ if not hasattr(mod, n)]
    assert len(set(mod.__all__)) == len(mod.__all__)


def test_hooks_flag_needs_an_offpolicy_setting(capsys):
    code, _, err = run(capsys, "verify", "--mdp", MDP, "--estimator", "grpo", "--hooks-from", "policy")
    assert code == 2 and "off-policy verification only" in err


def test_offpolicy_bench_tiny(tmp_path, bench):
    """The benchmark script runs end to end at a tiny size (no timing assertions)."""
    out = tmp_path / "offpolicy.json"
    assert bench("offpolicy_bench").main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["on_batches"] == row["off_batches"] > 0 and row["on_s"] > 0 and row["off_s"] > 0
    assert row["ratio"] > 0 and row["ratio_cpu"] > 0 and result["command"].startswith("python benchmarks/offpolicy")
