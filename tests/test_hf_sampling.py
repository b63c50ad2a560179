"""Sampling a real-architecture restricted policy: the tpg sampler (``step_log_probs`` with its
incremental cache) and the batched device sampler (static cache; continuations from prefixes)
against exact probabilities (chi-square, fixed seeds), and the decode step's graph-capturability.
GPU-only checks live in test_hf_gpu.py."""

import pytest
import torch
from scipy.stats import chisquare

pytest.importorskip("transformers")

from tpg.exact.hf import make_lm_problem, solve_lm  # noqa: E402
from tpg.rollouts import sample  # noqa: E402
from tpg.verify.context import node_paths  # noqa: E402

ALLOWED = [3, 5, 7]
PROMPTS = [[10, 11, 12], [20, 21]]
N = 4000
P_MIN = 1e-3


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def problem(request):
    mdp, pol = make_lm_problem(request.param, ALLOWED, PROMPTS, 3, eos_token=5, prompt_weights=[0.4, 0.6])
    return mdp, pol, solve_lm(mdp, pol, with_grad=False)


def leaves_of(tree, prompt_b, tokens_bt, length_b):
    mask = torch.arange(tokens_bt.shape[1]) < length_b.unsqueeze(1)
    nodes = node_paths(tree, prompt_b, tokens_bt, mask)
    leaf = nodes[torch.arange(prompt_b.numel()), length_b]
    index = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    index[tree.leaf_ids] = torch.arange(tree.num_leaves)
    assert bool((index[leaf] >= 0).all())
    return index[leaf], nodes[:, :-1], mask


def check_frequencies(counts, probs, n):
    expected = probs * n
    assert abs(float(expected.sum()) - n) < 1e-6
    assert chisquare(counts.to(torch.float64).numpy(), expected.numpy()).pvalue > P_MIN


def check_logp(tree, sol, nodes, tokens, mask, logp):
    nt = torch.where(nodes >= 0, tree.nt_index_n[nodes.clamp(min=0)], -1)
    ref = torch.where(mask, sol.logp[nt.clamp(min=0), tokens], torch.zeros((), dtype=torch.float64))
    assert float((ref - logp).abs().max()) < 1e-12


def test_tpg_sampler_matches_exact_probabilities(problem):
    mdp, pol, sol = problem
    ro = sample(mdp, pol, num_prompts=N, seed=1)
    leaf, nodes, mask = leaves_of(mdp.tree, ro.prompt, ro.tokens, ro.length)
    check_frequencies(torch.bincount(leaf, minlength=mdp.tree.num_leaves), sol.response_prob, N)
    check_logp(mdp.tree, sol, nodes, ro.tokens, mask, ro.logp)
    assert torch.equal(mask, ro.mask)


def test_device_sampler_matches_exact_probabilities(problem):
    mdp, pol, sol = problem
    prompts = torch.multinomial(mdp.prompt_weights, N, replacement=True, generator=torch.Generator().manual_seed(2))
    tokens, logp, length = pol.sample(prompts, seed=3)
    leaf, nodes, mask = leaves_of(mdp.tree, prompts, tokens, length)
    check_frequencies(torch.bincount(leaf, minlength=mdp.tree.num_leaves), sol.response_prob, N)
    check_logp(mdp.tree, sol, nodes, tokens, mask, logp)
    assert bool((tokens[~mask] == 0).all()) and float(logp[~mask].abs().max()) == 0.0
    states = list(pol._decode_states.values())
    again, _, _ = pol.sample(prompts, seed=3)
    assert torch.equal(again, tokens)  # a seed fixes the batch
    assert list(pol._decode_states.values()) == states  # the decode buffers are reused
    assert pol.last_sample_info["static_cache"] and not pol.last_sample_info["cuda_graph"]


def test_continuations_from_many_prefixes(problem):
    """S continuations of each prefix: the prefix is kept, the next tokens follow pi(.|prefix)."""
    mdp, pol, sol = problem
    tree = mdp.tree
    prefixes = torch.tensor([[0, 0], [0, 2], [2, 0], [2, 2]])
    plen = torch.tensor([0, 2, 1, 2])
    prompt = torch.tensor([0, 1, 1, 0])
    S = 3000
    tokens, logp, length = pol.sample(prompt, prefix_bt=prefixes, prefix_len_b=plen, num_samples=S, seed=4)
    tokens = tokens.view(4, S, 3)
    for i in range(4):
        L = int(plen[i])
        assert bool((tokens[i, :, :L] == prefixes[i, :L]).all())
        node = int(tree.node_id(int(prompt[i]), prefixes[i, :L].tolist()))
        k = int(tree.nt_index_n[node])
        check_frequencies(torch.bincount(tokens[i, :, L], minlength=3), sol.logp[k].exp(), S)
    leaf, nodes, mask = leaves_of(tree, prompt.repeat_interleave(S), tokens.view(-1, 3), length)
    check_logp(tree, sol, nodes, tokens.view(-1, 3), mask, logp)  # forced tokens carry their log-probabilities


def test_incremental_cache_is_invalidated(problem):
    """The sampler's cache is reused only for the next position of the same batch and parameters."""
    mdp, pol, _ = problem
    prompt = torch.tensor([0, 1, 1])
    toks = torch.tensor([[0, 2], [2, 0], [1, 1]])
    lp0 = pol.step_log_probs(0, prompt, toks, None, None)
    lp1 = pol.step_log_probs(1, prompt, toks, None, None)  # incremental
    fresh = pol.step_log_probs(1, prompt, torch.tensor([[2, 2], [2, 0], [1, 1]]), None, None)  # other tokens: full
    pol.clear_sampling_cache()
    full = pol.step_log_probs(1, prompt, toks, None, None)
    assert float((lp1 - full).abs().max()) < 1e-12 and not torch.equal(fresh[0], lp1[0])
    with torch.no_grad():
        p = next(pol.model.parameters())
        p.add_(0.1)
    try:
        assert not torch.equal(pol.step_log_probs(1, prompt, toks, None, None), full)
    finally:
        with torch.no_grad():
            p.sub_(0.1)
    assert lp0.shape == (3, 3) and lp0.dtype == torch.float64


def test_bad_sampler_arguments(problem):
    _, pol, _ = problem
    with pytest.raises(ValueError, match="prompt ids"):
        pol.sample(torch.tensor([2]))
    with pytest.raises(ValueError, match="prefix tokens"):
        pol.sample(torch.tensor([0]), prefix_bt=torch.tensor([[3]]))
    with pytest.raises(ValueError, match="num_samples"):
        pol.sample(torch.tensor([0]), num_samples=0)


def test_decode_step_traces_without_graph_breaks():
    """The decode step (static cache, position counter and mask updated in place on the device) is
    one graph for torch.compile(fullgraph=True): no host synchronisation or data-dependent Python,
    which is what a CUDA graph capture needs."""
    from tpg.policies.hf import HFRestrictedPolicy, _DecodeState
    torch._dynamo.reset()
    pol = HFRestrictedPolicy("llama-tiny", [3, 5, 7, 9], [[10, 11, 12, 13], [14, 15]], 4, dtype="float32")
    z0, c0 = pol._prompt_prefill()
    state = _DecodeState(pol, c0, 2, 16, use_graph=False)
    state.load_prompts(c0, torch.tensor([0, 1]))
    state.ids.fill_(3)
    state.pos.add_(1)
    compiled = torch.compile(state._eager_step, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = state._eager_step()
        state.cache.pos.sub_(1)
        out = compiled()
        ref = pol.sequence_logits(torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.long))[:, -1]
    assert float((out - eager).abs().max()) < 1e-6 and int(state.cache.pos) == 5
    assert float((out - ref).abs().max()) < 1e-5  # the static cache gives the full-sequence logits
    torch._dynamo.reset()


def test_device_sampler_as_rollouts(problem):
    """lm_sample / lm_sample_continuations: tpg Rollouts from the device sampler, with the true
    token rewards, RM, node ids and the leaf of every response."""
    from tpg.exact import path_returns
    from tpg.verify.lm import lm_sample, lm_sample_continuations
    mdp, pol, sol = problem
    tree = mdp.tree
    ro = lm_sample(mdp, pol, num_prompts=50, group_size=4, seed=5)
    assert ro.batch_size == 200 and torch.equal(ro.group, torch.arange(50).repeat_interleave(4))
    index = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    index[tree.leaf_ids] = torch.arange(tree.num_leaves)
    rm = path_returns(tree, mdp.edge_rewards(), mdp.gamma)
    assert float((ro.rm - rm[index[ro.leaf]]).abs().max()) < 1e-12
    check_logp(tree, sol, ro.nodes, ro.tokens, ro.mask, ro.logp)
    cont = lm_sample_continuations(mdp, pol, ro.prompt[:3], ro.tokens[:3, :1], torch.ones(3, dtype=torch.long), 5,
                                   seed=6)
    assert cont.batch_size == 15 and bool((cont.tokens[:, 0] == ro.tokens[:3, 0].repeat_interleave(5)).all())
    assert bool((cont.prefix_len == 1).all()) and float((cont.rm - rm[index[cont.leaf]]).abs().max()) < 1e-12
