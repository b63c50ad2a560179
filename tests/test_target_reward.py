"""Target rewards (tpg.mdp.objectives, verify(..., target_reward=), tpg verify --target-reward): the exact
J_target and grad J_target against independent computations, the batches carry R_target, and an estimator
fed RM - alpha T is unbiased for the length-penalised objective and biased for the plain one."""

import json

import pytest
import torch

import tpg
from tpg.cases import mdp_from_spec, problem_from_task_spec
from tpg.cli import main
from tpg.estimators import get_estimator, plugin_from_callable
from tpg.exact import solve
from tpg.exact.engine import path_log_probs, path_returns
from tpg.mdp.objectives import target_reward, with_target_reward
from tpg.rollouts import sample
from tpg.verify import exact_moments, exact_verdict

SPEC = "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=0"
ALPHA = 0.5


def brute_force(mdp, policy, reward_of_leaves):
    """``J = sum_W rho(x) P(W|x) R(W)`` and its gradient by autograd over every response, with ``R``
    computed from the base MDP's leaf paths by ``reward_of_leaves(rm, length, tokens, prompt)``."""
    tree = mdp.tree
    _, tok, length = tree.leaf_paths()
    rm = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
    prompt = tree.prompt_n[tree.leaf_ids]
    r = reward_of_leaves(rm, length.to(torch.float64), tok, prompt)
    params = list(policy.parameters())
    with torch.enable_grad():
        p = mdp.prompt_weights[prompt] * path_log_probs(tree, policy.node_log_probs(tree)).exp()
        J = (p * r).sum()
        grads = torch.autograd.grad(J, params)
    return float(J.detach()), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("gamma", [1.0, 0.8])
@pytest.mark.parametrize("spec, formula", [
    ("length_penalty:0.5", lambda rm, T, tok, x: rm - 0.5 * T),
    ("scaled:-2", lambda rm, T, tok, x: -2 * rm),
    ("clip:-0.5,0.7", lambda rm, T, tok, x: rm.clamp(-0.5, 0.7)),
    ("overlong:3,2", lambda rm, T, tok, x: rm + torch.where(T <= 1, 0.0, torch.where(T <= 3, (1 - T) / 2, -1.0))),
])
def test_exact_target_gradient_agrees_with_brute_force(spec, formula, gamma):
    mdp, policy = mdp_from_spec(SPEC + f",gamma={gamma}")
    sol = solve(with_target_reward(mdp, spec), policy)
    J, grad = brute_force(mdp, policy, formula)
    assert abs(sol.J - J) < 1e-12
    assert float((sol.flat_grad() - grad).abs().max()) < 1e-10


def test_length_penalty_gradient_is_grad_j_minus_alpha_grad_expected_length():
    mdp, policy = mdp_from_spec(SPEC + ",gamma=0.9")
    target = solve(with_target_reward(mdp, f"length_penalty:{ALPHA}"), policy).flat_grad()
    ones = torch.ones_like(mdp.reward_matrix())
    grad_length = solve(mdp, policy, r_kv=ones, gamma=1.0).flat_grad()  # E[T] with a reward of 1 per token
    expected = solve(mdp, policy).flat_grad() - ALPHA * grad_length
    assert float((target - expected).abs().max()) < 1e-12


def test_callable_target_on_tokens_and_prompt():
    mdp, policy = mdp_from_spec(SPEC)

    def bonus(rm, tokens, mask, prompt):
        return rm + 0.3 * ((tokens == 1) & mask).sum(1) - 0.2 * prompt

    sol = solve(with_target_reward(mdp, bonus), policy)
    J, grad = brute_force(mdp, policy, lambda rm, T, tok, x: rm + 0.3 * (tok == 1).sum(1) - 0.2 * x)
    assert abs(sol.J - J) < 1e-12 and float((sol.flat_grad() - grad).abs().max()) < 1e-10
    assert with_target_reward(mdp, bonus).name.endswith("/target=test_target_reward.test_callable_target_on_tokens_"
                                                        "and_prompt.<locals>.bonus")


def test_batches_carry_the_target_reward():
    mdp, policy = mdp_from_spec(SPEC + ",gamma=0.8")
    shaped = sample(with_target_reward(mdp, f"length_penalty:{ALPHA}"), policy, num_prompts=16, group_size=3, seed=4)
    plain = sample(mdp, policy, num_prompts=16, group_size=3, seed=4)
    assert torch.equal(shaped.tokens, plain.tokens)
    assert float((shaped.rm - (plain.rm - ALPHA * plain.length.to(torch.float64))).abs().max()) < 1e-12
    rows, last = torch.arange(len(shaped.length)), shaped.length - 1
    on_last = shaped.token_rewards[rows, last] * 0.8 ** last.to(torch.float64)
    assert float((on_last - shaped.rm).abs().max()) < 1e-12
    elsewhere = shaped.token_rewards.clone()
    elsewhere[rows, last] = 0.0
    assert not bool(elsewhere.any())  # a response-level reward: nothing before the last token


def lp_rloo(token_level_rewards, response_mask, index):
    """RLOO on RM - alpha T, computed from what verl passes (the user's trainer shaping its own reward)."""
    r = token_level_rewards.sum(-1) - ALPHA * response_mask.sum(-1)
    ids = torch.as_tensor(index)
    n = int(ids.max()) + 1
    sums = torch.zeros(n, dtype=r.dtype).index_add_(0, ids, r)
    size = torch.bincount(ids, minlength=n).to(r.dtype)[ids]
    adv = r - (sums[ids] - r) / (size - 1)
    return adv.unsqueeze(-1) * response_mask, None


def test_estimator_fed_the_penalised_reward_is_unbiased_for_it_and_biased_for_j():
    mdp, policy = mdp_from_spec(SPEC)
    shaped = with_target_reward(mdp, f"length_penalty:{ALPHA}")
    grad_j = solve(mdp, policy).flat_grad()
    grad_target = solve(shaped, policy).flat_grad()
    # the same estimator two ways: RLOO fed the shaped batches, and the user's function shaping RM itself
    m_shaped = exact_moments(shaped, policy, get_estimator("rloo"), 3, with_cov=False).mean
    m_user = exact_moments(mdp, policy, plugin_from_callable(lp_rloo), 3, with_cov=False).mean
    assert float((m_shaped - m_user).abs().max()) < 1e-12
    assert exact_verdict(m_shaped, grad_target).verdict == "unbiased"
    control = exact_verdict(m_shaped, grad_j)  # negative control: the plain objective sees a bias
    assert control.verdict == "biased" and control.cosine < 0.99
    # and the other way round: RLOO on the plain RM is biased for the penalised objective
    m_plain = exact_moments(mdp, policy, get_estimator("rloo"), 3, with_cov=False).mean
    assert exact_verdict(m_plain, grad_target).verdict == "biased"
    # through tpg.verify: the records name the target
    recs = tpg.verify(mdp, policy, ["rloo", "reinforce"], group_size=3, target_reward=f"length_penalty:{ALPHA}")
    assert [r["verdict"] for r in recs] == ["unbiased", "unbiased"]
    assert {r["target"] for r in recs} == {f"grad J[length_penalty:{ALPHA:g}]"}
    assert recs[0]["mdp"].startswith(mdp.name + f"/target=length_penalty:{ALPHA:g}")
    assert tpg.verify(mdp, policy, lp_rloo, group_size=3)[0]["verdict"] == "biased"
    kl = tpg.verify(mdp, policy, "rloo:kl=k3", group_size=3, target_reward=f"length_penalty:{ALPHA}")[0]
    assert kl["target"] == f"grad J[length_penalty:{ALPHA:g}] - 0.1 grad KL" and kl["verdict"] == "biased"


def test_monte_carlo_mode_with_a_target_reward():
    mdp, policy = mdp_from_spec(SPEC)
    recs = tpg.verify(mdp, policy, ["rloo", lp_rloo], group_size=3, mode="mc", samples=2000, seed=0,
                      target_reward=f"length_penalty:{ALPHA}")
    assert recs[0]["verdict"] == "consistent"
    assert recs[1]["verdict"] == "biased"  # shapes the reward a second time


def test_task_mdp_keeps_its_prompts_and_rm_is_no_change():
    mdp, policy = problem_from_task_spec("copy:vocab=3,length=1,prompts=2")
    shaped = with_target_reward(mdp, "length_penalty:0.1")
    assert torch.equal(shaped.prompt_tokens, mdp.prompt_tokens) and shaped.task == "copy"
    assert with_target_reward(mdp, "rm") is mdp and with_target_reward(mdp, None) is mdp
    rec = tpg.verify(mdp, policy, "rloo", group_size=2, target_reward="rm")[0]
    assert rec["target"] == "grad J" and rec["verdict"] == "unbiased"


def test_bad_target_rewards_name_the_problem():
    mdp, policy = mdp_from_spec(SPEC)
    with pytest.raises(ValueError, match="not a function of each response alone"):
        with_target_reward(mdp, lambda rm: rm - rm.mean())
    with pytest.raises(ValueError, match="its parameter foo is not one of them"):
        target_reward(lambda rm, foo: rm)
    with pytest.raises(ValueError, match=r"returned shape \[1\], expected \[\d+\]"):
        with_target_reward(mdp, lambda rm: rm[:1])
    with pytest.raises(ValueError, match="returned a non-finite value"):
        with_target_reward(mdp, lambda rm, length: rm / (length - length))
    with pytest.raises(ValueError, match="raised ZeroDivisionError"):
        with_target_reward(mdp, lambda rm: 1 / 0)
    for spec, msg in [("length_penalty", "takes 1 argument"), ("clip:1,0", "needs lo < hi"), ("bogus:1", "unknown"),
                      ("scaled:0", "non-zero"), ("overlong:2,3", "1 <= cache <= L")]:
        with pytest.raises(ValueError, match=msg):
            target_reward(spec)


def test_cli_target_reward_text_json_file_and_errors(tmp_path, capsys):
    fn = tmp_path / "shaping.py"
    fn.write_text(f"def shaped(rm, length):\n    return rm - {ALPHA} * length\n")
    for target in (f"length_penalty:{ALPHA}", f"{fn}:shaped"):
        assert main(["verify", "--mdp", SPEC, "--estimator", "rloo", "--group-size", "3", "--target-reward", target,
                     "--json"]) == 0
        (rec,) = json.loads(capsys.readouterr().out)["records"]
        assert rec["verdict"] == "unbiased" and rec["target"].startswith("grad J[")
    assert main(["verify", "--mdp", SPEC, "--estimator", "rloo", "--group-size", "3", "--target-reward",
                 f"length_penalty:{ALPHA}"]) == 0
    out = capsys.readouterr().out
    assert f"target reward length_penalty:{ALPHA:g}: R = RM(W) - alpha * T" in out
    assert f"target: grad J[length_penalty:{ALPHA:g}]" in out
    for target, msg in [("length_penalty:x", "alpha must be a number"), (f"{fn}:nope", "function 'nope' not found")]:
        assert main(["verify", "--mdp", SPEC, "--estimator", "rloo", "--target-reward", target]) == 2
        assert msg in capsys.readouterr().err
    assert main(["verify", "--suite", "standard", "--target-reward", "length_penalty:0.1"]) == 2
    assert "do not combine it with --target-reward" in capsys.readouterr().err
