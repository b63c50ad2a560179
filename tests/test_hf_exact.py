"""The exact engine on real architectures (2-layer GPT-2 and Llama from configs, float64 on CPU):
prefix-shared J and grad J against brute-force enumeration and naive full sequences to 1e-10, in
both sharing modes; the three token-reward kinds and their zero-reward twins."""

import pytest
import torch

pytest.importorskip("transformers")

from tpg.exact import grad_by_enumeration, path_returns, solve  # noqa: E402
from tpg.exact.hf import (enumerate_lm, make_lm_problem, naive_node_logits, solve_lm, work_counts)  # noqa: E402
from tpg.mdp.lm_tasks import LMRewards, LMTaskMDP  # noqa: E402
from tpg.mdp.mdp import TokenMDP  # noqa: E402
from tpg.mdp.rewards import TwinRewards  # noqa: E402
from tpg.rollouts import sample  # noqa: E402
from tpg.verify.context import node_paths  # noqa: E402

ALLOWED = [3, 5, 7]
PROMPTS = [[10, 11, 12], [20, 21]]
TOL = 1e-10


def flat(grads):
    return torch.cat([g.reshape(-1).to(torch.float64) for g in grads])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=[("gpt2-tiny", None), ("gpt2-tiny", 5), ("llama-tiny", None),
                                        ("llama-tiny", 5)], ids=lambda p: f"{p[0]}-eos{p[1]}")
def problem(request):
    name, eos = request.param
    return make_lm_problem(name, ALLOWED, PROMPTS, 3, eos_token=eos, reward="table", prompt_weights=[0.3, 0.7])


def test_prefix_sharing_matches_brute_force(problem):
    """solve (dynamic programme on prefix-shared logits) = autograd through the sum over every
    response = naive full-sequence enumeration, J and every parameter's gradient, to 1e-10."""
    mdp, pol = problem
    sol = solve(mdp, pol)
    g = flat(sol.grads)
    assert g.norm() > 0
    one_pass = solve_lm(mdp, pol)
    J_enum, g_enum = grad_by_enumeration(mdp, pol)
    J_naive, g_naive = enumerate_lm(mdp, pol, max_tokens=40)  # several chunks
    J_full, g_full = enumerate_lm(mdp, pol, full_head=True)
    for J, grads in ((one_pass.J, one_pass.grads), (J_enum, g_enum), (J_naive, g_naive), (J_full, g_full)):
        assert abs(J - sol.J) < TOL
        assert rel(flat(grads), g) < TOL


@pytest.mark.parametrize("mode", ["packed", "levels"])
def test_node_logits_match_full_sequences(problem, mode):
    mdp, pol = problem
    tree = mdp.tree
    old = (pol.tree_mode, pol.max_batch)
    pol.tree_mode, pol.max_batch = mode, 3  # levels in chunks of 3 rows
    try:
        with torch.no_grad():
            shared = pol.node_logits(tree)
            naive = naive_node_logits(pol, tree)
            naive_full = naive_node_logits(pol, tree, full_head=True)
    finally:
        pol.tree_mode, pol.max_batch = old
    assert shared.shape == (tree.num_nonterminal, 3) and shared.dtype == torch.float64
    assert float((shared - naive).abs().max()) < TOL and float((shared - naive_full).abs().max()) < TOL


def test_levels_and_packed_gradients_agree(problem):
    mdp, pol = problem
    g = {}
    for mode in ("packed", "levels"):
        pol.tree_mode = mode
        g[mode] = flat(solve_lm(mdp, pol).grads)
    pol.tree_mode = "auto"
    assert rel(g["levels"], g["packed"]) < TOL


def test_work_counts(problem):
    mdp, pol = problem
    w = work_counts(mdp, pol)
    assert w["shared_tokens"] == 5 + mdp.tree.num_nonterminal - 2
    assert w["naive_tokens"] == mdp.tree.num_leaves * (3 + 3) and w["shared_tokens"] < w["naive_tokens"]


@pytest.mark.parametrize("reward", ["table", "rule", "lm"])
def test_reward_kinds_and_twins(reward):
    """Each reward kind: exact = brute force; its zero-reward twin has the same RM for every
    response (so the same J and grad J) with all of it on the last token."""
    mdp, pol = make_lm_problem("gpt2-tiny", ALLOWED, PROMPTS, 3, eos_token=5, reward=reward, reward_seed=4)
    twin = mdp.zero_reward_twin()
    assert isinstance(twin, LMTaskMDP) and isinstance(twin.rewards, TwinRewards)
    assert twin.prompt_ids == mdp.prompt_ids and twin.allowed_tokens == mdp.allowed_tokens
    tree = mdp.tree
    rm = path_returns(tree, mdp.edge_rewards(), 1.0)
    rm_twin = path_returns(tree, twin.edge_rewards(), 1.0)
    assert float((rm - rm_twin).abs().max()) < 1e-12
    edge = twin.edge_rewards()
    not_leaf = torch.ones(tree.num_nodes, dtype=torch.bool)
    not_leaf[tree.leaf_ids] = False
    assert float(edge[not_leaf].abs().max()) == 0.0
    s, st = solve_lm(mdp, pol), solve_lm(twin, pol)
    J_enum, g_enum = grad_by_enumeration(twin, pol)
    assert abs(s.J - st.J) < TOL and abs(J_enum - st.J) < TOL
    assert rel(flat(st.grads), flat(s.grads)) < TOL and rel(flat(g_enum), flat(s.grads)) < TOL
    if reward == "rule":
        assert mdp.answers.shape == (2, 3) and bool((mdp.answers[:, -1] == 1).all())  # ends with EOS
        assert float(rm.max()) == 3.0  # the right answer scores one per token


def test_lm_rewards_are_the_reward_models_log_probs():
    """r(s, w) = log p_RM(w | s) under the reward model's full vocabulary, the same on the tree and
    on sampled responses (scored by full-sequence forwards), and usable in any TokenMDP's twin."""
    mdp, pol = make_lm_problem("llama-tiny", ALLOWED, PROMPTS, 3, eos_token=5, reward="lm", reward_scale=0.5)
    scorer = mdp.rewards.scorer
    tree = mdp.tree
    r_kv = mdp.reward_matrix()
    node = int(tree.node_id(1, [0, 2]))
    k = int(tree.nt_index_n[node])
    seq = torch.tensor([PROMPTS[1] + [3, 7]])
    with torch.no_grad():
        logp = torch.log_softmax(scorer.policy.model(seq).logits[0, -1].to(torch.float64), -1)
    assert float((r_kv[k] - 0.5 * logp[ALLOWED]).abs().max()) < 1e-12
    ro = sample(mdp, pol, num_prompts=64, seed=0)  # no tree ids in the batch: scored by the model
    assert ro.nodes is None
    nodes = node_paths(tree, ro.prompt, ro.tokens, ro.mask)
    child = nodes[:, 1:]
    via_tree = torch.where(ro.mask, mdp.edge_rewards()[child.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    assert float((ro.token_rewards - via_tree).abs().max()) < 1e-12
    plain = TokenMDP(3, 3, [0.5, 0.5], LMRewards(scorer), eos_token=1)  # TokenMDP.zero_reward_twin on LM rewards
    t = plain.zero_reward_twin()
    assert float((path_returns(tree, plain.edge_rewards(), 1.0) - path_returns(tree, t.edge_rewards(), 1.0))
                 .abs().max()) < 1e-12
    assert not any(p.requires_grad for p in scorer.policy.parameters())
    assert any(p.requires_grad for p in pol.parameters())


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_lora_gradients_match_brute_force(name):
    """trainable='lora:2' (peft adapters on every block's linear layers, base frozen), with B moved
    off zero so that dJ/dA and dJ/dB are both nonzero: the prefix-shared J and grad J (packed and
    levels) = autograd through the sum over every response = naive full-sequence enumeration, to
    1e-10; the gradient covers exactly the adapters' A and B."""
    pytest.importorskip("peft")
    mdp, pol = make_lm_problem(name, ALLOWED, PROMPTS, 3, eos_token=5, trainable="lora:2",
                               prompt_weights=[0.3, 0.7])
    names = [n for n, p in pol.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    sol = solve(mdp, pol)
    assert len(sol.grads) == len(names)
    for n, g in zip(names, sol.grads):
        assert float(g.abs().max()) > 0, n  # A too, now that B != 0
    g = flat(sol.grads)
    J_enum, g_enum = grad_by_enumeration(mdp, pol)
    J_naive, g_naive = enumerate_lm(mdp, pol)
    others = [(J_enum, g_enum), (J_naive, g_naive)]
    for mode in ("packed", "levels"):
        pol.tree_mode = mode
        s = solve_lm(mdp, pol)
        others.append((s.J, s.grads))
    pol.tree_mode = "auto"
    for J, grads in others:
        assert abs(J - sol.J) < TOL
        assert rel(flat(grads), g) < TOL
