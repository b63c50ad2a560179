"""tpg.testing: assert_unbiased / assert_scaled / assert_biased on Python callables, with negative
controls, readable failures whose case files and commands reproduce the verdict."""

import json
import re
import shlex

import pytest
import torch

import tpg
import tpg.testing as T
from tpg.cases import load_case, mdp_from_spec, save_case
from tpg.cli import main

SMALL = "length:vocab=2,horizon=4,eos=1,seed=2"  # 125 batches at G = 3
TWO_PROMPTS = "dense:vocab=3,horizon=2,eos=0,prompts=2,seed=3"


def rloo(rewards, group_ids):
    """Leave-one-out baseline (simple form): unbiased."""
    n = int(group_ids.max()) + 1
    sums = torch.zeros(n, dtype=rewards.dtype).index_add_(0, group_ids, rewards)
    size = torch.bincount(group_ids, minlength=n).to(rewards.dtype)[group_ids]
    return rewards - (sums[group_ids] - rewards) / (size - 1).clamp(min=1)


def mean_with_self(rewards, group_ids):
    """The group mean including the response itself: E[g] = (G - 1)/G grad J."""
    n = int(group_ids.max()) + 1
    sums = torch.zeros(n, dtype=rewards.dtype).index_add_(0, group_ids, rewards)
    size = torch.bincount(group_ids, minlength=n).to(rewards.dtype)[group_ids]
    return rewards - sums[group_ids] / size


def grpo_std(token_level_rewards, response_mask, index):
    """GRPO with the std normalisation (verl form, groups of 2 or more): biased."""
    scores = token_level_rewards.sum(-1)
    ids = torch.as_tensor(index)
    n = int(ids.max()) + 1
    size = torch.bincount(ids, minlength=n).to(scores.dtype)
    mean = torch.zeros(n, dtype=scores.dtype).index_add_(0, ids, scores) / size
    var = torch.zeros(n, dtype=scores.dtype).index_add_(0, ids, (scores - mean[ids]) ** 2) / (size - 1)
    adv = (scores - mean[ids]) / (var.sqrt()[ids] + 1e-6)
    return adv.unsqueeze(-1) * response_mask, None


def test_unbiased_function_passes_on_the_default_cases_and_returns_the_records():
    recs = T.assert_unbiased(rloo)
    assert [r["case"] for r in recs] == list(T.DEFAULT_CASES)
    assert all(r["verdict"] == "unbiased" and r["spec"] == "test_testing.rloo" for r in recs)


def test_biased_function_fails_with_verdict_numbers_case_file_and_command(tmp_path, capsys):
    with pytest.raises(AssertionError) as info:
        T.assert_unbiased(mean_with_self, cases=[SMALL, TWO_PROMPTS], case_dir=tmp_path)
    msg = str(info.value)
    assert msg.startswith("tpg: test_testing.mean_with_self is not unbiased on 2 of 2 cases (G = 3; exact mode")
    assert "verdict   scaled (wanted unbiased)" in msg
    assert re.search(r"cosine    1\.0000000000   scale 0\.666667   rel_bias 0\.333", msg)
    files = re.findall(r"case file (\S+\.json)", msg)
    assert len(files) == 2 and all(p.startswith(str(tmp_path)) for p in files)
    # the case file is the problem: the same verdict and scale from it, in Python and from the command printed
    mdp, policy = load_case(files[1])
    rec = tpg.verify(mdp, policy, mean_with_self, group_size=3)[0]
    assert rec["verdict"] == "scaled" and abs(rec["scale"] - 2 / 3) < 1e-12
    commands = re.findall(r"(?:reproduce|or) (tpg verify .*)", msg)
    assert len(commands) == 4 and "--mdp " + TWO_PROMPTS in commands[3]
    for cmd in (commands[2], commands[3]):
        capsys.readouterr()
        assert main(shlex.split(cmd)[1:] + ["--json"]) == 0
        (out,) = json.loads(capsys.readouterr().out)["records"]
        assert out["verdict"] == "scaled" and abs(out["scale"] - 2 / 3) < 1e-12


def test_scaled_and_biased_assertions_with_their_negative_controls(tmp_path):
    T.assert_scaled(mean_with_self, cases=SMALL, scale=2 / 3)
    T.assert_scaled(rloo, cases=SMALL)  # unbiased is scaled by 1
    with pytest.raises(AssertionError, match=r"scaled with scale 0\.6666666667 \(wanted 0\.5 within relative 1e-06\)"):
        T.assert_scaled(mean_with_self, cases=SMALL, scale=0.5, case_dir=tmp_path)
    with pytest.raises(AssertionError, match=r"verdict   biased \(wanted unbiased or scaled\)"):
        T.assert_scaled(grpo_std, cases=SMALL, case_dir=tmp_path)
    T.assert_biased(grpo_std, cases=[SMALL, TWO_PROMPTS])
    with pytest.raises(AssertionError, match=r"verdict   unbiased \(wanted biased\)"):
        T.assert_biased(rloo, cases=SMALL, case_dir=tmp_path)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        T.assert_scaled(rloo, cases=SMALL, scale=-1.0)


def test_monte_carlo_mode_says_consistent_is_not_a_proof_and_splits_alpha(tmp_path):
    recs = T.assert_unbiased(rloo, cases=[SMALL, TWO_PROMPTS], mode="mc", samples=2000, seed=1)
    assert all(r["verdict"] == "consistent" and r["alpha"] == pytest.approx(0.005) for r in recs)
    assert all(r["mde_rel_bias"] is not None for r in recs)  # the power rides along
    with pytest.raises(AssertionError) as info:
        T.assert_unbiased(grpo_std, cases=TWO_PROMPTS, mode="mc", samples=2000, case_dir=tmp_path)
    msg = str(info.value)
    assert "Monte Carlo mode: N = 2,000 batches, seed 0" in msg and "consistent means not rejected, not proven" in msg
    assert "verdict   biased (wanted consistent)" in msg and "test      p(c=1)" in msg and "power     detects" in msg
    assert "--mode mc --samples 2000 --seed 0 --alpha 0.01" in msg
    # a negative control the test cannot see at this N: the message says what it could have missed
    with pytest.raises(AssertionError, match=r"(?s)verdict   consistent \(wanted biased\).*could have missed"):
        T.assert_biased(rloo, cases=SMALL, mode="mc", samples=500, case_dir=tmp_path)


def test_cases_as_spec_task_file_and_pair(tmp_path):
    mdp, policy = mdp_from_spec(TWO_PROMPTS)
    path = tmp_path / "mine.json"
    save_case(path, mdp, policy)
    got = T.resolve_cases([SMALL, "copy:vocab=3,length=1,prompts=2", str(path), (mdp, policy)])
    assert [g[0] for g in got] == [SMALL, "copy:vocab=3,length=1,prompts=2", str(path), mdp.name]
    assert [g[1] for g in got] == [f"--mdp {SMALL}", "--task copy:vocab=3,length=1,prompts=2",
                                   f"--case {path}", None]
    assert len(T.resolve_cases((mdp, policy))) == 1 and len(T.resolve_cases(SMALL)) == 1
    T.assert_unbiased(rloo, cases=[str(path), (mdp, policy)])
    with pytest.raises(ValueError, match="not an --mdp spec"):
        T.resolve_cases(["bogus:vocab=3"])


def test_options_verl_form_dtype_and_catalog_specs(tmp_path):
    T.assert_biased(grpo_std, cases=SMALL, layout="batch:1x3", agg="token-mean")  # options as keyword arguments
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        T.assert_unbiased(rloo, cases=SMALL, nope=1)
    with pytest.raises(ValueError, match="options .* are for a Python callable"):
        T.assert_unbiased("rloo", cases=SMALL, agg="token-mean")
    recs = T.assert_unbiased(rloo, cases=SMALL, dtype="float32")
    assert recs[0]["dtype"] == "float32"
    T.assert_unbiased("rloo", cases=SMALL)
    T.assert_scaled("grpo:std_norm=false", cases=SMALL, scale=2 / 3)
    with pytest.raises(AssertionError, match=r"reproduce tpg verify --case \S+ --estimator grpo --group-size 3"):
        T.assert_unbiased("grpo", cases=SMALL, case_dir=tmp_path)


def test_a_lambda_has_no_command_line_and_errors_are_failures(tmp_path):
    with pytest.raises(AssertionError, match="no command line: the estimator or target reward is not a top-level"):
        T.assert_unbiased(lambda rewards, group_ids: rewards - rewards.mean(), cases=SMALL, case_dir=tmp_path)

    def nan(rewards, group_ids):
        return rewards * float("nan")

    with pytest.raises(AssertionError, match=r"(?s)verdict   error \(wanted unbiased\).*error     .*non-finite"):
        T.assert_unbiased(nan, cases=SMALL, case_dir=tmp_path)


def test_target_reward_through_the_assertions(tmp_path):
    T.assert_unbiased(rloo, cases=SMALL, target_reward="length_penalty:0.5")
    with pytest.raises(AssertionError, match=r"--target-reward 'length_penalty:0.5'|--target-reward length_penalty"):
        T.assert_unbiased(mean_with_self, cases=SMALL, target_reward="length_penalty:0.5", case_dir=tmp_path)


def test_verifier_defaults_and_case_dir(tmp_path):
    v = T.Verifier(case_dir=tmp_path / "cases", group_size=2)
    assert v.assert_unbiased(rloo, cases=SMALL)[0]["group_size"] == 2
    with pytest.raises(AssertionError, match=r"\(G = 2; exact mode"):
        v.assert_unbiased(mean_with_self, cases=SMALL)
    assert list((tmp_path / "cases").glob("case-1-*.json"))
    with pytest.raises(ValueError, match="mode must be one of exact, mc"):
        v.assert_unbiased(rloo, cases=SMALL, mode="proof")
