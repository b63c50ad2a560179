"""Monte Carlo mode under a behaviour policy: the sample mean of batches drawn from mu (rejection sampling
for dynamic sampling) against the exact off-policy mean, with tolerances from the exact covariance
(k sigma / sqrt N, fixed seeds) and a control the same check must reject; the harness's MC verdicts."""

import math

import pytest

from tpg.cases import mdp_from_spec
from tpg.estimators import get_estimator
from tpg.exact import solve
from tpg.offpolicy import offpolicy_moments, resolve_behaviour, sample_offpolicy_terms
from tpg.verify import ParamMap, verify
from tpg.verify.montecarlo import sample_mean

CASE = "dense:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed=1"
SPARSE = "sparse:vocab=2,horizon=2,prompts=2,weights=random,p=0.4,seed=3"
N = 3000
#: per-coordinate z bound: about 2e-4 two-sided per coordinate under the null (at most ~30 coordinates)
Z_MAX = 4.5


def _z(mdp, pol, est, G, beh, loss, seed=0, against=None):
    sol = solve(mdp, pol)
    b = resolve_behaviour(beh, mdp, pol, sol_pi=sol)
    exact = offpolicy_moments(mdp, pol, get_estimator(est), b, loss, G, sol=sol, with_cov=True)
    gs = sample_offpolicy_terms(mdp, pol, get_estimator(est), b, loss, N, G, seed=seed, sol=sol)
    mean = sample_mean(gs, sol.logp.exp(), ParamMap(pol, mdp.tree))
    se = (exact.cov.diagonal().clamp(min=0) / N).sqrt()
    ref = exact.mean if against is None else against
    live = se > 1e-12
    assert bool(((mean - ref).abs()[~live] < 1e-9).all())  # zero-variance coordinates are exact
    return float(((mean - ref).abs()[live] / se[live]).max()), exact, gs


@pytest.mark.parametrize("spec,est,G,beh,loss", [
    (CASE, "rloo", 3, "logit_noise:0.5,1", "is_seq"),
    (CASE, "grpo", 3, "stale:2,lr=0.5", "ppo_clip:0.2,dual_clip=2"),
    (CASE, "reinforce", 1, "top_p:0.8", "tis:1.5"),
    (SPARSE, "grpo:std_norm=false", 3, "pi", "pg:filter_degenerate_groups=new_prompts"),
    (SPARSE, "rloo", 3, "temperature:1.4", "is_token:filter_degenerate_groups=same_prompt"),
])
def test_sampled_mean_matches_the_exact_mean(spec, est, G, beh, loss):
    mdp, pol = mdp_from_spec(spec)
    z, exact, gs = _z(mdp, pol, est, G, beh, loss)
    assert z < Z_MAX, z
    assert gs.num_batches == N and gs.tokens_per_batch > 0


def test_the_check_has_power():
    """The same check rejects the exact mean of another loss (pg vs is_seq under a mismatched mu)."""
    mdp, pol = mdp_from_spec(CASE)
    sol = solve(mdp, pol)
    wrong = offpolicy_moments(mdp, pol, get_estimator("rloo"), "logit_noise:0.5,1", "pg", 3, sol=sol).mean
    z, _, _ = _z(mdp, pol, "rloo", 3, "logit_noise:0.5,1", "is_seq", against=wrong)
    assert z > 2 * Z_MAX


def test_dynamic_sampling_counts_rejected_draws():
    """Tokens per batch include the rejected groups: about E[tokens per group] / Z (exact value from the
    closed form), against about E[tokens per group] without the filter."""
    mdp, pol = mdp_from_spec(SPARSE)
    sol = solve(mdp, pol)
    est = get_estimator("rloo")
    filt = offpolicy_moments(mdp, pol, est, "pi", "pg:filter_degenerate_groups=true", 3, sol=sol)
    plain = offpolicy_moments(mdp, pol, est, "pi", "pg", 3, sol=sol)
    assert filt.tokens_per_batch == pytest.approx(plain.tokens_per_batch / filt.kept_prob, rel=1e-12)
    gs = sample_offpolicy_terms(mdp, pol, est, "pi", "pg:filter_degenerate_groups=true", N, 3, seed=1, sol=sol)
    # the drawn groups' count is geometric: its relative s.d. per batch is sqrt(1 - Z); five s.e. of the mean
    tol = 5 * math.sqrt(1 - filt.kept_prob) / filt.kept_prob * plain.tokens_per_batch / math.sqrt(N)
    assert abs(gs.tokens_per_batch - filt.tokens_per_batch) < tol + 0.05


def test_mc_verdicts_with_a_behaviour():
    """In MC mode is_seq is not rejected under a mismatched mu, and the uncorrected loss is (the control);
    the records carry the setting."""
    mdp, pol = mdp_from_spec(CASE)
    ok = verify(mdp, pol, "rloo", group_size=3, mode="mc", samples=2000, seed=0, behaviour="logit_noise:0.5,1",
                loss="is_seq")[0]
    bad = verify(mdp, pol, "rloo", group_size=3, mode="mc", samples=2000, seed=0, behaviour="logit_noise:0.5,1",
                 loss="pg")[0]
    assert ok["verdict"] != "biased" and bad["verdict"] == "biased"
    assert ok["behaviour"] == "logit_noise:0.5,1" and ok["loss"] == "is_seq" and ok["mode"] == "mc"
    assert ok["mismatch"]["kl_seq"] > 0 and ok["n_samples"] == 2000
