"""tpg.offpolicy.behaviour: each stage against a per-row Python reference, the mismatch report against
brute-force enumeration of responses, stale's inverse steps against forward autograd steps, recorded
policies (case files, train checkpoints), the sampler under mu, and the spec errors."""

import json
import math

import pytest
import torch

from _helpers import chisquare_p, leaf_of
from tpg.cases import case_to_dict, mdp_from_spec
from tpg.exact import grad_by_enumeration, solve
from tpg.offpolicy import behaviour_log_probs, parse_chain, resolve_behaviour
from tpg.offpolicy.behaviour import BehaviourPolicy, stale_policy
from tpg.policies import TabularSoftmax
from tpg.rollouts import sample

EOS = "dense:vocab=4,horizon=3,eos=0,prompts=2,weights=random,seed=3"


@pytest.fixture(scope="module")
def problem():
    return mdp_from_spec(EOS)


def _logits(mdp, pol):
    with torch.no_grad():
        return pol.node_logits(mdp.tree).detach().to(torch.float64)


# ------------------------------------------------------------------ per-row references
def _ref_row_probs(z):
    m = max(v for v in z if v != -math.inf)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in z]
    s = sum(e)
    return [x / s for x in e]


def _ref_top_k(p, k):
    return [pw > 0 and sum(1 for pv in p if pv > pw) < k for pw in p]


def _ref_top_p(p, top):
    return [pw > 0 and sum(pv for pv in p if pv > pw) < top for pw in p]


def _ref_apply(kind, z, arg):
    p = _ref_row_probs(z)
    if kind == "top_k":
        keep = _ref_top_k(p, arg)
    elif kind == "top_p":
        keep = _ref_top_p(p, arg) if arg < 1 else [pw > 0 for pw in p]
    else:  # min_p
        keep = [pw > 0 and pw >= arg * max(p) for pw in p]
    kept = sum(pw for pw, k in zip(p, keep) if k)
    return [math.log(pw / kept) if k else -math.inf for pw, k in zip(p, keep)]


TIES = torch.tensor([[0.0, 0.0, 0.0, 0.0],          # a uniform row: every tie
                     [1.0, 1.0, 0.0, -1.0],         # a tie at the top
                     [2.0, 0.5, 0.5, 0.5],          # a tie block straddling rank 2
                     [0.3, -0.2, 1.1, -2.0]], dtype=torch.float64)


@pytest.mark.parametrize("kind,args", [("top_k", [1, 2, 3, 4]), ("top_p", [0.2, 0.5, 0.6, 0.9, 0.999, 1.0]),
                                       ("min_p", [0.0, 0.3, 0.9, 1.0])])
def test_truncations_match_a_per_row_reference(problem, kind, args):
    """Truncation stages against a plain Python per-row implementation of their definitions, on random rows
    and on rows with ties (ties at the boundary all kept or all dropped)."""
    mdp, pol = problem
    z = _logits(mdp, pol).clone()
    z[: TIES.shape[0]] = TIES
    pol = TabularSoftmax(mdp.tree, logits=z)
    for a in args:
        got = behaviour_log_probs(f"{kind}:{a}", mdp, pol)
        for r in range(z.shape[0]):
            want = _ref_apply(kind, z[r].tolist(), a)
            for g, w in zip(got[r].tolist(), want):
                assert (g == w == -math.inf) or abs(g - w) < 1e-13, (kind, a, r, got[r], want)
    # the uniform row: top_k:1 and top_p:0.3 keep the whole tie block
    assert bool(torch.isfinite(behaviour_log_probs("top_k:1", mdp, pol)[0]).all())
    assert bool(torch.isfinite(behaviour_log_probs("top_p:0.3", mdp, pol)[0]).all())
    assert int(torch.isfinite(behaviour_log_probs("top_k:2", mdp, pol)[2]).sum()) == 4  # rank-2 tie block kept


def test_smooth_stages_match_their_formulas(problem):
    mdp, pol = problem
    z = _logits(mdp, pol)
    lp = torch.log_softmax(z, -1)
    assert torch.allclose(behaviour_log_probs("temperature:0.7", mdp, pol), torch.log_softmax(z / 0.7, -1), atol=1e-14)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(behaviour_log_probs("logit_noise:0.3,5", mdp, pol), torch.log_softmax(z + 0.3 * eps, -1),
                          atol=1e-14)
    bf = z.to(torch.bfloat16).to(torch.float64)
    assert torch.equal(behaviour_log_probs("precision:bf16", mdp, pol), torch.log_softmax(bf, -1))
    assert torch.allclose(behaviour_log_probs("pi", mdp, pol), lp, atol=1e-15)
    # the mixture, per state: w mu_1 + (1 - w) mu_2
    mu1 = behaviour_log_probs("temperature:2", mdp, pol).exp()
    mu2 = behaviour_log_probs("top_k:2", mdp, pol).exp()
    mix = behaviour_log_probs("mix:0.3,temperature:2,top_k:2", mdp, pol).exp()
    assert torch.allclose(mix, 0.3 * mu1 + 0.7 * mu2, atol=1e-15)
    # a chain applies left to right: top_p of the tempered policy
    chain = behaviour_log_probs("temperature:0.5+top_p:0.8", mdp, pol)
    zt = z / 0.5
    for r in range(zt.shape[0]):
        want = _ref_apply("top_p", zt[r].tolist(), 0.8)
        assert all((g == w == -math.inf) or abs(g - w) < 1e-13 for g, w in zip(chain[r].tolist(), want))


def test_spec_round_trip_and_errors():
    for spec in ["pi", "temperature:0.7", "top_k:2", "top_p:0.9", "min_p:0.1", "logit_noise:0.1,3", "precision:fp16",
                 "stale:2,lr=0.1", "mix:0.5,(logit_noise:0.1,3),top_p:0.9", "temperature:0.7+top_p:0.9",
                 "mix:0.25,pi,(temperature:2+top_k:1)"]:
        assert parse_chain(spec).spec == spec
        assert parse_chain(parse_chain(spec).spec).spec == spec
    assert parse_chain("logit_noise:sigma=0.2").spec == "logit_noise:0.2,0"
    assert parse_chain("temperature:1e+3").spec == "temperature:1000"
    bad = {"top_q:0.9": "unknown behaviour 'top_q'", "top_p:1.5": "(0, 1]", "top_p": None, "top_k:0": "top_k",
           "temperature:-1": "(0, inf)", "logit_noise:0.1,2,3": "too many arguments", "mix:0.5,pi": "mix:w,SPEC1,SPEC2",
           "mix:2,pi,pi": "'w'", "top_p:0.9+stale:1": "must start the chain", "precision:fp8": "bf16 | fp16 | fp32",
           "pi:1": "takes no arguments", "top_p:(0.9": "unbalanced", "temperature:T=1,T=2": "given twice",
           "temperature:x=1": "unknown option 'x'"}
    for spec, msg in bad.items():
        if msg is None:
            continue
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
            parse_chain(spec)


# ------------------------------------------------------------------ the mismatch report
def _leaf_table(mdp, logp):
    """``P(W)`` (prompt weight included) of every leaf, by walking its path in Python."""
    tree = mdp.tree
    nt_path, tok_path, _ = tree.leaf_paths()
    rho = mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
    out = []
    for i in range(nt_path.shape[0]):
        p = float(rho[i])
        for k, w in zip(nt_path[i].tolist(), tok_path[i].tolist()):
            if k >= 0:
                p *= math.exp(float(logp[k, w]))
        out.append(p)
    return out, nt_path, tok_path


@pytest.mark.parametrize("spec", ["temperature:1.6", "top_p:0.8", "top_k:2", "logit_noise:0.4,2", "stale:1,lr=0.5",
                                  "mix:0.5,top_k:1,pi"])
def test_mismatch_report_against_brute_force(problem, spec):
    """Every number of the mismatch report from an enumeration of the complete responses (sums over the
    paths of each response, no reach probabilities)."""
    mdp, pol = problem
    sol = solve(mdp, pol)
    beh = resolve_behaviour(spec, mdp, pol, sol_pi=sol)
    lpi, lmu = sol.logp, beh.logp
    P_pi, nt_path, tok_path = _leaf_table(mdp, lpi)
    P_mu, _, _ = _leaf_table(mdp, lmu)
    kl = length = absl = outside = 0.0
    max_abs = max_r = 0.0
    min_r = math.inf
    for i, pm in enumerate(P_mu):
        if pm == 0:
            continue
        for k, w in zip(nt_path[i].tolist(), tok_path[i].tolist()):
            if k < 0:
                continue
            d = float(lmu[k, w] - lpi[k, w])
            kl += pm * d
            absl += pm * abs(d)
            length += pm
            max_abs, max_r, min_r = max(max_abs, abs(d)), max(max_r, math.exp(-d)), min(min_r, math.exp(-d))
            outside += pm * float(lpi[k].exp()[lmu[k] == -math.inf].sum())
    # KL of the sequences: sum_W P_mu log(P_mu / P_pi) equals the token sum above (chain rule); check both
    kl_seq_direct = sum(pm * math.log(pm / pp) for pm, pp in zip(P_mu, P_pi) if pm > 0)
    m = beh.mismatch
    assert m["kl_seq"] == pytest.approx(kl, abs=1e-12) and m["kl_seq"] == pytest.approx(kl_seq_direct, abs=1e-12)
    assert m["mean_length_mu"] == pytest.approx(length, abs=1e-12)
    assert m["kl_token"] == pytest.approx(kl / length, abs=1e-12)
    assert m["mean_abs_log_ratio"] == pytest.approx(absl / length, abs=1e-12)
    assert m["max_abs_log_ratio"] == pytest.approx(max_abs, abs=1e-12)
    assert m["max_token_ratio"] == pytest.approx(max_r, rel=1e-12)
    assert m["min_token_ratio"] == pytest.approx(min_r, rel=1e-12)
    assert m["pi_mass_outside_token"] == pytest.approx(outside / length, abs=1e-12)
    live = [(pp, pm) for pp, pm in zip(P_pi, P_mu) if pm > 0]
    assert m["pi_mass_outside_seq"] == pytest.approx(1 - sum(pp for pp, _ in live), abs=1e-12)
    assert m["max_seq_ratio"] == pytest.approx(max(pp / pm for pp, pm in live), rel=1e-12)
    second = sum(pp * pp / pm for pp, pm in live)
    assert m["seq_ratio_second_moment"] == pytest.approx(second, rel=1e-12)
    assert m["ess_fraction"] == pytest.approx(sum(pp for pp, _ in live) ** 2 / second, rel=1e-12)
    truncates = any(pm == 0 for pm in P_mu)
    if truncates:
        assert m["kl_pi_mu_seq"] == math.inf
    else:
        assert m["kl_pi_mu_seq"] == pytest.approx(sum(pp * math.log(pp / pm) for pp, pm in zip(P_pi, P_mu)), abs=1e-12)


def test_on_policy_mismatch_is_zero(problem):
    mdp, pol = problem
    m = resolve_behaviour("pi", mdp, pol).mismatch
    assert m["kl_seq"] == 0 and m["max_abs_log_ratio"] == 0 and m["pi_mass_outside_seq"] == pytest.approx(0, abs=1e-15)
    assert m["seq_ratio_second_moment"] == pytest.approx(1, abs=1e-12)


# ------------------------------------------------------------------ stale and recorded policies
def _forward_steps(mdp, pol, k, lr):
    """``k`` gradient-ascent steps with the gradient from autograd through every response (engine b)."""
    import copy

    p = copy.deepcopy(pol)
    for _ in range(k):
        _, grads = grad_by_enumeration(mdp, p)
        with torch.no_grad():
            for q, g in zip([q for q in p.parameters() if q.requires_grad], grads):
                q.add_(lr * g)
    return p


@pytest.mark.parametrize("spec", ["dense:vocab=3,horizon=3,eos=0,prompts=2,seed=4",
                                  "dense:vocab=3,horizon=2,eos=0,prompts=2,seed=5,policy=shared"])
def test_stale_is_exactly_k_ascent_steps_behind(spec):
    """``k`` forward gradient-ascent steps from ``stale:k``'s policy (gradients by autograd through the
    enumeration, independent of the DP) land on ``pi`` to 1e-10."""
    mdp, pol = mdp_from_spec(spec)
    beh = resolve_behaviour("stale:3,lr=0.4", mdp, pol)
    assert beh.info["stale_residual"] < 1e-12 and beh.info["stale_param_distance"] > 0.05
    mu, _ = stale_policy(mdp, pol, 3, 0.4)
    back = _forward_steps(mdp, mu, 3, 0.4)
    for a, b in zip(back.parameters(), pol.parameters()):
        assert float((a - b).detach().abs().max()) < 1e-10
    assert torch.allclose(beh.logp, torch.log_softmax(mu.node_logits(mdp.tree).detach(), -1), atol=1e-13)
    assert resolve_behaviour("stale:0", mdp, pol).mismatch["kl_seq"] == 0


def test_stale_large_steps_and_the_refusal(problem):
    """A step too large for the plain fixed-point iteration still inverts (damped; the forward check holds);
    one that cannot be inverted on this problem is refused with the field named."""
    mdp, pol = problem
    beh = resolve_behaviour("stale:1,lr=5", mdp, pol)
    assert beh.info["stale_residual"] < 1e-10 and beh.info["stale_iterations"][0] > 20
    with pytest.raises(ValueError, match="behaviour stale: the backward gradient step 1 of size lr=20 did not "
                                         "converge.*smaller lr"):
        resolve_behaviour("stale:1,lr=20", mdp, pol)


def test_recorded_policies_case_file_and_checkpoint(problem, tmp_path):
    mdp, pol = problem
    other = TabularSoftmax(mdp.tree, seed=99)
    case = tmp_path / "mu.json"
    case.write_text(json.dumps(case_to_dict(mdp, other)))
    want = torch.log_softmax(other.logits.detach(), -1)
    assert torch.allclose(behaviour_log_probs(f"file:{case}", mdp, pol), want, atol=1e-14)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"format": "x", "policy": other.state_dict()}, ckpt)
    assert torch.allclose(behaviour_log_probs(f"file:{ckpt}", mdp, pol), want, atol=1e-14)
    assert torch.allclose(behaviour_log_probs(f"file:{ckpt}+temperature:2", mdp, pol),
                          torch.log_softmax(other.logits.detach() / 2, -1), atol=1e-14)
    small, small_pol = mdp_from_spec("dense:vocab=3,horizon=2,seed=0")
    bad = tmp_path / "small.json"
    bad.write_text(json.dumps(case_to_dict(small, small_pol)))
    with pytest.raises(ValueError, match="same tree"):
        behaviour_log_probs(f"file:{bad}", mdp, pol)
    torch.save({"policy": small_pol.state_dict()}, tmp_path / "small.ckpt")
    with pytest.raises(ValueError, match="does not fit"):
        behaviour_log_probs(f"file:{tmp_path / 'small.ckpt'}", mdp, pol)
    with pytest.raises(ValueError, match="no such file"):
        behaviour_log_probs(f"file:{tmp_path / 'nope.json'}", mdp, pol)
    # a policy object or a table is a behaviour too
    assert torch.allclose(behaviour_log_probs(other, mdp, pol), want, atol=1e-14)


def test_file_reads_what_tpg_train_writes(tmp_path):
    """``file:CKPT`` on a real ``tpg train`` checkpoint (the sha256 envelope around the state): the
    trained policy's log-probabilities, not the initial ones; a checkpoint with one changed byte is
    refused, naming the file."""
    import copy

    from tpg.train.config import TrainConfig
    from tpg.train.trainer import read_checkpoint, train

    spec = "dense:vocab=3,horizon=3,eos=0,prompts=2"
    ckpt = tmp_path / "run.csv.ckpt"
    train(TrainConfig(mdp=spec, iters=2, out=str(tmp_path / "run.csv"), progress=False, measure_memory=False))
    mdp, pol = mdp_from_spec(spec)
    trained = copy.deepcopy(pol)
    trained.load_state_dict(read_checkpoint(ckpt)["policy"])
    want = torch.log_softmax(_logits(mdp, trained), -1)
    assert (want - torch.log_softmax(_logits(mdp, pol), -1)).abs().max() > 1e-3  # training moved the policy
    assert torch.allclose(behaviour_log_probs(f"file:{ckpt}", mdp, pol), want, atol=1e-14)
    data = ckpt.read_bytes()
    mid = len(data) // 2
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[:mid] + bytes([data[mid] ^ 0x40]) + data[mid + 1:])
    with pytest.raises(ValueError, match=r"behaviour file: '.*bad\.ckpt'"):
        behaviour_log_probs(f"file:{bad}", mdp, pol)


def test_sampler_follows_mu_and_never_leaves_its_support(problem):
    """Responses sampled from the behaviour policy have mu's exact frequencies (chi-square), and the
    responses top-k removes are never drawn."""
    mdp, pol = problem
    beh = resolve_behaviour("temperature:0.8+top_k:2", mdp, pol)
    ro = sample(mdp, beh.policy, num_prompts=20000, seed=3)
    leaves = leaf_of(mdp.tree, ro.prompt, ro.tokens, ro.mask)
    index = {int(n): i for i, n in enumerate(mdp.tree.leaf_ids.tolist())}
    counts = torch.bincount(torch.tensor([index[int(n)] for n in leaves]), minlength=mdp.tree.num_leaves)
    prob = beh.sol.response_prob
    assert int(counts[prob == 0].sum()) == 0 and int((prob == 0).sum()) > 0
    assert chisquare_p(counts, prob) > 1e-4
    # the sampler's log-probabilities are mu's
    nt = mdp.tree.nt_index_n[ro.nodes.clamp(min=0)]
    want = torch.where(ro.mask, beh.logp[nt.clamp(min=0), ro.tokens], torch.zeros((), dtype=torch.float64))
    assert torch.allclose(ro.logp, want, atol=1e-13)
    assert isinstance(beh.policy, BehaviourPolicy)
