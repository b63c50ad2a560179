"""tpg.verify, exact mode: the analytic score against autograd, exact moments against brute force,
the verdicts of the catalog and of negative controls, refusals, plug-ins (verl form, float32)."""

import math
import textwrap

import pytest
import torch

from tpg.cases import mdp_from_spec
from tpg.estimators import get_estimator
from tpg.estimators.estimator import Estimator
from tpg.exact import solve
from tpg.mdp.mdp import TokenMDP
from tpg.mdp.rewards import TreeRewards
from tpg.mdp.tree import TokenTree
from tpg.policies import TabularSoftmax
from tpg.rollouts import sample
from tpg.estimators.functional import dense_ids
from tpg.verify import (EXACT_VERDICTS, MC_VERDICTS, ExactContext, ParamMap, VERDICTS, exact_moments, exact_verdict,
                        hotelling_test, verify)
from tpg.verify.verdict import (cosine_of_rel_bias, holm_adjust, holm_levels, mc_verdict, rel_bias_of_cosine,
                                scale_interval, scale_test)
from tpg.verify.context import node_paths
from tpg.verify.exact_moments import leaf_rollouts, make_batch, sample_space_size
from tpg.verify.score import logit_gradient, token_nt

EOS3 = "dense:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed=1"
NOEOS = "terminal:vocab=2,horizon=3,prompts=1,seed=4"


@pytest.fixture(scope="module")
def eos_problem():
    return mdp_from_spec(EOS3)


@pytest.fixture(scope="module")
def shared_problem():
    return mdp_from_spec("dense:vocab=3,horizon=3,eos=0,prompts=2,seed=2,policy=shared")


def one(mdp, pol, spec, G=2, **kw):
    return verify(mdp, pol, spec, group_size=G, **kw)[0]


# ------------------------------------------------------------------ negative-control estimators
class SampledTokenBaseline(Estimator):
    """A baseline that looks at the sampled token: ``A_t = R - [w_t = 1]`` (must be flagged)."""

    name = "token_baseline"

    def compute(self, batch, ctx, penalty_bt):
        R = batch.rm.unsqueeze(1).expand_as(batch.logp)
        return R - (batch.tokens == 1).to(R.dtype), 0, {}


class OwnRewardBaseline(Estimator):
    """A baseline built from the response's own reward: ``A = R - R^2 / 2`` (must be flagged)."""

    name = "own_reward_baseline"

    def compute(self, batch, ctx, penalty_bt):
        R = batch.rm
        return (R - 0.5 * R ** 2).unsqueeze(1).expand_as(batch.logp).clone(), 0, {}


class GroupMaxBaseline(Estimator):
    """A baseline that includes the response itself: ``A_i = R_i - max_g R`` (must be flagged)."""

    name = "group_max_baseline"
    needs_groups = True

    def compute(self, batch, ctx, penalty_bt):
        ids, n = dense_ids(batch.batch, batch.group)
        R = batch.rm
        best = torch.full((n,), -math.inf, dtype=R.dtype).scatter_reduce(0, ids, R, "amax")
        return (R - best[ids]).unsqueeze(1).expand_as(batch.logp).clone(), 0, {}


class CoinFlip(Estimator):
    """Draws its own random numbers (exact mode must refuse it)."""

    name = "coin"

    def compute(self, batch, ctx, penalty_bt):
        u = torch.rand(batch.batch_size, generator=ctx.random_generator(), dtype=torch.float64)
        return (batch.rm * 2 * (u < 0.5)).unsqueeze(1).expand_as(batch.logp).clone(), 0, {}


class NoExact(Estimator):
    name = "no_exact"
    supports_exact = False

    def compute(self, batch, ctx, penalty_bt):
        return batch.rm.unsqueeze(1).expand_as(batch.logp).clone(), 0, {}


# ------------------------------------------------------------------ the analytic score
@pytest.mark.parametrize("policy", ["tabular", "shared"])
def test_score_gradient_matches_autograd(policy):
    """sum_t c_t (e_w - pi) scattered into logits, mapped by J^T, equals autograd of the surrogate."""
    mdp, pol = mdp_from_spec(f"dense:vocab=3,horizon=3,eos=0,prompts=2,seed=3,policy={policy}")
    tree = mdp.tree
    ro = sample(mdp, pol, num_prompts=7, group_size=3, seed=5)
    nodes = torch.where(ro.mask, node_paths(tree, ro.prompt, ro.tokens, ro.mask)[:, :mdp.horizon], -1)
    nt = token_nt(tree, nodes)
    coef = torch.randn(ro.tokens.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * ro.mask
    pmap = ParamMap(pol, tree)
    with torch.no_grad():
        pi = pol.node_log_probs(tree).exp()
    g = pmap.to_params(logit_gradient(coef, nt, ro.tokens, pi))
    params = [p for p in pol.parameters()]
    logp = pol.node_log_probs(tree)
    lp = torch.where(nt >= 0, logp[nt.clamp(min=0), ro.tokens], torch.zeros((), dtype=torch.float64))
    ref = torch.autograd.grad((coef * lp).sum(), params)
    assert torch.allclose(g, torch.cat([r.reshape(-1) for r in ref]), atol=1e-12)
    # J U is the adjoint of J^T: <J^T g, u> = <g, J u>
    u = torch.randn(pmap.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_logit = logit_gradient(coef, nt, ro.tokens, pi)
    lhs = g @ u
    rhs = (g_logit.unsqueeze(2) * pmap.to_logits(u)).sum((0, 1))
    assert torch.allclose(lhs, rhs, atol=1e-12)


def test_leaf_rollouts_are_the_tree(eos_problem):
    mdp, pol = eos_problem
    sol = solve(mdp, pol, with_grad=False)
    ro = leaf_rollouts(mdp, sol)
    assert ro.batch_size == mdp.tree.num_leaves
    assert torch.allclose(ro.token_rewards.sum(1) if mdp.gamma == 1 else ro.rm, sol.response_rm)
    paths = node_paths(mdp.tree, ro.prompt, ro.tokens, ro.mask)
    assert torch.equal(torch.where(ro.mask, paths[:, :mdp.horizon], -1), ro.nodes)
    assert torch.equal(paths[torch.arange(ro.batch_size), ro.length], ro.leaf)
    assert math.isclose(float(sol.response_prob.sum()), 1.0, rel_tol=1e-12)


# ------------------------------------------------------------------ exact moments
def _brute_force_moments(mdp, pol, est):
    """E[g] and Cov[g] of a single-response estimator, one leaf at a time with autograd."""
    tree = mdp.tree
    sol = solve(mdp, pol, with_grad=False)
    ro = leaf_rollouts(mdp, sol)
    ctx = ExactContext(mdp, pol)
    params = [p for p in pol.parameters()]
    nt = token_nt(tree, ro.nodes)
    gs = []
    for i in range(ro.batch_size):
        sub = ro.index(torch.tensor([i]))
        out = est(make_batch(est, sub, torch.zeros(1, dtype=torch.long), torch.float64), ctx)
        logp = pol.node_log_probs(tree)
        lp = torch.where(nt[i] >= 0, logp[nt[i].clamp(min=0), ro.tokens[i]], torch.zeros((), dtype=torch.float64))
        grads = torch.autograd.grad((out.score_coef()[0] * lp).sum(), params)
        gs.append(torch.cat([g.reshape(-1) for g in grads]))
    G = torch.stack(gs)
    p = sol.response_prob
    mean = p @ G
    cov = (G - mean).T @ (p.unsqueeze(1) * (G - mean))
    return mean, cov


@pytest.mark.parametrize("spec", ["reinforce", "ppo_gae:lambda=0.5,critic=noisy,sigma=0.3", "trepo:anchors=every:2"])
def test_exact_moments_match_brute_force(shared_problem, spec):
    mdp, pol = shared_problem
    est = get_estimator(spec)
    mom = exact_moments(mdp, pol, est, with_cov=True)
    mean, cov = _brute_force_moments(mdp, pol, est)
    assert torch.allclose(mom.mean, mean, atol=1e-12)
    assert torch.allclose(mom.cov, cov, atol=1e-11)
    assert math.isclose(mom.variance_trace, float(cov.trace()), rel_tol=1e-10)
    assert float(torch.linalg.eigvalsh(mom.cov).min()) > -1e-12


def test_group_space_sizes(eos_problem):
    mdp, pol = eos_problem
    L = torch.bincount(mdp.tree.prompt_n[mdp.tree.leaf_ids]).tolist()
    assert sample_space_size(mdp, "group", 3) == (sum(n ** 3 for n in L), 3 * sum(n ** 3 for n in L))
    assert sample_space_size(mdp, "independent", 2) == (sum(L) ** 2, 2 * sum(L) ** 2)
    assert sample_space_size(mdp, "single", 1) == (sum(L), sum(L))


def test_grpo_mean_only_is_two_thirds_of_rloo(eos_problem):
    """Reduction: GRPO mean-only = (1 - 1/G) RLOO, per batch, hence in expectation; scale exactly 2/3."""
    mdp, pol = eos_problem
    m_rloo = exact_moments(mdp, pol, get_estimator("rloo"), 3).mean
    m_grpo = exact_moments(mdp, pol, get_estimator("grpo:std_norm=false"), 3).mean
    assert torch.allclose(m_grpo, m_rloo * 2 / 3, atol=1e-14)
    rec = one(mdp, pol, "grpo:std_norm=false", G=3)
    assert rec["verdict"] == "scaled" and abs(rec["scale"] - 2 / 3) < 1e-12
    assert one(mdp, pol, "dr_grpo", G=3)["verdict"] == "scaled"


# ------------------------------------------------------------------ verdicts of the catalog
UNBIASED = ["reinforce", "reward_to_go", "reinforce_baseline", "rloo", "remax", "ppo_gae", "ppo_gae:lambda=0.7",
            "ppo_gae:critic=noisy,sigma=0.5", "ppo_gae:critic=zero", "trepo", "trepo:anchors=every:2",
            "trepo:anchors=random:1", "trepo:anchors=random:1,fill=ipw", "reinforce:kl=k1_reward"]
BIASED = ["grpo", "reinforce_pp", "reinforce_pp_baseline", "ppo_gae:critic=noisy,sigma=0.5,lambda=0.9",
          "ppo_gae:critic=zero,lambda=0.8", "ppo_gae:gamma=0.9", "trepo:anchors=every:2,fill=interpolate",
          "reinforce:agg=seq-mean-token-mean", "reinforce:agg=token-mean", "opo", "reinforce:kl=k1"]


@pytest.mark.parametrize("spec", UNBIASED)
def test_unbiased_estimators(eos_problem, spec):
    rec = one(*eos_problem, spec, G=3)
    assert rec["verdict"] == "unbiased", rec
    assert rec["rel_bias"] < 1e-10 and abs(rec["scale"] - 1) < 1e-10


@pytest.mark.parametrize("spec", BIASED)
def test_biased_estimators(eos_problem, spec):
    rec = one(*eos_problem, spec, G=3)
    assert rec["verdict"] == "biased", rec
    assert rec["rel_bias"] > 1e-4 and rec["cosine"] < 1 - 1e-10


def test_length_normalisation_without_eos_only_rescales():
    mdp, pol = mdp_from_spec(NOEOS)
    rec = one(mdp, pol, "reinforce:agg=seq-mean-token-mean")
    assert rec["verdict"] == "scaled" and abs(rec["scale"] - 1 / 3) < 1e-12


@pytest.mark.parametrize("est", [SampledTokenBaseline(), OwnRewardBaseline(), GroupMaxBaseline(), get_estimator("grpo"),
                                 get_estimator("reinforce:agg=seq-mean-token-mean")],
                         ids=["sampled-token-baseline", "own-reward-baseline", "group-max-baseline", "std-norm",
                              "length-norm"])
def test_negative_controls_flagged(eos_problem, est):
    rec = one(*eos_problem, est, G=3)
    assert rec["verdict"] == "biased", rec


def test_records_have_the_documented_fields(eos_problem):
    rec = one(*eos_problem, "remax")
    for key in ("estimator", "options", "mode", "group_size", "verdict", "scale", "cosine", "rel_bias", "p_value",
                "n_samples", "variance_trace", "tokens_per_batch") + MC_FIELDS:
        assert key in rec
    assert rec["verdict"] in VERDICTS and rec["mode"] == "exact"
    assert all(rec[k] is None for k in MC_FIELDS)  # a proof by enumeration has no p-value and no power
    mdp = eos_problem[0]
    assert rec["n_samples"] == mdp.tree.num_leaves
    assert rec["tokens_per_batch"] > 1  # the response plus its greedy baseline, measured
    assert rec["tokens_exact"] is False


#: The Monte Carlo fields of a record (``None`` in exact mode).
MC_FIELDS = ("p_value", "p_value_direction", "p_value_adjusted", "p_value_direction_adjusted", "holm_family",
             "scale_se", "scale_ci", "scale_ci_level", "mde_rel_bias", "mde_cosine", "mde_scale", "power",
             "target_cosine", "n_for_cosine")


def test_verdict_vocabularies():
    """One documented vocabulary per mode; only 'biased' is shared (it means a rejection in both)."""
    assert tuple(EXACT_VERDICTS) == VERDICTS == ("unbiased", "scaled", "biased")
    assert tuple(MC_VERDICTS) == ("consistent", "consistent-scaled", "biased")
    assert not {"unbiased", "scaled"} & set(MC_VERDICTS)
    assert all(isinstance(m, str) and m for m in (*EXACT_VERDICTS.values(), *MC_VERDICTS.values()))


def test_shared_policy_verdicts(shared_problem):
    """Verdicts are taken in parameter space: the same catalog results through a shared-logit map."""
    mdp, pol = shared_problem
    recs = verify(mdp, pol, ["reinforce", "rloo", "grpo:std_norm=false", "grpo"], group_size=2)
    assert [r["verdict"] for r in recs] == ["unbiased", "unbiased", "scaled", "biased"]
    assert abs(recs[2]["scale"] - 0.5) < 1e-12


# ------------------------------------------------------------------ refusals and guards
def test_exact_mode_refuses_random_draws(eos_problem):
    with pytest.raises(ValueError, match="exact mode"):
        one(*eos_problem, CoinFlip())
    with pytest.raises(ValueError, match="refused"):
        one(*eos_problem, NoExact())
    rec = one(*eos_problem, CoinFlip(), on_error="record")
    assert rec["verdict"] == "error" and "random" in rec["error"]


def test_size_guard(eos_problem):
    with pytest.raises(ValueError, match="max_rows"):
        one(*eos_problem, "rloo", G=4, max_rows=1000)


def test_bad_arguments(eos_problem):
    mdp, pol = eos_problem
    for kw in ({"mode": "bogus"}, {"group_size": 0}, {"mode": "mc", "samples": 3}):
        with pytest.raises(ValueError):
            verify(mdp, pol, "reinforce", **kw)
    with pytest.raises(ValueError, match="unknown estimator"):
        verify(mdp, pol, "nope")


# ------------------------------------------------------------------ the verdict rules
def test_exact_verdict_rules():
    d = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert exact_verdict(d * (1 + 1e-12), d).verdict == "unbiased"
    v = exact_verdict(0.25 * d, d)
    assert v.verdict == "scaled" and abs(v.scale - 0.25) < 1e-14
    assert exact_verdict(-d, d).verdict == "biased"
    v = exact_verdict(d + torch.tensor([0.0, 0.0, 1e-3], dtype=torch.float64), d)
    assert v.verdict == "biased" and 0 < v.rel_residual < 1e-3
    assert exact_verdict(d * (1 + 1e-6), d, dtype=torch.float32).verdict == "unbiased"
    assert exact_verdict(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)).verdict == "unbiased"


def test_holm_adjustment_by_hand():
    """m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 4 x 0.01, max(0.04, 3 x 0.02), max(0.06, 2 x 0.03), 0.5 (input order)."""
    p = [0.03, 0.01, 0.5, 0.02]
    assert holm_adjust(p) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert holm_adjust([0.4, 0.9]) == pytest.approx([0.8, 0.9])
    assert holm_adjust([]) == []
    # step 1 rejects at 0.05/4, step 2 (0.02 vs 0.05/3) stops: the rest are decided at that level
    assert holm_levels(p, 0.05) == pytest.approx([0.05 / 3, 0.05 / 4, 0.05 / 3, 0.05 / 3])
    with pytest.raises(ValueError, match="p-values"):
        holm_adjust([0.1, float("nan")])
    with pytest.raises(ValueError, match="alpha"):
        holm_levels([0.1], 1.5)


def test_holm_levels_are_dual_to_adjusted_p_values():
    """On random families: p < level exactly when p_adj < alpha, p_adj >= p, and Holm rejects at least
    what Bonferroni rejects (p < alpha/m) and at most what unadjusted tests reject (p < alpha)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        m = 1 + trial % 12
        p = (torch.rand(m, generator=gen, dtype=torch.float64) ** 3 * 0.2).tolist()
        adj, lev = holm_adjust(p), holm_levels(p, 0.05)
        for pi, ai, li in zip(p, adj, lev):
            assert (pi < li) == (ai < 0.05) and ai >= pi and 0.05 / m <= li <= 0.05
            assert (pi < 0.05 / m) <= (ai < 0.05) <= (pi < 0.05)


def test_scale_test_and_interval_agree():
    """The t interval at level a excludes 1 exactly when the t test's p-value is below a."""
    gen = torch.Generator().manual_seed(1)
    for shift in (0.0, 0.05, 0.1, 0.2, 0.4):
        c = 1 + shift + torch.randn(300, generator=gen, dtype=torch.float64)
        mean, se, p = scale_test(c)
        assert abs(mean - float(c.mean())) < 1e-15 and abs(se - float(c.std()) / math.sqrt(300)) < 1e-15
        for a in (0.001, 0.01, 0.05, 0.2):
            lo, hi = scale_interval(mean, se, 300, a)
            assert (lo <= 1 <= hi) == (p >= a)
    assert scale_test(torch.full((5,), 0.5, dtype=torch.float64)) == (0.5, 0.0, 0.0)  # noiseless and off
    assert scale_test(torch.ones(5, dtype=torch.float64)) == (1.0, 0.0, 1.0)


def test_mc_verdict_rules():
    """biased only on a rejection of the direction (or a scale interval at or below 0); consistent-scaled
    only when c = 1 is rejected, so its interval excludes 1; a mere non-rejection is 'consistent'."""
    d = torch.tensor([1.0, 0.0], dtype=torch.float64)
    m = torch.tensor([0.9, 0.01], dtype=torch.float64)
    v = mc_verdict(0.5, 0.5, 0.01, 0.01, 0.98, 0.05, 1000, m, d)
    assert v.verdict == "consistent" and v.scale_ci[0] <= 1 <= v.scale_ci[1] and v.scale_ci_level == 0.99
    v = mc_verdict(1e-6, 0.5, 0.01, 0.01, 0.6, 0.05, 1000, m, d)
    assert v.verdict == "consistent-scaled" and not v.scale_ci[0] <= 1 <= v.scale_ci[1]
    assert mc_verdict(0.5, 1e-6, 0.01, 0.01, 0.98, 0.05, 1000, m, d).verdict == "biased"
    assert mc_verdict(1e-9, 0.5, 0.01, 0.01, -0.5, 0.05, 1000, m, d).verdict == "biased"  # points downhill
    # the level decides: p = 0.004 is a rejection at 0.005 and not at 0.001 (Holm in a larger family)
    assert mc_verdict(0.5, 0.004, 0.01, 0.005, 1.0, 0.05, 1000, m, d).verdict == "biased"
    assert mc_verdict(0.5, 0.004, 0.01, 0.001, 1.0, 0.05, 1000, m, d).verdict == "consistent"
    for verdict in ("consistent", "consistent-scaled", "biased"):
        assert verdict in MC_VERDICTS


def test_cosine_of_rel_bias():
    assert cosine_of_rel_bias(0.0) == 1.0 and abs(cosine_of_rel_bias(1.0) - 2 ** -0.5) < 1e-15
    assert abs(rel_bias_of_cosine(cosine_of_rel_bias(0.1425)) - 0.1425) < 1e-12
    assert abs(rel_bias_of_cosine(0.99) - math.sqrt(1 / 0.99 ** 2 - 1)) < 1e-15
    with pytest.raises(ValueError, match="cosine"):
        rel_bias_of_cosine(0.0)


def test_hotelling_null_and_offset():
    gen = torch.Generator().manual_seed(0)
    ps = torch.tensor([hotelling_test(torch.randn(200, 4, generator=gen, dtype=torch.float64)) for _ in range(300)])
    assert 0.01 < float((ps < 0.1).float().mean()) < 0.2  # about 0.1 under the null
    assert hotelling_test(torch.full((50, 3), 0.5, dtype=torch.float64)) == 0.0  # deterministic and off
    assert hotelling_test(torch.zeros(50, 3, dtype=torch.float64)) == 1.0
    z = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    z[:, 2] = 0.5  # a direction no sample varies in (a state never visited) is left out of the test
    assert hotelling_test(z) == hotelling_test(z[:, :2])


# ------------------------------------------------------------------ plug-ins
VERL_RLOO = '''
from collections import defaultdict
import torch

def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6):
    """verl's RLOO, formula for formula."""
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            else:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
        for i in range(bsz):
            n = len(id2score[index[i]])
            if n > 1:
                scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores
'''


def test_verl_plugin_matches_builtin(tmp_path, eos_problem):
    path = tmp_path / "my_rloo.py"
    path.write_text(textwrap.dedent(VERL_RLOO))
    mdp, pol = eos_problem
    plug, builtin = verify(mdp, pol, [f"{path}:compute_rloo_outcome_advantage", "rloo"], group_size=2)
    assert plug["verdict"] == builtin["verdict"] == "unbiased"
    est = get_estimator(f"{path}:compute_rloo_outcome_advantage")
    m_plug = exact_moments(mdp, pol, est, 2).mean
    m_rloo = exact_moments(mdp, pol, get_estimator("rloo"), 2).mean
    assert torch.allclose(m_plug, m_rloo, atol=1e-13)


def _offset_problem(offset: float):
    """Terminal rewards N(0, 1) + offset, no EOS: grad J does not see the offset, float32 rounding does."""
    tree = TokenTree.build(1, 2, 3, None)
    gen = torch.Generator().manual_seed(7)
    values = torch.zeros(tree.num_nodes, dtype=torch.float64)
    leaves = tree.leaf_ids
    values[leaves] = torch.randn(leaves.numel(), generator=gen, dtype=torch.float64) + offset
    mdp = TokenMDP(2, 3, [1.0], TreeRewards(values), None, 1.0, tree=tree)
    return mdp, TabularSoftmax(tree, seed=3)


def test_float32_plugin_reports_both_verdicts(tmp_path):
    path = tmp_path / "my_rloo.py"
    path.write_text(textwrap.dedent(VERL_RLOO))
    spec = f"{path}:compute_rloo_outcome_advantage"
    mdp, pol = _offset_problem(0.0)
    recs = verify(mdp, pol, spec, group_size=2, dtype=torch.float32)
    assert len(recs) == 1 and recs[0]["dtype"] == "float32" and recs[0]["verdict"] == "unbiased"
    assert recs[0]["float64_verdict"] == "unbiased"
    mdp, pol = _offset_problem(1e5)  # float32 keeps 1e5 + R to about 0.008: rounding no longer averages out
    recs = verify(mdp, pol, spec, group_size=2, dtype=torch.float32)
    assert [(r["dtype"], r["verdict"]) for r in recs] == [("float64", "unbiased"), ("float32", "biased")]


# ------------------------------------------------------------------ the contexts
def test_contexts_hooks(eos_problem):
    mdp, pol = eos_problem
    tree = mdp.tree
    ex = ExactContext(mdp, pol, seed=3)
    from tpg.verify import MonteCarloContext
    mc = MonteCarloContext(mdp, pol, generator=torch.Generator().manual_seed(0), seed=3)
    sol = ex.sol
    # prompt values and the greedy response (argmax decoding, checked by a plain loop)
    assert torch.allclose(ex.prompt_values(torch.tensor([0, 1])), sol.value[:2])
    for x in range(2):
        node = x
        while int(tree.nt_index_n[node]) >= 0:
            k = int(tree.nt_index_n[node])
            node = tree.num_prompts + k * tree.vocab_size + int(sol.logp[k].argmax())
        assert float(ex.greedy_rm(torch.tensor([x]))) == float(sol.past[node])
    # continuations: exact = V'(prefix); sampled mean within 5 standard errors, tokens counted
    prompt, prefix, plen = torch.tensor([0, 1]), torch.tensor([[1, 2], [2, 0]]), torch.tensor([1, 0])
    v_exact = ex.continuation_values(prompt, prefix, plen, 4)
    nodes = [tree.node_id(0, [1]), tree.node_id(1, [])]
    assert torch.allclose(v_exact, sol.value_resp[nodes])
    assert ex.tokens_sampled > 0
    K = 4000
    v_mc = mc.continuation_values(prompt, prefix, plen, K)
    rm = sol.response_rm
    for i, n in enumerate(nodes):
        leaf_under = [j for j, leaf in enumerate(tree.leaf_ids.tolist()) if tree.prefix(leaf)[0] == tree.prefix(n)[0]
                      and tree.prefix(leaf)[1][:len(tree.prefix(n)[1])] == tree.prefix(n)[1]]
        p = sol.response_prob[leaf_under] / float(sol.reach[n])
        sd = math.sqrt(float((p * (rm[leaf_under] - v_exact[i]) ** 2).sum()))
        assert abs(float(v_mc[i] - v_exact[i])) <= 5 * sd / math.sqrt(K) + 1e-12
    assert mc.tokens_sampled > 0
    # critics: 0 after the end; fixed noise is a fixed function; fresh noise is exact in exact mode only
    ro = leaf_rollouts(mdp, sol)
    batch = make_batch(get_estimator("ppo_gae"), ro, torch.arange(ro.batch_size), torch.float64)
    exact_v = ex.critic_values(batch, "exact", 1.0, {})
    assert exact_v.shape == (ro.batch_size, mdp.horizon + 1)
    assert bool((exact_v[torch.arange(ro.batch_size), ro.length] == 0).all())
    assert torch.allclose(exact_v[:, 0], sol.value[ro.prompt])  # gamma = 1 on ZRA rewards: V'(prompt)
    fixed = {"sigma": 0.5, "noise": "fixed"}
    assert torch.equal(ex.critic_values(batch, "noisy", 1.0, fixed), mc.critic_values(batch, "noisy", 1.0, fixed))
    fresh = {"sigma": 0.5, "noise": "fresh"}
    assert torch.equal(ex.critic_values(batch, "noisy", 1.0, fresh), exact_v)
    assert not torch.equal(mc.critic_values(batch, "noisy", 1.0, fresh), mc.critic_values(batch, "noisy", 1.0, fresh))
    tab = ex.critic_values(batch, "tabular", 1.0, {"steps": 30, "samples": 200})
    assert float((tab - exact_v).abs().max()) < 0.3 and ex.critic_tokens > 0
    with pytest.raises(ValueError, match="critic kind"):
        ex.critic_values(batch, "oracle", 1.0, {})
    with pytest.raises(ValueError, match="exact mode"):
        ex.random_generator()


def test_public_api():
    import tpg.verify as v
    for name in v.__all__:
        assert getattr(v, name) is not None


def test_transformer_policy_verdicts():
    """A tiny transformer policy: the logit Jacobian maps the score to its parameters."""
    from tpg.cases import load_problem
    mdp, pol = load_problem(task_spec="copy:vocab=4,length=2")
    recs = verify(mdp, pol, ["rloo", "grpo:std_norm=false"], group_size=3)
    assert [r["verdict"] for r in recs] == ["unbiased", "scaled"]
    assert abs(recs[1]["scale"] - 2 / 3) < 1e-10
