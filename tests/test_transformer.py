"""The tiny transformer policy: prefix-shared node logits against naive forwards, the exact
gradient against per-sequence brute force, and the sampler against exact probabilities."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from tpg.exact import grad_by_enumeration, path_log_probs, solve
from tpg.exact.transformer import (grad_brute_force, grad_full_sequences, node_logits_naive, objective_full_sequences,
                                   work_counts)
from tpg.mdp import make_mdp
from tpg.mdp.tasks import make_task
from tpg.policies.transformer import TinyTransformerPolicy
from tpg.rollouts import sample, sample_continuations

from _helpers import chisquare_p as _chisquare_p
from _helpers import leaf_of

N = 20_000
P_MIN = 1e-3


def small_problem(eos=None, gamma=1.0, prompt_tokens=True, seed=0):
    """V=4, H=3, 2 prompts, dense Gaussian token rewards."""
    mdp = make_mdp("dense", vocab=4, horizon=3, eos=eos, prompts=2, weights="random", gamma=gamma, seed=seed)
    prompts = torch.tensor([[1, 2], [3, 1]]) if prompt_tokens else 2
    return mdp, TinyTransformerPolicy(4, prompts, 3, seed=seed + 1)


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def chisquare_p(observed, prob):
    """Goodness-of-fit p-value over more than 10 bins (see :func:`_helpers.chisquare_p`)."""
    return _chisquare_p(observed, prob, min_bins=11)


# ----------------------------------------------------------------------------- the model
def test_init_is_seeded_float64_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = TinyTransformerPolicy(5, 3, 4, seed=7)
    b = TinyTransformerPolicy(5, 3, 4, seed=7)
    c = TinyTransformerPolicy(5, 3, 4, seed=8)
    assert torch.equal(state, torch.get_rng_state())
    pa, pb, pc = (torch.cat([p.reshape(-1) for p in m.parameters()]) for m in (a, b, c))
    assert pa.dtype == torch.float64 and torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.prompt_tokens.tolist() == [[5], [6], [7]] and a.input_vocab == 8


def test_constructor_and_tree_checks():
    with pytest.raises(ValueError, match="multiple of n_head"):
        TinyTransformerPolicy(4, 2, 3, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="prompt tokens"):
        TinyTransformerPolicy(4, torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match=">= 0"):
        TinyTransformerPolicy(4, torch.tensor([[1, -2]]), 3)
    with pytest.raises(ValueError, match="input_vocab"):
        TinyTransformerPolicy(4, torch.tensor([[1, 9]]), 3, input_vocab=5)
    mdp, pol = small_problem()
    with pytest.raises(ValueError, match="does not fit the tree"):
        TinyTransformerPolicy(4, 3, 3).node_logits(mdp.tree)
    with pytest.raises(ValueError, match="does not fit the tree"):
        TinyTransformerPolicy(4, 2, 2).node_logits(mdp.tree)


@pytest.mark.parametrize("eos", [None, 0, 3])
@pytest.mark.parametrize("prompt_tokens", [True, False])
def test_prefix_shared_node_logits_equal_naive(eos, prompt_tokens):
    mdp, pol = small_problem(eos=eos, prompt_tokens=prompt_tokens)
    shared = pol.node_logits(mdp.tree)
    assert shared.shape == (mdp.tree.num_nonterminal, 4)
    assert float(shared.detach().std()) > 0.3  # a definite policy, so a caching slip would show
    for by in ("prefix", "response"):
        torch.testing.assert_close(shared, node_logits_naive(pol, mdp.tree, by=by), rtol=0, atol=1e-12)


def test_shorter_tree_than_policy_horizon():
    mdp = make_mdp("dense", vocab=3, horizon=2, eos=None, prompts=2, seed=0)
    pol = TinyTransformerPolicy(3, torch.tensor([[0, 1, 2], [2, 2, 0]]), horizon=4, seed=2)
    torch.testing.assert_close(pol.node_logits(mdp.tree), node_logits_naive(pol, mdp.tree), rtol=0, atol=1e-12)


def test_token_log_probs_match_node_log_probs():
    mdp, pol = small_problem(eos=0)
    tree = mdp.tree
    nt, tok, _ = tree.leaf_paths()
    mask = nt >= 0
    lp = pol.token_log_probs(tree.prompt_n[tree.leaf_ids], tok.clamp(min=0), mask).sum(1)
    torch.testing.assert_close(lp, path_log_probs(tree, pol.node_log_probs(tree)), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- exact J and grad J
@pytest.mark.parametrize("eos", [None, 0])
def test_exact_gradient_matches_per_sequence_brute_force(eos):
    mdp, pol = small_problem(eos=eos)
    sol = solve(mdp, pol)
    J_enum, g_enum = grad_by_enumeration(mdp, pol)
    J_bf, g_bf = grad_brute_force(mdp, pol)
    J_fs, g_fs = grad_full_sequences(mdp, pol, batch_size=17)
    assert abs(sol.J - J_bf) < 1e-10 and abs(J_enum - J_bf) < 1e-10 and abs(J_fs - J_bf) < 1e-10
    names = [n for n, p in pol.named_parameters()]
    assert len(sol.grads) == len(g_bf) == len(names)
    for name, a, b, c, d in zip(names, sol.grads, g_enum, g_bf, g_fs):
        assert float(c.abs().max()) > 0, name
        for other in (a, b, d):
            torch.testing.assert_close(other, c, rtol=0, atol=1e-10, msg=name)


def test_exact_gradient_with_discount_and_twin():
    mdp, pol = small_problem(eos=0, gamma=0.8)
    sol = solve(mdp, pol)
    J_fs, g_fs = grad_full_sequences(mdp, pol)
    assert abs(sol.J - J_fs) < 1e-10 and max_diff(sol.grads, g_fs) < 1e-10
    twin = solve(mdp.zero_reward_twin(), pol)
    assert abs(twin.J - sol.J) < 1e-10 and max_diff(twin.grads, sol.grads) < 1e-10


def test_transformer_task_exact_matches_brute_force():
    mdp = make_task("copy", vocab=4, length=2, prompts=3, eos=True)
    pol = TinyTransformerPolicy.from_mdp(mdp, seed=5)
    assert pol.prompt_tokens.tolist() == mdp.prompt_tokens.tolist()
    sol = solve(mdp, pol)
    J_bf, g_bf = grad_brute_force(mdp, pol)
    assert abs(sol.J - J_bf) < 1e-10 and max_diff(sol.grads, g_bf) < 1e-10


# ----------------------------------------------------------------------------- sampling
def test_sampler_frequencies_match_exact_probabilities():
    mdp = make_task("rm", vocab=4, length=2, prompts=2, horizon=3, eos=True, seed=3)
    pol = TinyTransformerPolicy.from_mdp(mdp, seed=4)
    tree = mdp.tree
    sol = solve(mdp, pol, with_grad=False)
    ro = sample(mdp, pol, num_prompts=N, seed=11)
    leaf = leaf_of(tree, ro.prompt, ro.tokens, ro.mask)
    pos = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    pos[tree.leaf_ids] = torch.arange(tree.num_leaves)
    observed = torch.bincount(pos[leaf], minlength=tree.num_leaves)
    assert chisquare_p(observed, sol.response_prob) > P_MIN
    # each row's log-probabilities and RM are the exact ones of its response
    lp_exact = path_log_probs(tree, sol.logp)[pos[leaf]]
    torch.testing.assert_close(ro.logp.sum(1), lp_exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(ro.rm, sol.response_rm[pos[leaf]], rtol=0, atol=1e-12)
    # negative control: a slightly different policy's samples are flagged against these probabilities
    other = TinyTransformerPolicy.from_mdp(mdp, seed=4)
    with torch.no_grad():
        other.head.weight.mul_(1.15)
    ro = sample(mdp, other, num_prompts=N, seed=11)
    observed = torch.bincount(pos[leaf_of(tree, ro.prompt, ro.tokens, ro.mask)], minlength=tree.num_leaves)
    assert chisquare_p(observed, sol.response_prob) < P_MIN


def test_incremental_sampling_equals_full_recompute():
    mdp = make_task("table", vocab=5, length=3, prompts=3, horizon=4, eos=True, seed=1)
    cached = TinyTransformerPolicy.from_mdp(mdp, seed=2)
    full = copy.deepcopy(cached)
    full.incremental_sampling = False
    a = sample(mdp, cached, num_prompts=500, group_size=2, seed=5)
    b = sample(mdp, full, num_prompts=500, group_size=2, seed=5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.logp, b.logp, rtol=0, atol=1e-12)
    # an in-place parameter update between rollouts must not reuse a stale cache
    with torch.no_grad():
        for p, q in zip(cached.parameters(), full.parameters()):
            p.mul_(1.5)
            q.mul_(1.5)
    a = sample(mdp, cached, num_prompts=300, seed=6)
    b = sample(mdp, full, num_prompts=300, seed=6)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logp, b.logp, rtol=0, atol=1e-12)


def test_sampler_runs_one_new_token_per_step():
    """The sampler's successive step_log_probs calls hit the key/value cache (no full recompute)."""
    mdp = make_task("table", vocab=5, length=3, prompts=3, horizon=4, eos=True)
    pol = TinyTransformerPolicy.from_mdp(mdp, seed=2)
    calls = []
    forward = pol.forward_tokens

    def spy(tokens, past=None, start=0):
        calls.append((tokens.shape[1], start))
        return forward(tokens, past, start)

    pol.forward_tokens = spy
    sample(mdp, pol, num_prompts=100, seed=0)
    assert calls[0] == (3, 0) and calls[1:] == [(1, 3 + t) for t in range(len(calls) - 1)] and len(calls) > 1


def test_continuations_with_transformer():
    mdp = make_task("copy", vocab=4, length=2, prompts=4, eos=True)
    pol = TinyTransformerPolicy.from_mdp(mdp, seed=1)
    prefix = torch.tensor([[0, 1], [2, 0], [1, 0]])
    ro = sample_continuations(mdp, pol, torch.tensor([0, 1, 3]), prefix, torch.tensor([2, 1, 0]), 4, seed=0)
    assert torch.equal(ro.tokens[:4, :2], prefix[0].expand(4, 2)) and bool((ro.tokens[4:8, 0] == 2).all())
    lp = pol.token_log_probs(ro.prompt, ro.tokens, ro.mask)
    torch.testing.assert_close(ro.logp, lp.detach(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the benchmark
def test_prefix_bench_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_bench.py"
    spec = importlib.util.spec_from_file_location("prefix_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.bench_case(vocab=3, horizon=2, eos=None, prompts=2, d_model=8, repeats=1)
    assert row["max_grad_diff"] < 1e-10 and row["naive_positions"] > row["shared_positions"]
    assert {"prefix_s", "prefix_one_pass_s", "naive_s", "ratio", "mean_response_length"} <= set(row)
    bench.write_outputs([row], tmp_path / "prefix.json", tmp_path / "PREFIX.md", command="pytest smoke")
    assert (tmp_path / "prefix.json").exists() and "| V |" in (tmp_path / "PREFIX.md").read_text()


def test_work_counts_and_full_sequence_objective():
    mdp, pol = small_problem(eos=0)
    wc = work_counts(mdp.tree, pol.prompt_len)
    assert wc["num_responses"] == mdp.tree.num_leaves and wc["shared_positions"] < wc["naive_positions"]
    with torch.no_grad():
        assert abs(float(objective_full_sequences(mdp, pol)) - solve(mdp, pol, with_grad=False).J) < 1e-12
