"""The Markov engine (tpg.exact.markov) against the tree engine, against autograd through an
independent enumeration, against closed forms at H = 1024, and its refusals; ``tpg exact`` past the
tree's size guard."""

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpg.cases import make_policy
from tpg.cli import main
from tpg.exact import (choose_engine, exact_kl, grad_by_enumeration, kl_by_enumeration, markov_entropy, markov_kl,
                       markov_objective, markov_unsupported_reason, solve, solve_markov)
from tpg.exact.markov import prefix_response_values, reachable_states, zra_value_tables
from tpg.mdp import make_mdp
from tpg.mdp.mdp import TokenMDP
from tpg.mdp.rewards import CompactRewards
from tpg.policies import SharedSoftmax, TabularSoftmax

TOL = 1e-10
COMPACT_FAMILIES = ("dense", "terminal", "sparse", "length")


def problem(family="dense", vocab=3, horizon=3, eos=None, prompts=1, gamma=1.0, seed=0, scale=1.0,
            weights="random"):
    mdp = make_mdp(family, vocab=vocab, horizon=horizon, eos=eos, prompts=prompts, weights=weights, gamma=gamma,
                   seed=seed, compact=True)
    return mdp, make_policy(mdp, "shared", seed=seed, scale=scale)


def node_states(tree, rows):
    """Flat Markov state ``t R + prev`` of every non-terminal node of the tree, ``[N_nt]``."""
    nodes = tree.nt_node_k
    prev = torch.where(tree.parent_n[nodes] >= 0, tree.token_n[nodes], tree.vocab_size + tree.prompt_n[nodes])
    return tree.depth_n[nodes] * rows + prev


def per_state_sum(values_k, states_k, size):
    """Sum of per-node values over the nodes of each state (``values_k`` ``[N_nt]`` or ``[N_nt, V]``)."""
    out = torch.zeros((size,) + tuple(values_k.shape[1:]), dtype=torch.float64)
    return out.index_add_(0, states_k, values_k)


CASES = [dict(family=f, eos=eos, gamma=g, prompts=p, vocab=v, horizon=h, seed=i)
         for i, (f, eos, g, (p, v, h)) in enumerate(itertools.product(
             COMPACT_FAMILIES, [None, 0, 2], [1.0, 0.8], [(1, 3, 4), (3, 4, 3)]))]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_markov_matches_tree_engine(spec):
    """J, grad J, V, Q, advantages, reach, past reward, V', E[T] and P(T = t) against the tree DP."""
    mdp, pol = problem(**spec)
    tree = mdp.tree
    H, V, P = mdp.horizon, mdp.vocab_size, mdp.num_prompts
    R = V + P
    ms, ts = solve_markov(mdp, pol), solve(mdp, pol)
    assert ms.J == pytest.approx(ts.J, abs=TOL)
    assert float((ms.flat_grad() - ts.flat_grad()).abs().max()) < TOL
    J_enum, g_enum = grad_by_enumeration(mdp, pol)
    assert ms.J == pytest.approx(J_enum, abs=TOL)
    assert float((ms.grads[0] - g_enum[0]).abs().max()) < TOL
    # per node: V, Q and Q - V are those of the node's state
    st_k = node_states(tree, R)
    nt_nodes = tree.nt_node_k
    assert float((ms.value.reshape(-1)[st_k] - ts.value[nt_nodes]).abs().max()) < TOL
    assert float((ms.q.reshape(-1, V)[st_k] - ts.q).abs().max()) < TOL
    assert float((ms.advantage.reshape(-1, V)[st_k] - ts.advantage).abs().max()) < TOL
    # per state: the reaches add up, and so do the reach-weighted past rewards
    mu_k = ts.reach[nt_nodes]
    reach = per_state_sum(mu_k, st_k, H * R).view(H, R)
    assert float((ms.reach - reach).abs().max()) < TOL
    past = per_state_sum(mu_k * ts.past[nt_nodes], st_k, H * R).view(H, R)
    past_mean = torch.where(reach > 0, past / reach.clamp(min=1e-300), 0.0)
    assert float((ms.past_mean - past_mean).abs().max()) < TOL
    vresp = per_state_sum(mu_k * ts.value_resp[nt_nodes], st_k, H * R).view(H, R)
    assert float(((ms.value_resp - vresp / reach.clamp(min=1e-300)) * (reach > 0)).abs().max()) < TOL
    # only reachable states carry reach
    assert not bool((ms.reach[~ms.reachable] != 0).any())
    # the length distribution
    depth = tree.depth_n[ts.leaf_ids]
    probs = torch.zeros(H, dtype=torch.float64).index_add_(0, depth - 1, ts.response_prob)
    assert float((ms.length_probs - probs).abs().max()) < TOL
    assert ms.expected_length == pytest.approx(float((ts.response_prob * depth).sum()), abs=TOL)
    assert float(ms.length_probs.sum()) == pytest.approx(1.0, abs=TOL)
    assert float((ms.prompt_values() - ts.value[:P]).abs().max()) < TOL


def _enumerated_objective(logits, table, rho, eos, gamma):
    """``J = sum_x rho(x) sum_W P(W|x) RM(W)`` by listing every response in plain Python over the
    shared logits and the reward table (differentiable in ``logits``; shares no code with tpg)."""
    H, R, V = table.shape
    logp = torch.log_softmax(logits[:H], -1)
    total = torch.zeros((), dtype=torch.float64)
    for x in range(rho.numel()):
        for length in range(1, H + 1):
            for W in itertools.product(range(V), repeat=length):
                if eos is not None and (eos in W[:-1] or (length < H and W[-1] != eos)):
                    continue
                if eos is None and length < H:
                    continue
                lp, rm, prev = 0.0, 0.0, V + x
                for t, w in enumerate(W):
                    lp = lp + logp[t, prev, w]
                    rm += gamma ** t * float(table[t, prev, w])
                    prev = w
                total = total + rho[x] * torch.exp(lp) * rm
    return total


@settings(max_examples=30, deadline=None)
@given(vocab=st.integers(2, 4), horizon=st.integers(1, 4), eos=st.one_of(st.none(), st.integers(0, 3)),
       prompts=st.integers(1, 3), gamma=st.one_of(st.just(1.0), st.floats(0.2, 1.0)), seed=st.integers(0, 10_000),
       scale=st.floats(0.1, 4.0), reward_scale=st.floats(0.01, 100.0))
def test_markov_matches_independent_enumeration_property(vocab, horizon, eos, prompts, gamma, seed, scale,
                                                         reward_scale):
    """Random tables, logits and prompt weights: J and grad J against autograd through a plain
    enumeration of every response, and against the tree engine."""
    if vocab ** horizon > 100:
        horizon = 2
    eos = None if eos is None else eos % vocab
    gen = torch.Generator().manual_seed(seed)
    R = vocab + prompts
    table = torch.randn(horizon, R, vocab, generator=gen, dtype=torch.float64) * reward_scale
    rho = torch.rand(prompts, generator=gen, dtype=torch.float64) + 0.05
    rho = rho / rho.sum()
    mdp = TokenMDP(vocab, horizon, rho, CompactRewards(table), eos, gamma)
    pol = SharedSoftmax(vocab, horizon, prompts, seed=seed + 1, scale=scale)
    ms = solve_markov(mdp, pol)
    logits = pol.logits.detach().clone().requires_grad_(True)
    J = _enumerated_objective(logits, table, mdp.prompt_weights, eos, gamma)
    (g,) = torch.autograd.grad(J, logits)
    tol = TOL * max(1.0, reward_scale)
    assert ms.J == pytest.approx(float(J.detach()), abs=tol)
    assert float((ms.grads[0] - g).abs().max()) < tol
    ts = solve(mdp, pol)
    assert float((ms.flat_grad() - ts.flat_grad()).abs().max()) < tol


@pytest.mark.parametrize("eos,gamma", [(None, 1.0), (3, 0.97), (0, 1.0)])
def test_analytic_score_matches_autograd_at_long_horizon(eos, gamma):
    """H = 96, V = 8: no tree; the analytic score against autograd through the forward-only J."""
    mdp, pol = problem("dense", vocab=8, horizon=96, eos=eos, prompts=2, gamma=gamma, seed=5)
    ms = solve_markov(mdp, pol)
    J = markov_objective(mdp, pol)
    (g,) = torch.autograd.grad(J, pol.logits)
    assert ms.J == pytest.approx(float(J.detach()), abs=TOL)
    assert float((ms.grads[0] - g).abs().max()) < TOL
    assert float(ms.grad_logits.sum(2).abs().max()) < TOL  # softmax shift invariance


def test_closed_forms_at_h1024():
    """Uniform policy, reward 1 per token: J = sum_t gamma^t P(T > t), P(T > t) = ((V-1)/V)^t with EOS."""
    H, V = 1024, 32
    for eos, gamma in ((None, 0.99), (5, 0.995)):
        mdp = TokenMDP(V, H, [1.0], CompactRewards(torch.ones(H, V + 1, V, dtype=torch.float64)), eos, gamma)
        pol = SharedSoftmax(V, H, 1)  # zero logits: uniform
        ms = solve_markov(mdp, pol)
        alive = ((V - 1) / V) ** torch.arange(H, dtype=torch.float64) if eos is not None \
            else torch.ones(H, dtype=torch.float64)
        disc = gamma ** torch.arange(H, dtype=torch.float64)
        assert ms.J == pytest.approx(float((alive * disc).sum()), rel=1e-12)
        assert ms.expected_length == pytest.approx(float(alive.sum()), rel=1e-12)
        if eos is None:
            assert float(ms.grad_logits.abs().max()) < 1e-12  # every token earns the same: no gradient
            assert float(ms.length_probs[-1]) == pytest.approx(1.0, abs=1e-12)


def test_policy_longer_than_mdp_and_parameterised_table():
    """A shared policy with a longer horizon: the rows past H get zero gradient (as in the tree engine)."""
    mdp, _ = problem("dense", vocab=3, horizon=3, eos=1, prompts=2, gamma=0.9, seed=3)
    pol = SharedSoftmax(3, 5, 2, seed=8)
    ms, ts = solve_markov(mdp, pol), solve(mdp, pol)
    assert ms.grads[0].shape == pol.logits.shape
    assert float((ms.grads[0] - ts.grads[0]).abs().max()) < TOL
    assert float(ms.grads[0][3:].abs().max()) == 0.0

    class Scaled(SharedSoftmax):
        """logits = a * base: the chain rule goes through autograd."""

        def __init__(self):
            super().__init__(3, 3, 2, seed=9)
            self.base = torch.nn.Parameter(self.logits.detach().clone(), requires_grad=False)
            del self.logits
            self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        @property
        def logits(self):
            return self.a * self.base

    sp = Scaled()
    ms, ts = solve_markov(mdp, sp), solve(mdp, sp)
    assert len(ms.grads) == 1 and ms.grads[0].shape == ()
    assert float((ms.grads[0] - ts.grads[0]).abs()) < TOL


@pytest.mark.parametrize("eos,gamma", [(None, 1.0), (0, 0.8)])
def test_kl_and_entropy(eos, gamma):
    mdp, pol = problem("dense", vocab=3, horizon=4, eos=eos, prompts=2, gamma=gamma, seed=2)
    ref = SharedSoftmax(3, 4, 2, seed=77, scale=0.5)
    kl, grads = markov_kl(mdp, pol, ref)
    kl_tree, grads_tree = exact_kl(mdp, pol, ref)
    kl_enum, grads_enum = kl_by_enumeration(mdp, pol, ref)
    assert kl == pytest.approx(kl_tree, abs=TOL) and kl == pytest.approx(kl_enum, abs=TOL)
    assert float((grads[0] - grads_tree[0]).abs().max()) < TOL
    assert float((grads[0] - grads_enum[0]).abs().max()) < TOL
    assert markov_kl(mdp, pol, pol)[0] == pytest.approx(0.0, abs=TOL)
    # entropy against autograd through an enumeration of -sum_W P log P
    ent, g_ent = markov_entropy(mdp, pol)
    tree = mdp.tree
    from tpg.exact import path_log_probs
    lp = path_log_probs(tree, pol.node_log_probs(tree))
    rho = mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
    H_enum = -(rho * lp.exp() * lp).sum()
    (g,) = torch.autograd.grad(H_enum, pol.logits)
    assert ent == pytest.approx(float(H_enum.detach()), abs=TOL)
    assert float((g_ent[0] - g).abs().max()) < TOL


def test_zra_value_tables_reduce_to_v_at_gamma_one():
    mdp, pol = problem("dense", vocab=4, horizon=6, eos=1, prompts=2, gamma=1.0, seed=4)
    ms = solve_markov(mdp, pol)
    D, F = zra_value_tables(ms.logp.exp(), mdp.rewards.table, mdp.eos_token, 1.0, 1.0)
    live = ms.reachable
    assert float((D[live] - 1).abs().max()) < TOL and float((F - ms.value).abs().max()) < TOL
    assert float(D[1:, 1].abs().max()) == 0.0 and float(ms.value[1:, 1].abs().max()) == 0.0  # after EOS: 0


def test_prefix_response_values_match_tree():
    mdp, pol = problem("length", vocab=3, horizon=4, eos=0, prompts=2, gamma=0.9, seed=6)
    ms, ts = solve_markov(mdp, pol), solve(mdp, pol)
    tree = mdp.tree
    nodes = torch.arange(tree.num_nodes)
    prompts, prefixes = zip(*(tree.prefix(int(n)) for n in nodes))
    L = torch.tensor([len(p) for p in prefixes])
    toks = torch.zeros(len(prefixes), mdp.horizon, dtype=torch.long)
    for i, p in enumerate(prefixes):
        toks[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    got = prefix_response_values(mdp, ms, torch.tensor(prompts), toks, L)
    assert float((got - ts.value_resp).abs().max()) < TOL  # every node, terminal ones included


# ------------------------------------------------------------------ refusals and dispatch
def test_refuses_what_is_not_markov():
    mdp, pol = problem("dense", vocab=3, horizon=3, eos=0, prompts=2)
    tab = make_policy(mdp, "tabular", seed=0)
    with pytest.raises(ValueError, match="needs a SharedSoftmax policy.*got TabularSoftmax"):
        solve_markov(mdp, tab)
    tree_mdp = make_mdp("dense", vocab=3, horizon=3, eos=0, prompts=2, compact=False)
    with pytest.raises(ValueError, match="needs compact rewards.*got TreeRewards"):
        solve_markov(tree_mdp, pol)
    with pytest.raises(ValueError, match="TwinRewards.*zero-reward twin"):
        solve_markov(mdp.zero_reward_twin(), pol)
    for bad in (SharedSoftmax(4, 3, 2), SharedSoftmax(3, 3, 1), SharedSoftmax(3, 2, 2)):
        with pytest.raises(ValueError, match="does not fit the MDP"):
            solve_markov(mdp, bad)
    with pytest.raises(ValueError, match=r"rewards must have shape \[H, V \+ P, V\]"):
        solve_markov(mdp, pol, rewards=torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="rewards must be finite"):
        solve_markov(mdp, pol, rewards=torch.full((3, 5, 3), float("nan")))
    with pytest.raises(ValueError, match=r"gamma must be a number in \(0, 1\]"):
        solve_markov(mdp, pol, gamma=1.5)
    with pytest.raises(ValueError, match="reference policy: .*SharedSoftmax"):
        markov_kl(mdp, pol, tab)
    assert markov_unsupported_reason(mdp, pol) is None


def test_choose_engine():
    small, pol = problem("dense", vocab=3, horizon=3)
    assert choose_engine(small, pol) == "tree" and choose_engine(small, pol, "markov") == "markov"
    big, bpol = problem("dense", vocab=8, horizon=40, eos=0)
    assert choose_engine(big, bpol) == "markov" and choose_engine(big, bpol, "tree") == "tree"
    with pytest.raises(ValueError, match="engine must be one of auto, tree, markov"):
        choose_engine(small, pol, "fast")
    with pytest.raises(ValueError, match="needs a SharedSoftmax"):
        choose_engine(small, make_policy(small, "tabular"), "markov")
    twin = big.zero_reward_twin()
    with pytest.raises(ValueError, match="above max_nodes.*the Markov engine does not apply either: .*TwinRewards"):
        choose_engine(twin, bpol)
    assert reachable_states(3, 3, 2, 0).tolist() == [[False, False, False, True, True],
                                                    [False, True, True, False, False],
                                                    [False, True, True, False, False]]


# ------------------------------------------------------------------ the command line
def test_cli_exact_markov_past_the_tree_guard(capsys):
    spec = "dense:compact=true,policy=shared,horizon=1024,vocab=64,eos=0,prompts=2,gamma=0.99"
    assert main(["exact", "--mdp", spec]) == 0
    out = capsys.readouterr().out
    from tpg.cases import mdp_from_spec
    mdp, pol = mdp_from_spec(spec)
    ms = solve_markov(mdp, pol)
    assert "engine         = markov" in out
    assert f"J              = {ms.J:.12g}" in out
    assert f"|grad J|       = {float(ms.flat_grad().norm()):.6g}" in out
    assert f"E[T]           = {ms.expected_length:.6g}" in out


def test_cli_exact_engines(capsys):
    spec = "dense:compact=true,policy=shared,horizon=3,vocab=3,eos=0,prompts=2"
    assert main(["exact", "--mdp", spec, "--engine", "markov", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main(["exact", "--mdp", spec, "--json"]) == 0  # auto: the tree fits
    tree_doc = json.loads(capsys.readouterr().out)
    assert doc["engine"] == "markov" and doc["J"] == pytest.approx(tree_doc["J"], abs=TOL)
    # the tree's per-node gradient, summed per (position, previous token), is the Markov one
    per_state = {}
    for e in tree_doc["grad"]:
        key = (len(e["prefix"]), e["prefix"][-1] if e["prefix"] else 3 + e["prompt"])
        acc = per_state.setdefault(key, [0.0] * 3)
        per_state[key] = [a + g for a, g in zip(acc, e["grad"])]
    assert {(e["position"], e["prev"]) for e in doc["grad"]} == set(per_state)
    for e in doc["grad"]:
        assert max(abs(a - b) for a, b in zip(e["grad"], per_state[(e["position"], e["prev"])])) < TOL
    assert math.isclose(sum(e["reach"] for e in doc["grad"] if e["position"] == 0), 1.0)
    assert main(["exact", "--mdp", "dense:vocab=3,horizon=3", "--engine", "markov"]) == 2
    assert "tpg: error: the Markov engine needs a SharedSoftmax policy" in capsys.readouterr().err
    assert main(["exact", "--mdp", "dense:compact=true,policy=shared,vocab=8,horizon=40", "--engine", "tree"]) == 2
    assert "above max_nodes" in capsys.readouterr().err
    assert main(["exact", "--mdp", "dense:compact=true,vocab=8,horizon=40"]) == 2
    assert "policy=tabular needs the stored response tree" in capsys.readouterr().err


def test_markov_bench_tiny(tmp_path, bench):
    """The benchmark script runs end to end at a tiny size (no timing assertions)."""
    out = tmp_path / "markov.json"
    assert bench("markov_bench").main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["agreement_ok"] and result["tiny"] and result["target_met"] is None
    assert all(r["max_abs_err_grad"] <= TOL and r["ratio"] > 0 for r in result["side_by_side"])
    assert all(r["autograd_max_abs_err_grad"] <= TOL for r in result["long_horizon"])
    assert result["command"].startswith("python benchmarks/markov_bench.py")
