"""Tasks with known token rewards: each rule task's RM against the rule written out per response,
the right answer on top, the reward model on the tree against a per-response loop, rollouts
against the tree, zero-reward twins, and the spec parser's errors."""

import itertools

import pytest
import torch

from tpg.exact import path_returns, solve
from tpg.mdp.rewards import CompactRewards, TwinRewards
from tpg.mdp.tasks import (RULE_TASKS, TASKS, RewardModelRewards, TaskMDP, make_task, parse_task_spec, task_from_spec,
                           task_help)
from tpg.policies import SharedSoftmax
from tpg.rollouts import sample


def responses(mdp):
    """(leaf id, prompt id, response tokens) of every complete response."""
    tree = mdp.tree
    for leaf in tree.leaf_ids.tolist():
        p, toks = tree.prefix(leaf)
        yield leaf, p, toks


def response_rm(mdp):
    return dict(zip(mdp.tree.leaf_ids.tolist(), path_returns(mdp.tree, mdp.edge_rewards(), mdp.gamma).tolist()))


def digits(value, base, width):
    out = []
    for _ in range(width):
        out.append(value % base)
        value //= base
    return out[::-1]


def answer(mdp, x):
    """The right response to prompt tokens ``x``, from the task's rule (not from ``mdp.answers``)."""
    o = mdp.options
    if mdp.task == "copy":
        y = list(x)
    elif mdp.task == "reverse":
        y = list(reversed(x))
    elif mdp.task == "target":
        y = list(o["target"])
    elif mdp.task == "count":
        y = [x.count(o["token"])]
    else:
        b, width, top = o["base"], 1, len(x) * (o["base"] - 1)
        while top >= b ** width:
            width += 1
        y = digits(sum(x), b, width)
    return y + ([mdp.vocab_size - 1] if o["eos"] else [])


def rule_rm(y, toks, score):
    if score == "whole":
        return float(toks[:len(y)] == y)
    return float(sum(1 for t, w in enumerate(toks) if t < len(y) and w == y[t]))


RULE_SPECS = [
    "copy", "copy:eos=true", "copy:vocab=5,length=3,prompts=6,score=whole", "copy:horizon=3,score=whole",
    "reverse:vocab=5,length=3,prompts=5", "reverse:eos=true,score=whole,length=2",
    "target:target=2-0-1", "target:answer_length=2,prompts=2,length=2",
    "target:target=2-0-1,score=whole,eos=true,vocab=5,prompts=3,length=2",
    "count", "count:vocab=5,eos=true,token=2,length=3,prompts=10", "count:length=2,score=whole,horizon=2",
    "sum", "sum:base=3,length=3,prompts=all,eos=true", "sum:vocab=6,base=5,length=2,prompts=7,score=whole",
]


@pytest.mark.parametrize("spec", RULE_SPECS)
def test_rule_task_rewards_follow_the_rule(spec):
    mdp = task_from_spec(spec)
    assert isinstance(mdp, TaskMDP) and mdp.task in RULE_TASKS
    rm = response_rm(mdp)
    prompts = mdp.prompt_tokens.tolist()
    best = {}
    for leaf, p, toks in responses(mdp):
        y = answer(mdp, prompts[p])
        assert rm[leaf] == rule_rm(y, toks, mdp.options["score"]), (prompts[p], toks)
        best.setdefault(p, []).append((rm[leaf], toks))
    for p, rows in best.items():
        y = answer(mdp, prompts[p])
        assert mdp.answers[p].tolist() == y
        top = max(r for r, _ in rows)
        # the best responses are exactly those that start with the right answer (only the answer
        # itself when it fills the horizon or ends with EOS)
        winners = sorted(t for r, t in rows if r == top)
        assert winners == sorted(t for _, t in rows if t[:len(y)] == y)
        if mdp.horizon == len(y):
            assert winners == [y]


def test_copy_answer_is_the_unique_best_and_the_twin_keeps_rm():
    mdp = make_task("copy", vocab=5, length=3, prompts=4, eos=True, seed=2)
    twin = mdp.zero_reward_twin()
    assert isinstance(twin, TaskMDP) and torch.equal(twin.prompt_tokens, mdp.prompt_tokens)
    rm, rm_twin = response_rm(mdp), response_rm(twin)
    assert rm == pytest.approx(rm_twin, abs=1e-12)
    for leaf, p, toks in responses(mdp):
        right = toks == mdp.prompt_tokens[p].tolist() + [4]
        assert (rm[leaf] == 4.0) == right and rm[leaf] <= 4.0
    # ZRA: only a response's last token carries reward in the twin
    tree = twin.tree
    edge = twin.edge_rewards()
    inner = tree.nt_index_n >= 0
    assert float(edge[inner].abs().max()) == 0.0


@pytest.mark.parametrize("name", TASKS)
def test_every_task_has_a_twin_with_the_same_rm_and_prompt_tokens(name):
    mdp = make_task(name, gamma=0.9) if name not in ("count",) else make_task(name, gamma=0.9, length=2)
    twin = make_task(name, gamma=0.9, reward="terminal", **({"length": 2} if name == "count" else {}))
    assert isinstance(twin.rewards, TwinRewards) and torch.equal(twin.prompt_tokens, mdp.prompt_tokens)
    rm, rm_twin = response_rm(mdp), response_rm(twin)
    assert list(rm) == list(rm_twin)
    assert max(abs(rm[k] - rm_twin[k]) for k in rm) < 1e-12
    assert twin.with_gamma(0.9).prompt_tokens is twin.prompt_tokens
    pol = SharedSoftmax(mdp.vocab_size, mdp.horizon, mdp.num_prompts, seed=1)
    assert abs(solve(mdp, pol).J - solve(twin, pol).J) < 1e-12


@pytest.mark.parametrize("spec", ["table:eos=true", "rm", "rm:eos=true,horizon=4,hidden=8,scale=2", "copy:eos=true",
                                  "target:target=1-1-0,score=whole", "sum:base=3,length=3,prompts=all,eos=true",
                                  "count:reward=terminal,eos=true,vocab=5"])
def test_rollout_rewards_match_the_tree(spec):
    mdp = task_from_spec(spec)
    tree = mdp.tree
    pol = SharedSoftmax(mdp.vocab_size, mdp.horizon, mdp.num_prompts, seed=3, scale=0.5)
    ro = sample(mdp, pol, num_prompts=2000, seed=4)
    node = ro.prompt.clone()
    expected = torch.zeros_like(ro.token_rewards)
    edge = mdp.edge_rewards()
    for t in range(mdp.horizon):
        child = tree.num_prompts + tree.nt_index_n[node].clamp(min=0) * tree.vocab_size + ro.tokens[:, t]
        expected[:, t] = torch.where(ro.mask[:, t], edge[child], torch.zeros((), dtype=torch.float64))
        node = torch.where(ro.mask[:, t], child, node)
    torch.testing.assert_close(ro.token_rewards, expected, rtol=0, atol=1e-12)


def test_reward_model_on_the_tree_equals_a_per_response_loop():
    mdp = make_task("rm", vocab=4, length=3, prompts=3, horizon=3, eos=True, seed=5)
    rw = mdp.rewards
    assert isinstance(rw, RewardModelRewards) and not rw.needs_tree
    edge = mdp.edge_rewards()
    tree = mdp.tree
    for leaf, p, toks in responses(mdp):
        h = torch.zeros(rw.W.shape[0], dtype=torch.float64)
        for x in mdp.prompt_tokens[p].tolist():
            h = torch.tanh(h @ rw.W + rw.E[x] + rw.b)
        node = p
        for w in toks:
            r = rw.scale * float(torch.tanh(h @ rw.A + rw.F[w] + rw.c) @ rw.v)
            node = int(tree.child(torch.tensor(node), w))
            assert abs(float(edge[node]) - r) < 1e-12
            h = torch.tanh(h @ rw.W + rw.E[w] + rw.b)
    # a frozen model: the same seed gives the same rewards, another seed others; rewards depend on the prefix
    same = dict(vocab=4, length=3, prompts=3, horizon=3, eos=True)
    assert torch.equal(edge, make_task("rm", seed=5, **same).edge_rewards())
    assert not torch.equal(edge, make_task("rm", seed=6, **same).edge_rewards())
    r_kv = mdp.reward_matrix()
    depth2 = tree.level_nt(2)
    assert float(r_kv[depth2].std(0).max()) > 1e-3  # same position and token, different prefixes


def test_table_task_is_a_compact_table():
    mdp = make_task("table", vocab=5, length=2, prompts=3, horizon=3, seed=1)
    assert isinstance(mdp.rewards, CompactRewards) and mdp.rewards.table.shape == (3, 5 + 3, 5)
    assert mdp.answers is None and mdp.prompt_tokens.shape == (3, 2)


def test_prompts_are_distinct_seeded_and_in_range():
    a = make_task("copy", vocab=6, length=3, prompts=7, eos=True, seed=3)
    b = make_task("copy", vocab=6, length=3, prompts=7, eos=True, seed=3)
    c = make_task("copy", vocab=6, length=3, prompts=7, eos=True, seed=4)
    assert torch.equal(a.prompt_tokens, b.prompt_tokens) and not torch.equal(a.prompt_tokens, c.prompt_tokens)
    rows = [tuple(r) for r in a.prompt_tokens.tolist()]
    assert len(set(rows)) == 7 and all(0 <= t < 5 for r in rows for t in r)  # EOS (5) never in a prompt
    full = make_task("sum", vocab=3, length=2, prompts="all")
    assert sorted(map(tuple, full.prompt_tokens.tolist())) == list(itertools.product(range(3), repeat=2))
    assert float(full.prompt_weights.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("spec", ["copy:eos=true,seed=4,prompts=3", "target:answer_length=2,gamma=0.5",
                                  "rm:hidden=4,scale=0.5,eos=true", "sum:base=3,prompts=all", "count:reward=terminal"])
def test_spec_round_trip(spec):
    mdp = task_from_spec(spec)
    again = task_from_spec(mdp.spec)
    assert again.spec == mdp.spec and torch.equal(again.prompt_tokens, mdp.prompt_tokens)
    assert torch.equal(again.edge_rewards(), mdp.edge_rewards()) and again.gamma == mdp.gamma


def test_parse_task_spec():
    assert parse_task_spec("copy:vocab=6,length=3,seed=0") == dict(name="copy", vocab=6, length=3, seed=0)
    kw = parse_task_spec("target:target=1-2-0,eos=true,score=whole,prompts=all,gamma=0.5,d_model=16")
    assert kw == dict(name="target", target=[1, 2, 0], eos=True, score="whole", prompts="all", gamma=0.5, d_model=16)
    assert make_task(**kw).answers[0].tolist() == [1, 2, 0, 3]
    assert "count:" in task_help() and "d_model" in task_help()


@pytest.mark.parametrize("spec, match", [
    ("copyy", "task must be one of"),
    ("copy:vocab=6,colour=3", "unknown key 'colour' for task 'copy'; allowed keys: vocab"),
    ("copy:hidden=3", "unknown key 'hidden' for task 'copy'"),
    ("rm:score=whole", "unknown key 'score' for task 'rm'"),
    ("copy:vocab=six", "'vocab' must be an integer"),
    ("copy:vocab", "key=value"),
    ("copy:eos=maybe", "'eos' must be true or false"),
    ("copy:reward=sparse", "'reward' must be one of dense, terminal"),
    ("copy:score=half", "'score' must be one of token, whole"),
    ("copy:vocab=17", r"vocab must be an integer \[2, 16\]"),
    ("copy:length=5", r"length must be an integer \[1, 4\]"),
    ("copy:vocab=2,eos=true", "content token"),
    ("copy:length=2,vocab=3,prompts=10", "exceeds the 9 distinct prompts"),
    ("copy:prompts=many", "'prompts' must be an integer or 'all'"),
    ("copy:length=3,horizon=2", "horizon must be an integer >= 3"),
    ("copy:gamma=1.5", "gamma must be a number in"),
    ("copy:vocab=3,vocab=4", "given twice"),
    ("target:target=1-x", "joined by '-'"),
    ("target:target=1-4,vocab=5,eos=true", "EOS"),
    ("count:length=4,vocab=4", "need 5 digit tokens"),
    ("count:token=4", r"token must be an integer \[0, 3\]"),
    ("sum:base=5,vocab=4", r"base must be an integer \[2, 4\]"),
    ("copy:vocab=4,length=4,prompts=all,max_nodes=100", "above max_nodes"),
])
def test_bad_task_specs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        mdp = task_from_spec(spec)
        mdp.tree  # the size guard speaks when the tree is first needed


def test_make_task_rejects_keys_of_other_tasks():
    with pytest.raises(ValueError, match="unknown key 'base' for task 'copy'"):
        make_task("copy", base=3)
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        make_task("copy", learning_rate=0.1)
    make_task("copy", policy_seed=3, n_layer=1, d_model=8, n_head=1, init_scale=0.5)  # policy keys pass through
