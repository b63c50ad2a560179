"""Expected gradients of the single-sample estimators against the exact engine, on a tiny tree.

Every complete response is one batch (of one response); the estimator's expected logit
gradient is ``sum_W rho(x) P(W|x) sum_t coef_t (e_{w_t} - pi(.|s_t))``, which must equal
``solve(...).grad_logits`` for the unbiased estimators and differ for the biased ones (the
negative controls). Group estimators need G-tuples: that is the verifier's job.
"""

import pytest
import torch

from tpg.cases import make_policy, mdp_from_spec
from tpg.estimators import ResponseBatch, get_estimator
from tpg.exact.engine import exact_kl, solve


class ExactContext:
    """Exact hooks from the engine's solution (gamma = 1 critic only)."""

    exact = True

    def __init__(self, mdp, sol):
        self.mdp, self.sol, self.tree = mdp, sol, mdp.tree

    def _node(self, prompt, prefix, n):
        return self.tree.node_id(int(prompt), [int(x) for x in prefix[:n]])

    def prompt_values(self, prompt_b):
        return self.sol.value_resp[prompt_b]

    def greedy_rm(self, prompt_b):
        return 0.4 + 0.3 * prompt_b.double()  # any function of the prompt is a valid baseline

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, K):
        return torch.stack([self.sol.value_resp[self._node(p, row.tolist(), int(n))]
                            for p, row, n in zip(prompt_b, prefix_bt, prefix_len_b)])

    def critic_values(self, batch, kind, gamma, options):
        assert gamma == 1.0
        B, H = batch.mask.shape
        out = torch.zeros(B, H + 1, dtype=torch.float64)
        for i in range(B):
            toks = batch.tokens[i].tolist()
            for j in range(int(batch.length[i])):
                out[i, j] = self.sol.value_resp[self._node(batch.prompt[i], toks, j)]
        return out

    def random_generator(self):
        return torch.Generator().manual_seed(0)


def leaf_batch(mdp, sol, ref_policy=None):
    """Every complete response as its own batch (and group), with its probability."""
    tree = mdp.tree
    nt, tok, lengths = tree.leaf_paths()
    mask = tok >= 0
    tokens = tok.clamp(min=0)
    ntc = nt.clamp(min=0)
    logp = torch.where(mask, sol.logp[ntc, tokens], 0.0)
    L, H = tok.shape
    ref = None
    if ref_policy is not None:
        ref_lp = ref_policy.node_log_probs(tree).detach().double()
        ref = torch.where(mask, ref_lp[ntc, tokens], 0.0)
    edge = mdp.edge_rewards().double()
    child = tree.num_prompts + ntc * tree.vocab_size + tokens
    r = torch.where(mask, edge[child], 0.0)
    rm = sol.response_rm.double()
    tlr = torch.zeros(L, H, dtype=torch.float64)
    tlr[torch.arange(L), lengths - 1] = rm
    batch = ResponseBatch(prompt=tree.prompt_n[tree.leaf_ids], group=torch.zeros(L, dtype=torch.long),
                          batch=torch.arange(L), tokens=tokens, mask=mask, logp=logp, token_level_rewards=tlr, rm=rm,
                          length=lengths, ref_logp=ref, gamma=mdp.gamma, vocab_size=tree.vocab_size, horizon=H,
                          token_rewards=r)
    return batch, sol.response_prob.double(), ntc


def expected_logit_grad(out, batch, prob, ntc, sol):
    """``E[g]`` in logit space: ``sum_W p(W) sum_t c_t (e_{w_t} - pi(.|s_t))``."""
    coef = out.score_coef() * prob.unsqueeze(1)
    pi = sol.logp.exp()
    g = torch.zeros_like(pi)
    m = batch.mask
    g.index_put_((ntc[m], batch.tokens[m]), coef[m], accumulate=True)
    per_state = torch.zeros(pi.shape[0], dtype=torch.float64).index_add_(0, ntc[m], coef[m])
    return g - pi * per_state.unsqueeze(1)


@pytest.fixture(scope="module")
def problem():
    mdp, pol = mdp_from_spec("dense:vocab=3,horizon=3,eos=0,prompts=2,seed=1,weights=random")
    sol = solve(mdp, pol)
    return mdp, pol, sol


UNBIASED = ["reinforce", "reward_to_go", "reinforce_baseline", "remax", "ppo_gae", "ppo_gae:lambda=0.3",
            "ppo_gae:lambda=0", "ppo_gae:critic=zero", "trepo", "trepo:anchors=every:2",
            "trepo:anchors=segments:1", "trepo:anchors=random:1", "trepo:anchors=random:1,fill=ipw",
            "trepo:anchors=all,fill=interpolate"]
BIASED = ["trepo:anchors=every:2,fill=interpolate", "trepo:anchors=random:1,fill=interpolate",
          "ppo_gae:critic=zero,lambda=0.5", "reinforce:agg=seq-mean-token-mean",
          "reinforce:agg=token-mean"]  # a batch of one: token-mean is 1/|o|


@pytest.mark.parametrize("spec", UNBIASED)
def test_unbiased_single_sample(problem, spec):
    mdp, pol, sol = problem
    batch, prob, ntc = leaf_batch(mdp, sol)
    out = get_estimator(spec)(batch, ExactContext(mdp, sol))
    g = expected_logit_grad(out, batch, prob, ntc, sol)
    assert torch.allclose(g, sol.grad_logits, atol=1e-12), spec


@pytest.mark.parametrize("spec", BIASED)
def test_biased_controls(problem, spec):
    mdp, pol, sol = problem
    batch, prob, ntc = leaf_batch(mdp, sol)
    out = get_estimator(spec)(batch, ExactContext(mdp, sol))
    g = expected_logit_grad(out, batch, prob, ntc, sol)
    assert (g - sol.grad_logits).abs().max() > 1e-4, spec


def test_discounted_oracle_and_reinforce():
    """gamma < 1 with dense rewards: RM discounted with the same gamma keeps both unbiased (Theorem 1)."""
    mdp, pol = mdp_from_spec("dense:vocab=3,horizon=3,eos=0,prompts=1,seed=2,gamma=0.8")
    sol = solve(mdp, pol)
    batch, prob, ntc = leaf_batch(mdp, sol)
    for spec in ("reward_to_go", "reinforce"):
        out = get_estimator(spec)(batch, None)
        assert torch.allclose(expected_logit_grad(out, batch, prob, ntc, sol), sol.grad_logits, atol=1e-12)


@pytest.mark.parametrize("spec", ["reinforce:kl=k1_reward", "reward_to_go:kl=k1_reward", "trepo:kl=k1_reward",
                                  "ppo_gae:critic=zero,kl=k1_reward", "remax:kl=k1_reward"])
def test_kl_in_reward_is_unbiased_for_the_regularised_objective(problem, spec):
    mdp, pol, sol = problem
    ref = make_policy(mdp, seed=7)
    batch, prob, ntc = leaf_batch(mdp, sol, ref_policy=ref)
    beta = 0.3
    _, kl_grads = exact_kl(mdp, pol, ref)
    out = get_estimator(f"{spec},kl_beta={beta}")(batch, ExactContext(mdp, sol))
    g = expected_logit_grad(out, batch, prob, ntc, sol)
    assert torch.allclose(g, sol.grad_logits - beta * kl_grads[0], atol=1e-12)


def test_k1_loss_has_zero_expectation(problem):
    mdp, pol, sol = problem
    ref = make_policy(mdp, seed=7)
    batch, prob, ntc = leaf_batch(mdp, sol, ref_policy=ref)
    out = get_estimator("reinforce:kl=k1,kl_beta=0.5")(batch, None)
    assert torch.allclose(expected_logit_grad(out, batch, prob, ntc, sol), sol.grad_logits, atol=1e-12)
    out = get_estimator("reinforce:kl=k3,kl_beta=0.5")(batch, None)
    assert (expected_logit_grad(out, batch, prob, ntc, sol) - sol.grad_logits).abs().max() > 1e-4


def pair_batch(mdp, sol):
    """Every ordered pair of responses to the same prompt as a group of G = 2 (its own batch)."""
    batch, prob, ntc = leaf_batch(mdp, sol)
    prompt = batch.prompt
    rho = mdp.prompt_weights.double()
    cond = prob / rho[prompt]
    rows, pair_prob = [], []
    for x in range(mdp.num_prompts):
        ids = torch.nonzero(prompt == x).flatten()
        a = ids.repeat_interleave(ids.numel())
        b = ids.repeat(ids.numel())
        rows.append(torch.stack([a, b], 1).reshape(-1))
        pair_prob.append((rho[x] * cond[a] * cond[b]).repeat_interleave(2))
    rows = torch.cat(rows)
    pairs = batch.index(rows)
    n = rows.numel() // 2
    pairs.batch = torch.arange(n).repeat_interleave(2)
    pairs.group = pairs.batch.clone()
    return pairs, torch.cat(pair_prob), ntc[rows]


def test_group_estimators_with_g2(problem):
    mdp, pol, sol = problem
    pairs, prob, ntc = pair_batch(mdp, sol)
    assert float(prob.sum()) == pytest.approx(2.0)  # each pair's probability counted on both rows
    truth = sol.grad_logits

    def expect(spec):
        return expected_logit_grad(get_estimator(spec)(pairs), pairs, prob, ntc, sol)

    assert torch.allclose(expect("rloo"), truth, atol=1e-12)
    assert torch.allclose(expect("dr_grpo"), 0.5 * truth, atol=1e-12)        # (1 - 1/G) grad J
    assert torch.allclose(expect("grpo:std_norm=false"), 0.5 * truth, atol=1e-12)
    g = expect("grpo")
    cos = float((g * truth).sum() / (g.norm() * truth.norm()))
    assert 0.5 < cos < 1 - 1e-6                                                 # biased direction
