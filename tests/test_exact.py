"""The exact engine: the dynamic programme against autograd enumeration and against the
independent pure-Python reference (tpg/reference.py); values, probabilities, KL, the twin."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpg.cases import case_to_dict, make_policy
from tpg.exact import exact_kl, grad_by_enumeration, kl_by_enumeration, path_returns, solve
from tpg.mdp import FAMILIES, make_mdp
from tpg.policies import SharedSoftmax, TabularSoftmax
from tpg.reference import reference_from_case

from _helpers import assert_matches_reference_grad

TOL = 1e-10


def problem(family="dense", vocab=3, horizon=3, eos=None, prompts=1, gamma=1.0, seed=0, policy="tabular",
            compact=False, scale=1.0, weights="random"):
    mdp = make_mdp(family, vocab=vocab, horizon=horizon, eos=eos, prompts=prompts, weights=weights, gamma=gamma,
                   seed=seed, compact=compact)
    return mdp, make_policy(mdp, policy, seed=seed, scale=scale)


def max_abs(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def random_problems():
    """A grid of seeded problems over every family, EOS on/off, gamma, prompts, policy, storage."""
    out = []
    rng = torch.Generator().manual_seed(123)
    for i, (family, eos, gamma, policy) in enumerate(itertools.product(FAMILIES, [None, 0], [1.0, 0.9],
                                                                       ["tabular", "shared"])):
        vocab = int(torch.randint(2, 5, (1,), generator=rng))
        horizon = int(torch.randint(1, 5 if vocab < 4 else 4, (1,), generator=rng))
        prompts = 1 + i % 3
        compact = family != "first_token" and i % 2 == 1
        out.append(dict(family=family, vocab=vocab, horizon=horizon, eos=None if eos is None else vocab - 1,
                        prompts=prompts, gamma=gamma, seed=i, policy=policy, compact=compact))
    return out


PROBLEMS = random_problems()


@pytest.mark.parametrize("spec", PROBLEMS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_dp_matches_enumeration(spec):
    mdp, pol = problem(**spec)
    sol = solve(mdp, pol)
    J, grads = grad_by_enumeration(mdp, pol)
    assert sol.J == pytest.approx(J, abs=TOL)
    assert max_abs(sol.grads, grads) < TOL
    # softmax logits are shift invariant, so each row of dJ/dlogits sums to zero
    assert float(sol.grad_logits.sum(1).abs().max()) < TOL


@settings(max_examples=40, deadline=None)
@given(family=st.sampled_from(FAMILIES), vocab=st.integers(2, 4), horizon=st.integers(1, 3),
       eos=st.one_of(st.none(), st.integers(0, 3)), prompts=st.integers(1, 3),
       gamma=st.one_of(st.just(1.0), st.floats(0.3, 1.0)), seed=st.integers(0, 10_000),
       policy=st.sampled_from(["tabular", "shared"]), compact=st.booleans(), scale=st.floats(0.1, 3.0))
def test_dp_matches_enumeration_property(family, vocab, horizon, eos, prompts, gamma, seed, policy, compact, scale):
    eos = None if eos is None else eos % vocab
    compact = compact and family != "first_token"
    mdp, pol = problem(family, vocab, horizon, eos, prompts, gamma, seed, policy, compact, scale)
    sol = solve(mdp, pol)
    J, grads = grad_by_enumeration(mdp, pol)
    assert sol.J == pytest.approx(J, abs=TOL)
    assert max_abs(sol.grads, grads) < TOL


REF_PROBLEMS = [
    dict(family="dense", vocab=3, horizon=3, eos=None, prompts=2, gamma=1.0, seed=1),
    dict(family="dense", vocab=3, horizon=3, eos=0, prompts=2, gamma=0.9, seed=2, policy="shared"),
    dict(family="terminal", vocab=2, horizon=4, eos=1, prompts=1, gamma=0.8, seed=3),
    dict(family="sparse", vocab=4, horizon=2, eos=None, prompts=3, gamma=1.0, seed=4, compact=True),
    dict(family="first_token", vocab=3, horizon=3, eos=2, prompts=2, gamma=1.0, seed=5),
    dict(family="length", vocab=3, horizon=3, eos=0, prompts=1, gamma=0.95, seed=6, policy="shared", compact=True),
    dict(family="dense", vocab=2, horizon=1, eos=None, prompts=2, gamma=1.0, seed=7),
]


@pytest.mark.parametrize("spec", REF_PROBLEMS)
def test_dp_matches_reference(spec):
    mdp, pol = problem(**spec)
    sol = solve(mdp, pol)
    J_ref, grad_ref = reference_from_case(case_to_dict(mdp, pol))
    assert_matches_reference_grad(mdp, sol, J_ref, grad_ref, TOL)


def test_reference_sees_a_changed_reward():
    """Negative control: the comparison above is not vacuous."""
    mdp, pol = problem(**REF_PROBLEMS[0])
    case = case_to_dict(mdp, pol)
    J_ref, grad_ref = reference_from_case(case)
    case["token_rewards"][0]["reward"] += 1e-6
    J_bad, grad_bad = reference_from_case(case)
    assert abs(J_bad - J_ref) > 1e-9
    assert max(abs(a - b) for k in grad_ref for a, b in zip(grad_ref[k], grad_bad[k])) > 1e-9


@pytest.mark.parametrize("spec", PROBLEMS[::3])
def test_values_probabilities_and_returns(spec):
    mdp, pol = problem(**spec)
    sol = solve(mdp, pol)
    tree = mdp.tree
    depth = tree.depth_n.to(torch.float64)
    # V' = past + gamma^d V, and V' is E[RM | s] computed leaf by leaf
    assert torch.allclose(sol.value_resp, sol.past + mdp.gamma ** depth * sol.value, rtol=0, atol=1e-12)
    mass = torch.zeros(tree.num_nodes, dtype=torch.float64)  # sum over leaves below s of mu(leaf) RM(leaf)
    for leaf, prob, rm in zip(tree.leaf_ids.tolist(), sol.response_prob.tolist(), sol.response_rm.tolist()):
        node = leaf
        while node >= 0:
            mass[node] += prob * rm
            node = int(tree.parent_n[node])
    reached = sol.reach > 0
    assert torch.allclose(mass[reached] / sol.reach[reached], sol.value_resp[reached], rtol=0, atol=TOL)
    assert sol.J == pytest.approx(float(mass[: tree.num_prompts].sum()), abs=TOL)
    # response probabilities: rho(x) P(W|x), summing to rho(x) per prompt and to 1
    assert float(sol.response_prob.sum()) == pytest.approx(1.0, abs=1e-12)
    per_prompt = torch.zeros(tree.num_prompts, dtype=torch.float64).index_add_(
        0, tree.prompt_n[sol.leaf_ids], sol.response_prob)
    assert torch.allclose(per_prompt, mdp.prompt_weights, rtol=0, atol=1e-12)
    assert torch.allclose(sol.response_rm, path_returns(tree, mdp.edge_rewards(), mdp.gamma), rtol=0, atol=1e-12)
    # Q = r + gamma V(child), V = sum_w pi Q, at terminal nodes V = 0
    assert bool((sol.value[tree.leaf_ids] == 0).all())
    v_nt = (sol.logp.exp() * sol.q).sum(1)
    assert torch.allclose(v_nt, sol.value[tree.nt_node_k], rtol=0, atol=1e-12)
    assert torch.allclose(sol.advantage, sol.q - v_nt.unsqueeze(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("policy", ["tabular", "shared"])
@pytest.mark.parametrize("eos", [None, 1])
def test_exact_kl_matches_enumeration(policy, eos):
    mdp, pol = problem("dense", vocab=3, horizon=3, eos=eos, prompts=2, seed=3, policy=policy)
    ref = make_policy(mdp, policy, policy_seed=99)
    kl, grads = exact_kl(mdp, pol, ref)
    kl_e, grads_e = kl_by_enumeration(mdp, pol, ref)
    assert kl > 0 and kl == pytest.approx(kl_e, abs=TOL)
    assert max_abs(grads, grads_e) < TOL
    kl0, grads0 = exact_kl(mdp, pol, pol)
    assert abs(kl0) < 1e-14
    assert max(float(g.abs().max()) for g in grads0) < 1e-14


@pytest.mark.parametrize("spec", PROBLEMS[::2])
def test_twin_has_same_objective_and_gradient(spec):
    mdp, pol = problem(**spec)
    twin = mdp.zero_reward_twin()
    sol, sol_twin = solve(mdp, pol), solve(twin, pol)
    assert sol_twin.J == pytest.approx(sol.J, abs=TOL)
    assert max_abs(sol_twin.grads, sol.grads) < TOL
    assert torch.allclose(sol_twin.value_resp[mdp.tree.leaf_ids], sol.value_resp[mdp.tree.leaf_ids], atol=1e-12)


def test_solve_without_grad():
    mdp, pol = problem()
    sol = solve(mdp, pol, with_grad=False)
    assert sol.grads is None
    with pytest.raises(ValueError, match="gradient"):
        sol.flat_grad()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_policies_reject_non_finite_logits(bad):
    """A non-finite logit would turn the engine's sums into NaN; both policies refuse it."""
    mdp = make_mdp("dense", vocab=3, horizon=2)
    tab = torch.zeros(mdp.tree.num_nonterminal, 3, dtype=torch.float64)
    tab[1, 2] = bad
    with pytest.raises(ValueError, match="tabular logits must be finite"):
        TabularSoftmax(mdp.tree, logits=tab)
    shared = torch.zeros(2, 4, 3, dtype=torch.float64)
    shared[1, 0, 2] = bad
    with pytest.raises(ValueError, match="shared logits must be finite"):
        SharedSoftmax(3, 2, 1, logits=shared)
