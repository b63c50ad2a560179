"""The flat response tree: node counts, layout invariants, navigation, size guard."""

import math
import re

import pytest
import torch

from tpg.mdp.tree import TokenTree, count_nodes
from tpg.reference import enumerate_responses

SHAPES = [  # (prompts, vocab, horizon, eos)
    (1, 2, 1, None), (1, 2, 1, 0), (2, 3, 1, 2), (1, 3, 3, None), (1, 3, 3, 0), (2, 3, 3, 1),
    (3, 2, 4, None), (2, 2, 4, 1), (1, 4, 2, 3), (2, 5, 3, 0),
]


@pytest.mark.parametrize("P,V,H,eos", SHAPES)
def test_count_nodes_matches_closed_form_and_built_tree(P, V, H, eos):
    counts = count_nodes(P, V, H, eos)
    b = V - 1 if eos is not None else V  # branching of a non-terminal node into non-terminals
    assert counts == [P] + [P * V * b ** (d - 1) for d in range(1, H + 1)]
    tree = TokenTree.build(P, V, H, eos)
    assert tree.num_nodes == sum(counts)
    assert [tree.level_start[d + 1] - tree.level_start[d] for d in range(H + 1)] == counts
    assert tree.num_nonterminal == sum(P * b ** d for d in range(H))
    assert tree.num_leaves == tree.num_nodes - tree.num_nonterminal


def test_count_nodes_horizon_one():
    assert count_nodes(3, 4, 1, None) == [3, 12]
    assert count_nodes(3, 4, 1, 0) == [3, 12]
    tree = TokenTree.build(3, 4, 1, 0)
    assert tree.num_nonterminal == 3
    assert tree.leaf_ids.tolist() == list(range(3, 15))


@pytest.mark.parametrize("P,V,H,eos", SHAPES)
def test_layout_invariants(P, V, H, eos):
    tree = TokenTree.build(P, V, H, eos)
    n = tree.num_nodes
    assert tree.depth_n[:P].tolist() == [0] * P
    assert tree.prompt_n[:P].tolist() == list(range(P))
    assert tree.parent_n[:P].tolist() == [-1] * P and tree.token_n[:P].tolist() == [-1] * P
    # non-terminals numbered in increasing node id, nt_index_n is their inverse
    assert bool((tree.nt_node_k[1:] > tree.nt_node_k[:-1]).all())
    assert tree.nt_index_n[tree.nt_node_k].tolist() == list(range(tree.num_nonterminal))
    # the child of non-terminal k by token v is P + k V + v, and every non-root node is such a child
    k = torch.arange(tree.num_nonterminal).repeat_interleave(V)
    v = torch.arange(V).repeat(tree.num_nonterminal)
    child = P + k * V + v
    assert child.tolist() == list(range(P, n))
    assert torch.equal(tree.parent_n[child], tree.nt_node_k[k])
    assert torch.equal(tree.token_n[child], v)
    assert torch.equal(tree.depth_n[child], tree.depth_n[tree.nt_node_k[k]] + 1)
    assert torch.equal(tree.prompt_n[child], tree.prompt_n[tree.nt_node_k[k]])
    assert torch.equal(tree.child(tree.nt_node_k[k], v), child)
    # terminal iff H tokens or ends with EOS
    ends_eos = tree.token_n == eos if eos is not None else torch.zeros(n, dtype=torch.bool)
    terminal = (tree.depth_n == H) | ends_eos
    assert torch.equal(tree.nt_index_n < 0, terminal)
    assert torch.equal(tree.leaf_ids, torch.nonzero(terminal).flatten())
    # levels: depth is constant on each level block, nt_children reshape to [n, V]
    for d in range(H + 1):
        assert bool((tree.depth_n[tree.level_start[d]:tree.level_start[d + 1]] == d).all())
        nt = tree.nt_node_k[tree.nt_level_start[d]:tree.nt_level_start[d + 1]]
        assert bool((tree.depth_n[nt] == d).all())
    for d in range(H):
        kids = torch.arange(n)[tree.nt_children(d)].view(-1, V)
        assert torch.equal(tree.parent_n[kids], tree.nt_node_k[tree.level_nt(d)].unsqueeze(1).expand(-1, V))


@pytest.mark.parametrize("P,V,H,eos", SHAPES)
def test_leaves_are_the_enumerated_responses(P, V, H, eos):
    tree = TokenTree.build(P, V, H, eos)
    responses = list(enumerate_responses(V, H, eos))
    assert tree.num_leaves == P * len(responses)
    if eos is None:
        assert len(responses) == V ** H
    else:  # EOS at T < H after T-1 other tokens, or H tokens of which the first H-1 are not EOS
        assert len(responses) == sum((V - 1) ** (T - 1) for T in range(1, H)) + (V - 1) ** (H - 1) * V
    got = {(p, tuple(pre)) for p, pre in map(tree.prefix, tree.leaf_ids.tolist())}
    assert got == {(p, r) for p in range(P) for r in responses}
    nt_path, tok_path, lengths = tree.leaf_paths()
    assert torch.equal(lengths, tree.depth_n[tree.leaf_ids])
    for i, leaf in enumerate(tree.leaf_ids.tolist()):
        _, prefix = tree.prefix(leaf)
        L = len(prefix)
        assert tok_path[i, :L].tolist() == prefix and bool((tok_path[i, L:] == -1).all())
        assert bool((nt_path[i, L:] == -1).all())
        node = tree.nt_node_k[nt_path[i, :L]]
        assert tree.depth_n[node].tolist() == list(range(L))
        assert int(tree.child(node[-1], tok_path[i, L - 1])) == leaf


@pytest.mark.parametrize("P,V,H,eos", SHAPES)
def test_node_id_prefix_round_trip(P, V, H, eos):
    tree = TokenTree.build(P, V, H, eos)
    for node in range(tree.num_nodes):
        prompt, prefix = tree.prefix(node)
        assert len(prefix) == int(tree.depth_n[node])
        assert tree.node_id(prompt, prefix) == node


def test_node_id_rejects_bad_prefixes():
    tree = TokenTree.build(2, 3, 3, 0)
    with pytest.raises(ValueError, match="prompt"):
        tree.node_id(2, [])
    with pytest.raises(ValueError, match="position 1"):
        tree.node_id(0, [1, 3])
    with pytest.raises(ValueError, match="terminal"):
        tree.node_id(0, [0, 1])  # continues past EOS
    with pytest.raises(ValueError, match="terminal"):
        tree.node_id(0, [1, 1, 1, 1])  # past the horizon
    with pytest.raises(ValueError, match="terminal"):
        tree.child(tree.node_id(0, [2, 0]), 1)


def test_size_guard_names_the_node_count():
    total = sum(count_nodes(2, 10, 6, None))
    with pytest.raises(ValueError, match=re.escape(f"{total:,} nodes")) as err:
        TokenTree.build(2, 10, 6, None, max_nodes=total - 1)
    assert "max_nodes" in str(err.value)
    assert TokenTree.build(1, 3, 2, None, max_nodes=sum(count_nodes(1, 3, 2, None))).num_nodes == 13


def test_prefix_of_an_unknown_node_id_is_a_value_error():
    tree = TokenTree.build(2, 3, 2, None)
    with pytest.raises(ValueError, match="node id must be in"):
        tree.prefix(tree.num_nodes)
    with pytest.raises(ValueError, match="node id must be in"):
        tree.prefix(-1)


# ---------------------------------------------------------------------------- O(1) size guard
@pytest.fixture
def no_big_integers(monkeypatch):
    """Fail if the exact per-depth count runs (O(horizon) big-integer work): a guard that needs it
    for a huge horizon would take minutes (10^6) or forever (10^12)."""
    import tpg.mdp.tree as tree_mod

    def boom(*a, **k):
        raise AssertionError("count_nodes ran: the size guard is not O(1)")

    monkeypatch.setattr(tree_mod, "count_nodes", boom)


@pytest.mark.parametrize("P,V,H,eos", SHAPES + [(1, 2, 30, 1), (3, 7, 6, None), (2, 2, 40, None)])
def test_log_and_closed_form_node_counts_match_the_exact_count(P, V, H, eos):
    from tpg.mdp.tree import log_num_nodes, num_tree_nodes

    exact = sum(count_nodes(P, V, H, eos))
    assert num_tree_nodes(P, V, H, eos) == exact
    assert log_num_nodes(P, V, H, eos) == pytest.approx(math.log(exact), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("P,V,eos,max_nodes", [(1, 3, None, 5_000_000), (2, 4, 3, 1000), (1, 2, 1, 999),
                                               (3, 5, None, 40), (2, 3, None, 5)])
def test_max_fitting_horizon_is_the_largest_that_fits(P, V, eos, max_nodes):
    from tpg.mdp.tree import check_tree_size, max_fitting_horizon

    H = max_fitting_horizon(P, V, eos, max_nodes)
    if H >= 1:
        assert check_tree_size(P, V, H, eos, max_nodes) == sum(count_nodes(P, V, H, eos))
    assert sum(count_nodes(P, V, H + 1, eos)) > max_nodes
    with pytest.raises(ValueError, match=rf"horizon={H + 1}: .*at most horizon={H} fits|not even horizon=1"):
        check_tree_size(P, V, H + 1, eos, max_nodes)


@pytest.mark.parametrize("H", [10**6, 10**12])
@pytest.mark.parametrize("eos", [None, 0])
def test_huge_horizons_are_refused_without_big_integers(no_big_integers, H, eos):
    from tpg.mdp.tree import check_tree_size

    with pytest.raises(ValueError, match=rf"^horizon={H}: the response tree has about 10\^[\d,.]+ nodes") as err:
        check_tree_size(1, 3, H, eos, 5_000_000)
    assert "max_nodes=5,000,000" in str(err.value) and "at most horizon=" in str(err.value)
    with pytest.raises(ValueError, match=rf"horizon={H}"):
        TokenTree.build(1, 3, H, eos)
    # V = 2 with EOS: one non-terminal child per node, 1 + 2 H nodes (10^6 fits, 10^12 does not)
    if H == 10**6:
        assert check_tree_size(1, 2, H, 1, 5_000_000) == 2 * H + 1
    else:
        with pytest.raises(ValueError, match=rf"horizon={H}: the response tree has about 10\^12.3 nodes.*"
                                             rf"at most horizon=2499999 fits"):
            check_tree_size(1, 2, H, 1, 5_000_000)
