"""Token MDPs and reward families: what each family puts where, the zero-reward twin, and
the checks on bad input."""

import math

import pytest
import torch

from tpg.mdp import FAMILIES, CompactRewards, TokenMDP, TreeRewards, make_mdp, parse_mdp_spec
from tpg.cases import make_policy
from tpg.mdp.tree import TokenTree
from tpg.rollouts import sample


def leaf_returns(mdp, edge_n=None):
    """``RM`` of every leaf of ``mdp.tree`` by walking up from the leaf (independent of the engine)."""
    tree = mdp.tree
    edge_n = mdp.edge_rewards() if edge_n is None else edge_n
    out = []
    for leaf in tree.leaf_ids.tolist():
        node, total = leaf, 0.0
        while int(tree.parent_n[node]) >= 0:
            total += mdp.gamma ** (int(tree.depth_n[node]) - 1) * float(edge_n[node])
            node = int(tree.parent_n[node])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def interior_mask(tree):
    """Non-root nodes that are not complete responses (their token is not the last one)."""
    nonroot = torch.arange(tree.num_nodes) >= tree.num_prompts
    return nonroot & (tree.nt_index_n >= 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("eos", [None, 1])
def test_every_family_builds(family, compact, eos):
    kw = dict(vocab=3, horizon=3, eos=eos, prompts=2, weights="random", gamma=0.9, seed=3, compact=compact)
    if compact and family == "first_token":
        with pytest.raises(ValueError, match="first_token"):
            make_mdp(family, **kw)
        return
    mdp = make_mdp(family, **kw)
    edge = mdp.edge_rewards()
    assert edge.shape == (mdp.tree.num_nodes,) and edge.dtype == torch.float64
    assert bool(torch.isfinite(edge).all())
    assert bool((edge[: mdp.num_prompts] == 0).all())
    assert mdp.reward_matrix().shape == (mdp.tree.num_nonterminal, 3)
    assert abs(float(mdp.prompt_weights.sum()) - 1) < 1e-12
    # same seed, same rewards; another seed, other rewards (all families are random)
    assert torch.equal(make_mdp(family, **kw).edge_rewards(), edge)
    assert not torch.equal(make_mdp(family, **{**kw, "seed": 4}).edge_rewards(), edge)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("eos", [None, 0])
def test_terminal_family_rewards_only_last_tokens(compact, eos):
    mdp = make_mdp("terminal", vocab=3, horizon=4, eos=eos, prompts=2, seed=1, compact=compact)
    edge = mdp.edge_rewards()
    assert bool((edge[interior_mask(mdp.tree)] == 0).all())
    assert bool((edge[mdp.tree.leaf_ids] != 0).all())


@pytest.mark.parametrize("family,compact", [("first_token", False), ("length", False), ("length", True)])
def test_other_families_shape(family, compact):
    mdp = make_mdp(family, vocab=3, horizon=3, eos=2, prompts=2, seed=5, compact=compact, cost=0.25)
    tree, edge = mdp.tree, mdp.edge_rewards()
    interior = interior_mask(tree)
    if family == "first_token":
        assert bool((edge[interior] == 0).all())
        leaf_r = edge[tree.leaf_ids]
        assert set(leaf_r.tolist()) <= {0.0, 1.0}
        first = {}  # the reward is decided by (prompt, first token)
        for leaf, r in zip(tree.leaf_ids.tolist(), leaf_r.tolist()):
            p, prefix = tree.prefix(leaf)
            assert first.setdefault((p, prefix[0]), r) == r
    else:
        assert bool((edge[interior] == -0.25).all())


@pytest.mark.parametrize("compact", [False, True])
def test_sparse_is_binary(compact):
    mdp = make_mdp("sparse", vocab=3, horizon=4, eos=1, prompts=2, seed=2, compact=compact, p=0.3)
    values = set(mdp.edge_rewards().tolist())
    assert values == {0.0, 1.0}
    frac = float(mdp.edge_rewards()[mdp.num_prompts:].mean())
    assert 0.15 < frac < 0.45


@pytest.mark.parametrize("family", ["dense", "sparse", "length", "first_token"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_zero_reward_twin_keeps_rm_and_puts_it_last(family, compact, gamma):
    if compact and family == "first_token":
        return
    mdp = make_mdp(family, vocab=3, horizon=4, eos=0, prompts=2, gamma=gamma, seed=7, compact=compact)
    twin = mdp.zero_reward_twin()
    assert twin.gamma == gamma
    assert torch.allclose(leaf_returns(twin), leaf_returns(mdp), rtol=0, atol=1e-12)
    assert bool((twin.edge_rewards()[interior_mask(twin.tree)] == 0).all())
    # the twin of the twin is the twin, and make_mdp(twin=True) gives the same rewards
    assert torch.equal(twin.zero_reward_twin().edge_rewards(), twin.edge_rewards())
    made = make_mdp(family, vocab=3, horizon=4, eos=0, prompts=2, gamma=gamma, seed=7, compact=compact, twin=True)
    assert torch.equal(made.edge_rewards(), twin.edge_rewards())


def test_with_gamma_keeps_rewards():
    mdp = make_mdp("dense", vocab=3, horizon=3, seed=0)
    other = mdp.with_gamma(0.7)
    assert other.gamma == 0.7 and torch.equal(other.edge_rewards(), mdp.edge_rewards())
    assert torch.allclose(leaf_returns(other), leaf_returns(mdp.with_gamma(0.7)))


@pytest.mark.parametrize("family", ["dense", "terminal", "sparse", "length"])
@pytest.mark.parametrize("twin", [False, True])
@pytest.mark.parametrize("eos", [None, 2])
def test_compact_rewards_on_tree_agree_with_rollout_rewards(family, twin, eos):
    mdp = make_mdp(family, vocab=3, horizon=4, eos=eos, prompts=2, gamma=0.8, seed=11, compact=True, twin=twin)
    tree, edge = mdp.tree, mdp.edge_rewards()
    B, H = 200, 4
    # batch 1: uniform random tokens, cut at the first EOS (reaches unlikely responses too)
    gen = torch.Generator().manual_seed(0)
    prompt_b = torch.randint(0, 2, (B,), generator=gen)
    tokens_bt = torch.randint(0, 3, (B, H), generator=gen)
    length_b = torch.full((B,), H)
    if eos is not None:
        is_eos = tokens_bt == eos
        length_b = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((B,), H))
    mask_bt = torch.arange(H).expand(B, H) < length_b.unsqueeze(1)
    batches = [(prompt_b, torch.where(mask_bt, tokens_bt, 0), mask_bt)]
    # batch 2: drawn by the sampler from a shared policy (which never builds node ids)
    ro = sample(mdp, make_policy(mdp, "shared", seed=1), num_prompts=B, seed=0)
    batches.append((ro.prompt, ro.tokens, ro.mask))
    for prompt_b, tokens_bt, mask_bt in batches:
        got = mdp.rewards.rollout_rewards(mdp, prompt_b, tokens_bt, mask_bt, None)
        for b in range(B):
            p, L = int(prompt_b[b]), int(mask_bt[b].sum())
            for t in range(H):
                want = float(edge[tree.node_id(p, tokens_bt[b, : t + 1].tolist())]) if t < L else 0.0
                assert float(got[b, t]) == pytest.approx(want, abs=1e-12)
    assert torch.equal(ro.token_rewards, mdp.rewards.rollout_rewards(mdp, ro.prompt, ro.tokens, ro.mask, None))


# ---------------------------------------------------------------------------- bad input
def _compact(V=3, H=2, P=1):
    return CompactRewards(torch.zeros(H, V + P, V, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,field", [
    (dict(vocab_size=1), "vocab_size"),
    (dict(vocab_size=2.0), "vocab_size"),
    (dict(horizon=0), "horizon"),
    (dict(horizon=True), "horizon"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(gamma=math.nan), "gamma"),
    (dict(gamma=-0.5), "gamma"),
    (dict(eos_token=3), "eos_token"),
    (dict(eos_token=-1), "eos_token"),
    (dict(prompt_weights=[-0.5, 1.5]), "prompt_weights"),
    (dict(prompt_weights=[0.5, 0.4]), "prompt_weights"),
    (dict(prompt_weights=[math.nan, 1.0]), "prompt_weights"),
    (dict(prompt_weights=[]), "prompt_weights"),
])
def test_token_mdp_rejects_bad_fields(kwargs, field):
    args = dict(vocab_size=3, horizon=2, prompt_weights=[0.5, 0.5], rewards=_compact(P=2), eos_token=None, gamma=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        TokenMDP(**args)


@pytest.mark.parametrize("kwargs,field", [
    (dict(vocab=1), "vocab_size"),
    (dict(horizon=0), "horizon"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(gamma=math.nan), "gamma"),
    (dict(eos=5), "eos_token"),
    (dict(prompts=0), "prompts"),
    (dict(p=1.5), "p"),
    (dict(family="nope"), "family"),
    (dict(weights="skewed"), "weights"),
])
def test_make_mdp_rejects_bad_fields(kwargs, field):
    args = dict(family="dense", vocab=3, horizon=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        make_mdp(**args)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_raise(bad):
    tree = TokenTree.build(1, 3, 2, None)
    values = torch.zeros(tree.num_nodes, dtype=torch.float64)
    values[5] = bad
    with pytest.raises(ValueError, match="token_rewards must be finite"):
        TokenMDP(3, 2, [1.0], TreeRewards(values), tree=tree)
    table = torch.zeros(2, 4, 3, dtype=torch.float64)
    table[1, 2, 0] = bad
    with pytest.raises(ValueError, match="compact reward table must be finite"):
        TokenMDP(3, 2, [1.0], CompactRewards(table))


def test_reward_shapes_checked():
    tree = TokenTree.build(1, 3, 2, None)
    with pytest.raises(ValueError, match="token_rewards"):
        TokenMDP(3, 2, [1.0], TreeRewards(torch.zeros(tree.num_nodes + 1)), tree=tree)
    root = torch.zeros(tree.num_nodes)
    root[0] = 1.0
    with pytest.raises(ValueError, match="root"):
        TokenMDP(3, 2, [1.0], TreeRewards(root), tree=tree)
    with pytest.raises(ValueError, match="compact reward table"):
        TokenMDP(3, 2, [1.0], CompactRewards(torch.zeros(2, 3, 3)))
    with pytest.raises(ValueError, match="rewards"):
        TokenMDP(3, 2, [1.0], torch.zeros(2, 4, 3))


@pytest.mark.parametrize("spec,field", [
    ("bogus:vocab=3", "family"),
    ("dense:vocab=three", "vocab"),
    ("dense:colour=3", "colour"),
    ("dense:vocab", "key=value"),
    ("dense:compact=maybe", "compact"),
    ("dense:policy=mlp", "policy"),
])
def test_parse_mdp_spec_rejects(spec, field):
    with pytest.raises(ValueError, match=field):
        parse_mdp_spec(spec)


def test_parse_mdp_spec_reads_keys():
    kw = parse_mdp_spec("sparse:vocab=4,horizon=5,eos=none,prompts=2,gamma=0.9,compact=true,p=0.3")
    assert kw == dict(family="sparse", vocab=4, horizon=5, eos=None, prompts=2, gamma=0.9, compact=True, p=0.3)
    mdp = make_mdp(**kw)
    assert (mdp.vocab_size, mdp.horizon, mdp.eos_token, mdp.num_prompts, mdp.gamma) == (4, 5, None, 2, 0.9)


# ---------------------------------------------------------------------------- guards: keys, seeds, sizes
def test_parse_mdp_spec_rejects_duplicate_keys():
    for spec in ("dense:seed=1,seed=2", "dense:vocab=3,horizon=2,vocab=3", "dense:eos=none, eos=0"):
        with pytest.raises(ValueError, match="given twice"):
            parse_mdp_spec(spec)


@pytest.mark.parametrize("key", ["seed", "policy_seed"])
@pytest.mark.parametrize("value", [-1, 2**32, 10**23])
def test_seeds_outside_the_range_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"{key}.*\[0, 4294967295\]"):
        parse_mdp_spec(f"dense:{key}={value}")
    if key == "seed":
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]"):
            make_mdp("dense", seed=value)
    with pytest.raises(ValueError, match=rf"{key} must be an integer in \[0, 4294967295\]"):
        make_policy(make_mdp("dense"), **{key: value})
    assert parse_mdp_spec(f"dense:{key}=4294967295")[key] == 2**32 - 1


def test_a_compact_table_that_cannot_fit_names_the_horizon():
    with pytest.raises(ValueError, match=r"^horizon=1000000000000: the compact reward table .* needs at least"):
        make_mdp("dense", vocab=3, horizon=10**12, compact=True)


def test_describing_an_mdp_past_the_guard_counts_in_O1(monkeypatch):
    import tpg.mdp.tree as tree_mod

    small = make_mdp("dense", vocab=3, horizon=3, prompts=2, compact=True)
    assert small.tree_fits() and small.num_nodes == small.tree.num_nodes == 80 and "nodes=80" in small.describe()
    monkeypatch.setattr(tree_mod, "count_nodes", lambda *a: (_ for _ in ()).throw(AssertionError("O(H) count")))
    mdp = make_mdp("dense", vocab=3, horizon=10**5, prompts=2, compact=True, seed=1)
    assert not mdp.tree_fits()
    assert "nodes=about 10^47,712.6" in mdp.describe()  # log10(2 * 1.5 * 3^H)
    with pytest.raises(ValueError, match="horizon=100000"):
        mdp.tree
