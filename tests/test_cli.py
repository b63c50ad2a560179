"""The core commands: tpg exact, tpg prove, and bad input (one line, exit status 2)."""

import json
import subprocess
import sys

import pytest

from tpg.cli import main
from tpg.reference import reference_from_case

CASE = {"format": "tpg-case/1", "vocab_size": 3, "horizon": 3, "eos_token": 0, "gamma": 0.9,
        "prompt_weights": [0.25, 0.75],
        "token_rewards": [{"prompt": 0, "prefix": [1, 2], "token": 0, "reward": 0.7},
                          {"prompt": 1, "prefix": [], "token": 2, "reward": -1.3},
                          {"prompt": 1, "prefix": [2], "token": 1, "reward": 0.4}],
        "policy": {"kind": "tabular",
                   "logits": [{"prompt": 0, "prefix": [], "logits": [0.1, -0.3, 0.2]},
                              {"prompt": 1, "prefix": [2, 1], "logits": [1.5, 0.0, -2.0]}]}}


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exact_json_matches_the_independent_reference(tmp_path, capsys):
    path = tmp_path / "case.json"
    path.write_text(json.dumps(CASE))
    code, out, _ = _run(capsys, ["exact", "--case", str(path), "--json"])
    assert code == 0
    got = json.loads(out)
    J_ref, grad_ref = reference_from_case(CASE)
    assert abs(got["J"] - J_ref) < 1e-10
    assert len(got["grad"]) == len(grad_ref)
    for entry in got["grad"]:
        ref = grad_ref[(entry["prompt"], tuple(entry["prefix"]))]
        assert max(abs(a - b) for a, b in zip(entry["grad"], ref)) < 1e-10


def test_exact_summary_and_save_case_round_trip(tmp_path, capsys):
    saved = tmp_path / "saved.json"
    code, out, _ = _run(capsys, ["exact", "--mdp", "length:vocab=3,horizon=3,eos=1,prompts=2,gamma=0.8,seed=3",
                                 "--save-case", str(saved)])
    assert code == 0 and "J " in out and "|grad J|" in out
    code, out2, _ = _run(capsys, ["exact", "--case", str(saved), "--json"])
    J_saved = json.loads(out2)["J"]
    J_ref, _ = reference_from_case(json.loads(saved.read_text()))
    assert abs(J_saved - J_ref) < 1e-10


def test_prove_json_rows(capsys):
    code, out, _ = _run(capsys, ["prove", "--statement", "lemma2", "--json"])
    doc = json.loads(out)
    rows = doc["rows"]
    assert code == 0 and rows and doc["schema"] == "tpg-prove/1" and doc["ok"] is True
    assert {r["kind"] for r in rows} == {"statement", "negative control"}
    assert all(r["passed"] for r in rows)


@pytest.mark.parametrize("argv, field", [
    (["exact", "--mdp", "dense:vocab=1"], "vocab_size"),
    (["exact", "--mdp", "dense:gamma=1.5"], "gamma"),
    (["exact", "--mdp", "dense:horizon=0"], "horizon"),
    (["exact", "--mdp", "dense:eos=7"], "eos_token"),
    (["exact", "--mdp", "dense:colour=red"], "colour"),
    (["exact", "--mdp", "nosuchfamily:vocab=3"], "reward family"),
    (["exact", "--mdp", "dense:vocab=4,horizon=12,max_nodes=1000"], "max_nodes"),
])
def test_bad_spec_exits_2_naming_the_field(capsys, argv, field):
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert err.startswith("tpg: error:") and field in err
    assert "Traceback" not in err


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update(colour=1), "colour"),
    (lambda c: c.update(prompt_weights=[0.5, 0.6]), "prompt_weights"),
    (lambda c: c.update(prompt_weights=[-0.5, 1.5]), "prompt_weights"),
    (lambda c: c["token_rewards"][0].update(prefix=[1, 2, 1, 1]), "token_rewards[0].prefix"),
    (lambda c: c["token_rewards"][1].update(token=9), "token_rewards[1].token"),
    (lambda c: c["policy"]["logits"][0].update(logits=[1.0]), "policy.logits[0].logits"),
])
def test_bad_case_file_exits_2_naming_the_field(tmp_path, capsys, mutate, field):
    case = json.loads(json.dumps(CASE))
    mutate(case)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(case))
    code, _, err = _run(capsys, ["exact", "--case", str(path)])
    assert code == 2 and field in err and "Traceback" not in err


def test_unreadable_and_invalid_case_files(tmp_path, capsys):
    code, _, err = _run(capsys, ["exact", "--case", str(tmp_path / "missing.json")])
    assert code == 2 and "cannot read case file" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = _run(capsys, ["exact", "--case", str(bad)])
    assert code == 2 and "not valid JSON" in err


def test_console_script_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "tpg.cli", "exact", "--mdp", "dense:gamma=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "gamma must be a number in (0, 1]" in proc.stderr


# ---------------------------------------------------------------------------- outputs that cannot be written
def _unwritable(tmp_path, kind, suffix=""):
    """A path where a file cannot be written: an existing directory, below a regular file, in /proc."""
    if kind == "directory":
        d = tmp_path / f"a_dir{suffix}"
        d.mkdir(exist_ok=True)
        return str(d)
    if kind == "below a file":
        f = tmp_path / "a_file"
        f.write_text("x")
        return str(f / f"out{suffix}")
    return f"/proc/tpg-test/out{suffix}"


@pytest.mark.parametrize("kind", ["directory", "below a file", "proc"])
@pytest.mark.parametrize("command", ["exact", "train", "compare-runs", "report", "figures", "study"])
def test_an_unwritable_output_is_one_line_exit_2(tmp_path, capsys, kind, command):
    log = tmp_path / "log.csv"
    log.write_text("iter,J\n0,1.0\n")
    # a directory is where an output directory belongs: give a regular file instead
    out_dir = str(log) if kind == "directory" else _unwritable(tmp_path, kind, "/figs")
    cache = tmp_path / "cache"
    argv = {"exact": ["exact", "--mdp", "dense", "--save-case", _unwritable(tmp_path, kind, ".json")],
            "train": ["train", "--mdp", "dense", "--iters", "1", "--no-progress",
                      "--out", _unwritable(tmp_path, kind, ".csv")],
            "compare-runs": ["compare-runs", str(log), "--out", _unwritable(tmp_path, kind, ".png")],
            "report": ["report", "--no-proofs", "--cache-dir", str(cache), "--out", _unwritable(tmp_path, kind, ".md")],
            "figures": ["figures", "--cache-dir", str(cache), "--out-dir", out_dir],
            "study": ["study", "gamma", "--quick", "--cache-dir", out_dir]}[command]
    code, out, err = _run(capsys, argv)
    assert code == 2, err
    assert err.startswith("tpg: error: cannot write ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not cache.exists()


def test_an_output_error_mid_run_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import tpg.cases

    def full_disk(path, *a, **k):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(tpg.cases, "save_case", full_disk)
    code, _, err = _run(capsys, ["exact", "--mdp", "dense", "--save-case", str(tmp_path / "c.json")])
    assert code == 2 and err == f"tpg: error: cannot write {tmp_path / 'c.json'}: No space left on device\n"


# ---------------------------------------------------------------------------- seeds and sizes
@pytest.mark.parametrize("argv, field", [
    (["exact", "--mdp", "dense:seed=99999999999999999999999"], "--mdp key 'seed'"),
    (["exact", "--mdp", "dense:policy_seed=-1"], "--mdp key 'policy_seed'"),
    (["exact", "--task", "copy:seed=18446744073709551616"], "seed"),
    (["verify", "--mdp", "dense", "--estimator", "reinforce", "--seed", "99999999999999999999999"], "--seed"),
    (["verify", "--mdp", "dense", "--estimator", "reinforce", "--seed", "-5"], "--seed"),
    (["train", "--mdp", "dense", "--iters", "1", "--seed", "99999999999999999999999"], "TrainConfig.seed"),
])
def test_a_seed_outside_the_range_names_the_field(capsys, argv, field):
    code, _, err = _run(capsys, argv)
    assert code == 2 and err.startswith("tpg: error: ") and err.count("\n") == 1
    assert field in err and "[0, 4294967295]" in err


def test_duplicate_mdp_keys_exit_2(capsys):
    code, _, err = _run(capsys, ["exact", "--mdp", "dense:vocab=3,vocab=4"])
    assert code == 2 and "--mdp key 'vocab' given twice" in err


@pytest.mark.parametrize("argv, flag", [
    (["--group-size", "1000000000000"], "--group-size 1000000000000"),
    (["--mode", "mc", "--group-size", "1000000000000"], "--group-size 1000000000000"),
    (["--mode", "mc", "--samples", "1000000000000"], "--samples 1000000000000"),
])
def test_verify_refuses_batches_that_cannot_fit_before_sampling(capsys, monkeypatch, argv, flag):
    import importlib

    def boom(*a, **k):
        raise AssertionError("the guard came after the work")

    # by module (tpg.verify re-exports functions of the same names)
    monkeypatch.setattr(importlib.import_module("tpg.verify.montecarlo"), "sample", boom)
    monkeypatch.setattr(importlib.import_module("tpg.verify.exact_moments"), "sample_space_size", boom)
    code, _, err = _run(capsys, ["verify", "--mdp", "dense", "--estimator", "grpo", *argv])
    assert code == 2 and err.startswith(f"tpg: error: {flag}: ") and "more than this machine's" in err
