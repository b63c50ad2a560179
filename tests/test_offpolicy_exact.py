"""Exact off-policy verdicts (issue 10, section 3), each with an independent derivation and a negative
control: is_token at mu = pi is the on-policy verifier; is_seq is unbiased for every full-support mu;
top-p without correction is biased with a bias that vanishes as p -> 1; truncated IS is biased iff a
ratio exceeds its cap; ppo_clip at ratio 1 is today's PPO verdict; DAPO's dynamic sampling has the
closed form of a conditioning (checked by brute force over G-tuples with autograd gradients)."""

import itertools
import math

import pytest
import torch

from tpg.cases import mdp_from_spec
from tpg.estimators import get_estimator
from tpg.exact import solve
from tpg.offpolicy import keep_probabilities, offpolicy_moments, resolve_behaviour
from tpg.verify import exact_moments, exact_verdict, verify
from tpg.verify.exact_moments import leaf_rollouts, make_batch
from tpg.verify.score import token_nt

CASE = "dense:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed=1"
FULL_SUPPORT = ["temperature:1.5", "logit_noise:0.5,1", "stale:2,lr=0.5", "mix:0.7,pi,(temperature:0.4)",
                "precision:bf16"]


@pytest.fixture(scope="module")
def problem():
    mdp, pol = mdp_from_spec(CASE)
    return mdp, pol, solve(mdp, pol)


def _mean(problem, est, beh, loss, G=3, **kw):
    mdp, pol, sol = problem
    return offpolicy_moments(mdp, pol, get_estimator(est), beh, loss, G, sol=sol, **kw)


NUMBERS = ("scale", "cosine", "rel_bias", "rel_residual", "variance_trace", "tokens_per_batch")


def test_is_token_at_mu_equals_pi_is_the_on_policy_verifier(problem):
    """Every estimator kind (single, group, batch-coupled, critic, continuations, KL options): the
    off-policy record of is_token at mu = pi equals the on-policy record, verdict and numbers to 1e-12."""
    mdp, pol, _ = problem
    specs = ["reinforce", "reward_to_go", "rloo", "grpo", "reinforce_pp", "grpo:agg=token-mean",
             "ppo_gae:lambda=0.9,critic=noisy,sigma=0.3", "trepo:anchors=every:2,fill=interpolate", "remax",
             "rloo:kl=k1_reward", "grpo:kl=k3,kl_beta=0.2"]
    on = verify(mdp, pol, specs, group_size=3)
    for beh in ("pi", "temperature:1"):
        off = verify(mdp, pol, specs, group_size=3, behaviour=beh, loss="is_token")
        for a, b in zip(on, off):
            assert a["verdict"] == b["verdict"], (a["spec"], beh)
            assert b["behaviour"] == beh and b["loss"] == "is_token" and b["mismatch"]["kl_seq"] == 0
            for k in NUMBERS:
                assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-12), (a["spec"], k)
    m_on = exact_moments(mdp, pol, get_estimator("grpo"), 3, with_cov=False)
    m_off = _mean(problem, "grpo", "pi", "is_token")
    assert float((m_on.mean - m_off.mean).abs().max()) < 1e-14


@pytest.mark.parametrize("beh", FULL_SUPPORT)
def test_is_seq_is_unbiased_for_every_full_support_behaviour(problem, beh):
    """E_mu[rho_seq g] = E_pi[g]: the exact off-policy mean equals the on-policy exact mean (1e-12), so
    unbiased estimators stay unbiased; the uncorrected pg loss on the same samples is biased."""
    mdp, pol, sol = problem
    b = resolve_behaviour(beh, mdp, pol, sol_pi=sol)
    assert b.mismatch["pi_mass_outside_seq"] == 0 and b.mismatch["kl_seq"] > 1e-8
    for est, G in (("reinforce", 1), ("rloo", 3), ("reward_to_go", 1), ("reinforce_baseline", 1)):
        on = exact_moments(mdp, pol, get_estimator(est), G, with_cov=False)
        m = _mean(problem, est, b, "is_seq", G)
        assert float((m.mean - on.mean).abs().max()) < 1e-12 * max(1.0, float(on.mean.abs().max())), est
        assert exact_verdict(m.mean, sol.flat_grad()).verdict == "unbiased"
        # the negative control: no correction
        pg = _mean(problem, est, b, "pg", G)
        v = exact_verdict(pg.mean, sol.flat_grad())
        assert v.verdict == "biased" and v.rel_bias > 1e-5, (est, v)
    # and without full support is_seq cannot reach the truncated responses: biased
    assert exact_verdict(_mean(problem, "rloo", "top_p:0.8", "is_seq").mean, sol.flat_grad()).verdict == "biased"


def test_top_p_bias_vanishes_as_p_goes_to_one(problem):
    """Uncorrected top-p sampling: biased for every p < 1 that truncates, the relative bias shrinks
    monotonically with the mass it cuts, and p = 1 is exactly unbiased."""
    mdp, pol, sol = problem
    # (at p = 0.3 this case is greedy: g = 0, relative bias exactly 1, which p = 0.5 exceeds slightly, so
    # the bias is not monotone from the very bottom; it is from p = 0.5 on)
    grid = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]
    rows = []
    for p in grid:
        m = _mean(problem, "rloo", f"top_p:{p}", "pg")
        rows.append((p, exact_verdict(m.mean, sol.flat_grad()), m.mismatch["pi_mass_outside_seq"]))
    for (p, v, outside) in rows:
        # biased exactly when some response is cut (p = 0.99 keeps every token of this case)
        assert (v.verdict == "biased") == (outside > 0), (p, v.verdict, outside)
    assert rows[0][2] > 0.1 and rows[-1][1].verdict == "unbiased" and rows[-1][2] == 0
    biases = [v.rel_bias for _, v, _ in rows]
    outside = [o for _, _, o in rows]
    assert all(b1 >= b2 - 1e-12 for b1, b2 in zip(biases, biases[1:])), biases
    assert all(o1 >= o2 - 1e-15 for o1, o2 in zip(outside, outside[1:])), outside
    assert biases[0] > 10 * biases[-2] > 0


def _max_ratios(mdp, sol, beh):
    """The largest token ratio pi/mu over the (state, token) pairs mu reaches, and the largest sequence
    ratio over mu's responses, by walking every response's path (no reach probabilities)."""
    tree = mdp.tree
    nt_path, tok_path, _ = tree.leaf_paths()
    best_tok = best_seq = 0.0
    for i in range(nt_path.shape[0]):
        seq, possible = 0.0, True
        for k, w in zip(nt_path[i].tolist(), tok_path[i].tolist()):
            if k < 0:
                continue
            lm, lp = float(beh.logp[k, w]), float(sol.logp[k, w])
            if lm == -math.inf:
                possible = False
                break
            seq += lp - lm
            best_tok = max(best_tok, math.exp(lp - lm))
        if possible:
            best_seq = max(best_seq, math.exp(seq))
    return best_tok, best_seq


@pytest.mark.parametrize("beh", ["logit_noise:0.5,1", "temperature:1.7"])
def test_tis_is_biased_iff_a_ratio_exceeds_its_cap(problem, beh):
    """Sequence-level TIS equals is_seq (unbiased) when C is at least the largest sequence ratio and is
    biased just below it; token-level TIS equals is_token exactly iff C is at least the largest token
    ratio. The largest ratios come from a walk over every response."""
    mdp, pol, sol = problem
    b = resolve_behaviour(beh, mdp, pol, sol_pi=sol)
    tok, seq = _max_ratios(mdp, sol, b)
    assert b.mismatch["max_token_ratio"] == pytest.approx(tok, rel=1e-12)
    assert b.mismatch["max_seq_ratio"] == pytest.approx(seq, rel=1e-12)
    d = sol.flat_grad()
    is_seq = _mean(problem, "rloo", b, "is_seq").mean
    above = _mean(problem, "rloo", b, f"tis:{seq * (1 + 1e-9)!r},level=seq").mean
    below = _mean(problem, "rloo", b, f"tis:{seq * (1 - 1e-3)!r},level=seq").mean
    assert float((above - is_seq).abs().max()) == 0 and exact_verdict(above, d).verdict == "unbiased"
    v = exact_verdict(below, d)
    assert v.verdict == "biased" and v.rel_bias > 1e-8
    # far below the largest ratio: a clearly visible bias
    assert exact_verdict(_mean(problem, "rloo", b, f"tis:{seq / 2!r},level=seq").mean, d).rel_bias > 1e-3
    is_tok = _mean(problem, "rloo", b, "is_token").mean
    assert float((_mean(problem, "rloo", b, f"tis:{tok * (1 + 1e-9)!r}").mean - is_tok).abs().max()) < 1e-15
    assert float((_mean(problem, "rloo", b, f"tis:{tok * (1 - 1e-3)!r}").mean - is_tok).abs().max()) > 1e-10


def test_ppo_clip_at_ratio_one_is_todays_ppo_verdict(problem):
    """With mu = pi every PPO ratio is 1 and the clipped losses are today's on-policy PPO (and GRPO)
    verdicts; with old=pi (the trainer's recomputed pi_old) the clip never acts, off-policy too."""
    mdp, pol, sol = problem
    specs = ["ppo_gae", "ppo_gae:lambda=0.9,critic=noisy,sigma=0.3", "ppo_gae:gamma=0.9", "grpo"]
    on = verify(mdp, pol, specs, group_size=3)
    for loss in ("ppo_clip:0.2", "ppo_clip:0.1,clip_high=0.28,dual_clip=3", "gspo", "cispo:0.2"):
        off = verify(mdp, pol, specs, group_size=3, loss=loss)
        for a, b in zip(on, off):
            assert a["verdict"] == b["verdict"] and b["behaviour"] == "pi", (loss, a["spec"])
            for k in NUMBERS:
                assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-12), (loss, a["spec"], k)
    mu = "logit_noise:0.5,1"
    pg = _mean(problem, "ppo_gae", mu, "pg", 1).mean
    assert float((_mean(problem, "ppo_gae", mu, "ppo_clip:0.2,old=pi", 1).mean - pg).abs().max()) < 1e-15
    # the negative control: with old=mu the clip acts and changes the expectation
    assert float((_mean(problem, "ppo_gae", mu, "ppo_clip:0.2", 1).mean - pg).abs().max()) > 1e-4


# ------------------------------------------------------------------ dynamic sampling
SPARSE = "sparse:vocab=2,horizon=2,prompts=2,weights=random,p=0.4,seed=3"


def _brute_dynamic(mdp, pol, est_spec, G, beh_spec, mode):
    """E[g | kept] by enumerating each prompt's G-tuples under mu in plain loops, each batch's gradient by
    autograd of sum_t c_t log pi(theta) (no analytic score, no closed form)."""
    sol = solve(mdp, pol)
    beh = resolve_behaviour(beh_spec, mdp, pol, sol_pi=sol)
    tree = mdp.tree
    ro_all = leaf_rollouts(mdp, sol)
    est = get_estimator(est_spec)
    from tpg.verify import ExactContext
    ctx = ExactContext(mdp, beh.policy, sol=beh.sol)
    params = [p for p in pol.parameters() if p.requires_grad]
    rho = mdp.prompt_weights
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    kept_mass, per_prompt = 0.0, {}
    leaf_prompt = tree.prompt_n[tree.leaf_ids].tolist()
    for x in range(mdp.num_prompts):
        idx = [i for i, px in enumerate(leaf_prompt) if px == x]
        acc = torch.zeros_like(total)
        q = 0.0
        for tup in itertools.product(idx, repeat=G):
            p = math.prod(float(beh.sol.response_prob[i]) / float(rho[x]) for i in tup)
            rms = [float(ro_all.rm[i]) for i in tup]
            if p == 0 or len(set(rms)) == 1:
                continue
            q += p
            ro = ro_all.index(torch.tensor(tup))
            ro.group = torch.zeros(G, dtype=torch.long)
            out = est(make_batch(est, ro, torch.zeros(G, dtype=torch.long), torch.float64), ctx)
            coef = out.score_coef().detach()
            nt = token_nt(tree, ro.nodes)
            with torch.enable_grad():
                lp = pol.node_log_probs(tree).to(torch.float64)
                lpt = torch.where(ro.mask, lp[nt.clamp(min=0), ro.tokens], torch.zeros((), dtype=torch.float64))
                g = torch.autograd.grad((coef * lpt).sum(), params)
            acc += p * torch.cat([t.reshape(-1) for t in g])
        per_prompt[x] = q
        kept_mass += float(rho[x]) * q
        if mode == "same_prompt":
            total += float(rho[x]) * (acc / q if q > 0 else 0.0)
        else:
            total += float(rho[x]) * acc
    if mode == "new_prompts":
        total /= kept_mass
    return total, kept_mass, per_prompt


@pytest.mark.parametrize("mode", ["new_prompts", "same_prompt"])
@pytest.mark.parametrize("est,beh", [("rloo", "pi"), ("grpo", "temperature:1.4")])
def test_dynamic_sampling_closed_form_against_brute_force(mode, est, beh):
    mdp, pol = mdp_from_spec(SPARSE)
    G = 3
    want, Z, q_brute = _brute_dynamic(mdp, pol, est, G, beh, mode)
    m = offpolicy_moments(mdp, pol, get_estimator(est), beh, f"pg:filter_degenerate_groups={mode}", G)
    assert float((m.mean - want).abs().max()) < 1e-12
    assert m.kept_prob == pytest.approx(Z, abs=1e-14) and 0.1 < Z < 0.95
    assert m.keep_prob_per_prompt == pytest.approx([q_brute[x] for x in range(mdp.num_prompts)], abs=1e-14)
    assert len({round(q, 6) for q in q_brute.values()}) > 1  # prompts are kept with different probabilities
    # the negative control: without the filter the expectation differs
    plain = offpolicy_moments(mdp, pol, get_estimator(est), beh, "pg", G)
    assert float((plain.mean - m.mean).abs().max()) > 1e-4


def test_dynamic_sampling_rescales_mean_centred_estimators_by_one_over_z():
    """A mean-centred group advantage is 0 on a degenerate group, so DAPO's new_prompts filter only
    rescales E[g] by 1/Z; per-prompt resampling (same_prompt) tilts the direction instead."""
    mdp, pol = mdp_from_spec(SPARSE)
    sol = solve(mdp, pol)
    on = exact_moments(mdp, pol, get_estimator("grpo:std_norm=false"), 3, with_cov=False)
    m = offpolicy_moments(mdp, pol, get_estimator("grpo:std_norm=false"), "pi", "pg:filter_degenerate_groups=true", 3,
                          sol=sol)
    q = keep_probabilities(mdp, sol.response_prob, sol.response_rm, 3)
    Z = float((mdp.prompt_weights * q).sum())
    assert float((m.mean - on.mean / Z).abs().max()) < 1e-13
    v = exact_verdict(m.mean, sol.flat_grad())
    assert v.verdict == "scaled" and v.scale == pytest.approx((2 / 3) / Z, rel=1e-12)
    same = offpolicy_moments(mdp, pol, get_estimator("grpo:std_norm=false"), "pi",
                             "pg:filter_degenerate_groups=same_prompt", 3, sol=sol)
    assert exact_verdict(same.mean, sol.flat_grad()).verdict == "biased"
    # single-response estimators have groups of one: DAPO keeps them, the filter is a no-op
    r = offpolicy_moments(mdp, pol, get_estimator("reinforce"), "pi", "pg:filter_degenerate_groups=true", 3, sol=sol)
    assert r.kept_prob == 1.0 and float((r.mean - sol.flat_grad()).abs().max()) < 1e-13
    # every group degenerate: refused
    flat, fpol = mdp_from_spec("sparse:vocab=2,horizon=1,prompts=1,p=0.0,seed=0")
    with pytest.raises(ValueError, match="identical rewards"):
        offpolicy_moments(flat, fpol, get_estimator("rloo"), "pi", "pg:filter_degenerate_groups=true", 2)


# ------------------------------------------------------------------ hooks, records, errors
def test_hooks_come_from_mu_or_pi(problem):
    """The oracle prompt-value baseline under is_seq is unbiased with either context's values (a
    prompt-only baseline), with different variances; at mu = pi the two contexts agree."""
    mdp, pol, sol = problem
    a = _mean(problem, "reinforce_baseline", "logit_noise:0.5,1", "is_seq", 1, hooks="behaviour")
    b = _mean(problem, "reinforce_baseline", "logit_noise:0.5,1", "is_seq", 1, hooks="policy")
    for m in (a, b):
        assert exact_verdict(m.mean, sol.flat_grad()).verdict == "unbiased"
    assert abs(a.variance_trace - b.variance_trace) > 1e-6
    c = _mean(problem, "trepo:anchors=every:2", "pi", "pg", 1, hooks="behaviour")
    d = _mean(problem, "trepo:anchors=every:2", "pi", "pg", 1, hooks="policy")
    assert float((c.mean - d.mean).abs().max()) < 1e-15
    with pytest.raises(ValueError, match="hooks must be one of"):
        _mean(problem, "rloo", "pi", "pg", hooks="engine")


def test_records_carry_the_setting_and_the_mismatch(problem):
    mdp, pol, _ = problem
    rec = verify(mdp, pol, "grpo", group_size=3, behaviour="top_p:0.9", loss="tis:2")[0]
    for key in ("behaviour", "loss", "hooks", "mismatch", "behaviour_info", "kept_prob", "verdict", "cosine",
                "variance_trace"):
        assert key in rec
    assert rec["behaviour"] == "top_p:0.9" and rec["loss"] == "tis:2" and rec["hooks"] == "behaviour"
    assert rec["mismatch"]["kl_pi_mu_seq"] is None and rec["mismatch"]["pi_mass_outside_seq"] > 0
    assert rec["variance_trace"] > 0 and rec["kept_prob"] == 1.0 and rec["verdict"] == "biased"
    assert "behaviour" not in verify(mdp, pol, "grpo", group_size=3)[0]  # on-policy records are unchanged
    err = verify(mdp, pol, ["all"], group_size=3, behaviour="temperature:1.2", loss="is_seq", on_error="record")
    assert all(r["behaviour"] == "temperature:1.2" for r in err)
    with pytest.raises(ValueError, match="unknown behaviour"):
        verify(mdp, pol, "grpo", behaviour="nucleus:0.9")
    with pytest.raises(ValueError, match="unknown loss"):
        verify(mdp, pol, "grpo", loss="ppo")
    with pytest.raises(ValueError, match="max_rows"):
        verify(mdp, pol, "grpo", group_size=3, behaviour="top_p:0.9", max_rows=100)


def test_example_verl_loss_plugin_equals_the_builtin(problem):
    """examples/plugins/ppo_tis_loss_verl.py with old=pi (verl's recomputed pi_old) is PPO at its first step
    times the TIS weight: exactly tis:2, in the exact engine (vectorised over the batches)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples/plugins/ppo_tis_loss_verl.py"
    mdp, pol, sol = problem
    for est in ("grpo", "rloo:agg=token-mean"):
        want = _mean(problem, est, "logit_noise:0.5,1", "tis:2").mean
        got = _mean(problem, est, "logit_noise:0.5,1", f"{path}:compute_policy_loss:old=pi,tis_cap=2").mean
        assert float((got - want).abs().max()) < 1e-14, est


AGGS = ["seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-mean", "token-sum"]


def _combine(agg, compare_on_policy):
    mdp, pol = mdp_from_spec("dense:vocab=2,horizon=2,eos=0,prompts=2,seed=5")
    if compare_on_policy:
        on = verify(mdp, pol, f"all:agg={agg}", group_size=2, on_error="record")
        at_pi = verify(mdp, pol, f"all:agg={agg}", group_size=2, on_error="record", loss="ppo_clip:0.2,dual_clip=3")
        for a, b in zip(on, at_pi):
            assert a["verdict"] == b["verdict"] != "error", (a["spec"], b.get("error"))
            assert b["cosine"] == pytest.approx(a["cosine"], abs=1e-12)
            assert b["scale"] == pytest.approx(a["scale"], abs=1e-12)
    for loss in ("ppo_clip:0.2,dual_clip=3", "is_seq:filter_degenerate_groups=true"):
        recs = verify(mdp, pol, f"all:agg={agg}", group_size=2, behaviour="logit_noise:0.4,2", loss=loss,
                      on_error="record")
        assert [r["verdict"] for r in recs if r["verdict"] == "error"] == [], [r["error"] for r in recs]


@pytest.mark.parametrize("agg", ["token-mean"])
def test_every_estimator_combines_with_a_loss(agg):
    """The whole catalog runs under a behaviour with a clipped loss and with dynamic sampling (no error
    records; token-mean makes every estimator batch-coupled)."""
    _combine(agg, compare_on_policy=False)


@pytest.mark.slow
@pytest.mark.parametrize("agg", AGGS)
def test_every_estimator_and_aggregation_mode_combines_with_a_loss(agg):
    """Every aggregation mode; at mu = pi the clipped loss reproduces the on-policy numbers."""
    _combine(agg, compare_on_policy=True)


def test_batch_layouts():
    """verl's batch:PxN layout (P prompt draws with N responses each, from the plug-in layouts): is_token at
    mu = pi is the on-policy verifier, and DAPO's new_prompts filter rescales a leave-one-out estimator by
    1/Z (its degenerate groups have zero advantage; the P slots are independent)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples/plugins/rloo_simple.py"
    mdp, pol = mdp_from_spec(SPARSE)
    sol = solve(mdp, pol)
    est = get_estimator(f"{path}:advantage:layout=batch:2x2")
    on = exact_moments(mdp, pol, est, 2, with_cov=False)
    off = offpolicy_moments(mdp, pol, est, "pi", "is_token", 2, sol=sol)
    assert float((off.mean - on.mean).abs().max()) < 1e-14
    assert off.variance_trace == pytest.approx(on.variance_trace, rel=1e-12)
    filt = offpolicy_moments(mdp, pol, est, "pi", "pg:filter_degenerate_groups=true", 2, sol=sol)
    Z = float((mdp.prompt_weights * keep_probabilities(mdp, sol.response_prob, sol.response_rm, 2)).sum())
    assert filt.kept_prob == pytest.approx(Z, abs=1e-14) and Z < 0.99
    assert float((filt.mean - on.mean / Z).abs().max()) < 1e-13
