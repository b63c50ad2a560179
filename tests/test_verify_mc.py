"""tpg.verify, Monte Carlo mode: agreement with exact mode within k sigma / sqrt(N) (sigma from the
exact covariance), verdicts at the default N (what a test supports: consistent, consistent-scaled,
biased), the negative controls, Holm across estimators, the power model and the N it suggests, and
the calibration of the false-alarm rate (a quick one here, the large one marked slow)."""

import math
import re

import pytest
import torch
from scipy import stats

from tpg.cases import mdp_from_spec
from tpg.estimators import get_estimator
from tpg.exact import solve
from tpg.verify import MC_VERDICTS, exact_moments, format_records, mc_test, sample_gradient_terms, verify
from tpg.verify.montecarlo import (DEFAULT_POWER, TARGET_COSINE, MCResult, PowerModel, batch_range, family_verdicts,
                                   sample_mean)
from tpg.verify.score import ParamMap
from tpg.verify.verdict import f_noncentrality_for_power, holm_adjust, t_shift_for_power

from test_verify import GroupMaxBaseline, OwnRewardBaseline, SampledTokenBaseline

PROBLEM = "dense:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed=1"
K_SIGMA = 5.0


@pytest.fixture(scope="module")
def problem():
    return mdp_from_spec(PROBLEM)


def _directions(grad_j, n_random=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(grad_j.numel(), n_random, generator=gen, dtype=torch.float64)
    U = torch.cat([(grad_j / grad_j.norm()).unsqueeze(1), R / R.norm(dim=0, keepdim=True)], 1)
    return U.T


@pytest.mark.parametrize("spec,G", [("reinforce", 1), ("rloo", 3), ("grpo", 3), ("reinforce_pp", 2),
                                    ("ppo_gae:critic=noisy,sigma=0.5,lambda=0.9", 1), ("remax", 1),
                                    ("reinforce:agg=token-mean", 3)])
def test_mc_mean_agrees_with_exact(problem, spec, G):
    """|u . (mean_MC - E g)| <= 5 sqrt(u^T Cov u / N) on grad J's direction and random ones."""
    mdp, pol = problem
    est = get_estimator(spec)
    mom = exact_moments(mdp, pol, est, G, with_cov=True)
    N = 4000
    gs = sample_gradient_terms(mdp, pol, est, N, G, seed=11)
    sol = solve(mdp, pol)
    m = sample_mean(gs, sol.logp.exp(), ParamMap(pol, mdp.tree))
    for u in _directions(sol.flat_grad()):
        sigma = math.sqrt(float(u @ mom.cov @ u))
        assert abs(float(u @ (m - mom.mean))) <= K_SIGMA * sigma / math.sqrt(N), (spec, u)


def test_mc_with_continuations_agrees_with_exact(problem):
    """Random anchors and K sampled continuations: exact mode averages both exactly; the Monte Carlo
    mean agrees within 5 standard errors (sigma from the sample: the continuations add variance)."""
    mdp, pol = problem
    est = get_estimator("trepo:anchors=random:1,K=2")
    exact_mean = exact_moments(mdp, pol, est, 1).mean
    N = 4000
    gs = sample_gradient_terms(mdp, pol, est, N, 1, seed=5)
    sol = solve(mdp, pol)
    pmap = ParamMap(pol, mdp.tree)
    from tpg.verify.montecarlo import batch_gradients
    G = batch_gradients(gs, sol.logp.exp(), pmap)
    for u in _directions(sol.flat_grad(), seed=1):
        z = G @ u
        assert abs(float(z.mean() - u @ exact_mean)) <= K_SIGMA * float(z.std()) / math.sqrt(N)
    assert gs.hook_tokens_per_batch > 0


MC_UNBIASED = ["reinforce", "reward_to_go", "reinforce_baseline", "rloo", "remax", "trepo:anchors=random:1,fill=ipw",
               "trepo:anchors=random:1,K=2", "ppo_gae:critic=noisy,noise=fresh,lambda=0.8,sigma=0.5", "ppo_gae:lambda=0.5"]
MC_BIASED = ["grpo", "reinforce_pp", "reinforce_pp_baseline", "ppo_gae:critic=noisy,sigma=1.0,lambda=0.5",
             "ppo_gae:gamma=0.9", "trepo:anchors=every:2,fill=interpolate", "trepo:anchors=random:1,fill=interpolate",
             "reinforce:agg=seq-mean-token-mean", SampledTokenBaseline(), OwnRewardBaseline()]


@pytest.fixture(scope="module")
def default_run(problem):
    """One Monte Carlo run at the default N (4000), seed 0, of the whole list: one Holm family of 42 tests."""
    mdp, pol = problem
    return verify(mdp, pol, MC_UNBIASED + ["grpo:std_norm=false"] + MC_BIASED + ["opo"], group_size=3, mode="mc",
                  seed=0)


def test_mc_verdicts_at_default_n(default_run):
    """At the default N and a fixed seed: the unbiased ones are 'consistent' (a test cannot prove
    'unbiased'), GRPO mean-only is 'consistent-scaled' with 2/3 in its interval, and every biased
    estimator and negative control is flagged 'biased'."""
    recs = default_run
    n_u = len(MC_UNBIASED)
    for r in recs[:n_u]:
        assert r["verdict"] == "consistent", r
        assert r["p_value_adjusted"] >= r["alpha"] and r["p_value_direction_adjusted"] >= r["alpha"]
        assert r["n_samples"] == 4000
    scaled = recs[n_u]
    assert scaled["verdict"] == "consistent-scaled" and scaled["scale_ci"][0] < 2 / 3 < scaled["scale_ci"][1]
    for r in recs[n_u + 1:-1]:
        assert r["verdict"] == "biased", r
    assert recs[-1]["verdict"] != "consistent"  # OPO: scaled by ~0.69 with a small direction error
    assert all(r["verdict"] in MC_VERDICTS for r in recs)
    assert not {"unbiased", "scaled"} & {r["verdict"] for r in recs}


def test_mc_verdicts_agree_with_their_intervals(default_run):
    """A verdict never contradicts its interval: the scale interval, at the level Holm decided c = 1 at,
    contains 1 exactly when c = 1 is not rejected; 'consistent' has 1 inside, 'consistent-scaled' outside."""
    for r in default_run:
        lo, hi = r["scale_ci"]
        assert (lo <= 1 <= hi) == (r["p_value_adjusted"] >= r["alpha"]), r
        if r["verdict"] == "consistent":
            assert lo <= 1 <= hi, r
        if r["verdict"] == "consistent-scaled":
            assert not lo <= 1 <= hi, r
        assert 1 - r["alpha"] <= r["scale_ci_level"] <= 1 - r["alpha"] / r["holm_family"] + 1e-15


def test_holm_across_the_run(default_run):
    """Every record of the run carries the family size (2 tests x 21 estimators) and the Holm adjustment
    of all 42 raw p-values together."""
    m = 2 * len(default_run)
    raw = [p for r in default_run for p in (r["p_value"], r["p_value_direction"])]
    adjusted = [p for r in default_run for p in (r["p_value_adjusted"], r["p_value_direction_adjusted"])]
    assert all(r["holm_family"] == m for r in default_run)
    assert adjusted == pytest.approx(holm_adjust(raw), rel=1e-12, abs=0)


def _result(p_scale: float, p_direction: float) -> MCResult:
    """A synthetic test outcome (unit scale, known power model) for the family rules."""
    d = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    model = PowerModel(num_batches=4000, num_params=3, grad_norm=1.0, scale_sd=1.0, var_direction=1.0,
                       dim_direction=2.0)
    return MCResult(None, d.clone(), d, 1.0, p_scale, p_direction, 1.0, 1 / math.sqrt(4000), 4000, model)


def test_holm_family_controls_the_run():
    """A direction p-value of 0.004 is a rejection for one estimator at alpha = 0.01 (its own two tests:
    0.004 < 0.01/2) but not in a run of five (0.004 >= 0.01/10); the power is stated at the strictest
    level alpha/m, so the larger family reports a larger minimal detectable bias."""
    alone = family_verdicts([_result(0.5, 0.004)], 0.01)[0]
    assert alone.verdict == "biased" and alone.holm_family == 2
    run = family_verdicts([_result(0.5, 0.004)] + [_result(0.5, 0.6)] * 4, 0.01)
    assert run[0].verdict == "consistent" and run[0].holm_family == 10
    assert run[0].p_value_direction == 0.004 and run[0].p_value_direction_adjusted == pytest.approx(0.04)
    assert run[0].mde_rel_bias > alone.mde_rel_bias and run[0].mde_scale > alone.mde_scale
    with pytest.raises(ValueError, match="alpha"):
        family_verdicts([_result(0.5, 0.5)], 0.0)


def test_text_output_states_the_family_and_the_power(default_run):
    """The table never says 'unbiased' in Monte Carlo mode, explains its columns and verdict words, says
    that the run is one Holm family, and for every non-rejection says what could have been missed."""
    text = format_records(default_run)
    assert "unbiased" not in text
    assert not re.search(r"(?<!consistent-)\bscaled\b", text)
    m = 2 * len(default_run)
    assert f"Holm: the {m} tests of this run" in text and "P(any false alarm) <= alpha = 0.01" in text
    for word in MC_VERDICTS:
        assert re.search(rf"^  {word} +\S", text, re.M), word
    assert "columns:" in text and "  mde b (cos)  " in text and "orthogonal to the target" in text
    for r in default_run:
        line = re.search(rf"^  {re.escape(r['spec'])} \({r['verdict']}\): could have missed .*$", text, re.M)
        assert (line is not None) == (r["verdict"] != "biased"), r["spec"]
    rloo = next(r for r in default_run if r["spec"] == "rloo")
    assert rloo["n_for_cosine"] <= 4000 and "N = 4,000 detects cosine 0.99" in text
    # the printed interval, as printed, agrees with the verdict (enough digits to keep 1 in or out)
    for r, line in zip(default_run, text.splitlines()[2:]):
        lo, hi = map(float, re.search(r"\[(\S+), (\S+)\] \S+%", line).groups())
        assert (lo <= 1 <= hi) == (r["verdict"] == "consistent" or (r["verdict"] == "biased"
                                                                     and r["scale_ci"][0] <= 1 <= r["scale_ci"][1]))


def test_printed_interval_keeps_one_where_it_is():
    """An interval just below 1 is printed with the digits that show it excludes 1 (not '[1, 1]')."""
    from tpg.verify.harness import _fmt_interval
    assert _fmt_interval(0.99951, 0.999996) == "[0.99951, 0.999996]"
    assert _fmt_interval(0.61234, 0.7) == "[0.612, 0.7]"
    assert _fmt_interval(0.9999, 1.00002) == "[1, 1]"  # contains 1, and reads so


def test_power_fields(default_run):
    """Every record states its power: the minimal detectable relative bias, the cosine it leaves
    (with c = min(1, scale)), the minimal detectable scale error, and the N for cosine 0.99."""
    for r in default_run:
        assert r["power"] == DEFAULT_POWER and r["target_cosine"] == TARGET_COSINE
        assert 0 < r["mde_rel_bias"] < 1 and 0 < r["mde_scale"] < 1 and r["n_for_cosine"] >= 8
        c = min(1.0, r["scale"])
        assert r["mde_cosine"] == pytest.approx(c / math.sqrt(c * c + r["mde_rel_bias"] ** 2), rel=1e-12)


def test_power_model_solves_its_equations():
    """At the minimal detectable effects the tests reject with probability 0.8 under the stated
    alternative: noncentral F(k, n_B - k) with lambda = n_B t^2 / (t + q / n_A), t = |b|^2 / sigma_b^2
    (n_B - k rounded down to 2 digits), and noncentral t(N - 1) with shift |c - 1| sqrt(N) / s_c. The
    effects shrink with N, and the suggested N detects the asked effect."""
    model = PowerModel(num_batches=4000, num_params=30, grad_norm=0.4, scale_sd=2.0, var_direction=0.05,
                       dim_direction=8.0)
    a = 0.0025
    assert model.directions_at(4000) == model.directions_at(400) == 1  # one direction, whitened or not
    mde = model.mde_rel_bias(a)
    t = (mde * 0.4) ** 2 / 0.05
    lam = 2000 * t * t / (t + 8.0 / 2000)
    assert stats.ncf.sf(stats.f.isf(a, 1, 1900), 1, 1900, lam) == pytest.approx(0.8, abs=1e-6)
    assert f_noncentrality_for_power(1, 1900, a) == pytest.approx(lam, rel=1e-8)
    shift = model.mde_scale(a) * math.sqrt(4000) / 2.0
    crit = stats.t.isf(a / 2, 3999)
    assert stats.nct.sf(crit, 3999, shift) + stats.nct.cdf(-crit, 3999, shift) == pytest.approx(0.8, abs=1e-6)
    assert shift == pytest.approx(t_shift_for_power(3999, a), rel=1e-12)
    assert model.mde_rel_bias(a, num_batches=16000) < 0.6 * mde
    n = model.samples_for_rel_bias(mde, a)
    assert 3800 <= n <= 4100 and model.mde_rel_bias(a, num_batches=n) <= mde
    assert model.samples_for_rel_bias(1e-9, a) is None  # past 1e9 batches
    assert PowerModel(4000, 30, 0.4, 0.0, 0.0, 0.0).mde_rel_bias(a) == 0.0  # a noiseless gradient hides nothing


def test_power_rejects_known_biased_at_default_n(problem):
    """The power requirement: estimators whose exact cosine with grad J is below 0.99 (the max-reward
    baseline that includes the response itself, G = 2; GRPO with the std, G = 3) are rejected by
    Monte Carlo at the default N."""
    mdp, pol = problem
    d = solve(mdp, pol).flat_grad()
    for est, G in ((GroupMaxBaseline(), 2), (get_estimator("grpo"), 3)):
        m = exact_moments(mdp, pol, est, G, with_cov=False).mean
        assert float(m @ d) / float(m.norm() * d.norm()) < 0.99
        rec = verify(mdp, pol, est, group_size=G, mode="mc", seed=0)[0]
        assert rec["n_samples"] == 4000 and rec["verdict"] == "biased", rec
        assert rec["n_for_cosine"] <= 4000  # and the tool says the default N is enough for cosine 0.99


def test_too_small_n_says_so_and_its_suggestion_rejects(problem):
    """At N = 100 the same estimators are not rejected; the text says N is too small and suggests an N,
    and at that N (same seed) they are rejected."""
    mdp, pol = problem
    for est, G in ((GroupMaxBaseline(), 2), (get_estimator("grpo"), 3)):
        small = verify(mdp, pol, est, group_size=G, mode="mc", samples=100, seed=0)
        assert small[0]["verdict"] != "biased"
        text = format_records(small)
        match = re.search(r"N too small to detect cosine 0\.99 with 80% power; try N >= ([\d,]+)", text)
        assert match, text
        n = int(match.group(1).replace(",", ""))
        assert n == small[0]["n_for_cosine"] > 100
        assert verify(mdp, pol, est, group_size=G, mode="mc", samples=n, seed=0)[0]["verdict"] == "biased"


def test_mc_records_and_bad_input(problem):
    mdp, pol = problem
    r = verify(mdp, pol, "rloo", group_size=3, mode="mc", samples=500, seed=3)[0]
    assert r["mode"] == "mc" and r["n_samples"] == 500 and 0 <= r["p_value"] <= 1 and r["alpha"] == 0.01
    assert r["p_value"] <= r["p_value_adjusted"] <= 1 and r["holm_family"] == 2
    assert r["variance_trace"] > 0 and r["tokens_per_batch"] > 3
    with pytest.raises(ValueError):
        verify(mdp, pol, "rloo", mode="mc", samples=4)
    with pytest.raises(ValueError, match="alpha"):
        verify(mdp, pol, "rloo", mode="mc", alpha=1.0)
    with pytest.raises(ValueError, match="target_cosine"):
        verify(mdp, pol, "rloo", mode="mc", target_cosine=1.0)


def test_mc_is_reproducible(problem):
    mdp, pol = problem
    a = verify(mdp, pol, ["trepo:anchors=random:1,fill=ipw", "ppo_gae:critic=noisy,noise=fresh"], mode="mc",
               samples=1000, seed=7)
    b = verify(mdp, pol, ["trepo:anchors=random:1,fill=ipw", "ppo_gae:critic=noisy,noise=fresh"], mode="mc",
               samples=1000, seed=7)
    assert a == b


# ------------------------------------------------------------------ calibration
def _false_alarms(p_scale, p_direction, S: int, alphas=(0.01, 0.05, 0.1)):
    """For each alpha: (rejections of the scale test, of the direction test, of either after Holm over
    the two, the binomial 99% interval of the count under a calibrated test)."""
    ps, pd = torch.tensor(p_scale), torch.tensor(p_direction)
    either = torch.tensor([min(holm_adjust([a, b])) for a, b in zip(p_scale, p_direction)])
    return {a: (int((ps < a).sum()), int((pd < a).sum()), int((either < a).sum()), stats.binom.interval(0.99, S, a))
            for a in alphas}


#: 18 parameters: the whitened bias direction at N = 1000 (18 <= 1000 / 20).
CALIBRATION_PROBLEM = "dense:vocab=3,horizon=2,eos=0,prompts=2,seed=3"
#: 52 parameters: the raw bias direction at N = 1000 (52 > 1000 / 20), as in sketched LM verification.
CALIBRATION_PROBLEM_RAW = "dense:vocab=4,horizon=3,eos=0,prompts=1,seed=3"


@pytest.mark.parametrize("problem_spec,spec,G", [(CALIBRATION_PROBLEM, "reinforce", 1), (CALIBRATION_PROBLEM, "rloo", 3),
                                                 (CALIBRATION_PROBLEM, "remax", 1),
                                                 (CALIBRATION_PROBLEM, "ppo_gae:lambda=0.9", 1),
                                                 (CALIBRATION_PROBLEM_RAW, "reinforce", 1)],
                         ids=["reinforce", "rloo", "remax", "ppo-exact-critic", "reinforce-raw-direction"])
def test_calibration_quick(problem_spec, spec, G):
    """False alarms of a true hypothesis (E[g] = grad J; ppo_gae with its exact critic) over 200
    independent runs at N = 1000: the count of rejections at alpha of each test, and of the verdict
    (Holm over both), lies in the binomial 99% interval of alpha. The runs are disjoint ranges of one
    sample of 200 N i.i.d. batches, hence independent."""
    mdp, pol = mdp_from_spec(problem_spec)
    sol = solve(mdp, pol)
    d, pi, pmap = sol.flat_grad(), sol.logp.exp(), ParamMap(pol, mdp.tree)
    S, N = 200, 1000
    gs = sample_gradient_terms(mdp, pol, get_estimator(spec), S * N, G, seed=0)
    runs = [mc_test(batch_range(gs, s * N, (s + 1) * N), d, pi, pmap, alpha=0.05, seed=s) for s in range(S)]
    counts = _false_alarms([r.p_scale for r in runs], [r.p_direction for r in runs], S)
    for alpha, (n_scale, n_dir, n_either, (lo, hi)) in counts.items():
        assert lo <= n_scale <= hi and lo <= n_dir <= hi and lo <= n_either <= hi, (spec, alpha, counts)
    assert sum(r.verdict.verdict != "consistent" for r in runs) == counts[0.05][2]  # the verdict is that count


@pytest.mark.slow
@pytest.mark.parametrize("spec,G", [("reinforce", 1), ("rloo", 3), ("remax", 1), ("ppo_gae", 1),
                                    ("grpo:std_norm=false", 3)])
def test_calibration(problem, spec, G):
    """Over 200 seeds at the default N the false-alarm rate of the test of a true hypothesis is
    consistent with alpha (binomial 99% interval): both tests and the verdict for the unbiased (ppo_gae:
    the exact critic), the direction test for the scaled."""
    mdp, pol = problem
    S = 200
    recs = [verify(mdp, pol, spec, group_size=G, mode="mc", seed=10_000 + s)[0] for s in range(S)]
    counts = _false_alarms([r["p_value"] for r in recs], [r["p_value_direction"] for r in recs], S, (0.01, 0.05, 0.1))
    for alpha, (n_scale, n_dir, n_either, (lo, hi)) in counts.items():
        assert lo <= n_dir <= hi, (spec, alpha, counts)
        if not spec.startswith("grpo"):
            assert lo <= n_scale <= hi and lo <= n_either <= hi, (spec, alpha, counts)
