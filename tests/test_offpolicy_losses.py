"""tpg.offpolicy.losses: each loss's coefficients against its hand-derived closed form, the whole
coefficient-to-gradient pipeline against autograd on the actual loss through the policy's parameters
(tabular and shared policies, ~1e-12), plug-ins in verl's and the simple form, and the spec errors."""

import textwrap

import pytest
import torch

from tpg.cases import mdp_from_spec
from tpg.estimators import get_estimator
from tpg.exact import solve
from tpg.offpolicy import LOSSES, LossInputs, get_loss, loss_coefficients, resolve_behaviour
from tpg.rollouts import sample
from tpg.verify import ExactContext, ParamMap
from tpg.verify.exact_moments import make_batch, ref_log_probs
from tpg.verify.harness import default_reference
from tpg.verify.score import batch_logit_gradients, token_nt

ALL_LOSSES = ["pg", "is_token", "is_seq", "tis:1.3", "tis:1.5,level=seq", "tis:1.2,level=geo", "mis:0.7,1.4",
              "mis:0.6,1.8,level=seq,reweight=false", "ppo_clip:0.2", "ppo_clip:0.1,clip_high=0.28,dual_clip=1.5",
              "ppo_clip:0.2,old=pi", "gspo:0.05", "gspo", "cispo:0.2", "cispo:0.1,clip_low=0.3"]


def _batch(spec, est_spec, G=3, n=40, beh_spec="logit_noise:0.6,2", seed=0):
    """A batch of ``n`` groups sampled from the behaviour, the estimator's output on it, and what the
    loss needs."""
    mdp, pol = mdp_from_spec(spec)
    sol = solve(mdp, pol)
    beh = resolve_behaviour(beh_spec, mdp, pol, sol_pi=sol)
    ro = sample(mdp, beh.policy, num_prompts=n, group_size=G, seed=seed)
    tree = mdp.tree
    nt = token_nt(tree, ro.nodes)
    zero = torch.zeros((), dtype=torch.float64)
    logp_mu = ro.logp.clone()
    ro.logp = torch.where(ro.mask, sol.logp[nt.clamp(min=0), ro.tokens], zero)
    est = get_estimator(est_spec)
    ref = default_reference(pol, 0)
    rb = make_batch(est, ro, ro.group, torch.float64, ref_log_probs(ref, tree, ro))
    out = est(rb, ExactContext(mdp, pol, sol=sol, ref_policy=ref))
    inp = LossInputs(logp_mu_bt=torch.where(ro.mask, logp_mu, zero), advantages_bt=out.advantages,
                     weights_bt=out.weights, mask_bt=ro.mask, batch_b=ro.group, rows_per_batch=G, agg=est.agg)
    return dict(mdp=mdp, pol=pol, sol=sol, ro=ro, nt=nt, inp=inp, out=out, ref=ref, n=n)


@pytest.fixture(scope="module")
def tab():
    return _batch("dense:vocab=3,horizon=3,eos=0,prompts=2,seed=1", "grpo:kl=k2,kl_beta=0.3")


# ------------------------------------------------------------------ closed forms
def _closed_form(spec, logp, inp):
    """``-dL/d log pi`` of each built-in written out by hand (no autograd), before the KL term."""
    m, A, w = inp.mask_bt, inp.advantages_bt, inp.weights_bt
    d = torch.where(m, logp - inp.logp_mu_bt, torch.zeros((), dtype=torch.float64))
    rho = d.exp()
    rho_seq = d.sum(1, keepdim=True).exp().expand_as(d)
    rho_geo = (d.sum(1, keepdim=True) / m.sum(1, keepdim=True)).exp().expand_as(d)
    loss = get_loss(spec)
    v = loss.values
    if loss.name == "pg":
        c = A
    elif loss.name == "is_token":
        c = rho * A
    elif loss.name == "is_seq":
        c = rho_seq * A
    elif loss.name in ("tis", "mis"):
        r = {"token": rho, "seq": rho_seq, "geo": rho_geo}[v["level"]]
        if loss.name == "tis":
            c = torch.minimum(r, torch.full_like(r, v["C"])) * A
        else:
            keep = ((r >= v["lo"]) & (r <= v["hi"])).to(r.dtype)
            c = (r * keep if v["reweight"] else keep) * A
    elif loss.name in ("ppo_clip", "gspo"):
        r = rho if v["old"] == "mu" else torch.ones_like(rho)
        if loss.name == "gspo":
            r = rho_geo
        lo, hi = loss.clip_range
        active = torch.where(A > 0, r < 1 + hi, r > 1 - lo)
        if loss.name == "ppo_clip" and v["dual_clip"]:
            active = active & ~((A < 0) & (r > v["dual_clip"]))
        c = torch.where(active, A * r, torch.zeros_like(r))
    elif loss.name == "cispo":
        lo = v["clip_low"]
        c = rho.clamp(min=(1 - lo) if lo >= 0 else None, max=1 + v["eps"]) * A
    return torch.where(m, w * c, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("spec", ALL_LOSSES)
def test_coefficients_match_the_hand_derived_formula(tab, spec):
    inp, ro, out = tab["inp"], tab["ro"], tab["out"]
    got = loss_coefficients(get_loss(spec), ro.logp, inp, out.kl_coef)
    zero = torch.zeros((), dtype=torch.float64)
    want = _closed_form(spec, ro.logp, inp) - torch.where(ro.mask, out.weights * out.kl_coef, zero)
    assert float((got - want).abs().max()) < 1e-13
    if spec.startswith(("ppo_clip:0.2", "gspo:0.05", "cispo:0.2", "tis:1.3")) and "old=pi" not in spec:
        # the case exercises the clip: some tokens inside it and some outside
        r = torch.where(ro.mask, (ro.logp - inp.logp_mu_bt).exp(), torch.ones((), dtype=torch.float64))
        assert bool(((r > 1.3) & ro.mask).any()) and bool(((r < 0.8) & ro.mask).any())


def test_ratio_one_losses_equal_pg(tab):
    """With pi_old = pi (old=pi) or at mu = pi every PPO-family loss has pg's gradient."""
    inp, ro, out = tab["inp"], tab["ro"], tab["out"]
    pg = loss_coefficients(get_loss("pg"), ro.logp, inp, out.kl_coef)
    for spec in ("ppo_clip:0.2,old=pi", "gspo:0.01,old=pi", "cispo:0.1,old=pi"):
        assert torch.equal(loss_coefficients(get_loss(spec), ro.logp, inp, out.kl_coef), pg) or \
            float((loss_coefficients(get_loss(spec), ro.logp, inp, out.kl_coef) - pg).abs().max()) < 1e-15
    on = LossInputs(logp_mu_bt=ro.logp, advantages_bt=inp.advantages_bt, weights_bt=inp.weights_bt, mask_bt=inp.mask_bt,
                    batch_b=inp.batch_b, rows_per_batch=inp.rows_per_batch, agg=inp.agg)
    for spec in ALL_LOSSES:
        got = loss_coefficients(get_loss(spec), ro.logp, on, out.kl_coef)
        assert float((got - pg).abs().max()) < 1e-14, spec


# ------------------------------------------------------------------ against autograd through the parameters
def _autograd_batches(case, loss):
    """``-grad_theta L_b`` of every batch by autograd through the policy's parameters: log pi recomputed
    from ``policy.node_log_probs`` with the graph, the loss evaluated on it, plus the KL loss term."""
    pol, mdp, ro, nt, inp, out = case["pol"], case["mdp"], case["ro"], case["nt"], case["inp"], case["out"]
    params = [p for p in pol.parameters() if p.requires_grad]
    zero = torch.zeros((), dtype=torch.float64)
    beta = float(out.info.get("beta", 0.3))
    with torch.no_grad():
        lref = case["ref"].node_log_probs(mdp.tree).to(torch.float64)
    ref = torch.where(ro.mask, lref[nt.clamp(min=0), ro.tokens], zero)
    G = inp.rows_per_batch
    grads = []
    for b in range(case["n"]):
        rows = slice(b * G, (b + 1) * G)
        sub = LossInputs(logp_mu_bt=inp.logp_mu_bt[rows], advantages_bt=inp.advantages_bt[rows],
                         weights_bt=inp.weights_bt[rows], mask_bt=inp.mask_bt[rows], batch_b=inp.batch_b[rows] - b,
                         rows_per_batch=G, agg=inp.agg)
        with torch.enable_grad():
            lp_all = pol.node_log_probs(mdp.tree).to(torch.float64)
            lp = torch.where(sub.mask_bt, lp_all[nt[rows].clamp(min=0), ro.tokens[rows]], zero)
            L = loss.batch_total(lp, sub)
            delta = torch.where(sub.mask_bt, lp - ref[rows], zero)
            L = L + (sub.weights_bt * beta * 0.5 * delta ** 2).sum()  # kl=k2 as a loss, with the live log pi
            g = torch.autograd.grad(L, params, allow_unused=True)
        grads.append(-torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if x is None else
                                 x.reshape(-1).to(torch.float64) for p, x in zip(params, g)]))
    return torch.stack(grads)


def _pipeline_batches(case, loss):
    pol, mdp, ro, nt, inp, out, sol = case["pol"], case["mdp"], case["ro"], case["nt"], case["inp"], case["out"], \
        case["sol"]
    coef = loss_coefficients(loss, ro.logp, inp, out.kl_coef)
    g = batch_logit_gradients(coef, nt, ro.tokens, sol.logp.exp(), inp.batch_b, case["n"])
    return ParamMap(pol, mdp.tree).to_params(g)


@pytest.mark.parametrize("policy", ["tabular", "shared"])
def test_pipeline_equals_autograd_on_the_actual_loss(policy):
    """Coefficients by autograd on the log-prob leaf, then the analytic score and the parameter map, give
    each batch's gradient of the trainer's loss through the policy's parameters to 1e-12."""
    spec = "dense:vocab=3,horizon=3,eos=0,prompts=2,seed=1" + (",policy=shared" if policy == "shared" else "")
    case = _batch(spec, "grpo:kl=k2,kl_beta=0.3", n=12)
    for lspec in ALL_LOSSES:
        loss = get_loss(lspec)
        a, b = _autograd_batches(case, loss), _pipeline_batches(case, loss)
        assert float((a - b).abs().max()) < 1e-12 * max(1.0, float(a.abs().max())), lspec


# ------------------------------------------------------------------ plug-ins
VERL_PPO = textwrap.dedent('''
    import torch

    def agg_loss(loss_mat, loss_mask, loss_agg_mode):
        if loss_agg_mode == "token-mean":
            return (loss_mat * loss_mask).sum() / loss_mask.sum()
        if loss_agg_mode == "seq-mean-token-sum":
            return (loss_mat * loss_mask).sum(-1).mean()
        raise ValueError(loss_agg_mode)

    def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_log_probs=None):
        eps = config.clip_ratio
        ratio = torch.exp(log_prob - old_log_prob)
        losses = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - eps, 1 + eps))
        return agg_loss(losses, response_mask, loss_agg_mode), torch.tensor(0.0)

    def no_vmap(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", clip=0.2):
        if float(response_mask.sum().item()) < 0:  # data-dependent Python control flow: no vmap
            return None
        ratio = torch.exp(log_prob - old_log_prob)
        losses = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
        return agg_loss(losses, response_mask, loss_agg_mode)

    def simple_is(old_log_prob, log_prob, advantages):
        return -torch.exp(log_prob - old_log_prob) * advantages

    def vector(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode):
        return log_prob.sum(-1)

    def boom(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode):
        raise RuntimeError("kaput")

    def two(a, b):
        return a
''')


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plug") / "losses.py"
    path.write_text(VERL_PPO)
    return str(path)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_verl_form_plugin_matches_the_builtin(plugin_file, agg):
    case = _batch("dense:vocab=3,horizon=3,eos=0,prompts=2,seed=1", f"rloo:agg={agg}", G=3, n=30)
    inp, ro = case["inp"], case["ro"]
    want = loss_coefficients(get_loss("ppo_clip:0.2"), ro.logp, inp)
    for spec in (f"{plugin_file}:compute_policy_loss", f"{plugin_file}:compute_policy_loss:clip_ratio=0.2",
                 f"{plugin_file}:no_vmap:clip=0.2"):
        loss = get_loss(spec)
        assert loss.form == "verl"
        got = loss_coefficients(loss, ro.logp, inp)
        assert float((got - want).abs().max()) < 1e-14, spec
    assert get_loss(f"{plugin_file}:no_vmap")._vmap_ok is None
    lo = get_loss(f"{plugin_file}:no_vmap")
    loss_coefficients(lo, ro.logp, inp)
    assert lo._vmap_ok is False  # fell back to one call per batch
    simple = get_loss(f"{plugin_file}:simple_is")
    assert simple.form == "simple"
    assert float((loss_coefficients(simple, ro.logp, inp) - loss_coefficients(get_loss("is_token"), ro.logp, inp))
                 .abs().max()) < 1e-14
    # a callable is a plug-in too; old=pi hands it the recomputed log pi (ratio 1: pg)
    from importlib import util
    spec = util.spec_from_file_location("plugmod", plugin_file)
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got = loss_coefficients(get_loss(mod.simple_is), ro.logp, inp)
    assert float((got - loss_coefficients(get_loss("is_token"), ro.logp, inp)).abs().max()) < 1e-14
    pg = loss_coefficients(get_loss("pg"), ro.logp, inp)
    got = loss_coefficients(get_loss(f"{plugin_file}:simple_is:old=pi"), ro.logp, inp)
    assert float((got - pg).abs().max()) < 1e-14


def test_plugin_errors(plugin_file, tab):
    inp, ro = tab["inp"], tab["ro"]
    with pytest.raises(ValueError, match="scalar"):
        loss_coefficients(get_loss(f"{plugin_file}:vector"), ro.logp, inp)
    with pytest.raises(ValueError, match="raised RuntimeError: kaput"):
        loss_coefficients(get_loss(f"{plugin_file}:boom"), ro.logp, inp)
    with pytest.raises(ValueError, match="cannot tell its form"):
        get_loss(f"{plugin_file}:two")
    with pytest.raises(ValueError, match="not found"):
        get_loss(f"{plugin_file}:nothing")
    with pytest.raises(ValueError, match="file not found"):
        get_loss("nope/none.py:fn")
    with pytest.raises(ValueError, match="neither a parameter"):
        get_loss(f"{plugin_file}:boom:clip=0.1")


# ------------------------------------------------------------------ specs
def test_loss_specs_and_errors():
    assert set(LOSSES) == {"pg", "is_token", "is_seq", "tis", "mis", "ppo_clip", "gspo", "cispo"}
    assert get_loss(None).spec == "pg" and get_loss("tis:2").spec == "tis:2"
    assert get_loss("ppo_clip:0.2,clip_high=0.28,dual_clip=3").spec == "ppo_clip:0.2,clip_high=0.28,dual_clip=3"
    assert get_loss("gspo").clip_range == (3e-4, 4e-4) and get_loss("gspo:0.01").clip_range == (0.01, 0.01)
    assert get_loss("ppo_clip:0.2,clip_high=0.28").clip_range == (0.2, 0.28)
    lo = get_loss("pg:filter_degenerate_groups=true")
    assert lo.filter == "new_prompts" and lo.spec == "pg:filter_degenerate_groups=new_prompts"
    assert get_loss("is_seq:filter_degenerate_groups=same_prompt").filter == "same_prompt"
    for spec in ALL_LOSSES:
        assert get_loss(get_loss(spec).spec).spec == get_loss(spec).spec
    bad = {"tis:-1": "'C' must be", "mis:2,1": "lo must be <= hi",
           "ppo_clip:0.2,dual_clip=0.5": "dual_clip must be > 1",
           "clip:0.2": "unknown loss 'clip'", "pg,filter_degenerate_groups=true": "arguments follow a colon",
           "tis:2,level=word": "token | seq | geo", "ppo_clip:0.2,old=nu": "must be mu",
           "pg:filter_degenerate_groups=maybe": "false | true", "is_token:1": "too many arguments",
           "tis:2,3": "too many arguments", "ppo_clip:eps=0.1,eps=0.2": "given twice"}
    for spec, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            get_loss(spec)
