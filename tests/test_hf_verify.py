"""Verification on tiny real architectures: exact verdicts of the standard estimators in the full
parameter space and in a random-projection sketch of it, the Monte Carlo test on sketched
per-sample gradients, and ``tpg verify --lm`` as the lead wires it."""

import argparse

import pytest
import torch

pytest.importorskip("transformers")

from tpg.exact.hf import make_lm_problem, solve_lm  # noqa: E402
from tpg.verify.lm import (SketchedPolicy, _tangent, add_lm_args, lm_problem_from_args,  # noqa: E402
                           problem_from_lm_args, resolve_param_space, sketch_logit_jacobian, verify_lm)
from tpg.verify.score import ParamMap  # noqa: E402

ALLOWED = [3, 5, 7]
PROMPTS = [[10, 11, 12], [20, 21]]
STANDARD = {"reinforce": "unbiased", "rloo": "unbiased", "grpo": "biased", "grpo:std_norm=false": "scaled"}


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def problem(request):
    return make_lm_problem(request.param, ALLOWED, PROMPTS, 3, eos_token=5, reward="table")


def verdicts(records):
    return {r["spec"]: r["verdict"] for r in records}


def test_exact_verdicts_full_parameter_space(problem):
    """reinforce and rloo (G=2) unbiased, grpo's std normalisation biased, grpo without it scaled by
    1 - 1/G, over every parameter of the LM."""
    mdp, pol = problem
    records = verify_lm(mdp, pol, list(STANDARD), mode="exact", group_size=2, param_space="auto")
    assert verdicts(records) == STANDARD
    assert all(r["param_space"] == "full" for r in records)
    by = {r["spec"]: r for r in records}
    assert by["reinforce"]["rel_bias"] < 1e-10 and by["rloo"]["rel_bias"] < 1e-10
    assert abs(by["grpo:std_norm=false"]["scale"] - 0.5) < 1e-10


def test_exact_verdicts_in_a_sketch(problem):
    mdp, pol = problem
    records = verify_lm(mdp, pol, list(STANDARD), mode="exact", group_size=2, param_space="sketch", sketch_dim=48)
    assert verdicts(records) == STANDARD and all(r["sketch_dim"] == 48 for r in records)


def test_sketch_is_the_projected_jacobian(problem):
    """A = centred(J R) / sqrt(k), J the dense logit Jacobian, R the regenerated directions; the
    sketched policy has the policy's J, and its gradient is S grad J."""
    mdp, pol = problem
    tree = mdp.tree
    k = 24
    A = sketch_logit_jacobian(pol, tree, k, seed=5, chunk=10)  # chunks of 10, 10 and 4 directions
    params = [p for p in pol.parameters() if p.requires_grad]
    R = torch.stack([torch.cat([_tangent(p, 5, j).reshape(-1) for p in params]) for j in range(k)], 1)
    J = ParamMap(pol, tree).jacobian()
    JR = (J @ R).view(tree.num_nonterminal, 3, k) / k ** 0.5
    with torch.no_grad():
        pi = pol.node_log_probs(tree).exp()
    assert float((A - (JR - (pi.unsqueeze(2) * JR).sum(1, keepdim=True))).abs().max()) < 1e-10
    sk = SketchedPolicy(pol, tree, k, seed=5)
    s_full, s_sk = solve_lm(mdp, pol), solve_lm(mdp, sk)
    g = torch.cat([x.reshape(-1) for x in s_full.grads])
    assert abs(s_full.J - s_sk.J) < 1e-12
    assert float((s_sk.grads[0] - R.T @ g / k ** 0.5).abs().max()) < 1e-10 * float(g.norm())


def test_monte_carlo_on_sketched_per_sample_gradients():
    """The calibrated test in the sketch (k = 128): reinforce is consistent (not rejected), grpo is not
    (c = 1 rejected: its scale is ~0.18). Its direction error (cosine 0.997 in the sketch, exact mode)
    is below what N = 2000 detects, and the record says so: its minimal detectable cosine is lower."""
    mdp, pol = make_lm_problem("gpt2-tiny", ALLOWED, PROMPTS, 3, eos_token=5, reward="table")
    records = verify_lm(mdp, pol, ["reinforce", "grpo"], mode="mc", samples=2000, group_size=2, sketch_dim=128,
                        seed=1)
    v = verdicts(records)
    assert v["reinforce"] == "consistent" and v["grpo"] in ("consistent-scaled", "biased")
    grpo = {r["spec"]: r for r in records}["grpo"]
    assert grpo["scale_ci"][1] < 1 and (grpo["verdict"] == "biased" or grpo["mde_cosine"] < 0.997)
    assert all(r["param_space"] == "sketch" and r["mode"] == "mc" for r in records)
    rec = {r["spec"]: r for r in records}["reinforce"]
    assert rec["scale_ci"][0] < 1.0 < rec["scale_ci"][1]


def test_zero_reward_twin_verdicts():
    """On the twin (ZRA holds) the standard estimators keep their verdicts."""
    mdp, pol = make_lm_problem("llama-tiny", ALLOWED, PROMPTS, 2, eos_token=5, reward="lm", twin=True)
    assert verdicts(verify_lm(mdp, pol, ["reinforce", "rloo", "grpo"], group_size=2)) == {
        "reinforce": "unbiased", "rloo": "unbiased", "grpo": "biased"}


def test_param_space_resolution(problem):
    mdp, pol = problem
    assert resolve_param_space("auto", "mc", mdp, pol) == "sketch"
    assert resolve_param_space("auto", "exact", mdp, pol) == "full"
    with pytest.raises(ValueError, match="param_space"):
        resolve_param_space("dense", "exact", mdp, pol)


def _parser():
    p = argparse.ArgumentParser()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mdp")
    p.add_argument("--mode", default="exact")
    p.add_argument("--seed", type=int, default=0)
    add_lm_args(p, src)
    return p


def test_lm_args():
    args = _parser().parse_args(["--lm", "gpt2-tiny", "--allowed-tokens", "3,5,7", "--horizon", "2",
                                 "--prompt-ids", "10,11,12", "--prompt-ids", "20,21", "--eos-token", "5",
                                 "--reward", "rule", "--reward-target", "0-1", "--twin", "--trainable", "last:1"])
    mdp, pol = lm_problem_from_args(args)
    assert mdp.vocab_size == 3 and mdp.horizon == 2 and mdp.eos_token == 1 and mdp.num_prompts == 2
    assert mdp.answers.tolist() == [[0, 1], [0, 1]] and "zra-twin" in mdp.name
    assert all(n.startswith("model.transformer.h.1.") for n, p in pol.named_parameters() if p.requires_grad)
    args = _parser().parse_args(["--lm", "gpt2-tiny", "--allowed-tokens", "3,5", "--mode", "mc",
                                 "--sketch-dim", "16"])
    mdp, target = problem_from_lm_args(args)
    assert isinstance(target, SketchedPolicy) and target.dim == 16 and mdp.prompt_ids == ((1, 2, 3, 4),)
    with pytest.raises(ValueError, match="allowed-tokens"):
        lm_problem_from_args(_parser().parse_args(["--lm", "gpt2-tiny"]))


def test_tpg_verify_lm_command(monkeypatch, capsys):
    """``tpg verify --lm ...`` with the two lines the lead adds (simulated here by patching): the
    same verdict table as on the simulators."""
    import tpg.cli as cli
    import tpg.verify.cli as vcli

    original_add, original_load = vcli._add_verify, cli.load_problem_from_args

    def add_verify(sub):
        original_add(sub)
        p = sub.choices["verify"]
        add_lm_args(p, p._mutually_exclusive_groups[0])  # the lead: add_lm_args(p, src) in _add_verify

    monkeypatch.setattr(vcli, "_add_verify", add_verify)
    monkeypatch.setattr(cli, "load_problem_from_args",  # the lead: the --lm branch in cmd_verify
                        lambda a: problem_from_lm_args(a) if getattr(a, "lm", None) else original_load(a))
    rc = cli.main(["verify", "--lm", "llama-tiny", "--allowed-tokens", "3,5,7", "--horizon", "2", "--prompt-ids",
                   "10,11,12", "--estimator", "reinforce", "--estimator", "grpo", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    import json
    assert {r["spec"]: r["verdict"] for r in json.loads(out)["records"]} == {"reinforce": "unbiased", "grpo": "biased"}
    rc = cli.main(["verify", "--lm", "gpt2-tiny", "--allowed-tokens", "3,5,7", "--horizon", "2",
                   "--estimator", "rloo", "--group-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "lm[gpt2-tiny]" in out and "unbiased" in out and "estimator" in out
