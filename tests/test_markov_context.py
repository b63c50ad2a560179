"""The Markov estimator contexts (tpg.verify.markov_context): every hook against the tree contexts on
small problems, the per-(t, prev) critics against independent computations, and estimators with hooks
at H = 1024 without a tree."""

import math

import pytest
import torch

from tpg.cases import make_policy
from tpg.estimators.base import ResponseBatch
from tpg.estimators.registry import get_estimator
from tpg.exact import solve_markov
from tpg.exact.markov import zra_value_tables
from tpg.mdp import make_mdp
from tpg.policies import SharedSoftmax
from tpg.rollouts import sample, sample_continuations
from tpg.verify.context import ExactContext
from tpg.verify.markov_context import MarkovExactContext, MarkovMonteCarloContext, batch_states

TOL = 1e-10


def problem(family="dense", vocab=3, horizon=4, eos=None, prompts=2, gamma=1.0, seed=0):
    mdp = make_mdp(family, vocab=vocab, horizon=horizon, eos=eos, prompts=prompts, weights="random", gamma=gamma,
                   seed=seed, compact=True)
    return mdp, make_policy(mdp, "shared", seed=seed)


SMALL = [dict(family="dense", eos=None, gamma=0.8), dict(family="dense", eos=1, gamma=0.9, horizon=5),
         dict(family="length", eos=0, gamma=1.0, vocab=4), dict(family="sparse", eos=2, gamma=0.7, prompts=1)]


@pytest.mark.parametrize("spec", SMALL, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_hooks_match_the_tree_context(spec):
    mdp, pol = problem(**spec)
    ref = SharedSoftmax(mdp.vocab_size, mdp.horizon, mdp.num_prompts, seed=99, scale=0.5)
    ro = sample(mdp, pol, num_prompts=60, group_size=2, seed=1)
    rb = ResponseBatch.from_rollouts(ro)
    tree_ctx, markov_ctx = ExactContext(mdp, pol, ref_policy=ref), MarkovExactContext(mdp, pol, ref_policy=ref)
    for g in (1.0, 0.6, mdp.gamma):
        for opts in ({}, {"kl": "k1_reward", "kl_beta": 0.3}, {"noise": "fresh", "sigma": 1.0}):
            kind = "noisy" if "noise" in opts else "exact"
            a = tree_ctx.critic_values(rb, kind, g, opts)
            b = markov_ctx.critic_values(rb, kind, g, opts)
            assert b.shape == (ro.batch_size, mdp.horizon + 1)
            assert float((a - b).abs().max()) < TOL, (g, opts)
    assert float((tree_ctx.greedy_rm(ro.prompt) - markov_ctx.greedy_rm(ro.prompt)).abs().max()) < TOL
    assert float((tree_ctx.prompt_values(ro.prompt) - markov_ctx.prompt_values(ro.prompt)).abs().max()) < TOL
    assert tree_ctx.tokens_sampled == markov_ctx.tokens_sampled
    # continuation values of prefixes of every length, complete ones included, and their expected cost
    L = torch.minimum(torch.randint(0, mdp.horizon + 1, (ro.batch_size,), generator=torch.Generator().manual_seed(0)),
                      ro.length)
    tree_ctx.tokens_sampled = markov_ctx.tokens_sampled = 0
    a = tree_ctx.continuation_values(ro.prompt, ro.tokens, L, 3)
    b = markov_ctx.continuation_values(ro.prompt, ro.tokens, L, 3)
    assert float((a - b).abs().max()) < TOL
    assert markov_ctx.tokens_sampled == pytest.approx(tree_ctx.tokens_sampled, abs=1e-9)
    with pytest.raises(ValueError, match="exact mode cannot take the expectation"):
        markov_ctx.random_generator()


def test_exact_critic_telescopes_at_h1024():
    """gamma = 1, lambda = 0 with the exact critic: the GAE advantages of a response sum to
    RM - V'(s_1) (the critic starts at the prompt value and is 0 after the end)."""
    mdp, pol = problem("dense", vocab=16, horizon=1024, eos=3, prompts=2, gamma=1.0, seed=2)
    ctx = MarkovMonteCarloContext(mdp, pol, seed=0)
    ro = sample(mdp, pol, num_prompts=32, seed=3)
    assert mdp._tree is None  # nothing built the tree
    rb = ResponseBatch.from_rollouts(ro)
    out = get_estimator("ppo_gae:critic=exact,lambda=0").compute(rb, ctx, None)[0]
    total = (out * ro.mask).sum(1)
    assert float((total - (ro.rm - ctx.prompt_values(ro.prompt))).abs().max()) < 1e-9
    vals = ctx.critic_values(rb, "exact", 1.0, {})
    assert float((vals[:, 0] - ctx.prompt_values(ro.prompt)).abs().max()) < TOL
    assert bool((vals[torch.arange(ro.batch_size), ro.length] == 0).all())


def test_fixed_noise_is_one_draw_per_state():
    mdp, pol = problem("dense", vocab=3, horizon=4, eos=0)
    ctx = MarkovExactContext(mdp, pol, seed=5)
    ro = sample(mdp, pol, num_prompts=200, seed=2)
    rb = ResponseBatch.from_rollouts(ro)
    opts = {"noise": "fixed", "sigma": 0.5, "critic_seed": 11}
    noisy = ctx.critic_values(rb, "noisy", 1.0, opts)[:, :-1]
    exact = ctx.critic_values(rb, "exact", 1.0, {})[:, :-1]
    assert torch.equal(noisy, ctx.critic_values(rb, "noisy", 1.0, opts)[:, :-1])  # fixed
    eps = (noisy - exact)[ro.mask]
    states = batch_states(mdp, ro.prompt, ro.tokens)[ro.mask]
    for s in states.unique():  # the same perturbation wherever the state is visited
        vals = eps[states == s]
        assert float((vals - vals[0]).abs().max()) < TOL
    assert float(eps.abs().max()) > 0.01
    assert torch.equal(ctx.critic_values(rb, "zero", 1.0, {}), torch.zeros(ro.batch_size, mdp.horizon + 1,
                                                                               dtype=torch.float64))


def test_tabular_critic_is_the_mean_return_per_state():
    """lr=None: the fitted (t, prev) table is the mean of every sampled return at that state
    (recomputed here from the same seeded draws)."""
    mdp, pol = problem("dense", vocab=3, horizon=4, eos=1, gamma=0.9)
    ctx = MarkovMonteCarloContext(mdp, pol, seed=0)
    opts = {"steps": 3, "samples": 40, "critic_seed": 4, "lr": None}
    ro = sample(mdp, pol, num_prompts=50, seed=9)
    rb = ResponseBatch.from_rollouts(ro)
    got = ctx.critic_values(rb, "tabular", 0.8, opts)
    gen = torch.Generator().manual_seed(4)
    sums, counts = {}, {}
    for _ in range(3):
        s = sample(mdp, pol, num_prompts=40, generator=gen)
        st = batch_states(mdp, s.prompt, s.tokens)
        for b in range(s.batch_size):
            for t in range(int(s.length[b])):
                key = int(st[b, t])
                sums[key] = sums.get(key, 0.0) + float(s.rm[b]) * 0.8 ** (int(s.length[b]) - 1 - t)
                counts[key] = counts.get(key, 0) + 1
    st = batch_states(mdp, ro.prompt, ro.tokens)
    for b in range(ro.batch_size):
        for t in range(mdp.horizon):
            want = sums.get(int(st[b, t]), 0.0) / counts.get(int(st[b, t]), 1) if t < int(ro.length[b]) else 0.0
            assert float(got[b, t]) == pytest.approx(want, abs=1e-12)
    assert ctx.critic_tokens == sum(counts.values())


def test_tabular_critic_converges_to_the_aliased_target():
    """A fully fitted (t, prev) table is E[target | t, prev] = E[c | t, prev] D + gamma^t F, which
    differs from the exact critic when the past reward varies within a state (dense rewards)."""
    mdp, pol = problem("dense", vocab=3, horizon=3, eos=None, prompts=1, gamma=0.9)
    ctx = MarkovMonteCarloContext(mdp, pol, seed=0)
    sol = solve_markov(mdp, pol)
    D, F = zra_value_tables(sol.logp.exp(), mdp.rewards.table, None, 0.9, 1.0)
    disc = 0.9 ** torch.arange(3, dtype=torch.float64).unsqueeze(1)
    target = (sol.past_mean * D + disc * F).reshape(-1)
    opts = {"steps": 1, "samples": 20000, "critic_seed": 1, "lr": None}
    table = ctx._tabular_critic(1.0, opts)
    # the sampling error of each cell's mean: sd of the return at the cell / sqrt(visits); returns
    # here are bounded by |RM| <= sum |r| <= 3 max|r|, a loose but valid bound for the check
    reach = sol.reach.reshape(-1)
    bound = 3 * float(mdp.rewards.table.abs().max())
    live = reach > 0.02
    tol = 5 * bound / torch.sqrt(reach[live] * 20000)
    assert bool(((table[live] - target[live]).abs() < tol).all())
    # the negative control: the same tolerance rejects the exact V'(s) averaged without the past reward
    wrong = (disc * F).reshape(-1)
    assert bool(((table[live] - wrong[live]).abs() >= tol).any())


def test_continuations_sampled_at_h1024_match_exact_values():
    """Monte Carlo continuation values from a few prefixes at H = 1024 are within 5 sigma of the
    exact V'(prefix) (sigma from the sample itself over many continuations); no tree is built."""
    mdp, pol = problem("dense", vocab=16, horizon=1024, eos=3, prompts=1, gamma=1.0, seed=7)
    ro = sample(mdp, pol, num_prompts=4, seed=1)
    L = torch.minimum(ro.length, torch.tensor([0, 5, 20, 1024]))
    exact = MarkovExactContext(mdp, pol).continuation_values(ro.prompt, ro.tokens, L, 1)
    K = 400
    cont = sample_continuations(mdp, pol, ro.prompt, ro.tokens, L, K, seed=3)
    assert mdp._tree is None
    rm = cont.rm.view(-1, K)
    sd = rm.std(1).clamp(min=1e-12) / math.sqrt(K)
    assert bool(((rm.mean(1) - exact).abs() <= 5 * sd + 1e-12).all())
    mc = MarkovMonteCarloContext(mdp, pol, generator=torch.Generator().manual_seed(0))
    v = mc.continuation_values(ro.prompt, ro.tokens, L, 2)
    assert v.shape == (4,) and mc.tokens_sampled > 0 and mc.random_generator() is mc.generator


HOOKED = ["reinforce", "rloo", "grpo", "remax", "reinforce_baseline", "ppo_gae:critic=exact,lambda=0.95",
          "ppo_gae:critic=noisy,noise=fresh", "ppo_gae:critic=tabular,steps=1,samples=8",
          "trepo:K=2,anchors=random:3,fill=segment"]


def test_estimators_with_hooks_run_at_h1024():
    mdp, pol = problem("dense", vocab=16, horizon=1024, eos=3, prompts=2, gamma=1.0, seed=2)
    ctx = MarkovMonteCarloContext(mdp, pol, seed=0)
    ro = sample(mdp, pol, num_prompts=8, group_size=4, seed=3)
    rb = ResponseBatch.from_rollouts(ro)
    for spec in HOOKED:
        out = get_estimator(spec)(rb, ctx)
        assert out.advantages.shape == (32, 1024) and bool(torch.isfinite(out.advantages).all()), spec
        assert bool((out.advantages[~ro.mask] == 0).all()), spec
    assert {"greedy_rm", "prompt_values", "critic_values", "continuation_values"} <= set(ctx.hook_calls)
    assert mdp._tree is None


def test_refuses_non_markov_problems():
    mdp, pol = problem()
    with pytest.raises(ValueError, match="SharedSoftmax"):
        MarkovExactContext(mdp, make_policy(mdp, "tabular"))
    ctx = MarkovExactContext(mdp, pol, ref_policy=make_policy(mdp, "tabular"))
    rb = ResponseBatch.from_rollouts(sample(mdp, pol, num_prompts=4, seed=0))
    with pytest.raises(ValueError, match="reference policy: .*SharedSoftmax"):
        ctx.critic_values(rb, "exact", 1.0, {"kl": "k1_reward", "kl_beta": 0.1})
    with pytest.raises(ValueError, match="critic kind must be one of"):
        ctx.critic_values(rb, "oracle", 1.0, {})
    with pytest.raises(ValueError, match="a continuation prefix runs past the end"):
        MarkovExactContext(*problem(eos=0)).continuation_values(torch.tensor([0]), torch.tensor([[0, 1]]),
                                                                 torch.tensor([2]), 1)
