"""tpg.proofs_checks: every statement of docs/THEORY.md section 2 holds exactly, every negative control fails.

On the default cases all of them; on random small MDPs (hypothesis) every statement, and every
negative control whose predicted gap is not degenerate. The predicted gap of each control is a
closed form from the dynamic programme (written out in :func:`predicted_negative`), and the
control must reproduce it, which also checks the derivations in the modules' docstrings.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpg.proofs_checks as proofs_checks
from tpg.proofs_checks import (STATEMENTS, critic_identity, eq26_gamma, gae_equality, lemma1, lemma2, td_identity,
                           theorem1, theorem2)
from tpg.proofs_checks.common import (NEGATIVE_TOL, STATEMENT_TOL, child_kv, enumerate_responses, negative_gamma,
                                  nt_column, response_values, seeded_normal)
from tpg.proofs_checks.runner import default_cases, format_table, run_checks
from tpg.cases import make_policy, mdp_from_spec
from tpg.exact import solve
from tpg.exact.engine import backward_values, nt_discount
from tpg.mdp.families import FAMILIES, make_mdp


# ----------------------------------------------------------------------------- default cases
@pytest.fixture(scope="module")
def default_rows():
    return run_checks()


def test_statement_modules_in_theory_order():
    names = [m.NAME for m in STATEMENTS]
    assert names == ["lemma1", "lemma2", "theorem1", "eq26_gamma", "theorem2", "critic_identity", "td_identity",
                     "gae_equality"]
    for mod in STATEMENTS:
        for attr in ("STATEMENT", "NEGATIVE"):
            text = getattr(mod, attr)
            assert isinstance(text, str) and text and "\n" not in text
        assert callable(mod.check) and callable(mod.negative_control)
        assert mod.__doc__ and mod.check.__doc__ and mod.negative_control.__doc__


def test_default_cases_cover_the_brief():
    cases = default_cases()
    assert 8 <= len(cases) <= 16
    mdps = [mdp for _, mdp, _ in cases]
    assert {m.gamma for m in mdps} == {1.0, 0.9}
    assert {m.eos_token is None for m in mdps} == {True, False}
    assert min(m.num_prompts for m in mdps) == 1 and max(m.num_prompts for m in mdps) > 1
    assert all(m.vocab_size == 3 and 3 <= m.horizon <= 4 for m in mdps)
    families = {label.split()[0] for label, _, _ in cases}
    assert {"dense", "terminal"} <= families


@pytest.mark.parametrize("name", [m.NAME for m in STATEMENTS])
def test_every_statement_holds_and_every_control_fails_on_default_cases(default_rows, name):
    rows = [r for r in default_rows if r["statement"] == name]
    assert len(rows) == 2 * len(default_cases())
    bad = [r for r in rows if not r["passed"]]
    assert not bad, format_table(bad)
    for r in rows:
        if r["kind"] == "statement":
            assert r["difference"] <= STATEMENT_TOL and r["threshold"] == STATEMENT_TOL
        else:
            assert r["difference"] > NEGATIVE_TOL and r["threshold"] == NEGATIVE_TOL


def test_format_table_is_aligned(default_rows):
    text = format_table(default_rows[:6])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["statement", "case", "kind"]
    assert len(lines) == 2 + 6
    col = lines[0].index("difference")
    # numbers are right-aligned under their header, in %.2e
    ends = {line.index("e", col) + 4 for line in lines[2:]}  # "1.11e-16" ends 4 past its "e"
    assert ends == {col + len("difference")}
    assert "holds" in text and "fails as it must" in text


def test_run_checks_selects_statements_by_name():
    cases = default_cases()[:2]
    rows = run_checks(cases, statements=["td_identity", lemma2])
    assert [r["statement"] for r in rows] == ["td_identity"] * 4 + ["lemma2"] * 4
    assert [r["kind"] for r in rows[:2]] == ["statement", "negative control"]
    with pytest.raises(ValueError, match="unknown statement"):
        run_checks(cases, statements=["lemma3"])


def test_a_violated_statement_is_reported():
    class Broken:
        NAME, STATEMENT, NEGATIVE = "broken", "1 = 2", "1 = 1"

        @staticmethod
        def check(mdp, policy):
            return 1.0

        @staticmethod
        def negative_control(mdp, policy):
            return 0.0

    rows = run_checks(default_cases()[:1], statements=[Broken])
    assert [r["passed"] for r in rows] == [False, False]
    text = format_table(rows)
    assert "VIOLATED" in text and "NOT FLAGGED" in text


def test_mismatch_bias_vanishes_only_at_gamma_one():
    mdp, policy = mdp_from_spec("dense:vocab=3,horizon=4,eos=0,prompts=2,seed=1")
    assert eq26_gamma.mismatch_bias(mdp, policy, 1.0) < 1e-12
    biases = [eq26_gamma.mismatch_bias(mdp, policy, g) for g in (0.99, 0.9, 0.5)]
    assert all(b > 1e-4 for b in biases)
    assert biases[0] < biases[1] < biases[2]
    mdp1, policy1 = mdp_from_spec("terminal:vocab=3,horizon=1,seed=0")  # one token: nothing to discount
    assert eq26_gamma.mismatch_bias(mdp1, policy1, 0.5) < 1e-12


def test_eq26_forced_weights_are_the_inverse_discount_of_the_last_token():
    """The weights come from the engine's backward recursion, not from a power of gamma: with EOS every
    length t = 1 .. H occurs and gets (1/gamma)^(t-1); without EOS only t = H does."""
    mdp, policy = mdp_from_spec("terminal:vocab=3,horizon=4,eos=0,prompts=2,gamma=0.9,seed=5")
    t_n, w_n = eq26_gamma.forced_weights(mdp, policy, 0.9)
    assert t_n.tolist() == [1, 2, 3, 4]
    assert w_n.tolist() == pytest.approx([(1 / 0.9) ** k for k in range(4)], rel=1e-12)
    mdp, policy = mdp_from_spec("dense:vocab=3,horizon=3,seed=0")
    t_n, w_n = eq26_gamma.forced_weights(mdp, policy, 0.5)
    assert t_n.tolist() == [3] and w_n.tolist() == pytest.approx([4.0], rel=1e-12)
    assert eq26_gamma.forced_weights(mdp, policy, 1.0)[1].tolist() == [1.0]
    with pytest.raises(ValueError, match="gamma"):
        eq26_gamma.forced_weights(mdp, policy, 0.0)


@pytest.mark.parametrize("wrong", [
    lambda gamma, t: torch.ones_like(t, dtype=torch.float64),                # ZRA kept as it is: no weight
    lambda gamma, t: (1.0 / gamma) ** (t.max() - t).to(torch.float64),      # the GAE-return form (1/gamma)^(T-t)
    lambda gamma, t: gamma ** (t - 1).to(torch.float64),                    # the discount itself
], ids=["one", "to-go", "gamma"])
def test_eq26_check_tells_the_theory_form_from_wrong_ones(monkeypatch, wrong):
    """The statement check compares the forced weights with docs/THEORY.md's (1/gamma)^(t-1) at a real gamma < 1
    on every default case (0.9 where the case has gamma = 1): any other form is violated everywhere."""
    monkeypatch.setattr(eq26_gamma, "theory_weight", wrong)
    for label, mdp, policy in default_cases():
        assert eq26_gamma.check(mdp, policy) > NEGATIVE_TOL, label


# ----------------------------------------------------------------------------- edge cases
EDGE_SPECS = [
    "dense:vocab=2,horizon=1",                        # H = 1: every child of a root is an end state
    "terminal:vocab=3,horizon=1,eos=0,prompts=3,gamma=0.5",
    "first_token:vocab=2,horizon=1,prompts=2",
    "terminal:vocab=2,horizon=4,eos=0,gamma=0.9",     # V = 2 with EOS: one continuing token per state
    "terminal:vocab=3,horizon=3,twin=true,gamma=0.5",  # all reward on the last token
    "sparse:vocab=2,horizon=2,p=0.0",                  # all rewards zero: grad J = 0
]


@pytest.mark.parametrize("spec", EDGE_SPECS)
def test_statements_hold_on_edge_cases(spec):
    mdp, policy = mdp_from_spec(spec)
    for mod in STATEMENTS:
        assert mod.check(mdp, policy) <= STATEMENT_TOL, mod.NAME
        assert abs(mod.negative_control(mdp, policy) - predicted_negative(mod, mdp, policy)) <= 1e-9, mod.NAME


def test_horizon_one_controls_are_degenerate_where_predicted():
    # with one token per response there is no later token to discount and no later state to
    # mis-value: the gamma and critic controls cannot fail, the others still do
    mdp, policy = mdp_from_spec("dense:vocab=3,horizon=1,prompts=2,gamma=0.9,seed=3")
    for mod in (eq26_gamma, td_identity, gae_equality):
        assert mod.negative_control(mdp, policy) < 1e-12, mod.NAME
    for mod in (lemma1, lemma2, theorem1, theorem2, critic_identity):
        assert mod.negative_control(mdp, policy) > NEGATIVE_TOL, mod.NAME


# ----------------------------------------------------------------------------- predicted gaps
def _scaled(gap: torch.Tensor, ref: torch.Tensor) -> float:
    return float(gap.abs().max()) / max(1.0, float(ref.abs().max()))


def predicted_negative(mod, mdp, policy) -> float:
    """The difference each negative control must report, from closed forms (DP quantities).

    ``mu`` reach, ``pi`` policy, ``d`` depth; "row gap" ``g(s, w)`` means the control's expected
    update minus ``grad J`` is ``mu(s) pi(w|s) (g(s, w) - E_pi g(s, .))`` in node-logit space.
    """
    tree = mdp.tree
    sol = solve(mdp, policy, with_grad=False)
    pi = sol.logp.exp()

    def row_gap(weight_kv, g_kv):
        centred = g_kv - (pi * g_kv).sum(1, keepdim=True)
        return nt_column(tree, sol.reach) * weight_kv * pi * centred

    disc_k1 = nt_discount(tree, mdp.gamma).unsqueeze(1)
    if mod in (lemma1, theorem2):  # the immediate reward gamma^d r(s, w) is missing
        return _scaled(row_gap(disc_k1, mdp.reward_matrix()), sol.grad_logits)
    if mod is lemma2:  # a token-dependent c(s w) is not a baseline
        c_kv = child_kv(tree, seeded_normal(tree.num_nodes, lemma2.SEED))
        return _scaled(row_gap(1.0, c_kv), torch.zeros(1))
    if mod is theorem1:  # an independent response's RM has expected update exactly 0
        return _scaled(sol.grad_logits, sol.grad_logits)
    if mod is critic_identity:  # greedy minus expected value, gamma^d (max_w Q - V)
        gap_k = nt_discount(tree, mdp.gamma) * (sol.q.max(1).values - sol.value[tree.nt_node_k])
        return _scaled(gap_k, sol.value_resp)
    if mod is td_identity:  # delta' = gamma^d delta, so delta' - delta = (gamma^d - 1)(Q - V)
        m = mdp.with_gamma(negative_gamma(mdp))
        sm = solve(m, policy, with_grad=False)
        disc = nt_discount(tree, m.gamma).unsqueeze(1)
        return _scaled((disc - 1) * sm.advantage, disc * sm.advantage)
    if mod is eq26_gamma:  # weight gamma^(T-t) - 1: g(s, w) = E[(gamma^(T-d-1) - 1) RM | s w]
        m = mdp.with_gamma(negative_gamma(mdp))
        sm = solve(m, policy, with_grad=False)
        resp = enumerate_responses(m, policy)
        disc_rm = dataclasses.replace(resp, rm_l=m.gamma ** resp.length_l.to(torch.float64) * resp.rm_l)
        u_kv = child_kv(tree, response_values(disc_rm))  # E[gamma^T RM | s w]
        g_kv = u_kv / (m.gamma * nt_discount(tree, m.gamma)).unsqueeze(1) - child_kv(tree, sm.value_resp)
        return _scaled(nt_column(tree, sm.reach) * pi * (g_kv - (pi * g_kv).sum(1, keepdim=True)), sm.grad_logits)
    if mod is gae_equality:
        # A~_t - A_t = -e(s_t) + gamma (1 - lambda) sum_{j>=1} (gamma lambda)^(j-1) e(s_{t+j}); the first
        # term is a baseline, the rest is Q_F(s_t, w_t) of the "reward" e(s w) under discount gamma lambda
        e_n = torch.zeros(tree.num_nodes, dtype=torch.float64)
        e_n[tree.nt_node_k] = seeded_normal(tree.num_nonterminal, gae_equality.CRITIC_SEED, gae_equality.CRITIC_STD)
        lam = gae_equality.NEGATIVE_LAMBDA
        _, qf_kv = backward_values(tree, pi, child_kv(tree, e_n), mdp.gamma * lam)
        return _scaled(row_gap(disc_k1 * mdp.gamma * (1 - lam), qf_kv), sol.grad_logits)
    raise AssertionError(f"no prediction for {mod.NAME}")


# ----------------------------------------------------------------------------- random MDPs
@st.composite
def small_problems(draw):
    vocab = draw(st.integers(2, 4))
    family = draw(st.sampled_from(FAMILIES))
    # sampled_from, not integers(1, 4): hypothesis favours the bounds and would draw H = 1, where
    # three of the controls are degenerate, about half of the time
    kw = dict(family=family, vocab=vocab, horizon=draw(st.sampled_from([1, 2, 3, 4])),
              eos=draw(st.one_of(st.none(), st.integers(0, vocab - 1))), prompts=draw(st.integers(1, 3)),
              weights=draw(st.sampled_from(["uniform", "random"])), gamma=draw(st.sampled_from([1.0, 0.9, 0.5])),
              seed=draw(st.integers(0, 2**20)),
              compact=family != "first_token" and draw(st.booleans()))
    mdp = make_mdp(**kw)
    policy = make_policy(mdp, draw(st.sampled_from(["tabular", "shared"])), policy_seed=draw(st.integers(0, 2**20)),
                         scale=draw(st.sampled_from([0.5, 1.0, 2.0])))
    return mdp, policy


RANDOM = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("mod", STATEMENTS, ids=lambda m: m.NAME)
@RANDOM
@given(problem=small_problems())
def test_statement_holds_on_random_mdps(mod, problem):
    mdp, policy = problem
    assert mod.check(mdp, policy) <= STATEMENT_TOL
    neg = mod.negative_control(mdp, policy)
    predicted = predicted_negative(mod, mdp, policy)
    # the control measures exactly the gap its closed form predicts ...
    assert math.isclose(neg, predicted, rel_tol=1e-7, abs_tol=1e-10)
    # ... and must be flagged unless that gap itself is (near) zero: a degenerate case such as
    # H = 1 (nothing to discount, no later state for a critic error), zero rewards (grad J = 0),
    # or rewards that do not vary with the token (first_token: Q = V past the first token, so
    # delta = 0 there and the missing gamma^(t-1) goes unseen) -- there the wrong claim is true
    if predicted > 1e-5:
        assert neg > NEGATIVE_TOL


def test_package_exports():
    assert proofs_checks.STATEMENTS is STATEMENTS
    assert set(proofs_checks.__all__) >= {"STATEMENTS", *(m.NAME for m in STATEMENTS)}
