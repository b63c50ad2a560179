"""Lemma 2: a function of the prefix only adds nothing, ``E[c(s_t) grad log pi(w_t | s_t)] = 0``.

``c`` is a fixed seeded ``N(0, 1)`` draw per node, so the check covers an arbitrary baseline,
not one with structure. The expectation ``E_W sum_t c(s_t) (e_{w_t} - pi(.|s_t))`` is taken over
every response and compared with the zero ``[N_nt, V]`` array.

Negative control: let ``c`` depend on the sampled token too, ``c(s_t, w_t)`` (the draw at the
node ``s_t w_t``); the row at ``s`` becomes ``mu(s) pi(.|s) (c(s, .) - E_pi c(s, .))``, non-zero.

Both return ``max |E[...]| / max(1, 0) = max |E[...]|`` (the reference side is 0).
"""

from __future__ import annotations

import torch

from .common import enumerate_responses, gather_n, rel_diff, score_expectation, seeded_normal

NAME = "lemma2"
STATEMENT = "E_W[c(s_t) grad log pi(w_t|s_t)] = 0 for any function c of the prefix"
NEGATIVE = "c(s_t, w_t) that depends on the sampled token"

#: seed of the random function ``c`` (one N(0, 1) value per node)
SEED = 2506_02553


def _baseline_expectation(mdp, policy, on_child: bool) -> float:
    resp = enumerate_responses(mdp, policy)
    c_n = seeded_normal(mdp.tree.num_nodes, SEED)
    adv_lt = gather_n(resp, c_n, resp.child_lt if on_child else resp.state_lt)
    expect_kv = score_expectation(resp, adv_lt)
    return rel_diff(expect_kv, torch.zeros_like(expect_kv))


def check(mdp, policy) -> float:
    """``max |E_W sum_t c(s_t) score_t|`` for a random ``c`` of the prefix."""
    return _baseline_expectation(mdp, policy, on_child=False)


def negative_control(mdp, policy) -> float:
    """``max |E_W sum_t c(s_t, w_t) score_t|`` for a random ``c`` of prefix and token."""
    return _baseline_expectation(mdp, policy, on_child=True)
