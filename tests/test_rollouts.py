"""The samplers: frequencies against exact probabilities (chi-square), per-row consistency
with the exact engine, seeding, group layout, continuations, and sampling past the size guard."""

import pytest
import torch

from tpg.cases import make_policy
from tpg.exact import path_log_probs, solve
from tpg.mdp import make_mdp
from tpg.rollouts import PAD_TOKEN, sample, sample_continuations

from _helpers import chisquare_p, leaf_of

N = 20_000
P_MIN = 1e-3


def leaf_position(tree):
    pos = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    pos[tree.leaf_ids] = torch.arange(tree.num_leaves)
    return pos


def problem(policy="tabular", eos=0, compact=False, vocab=3, horizon=3, prompts=2, gamma=1.0, seed=0):
    mdp = make_mdp("dense", vocab=vocab, horizon=horizon, eos=eos, prompts=prompts, weights="random",
                   gamma=gamma, seed=seed, compact=compact)
    return mdp, make_policy(mdp, policy, seed=seed)


CASES = [dict(policy=pol, eos=eos, compact=compact) for pol in ("tabular", "shared") for eos in (None, 0)
         for compact in (False, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_response_frequencies_match_exact_probabilities(case):
    mdp, pol = problem(**case)
    ro = sample(mdp, pol, num_prompts=N, seed=1)
    tree = mdp.tree
    leaf = leaf_of(tree, ro.prompt, ro.tokens, ro.mask)
    if ro.leaf is not None:
        assert torch.equal(ro.leaf, leaf)
    else:  # shared policy with compact rewards: the sampler never touches the tree
        assert case["policy"] == "shared" and case["compact"] and ro.nodes is None
    sol = solve(mdp, pol, with_grad=False)
    counts = torch.bincount(leaf_position(tree)[leaf], minlength=tree.num_leaves)
    assert chisquare_p(counts, sol.response_prob) > P_MIN
    # negative control: the same counts against another policy's probabilities are rejected
    other = solve(mdp, make_policy(mdp, case["policy"], policy_seed=777), with_grad=False)
    assert chisquare_p(counts, other.response_prob) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_rows_agree_with_the_exact_engine(case):
    mdp, pol = problem(**case, gamma=0.9, horizon=4)
    ro = sample(mdp, pol, num_prompts=300, group_size=2, seed=2)
    tree = mdp.tree
    sol = solve(mdp, pol, with_grad=False)
    leaf = leaf_of(tree, ro.prompt, ro.tokens, ro.mask)
    idx = leaf_position(tree)[leaf]
    assert torch.allclose(ro.rm, sol.response_rm[idx], rtol=0, atol=1e-12)
    assert torch.allclose(ro.logp.sum(1), path_log_probs(tree, sol.logp)[idx], rtol=0, atol=1e-12)
    # per token: the reward and log-probability of the token at its node
    nodes = torch.full_like(ro.tokens, -1)
    node = ro.prompt.clone()
    for t in range(mdp.horizon):
        nodes[:, t] = torch.where(ro.mask[:, t], node, -1)
        node = torch.where(ro.mask[:, t], tree.num_prompts + tree.nt_index_n[node].clamp(min=0) * mdp.vocab_size
                           + ro.tokens[:, t], node)
    if ro.nodes is not None:
        assert torch.equal(ro.nodes, nodes)
    k = tree.nt_index_n[nodes.clamp(min=0)]
    child = tree.num_prompts + k * mdp.vocab_size + ro.tokens
    exp_r = torch.where(ro.mask, mdp.edge_rewards()[child.clamp(max=tree.num_nodes - 1)], 0.0)
    exp_lp = torch.where(ro.mask, sol.logp[k.clamp(min=0), ro.tokens], 0.0)
    assert torch.allclose(ro.token_rewards, exp_r, rtol=0, atol=1e-12)
    assert torch.allclose(ro.logp, exp_lp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("compact", [False, True])
def test_twin_rollouts_keep_rm(compact):
    """The zero-reward twin samples the same responses (same seed) with the same RM, all on the last token."""
    mdp, pol = problem(eos=0, horizon=4, gamma=0.8, compact=compact)
    a = sample(mdp, pol, num_prompts=200, seed=3)
    b = sample(mdp.zero_reward_twin(), pol, num_prompts=200, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.rm, b.rm, rtol=0, atol=1e-12)
    last = torch.arange(mdp.horizon) == (b.length - 1).unsqueeze(1)
    assert bool((b.token_rewards[~last] == 0).all())


@pytest.mark.parametrize("eos", [None, 1])
def test_batch_layout(eos):
    mdp, pol = problem(eos=eos, horizon=4)
    ro = sample(mdp, pol, num_prompts=5, group_size=4, seed=3)
    H = mdp.horizon
    assert ro.batch_size == 20 and ro.tokens.shape == (20, H)
    assert ro.group.tolist() == [i for i in range(5) for _ in range(4)]
    assert bool((ro.prompt.view(5, 4) == ro.prompt.view(5, 4)[:, :1]).all())
    assert torch.equal(ro.length, ro.mask.sum(1))
    assert torch.equal(ro.mask, torch.arange(H).expand(20, H) < ro.length.unsqueeze(1))
    assert bool((ro.tokens[~ro.mask] == PAD_TOKEN).all()) and bool((ro.logp[~ro.mask] == 0).all())
    assert bool((ro.prefix_len == 0).all()) and ro.num_tokens == int(ro.length.sum())
    if eos is not None:
        last = ro.tokens.gather(1, (ro.length - 1).unsqueeze(1)).squeeze(1)
        # a response shorter than H ended with EOS (EOS may also be the H-th token)
        assert bool(((ro.length < H) <= (last == eos)).all())
        early = ro.mask & (torch.arange(H) < (ro.length - 1).unsqueeze(1))
        assert not bool((ro.tokens[early] == eos).any())
    fixed = sample(mdp, pol, num_prompts=3, group_size=2, prompts=torch.tensor([1, 0, 1]), seed=0)
    assert fixed.prompt.tolist() == [1, 1, 0, 0, 1, 1]
    sub = ro.index(torch.tensor([0, 5]))
    assert sub.batch_size == 2 and torch.equal(sub.tokens, ro.tokens[[0, 5]])


def test_seeding():
    mdp, pol = problem(horizon=4)
    a = sample(mdp, pol, num_prompts=50, group_size=2, seed=5)
    b = sample(mdp, pol, num_prompts=50, group_size=2, seed=5)
    c = sample(mdp, pol, num_prompts=50, group_size=2, generator=torch.Generator().manual_seed(5))
    d = sample(mdp, pol, num_prompts=50, group_size=2, seed=6)
    for name in ("prompt", "tokens", "mask", "logp", "rm", "nodes", "leaf"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    assert not torch.equal(a.tokens, d.tokens)


@pytest.mark.parametrize("bad,field", [(dict(num_prompts=0), "num_prompts"), (dict(group_size=0), "group_size"),
                                       (dict(prompts=torch.tensor([2])), "prompts")])
def test_sample_rejects_bad_arguments(bad, field):
    mdp, pol = problem()
    with pytest.raises(ValueError, match=field):
        sample(mdp, pol, **{"num_prompts": 1, **bad})


# ---------------------------------------------------------------------------- continuations
H4 = 4
OPEN = [(0, []), (1, [1]), (0, [2, 1]), (1, [1, 1, 2])]  # non-terminal prefixes (eos = 0, H = 4)
DONE = [(0, [0]), (1, [1, 0]), (0, [1, 2, 1, 1])]         # complete: end with EOS or have H tokens


def _prefix_batch(prefixes, width=H4):
    prompt_b = torch.tensor([p for p, _ in prefixes])
    prefix_bt = torch.zeros(len(prefixes), width, dtype=torch.long)
    for i, (_, pre) in enumerate(prefixes):
        prefix_bt[i, : len(pre)] = torch.tensor(pre, dtype=torch.long)
    return prompt_b, prefix_bt, torch.tensor([len(pre) for _, pre in prefixes])


@pytest.mark.parametrize("policy", ["tabular", "shared"])
def test_continuations_match_conditional_probabilities(policy):
    mdp, pol = problem(policy=policy, eos=0, horizon=H4, compact=policy == "shared")
    K = 4000
    ro = sample_continuations(mdp, pol, *_prefix_batch(OPEN), K, seed=4)
    assert ro.batch_size == K * len(OPEN)
    assert ro.group.tolist() == [i for i in range(len(OPEN)) for _ in range(K)]
    tree = mdp.tree
    sol = solve(mdp, pol, with_grad=False)
    leaf = leaf_of(tree, ro.prompt, ro.tokens, ro.mask)
    pos = leaf_position(tree)
    leaf_prefix = [tree.prefix(n) for n in tree.leaf_ids.tolist()]
    for i, (p, pre) in enumerate(OPEN):
        rows = ro.group == i
        L = len(pre)
        assert bool((ro.prompt[rows] == p).all()) and bool((ro.prefix_len[rows] == L).all())
        assert bool((ro.tokens[rows, :L] == torch.tensor(pre, dtype=torch.long)).all())
        below = torch.tensor([lp == p and lpre[:L] == pre for lp, lpre in leaf_prefix])
        prob = torch.where(below, sol.response_prob / sol.reach[tree.node_id(p, pre)], 0.0)
        assert float(prob.sum()) == pytest.approx(1.0, abs=1e-12)
        counts = torch.bincount(pos[leaf[rows]], minlength=tree.num_leaves)
        assert chisquare_p(counts[below], prob[below]) > P_MIN
    assert ro.num_tokens == int((ro.length - ro.prefix_len).sum())


def test_complete_prefixes_are_returned_unchanged():
    mdp, pol = problem(eos=0, horizon=H4)
    ro = sample_continuations(mdp, pol, *_prefix_batch(DONE), 3, seed=0)
    sol = solve(mdp, pol, with_grad=False)
    pos = leaf_position(mdp.tree)
    for i, (p, pre) in enumerate(DONE):
        rows = torch.nonzero(ro.group == i).flatten()
        assert ro.length[rows].tolist() == [len(pre)] * 3
        for r in rows.tolist():
            assert ro.tokens[r, : len(pre)].tolist() == pre and not bool(ro.mask[r, len(pre):].any())
        node = mdp.tree.node_id(p, pre)
        assert torch.allclose(ro.rm[rows], sol.response_rm[pos[node]].expand(3), rtol=0, atol=1e-12)
    assert ro.num_tokens == 0


@pytest.mark.parametrize("prefix,width,field", [
    ([0, 1], H4, "EOS"),               # EOS before the last position
    ([1, 2, 1, 1, 2], H4 + 1, "horizon"),  # longer than the horizon
    ([1, 3], H4, "prefix tokens"),     # token out of range
    ([-1], H4, "prefix tokens"),
])
def test_continuations_reject_bad_prefixes(prefix, width, field):
    mdp, pol = problem(eos=0, horizon=H4)
    prompt_b, prefix_bt, length_b = _prefix_batch([(0, prefix)], width=width)
    with pytest.raises(ValueError, match=field):
        sample_continuations(mdp, pol, prompt_b, prefix_bt, length_b, 2, seed=0)


def test_continuations_reject_bad_arguments():
    mdp, pol = problem(eos=0, horizon=H4)
    prompt_b, prefix_bt, length_b = _prefix_batch([(0, [1])])
    with pytest.raises(ValueError, match="prefix lengths"):
        sample_continuations(mdp, pol, prompt_b, prefix_bt, torch.tensor([H4 + 1]), 2)
    with pytest.raises(ValueError, match="prompt"):
        sample_continuations(mdp, pol, torch.tensor([2]), prefix_bt, length_b, 2)
    with pytest.raises(ValueError, match="num_continuations"):
        sample_continuations(mdp, pol, prompt_b, prefix_bt, length_b, 0)


# ---------------------------------------------------------------------------- past the size guard
@pytest.mark.parametrize("eos", [None, 0])
def test_shared_policy_with_compact_rewards_samples_past_the_size_guard(eos):
    V, H, gamma = 8, 40, 0.97
    mdp = make_mdp("dense", vocab=V, horizon=H, eos=eos, prompts=2, gamma=gamma, seed=9, compact=True)
    pol = make_policy(mdp, "shared", seed=9)
    assert not mdp.tree_fits()
    with pytest.raises(ValueError, match="max_nodes"):
        solve(mdp, pol)
    ro = sample(mdp, pol, num_prompts=32, group_size=2, seed=0)
    assert ro.tokens.shape == (64, H) and ro.nodes is None and ro.leaf is None
    if eos is None:
        assert bool((ro.length == H).all())
    # RM and log-probabilities recomputed by hand from the reward table and the logits
    table = mdp.rewards.table
    logp_rows = torch.log_softmax(pol.logits.detach(), dim=-1)
    for b in range(ro.batch_size):
        prev, rm, lp = V + int(ro.prompt[b]), 0.0, 0.0
        for t in range(int(ro.length[b])):
            tok = int(ro.tokens[b, t])
            rm += gamma ** t * float(table[t, prev, tok])
            lp += float(logp_rows[t, prev, tok])
            prev = tok
        assert float(ro.rm[b]) == pytest.approx(rm, abs=1e-10)
        assert float(ro.logp[b].sum()) == pytest.approx(lp, abs=1e-10)
    twin = sample(mdp.zero_reward_twin(), pol, num_prompts=32, group_size=2, seed=0)
    assert torch.equal(twin.tokens, ro.tokens) and torch.allclose(twin.rm, ro.rm, rtol=1e-12, atol=1e-12)
    cont = sample_continuations(mdp, pol, ro.prompt[:4], ro.tokens[:4, :10], ro.length[:4].clamp(max=10), 3, seed=1)
    assert cont.batch_size == 12
    for i in range(4):
        L = min(int(ro.length[i]), 10)
        assert bool((cont.tokens[3 * i: 3 * i + 3, :L] == ro.tokens[i, :L]).all())


def test_explicit_prompts_must_match_num_prompts():
    mdp = make_mdp("dense", vocab=3, horizon=2, prompts=3, seed=0)
    pol = make_policy(mdp, "tabular", seed=0)
    ro = sample(mdp, pol, prompts=torch.tensor([2, 0]), group_size=2, seed=0)
    assert ro.prompt.tolist() == [2, 2, 0, 0] and ro.group.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="num_prompts"):
        sample(mdp, pol, num_prompts=3, prompts=torch.tensor([2, 0]), seed=0)
