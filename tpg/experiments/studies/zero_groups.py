"""Zero-signal groups (the paper's claim 5): on sparse binary rewards a GRPO group whose ``G``
rewards are all equal (all 0, typically) has advantage ``(R_i - mean) / (std + eps) = 0`` for
every response, hence a zero gradient; a per-step advantage (PPO with the exact critic, TRePO)
can still be non-zero on the very same group, since ``V'(s_{t+1}) - V'(s_t)`` moves along a
response whose final reward is 0.

For one batch (one prompt ``x ~ rho`` and ``G`` responses) and each method the cell measures

* ``frac_zero_grad``: the probability that the batch's gradient is exactly zero (norm below
  :data:`ZERO_TOL`); for GRPO it must equal ``P(all G rewards equal) = sum_x rho(x) sum_r
  P(RM = r | x)^G`` (``p_all_equal``, computed in closed form for every ``G``);
* ``mean_grad_norm`` ``E|g|`` and ``mean_sq_grad_norm`` ``E|g|^2``: how much signal a batch carries;
* ``frac_nonzero_given_grpo_zero``: on the batches where GRPO's gradient is zero, the
  probability that this method's gradient is not;
* ``uphill_given_grpo_zero``: on those same batches, whether the signal climbs ``J``: the expected
  projection of the batch gradient on the true gradient, ``E[<g, grad J> | GRPO zero] / |grad J|^2``
  (positive: the expected step goes uphill; 1: as much ascent as an average batch of an unbiased
  method, whose ``E <g, grad J> = |grad J|^2``), with ``frac_uphill_given_grpo_zero`` (the
  probability that one such batch points uphill) and ``uphill_share_grpo_zero`` (the part of
  ``|grad J|^2`` those batches contribute).

``source = exact``: every ordered ``G``-tuple of responses of each prompt is enumerated with its
probability (when there are at most :data:`EXACT_MAX_ROWS` responses in all); TRePO's
continuation values are then their expectation ``V'`` (the ``K -> infinity`` limit).
``source = mc``: ``samples`` sampled groups, every method on the same groups, TRePO with ``K``
sampled continuations per prefix (so a TRePO batch can be zero too, when every continuation
scores 0); standard errors are binomial (fractions) or ``sd / sqrt(N)`` (norms).

Measured run time (``run_study(..., n_jobs=2)``, 2 cores shared with other work, load ~3-4):
quick ~2 s, full ~7 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ...estimators import get_estimator
from ...verify.context import ExactContext
from ...verify.exact_moments import leaf_rollouts
from . import claim_row, single_thread
from .variance import batch_gradients, load_problem, mc_context, sample_groups

NAME = "zero_groups"
TITLE = "Groups with all-equal rewards: GRPO's zero gradients against the per-step signal of PPO and TRePO"
FIGURES = ["zero_groups"]

#: A batch gradient with a smaller norm counts as zero.
ZERO_TOL = 1e-10
#: Largest enumerated sample space (responses).
EXACT_MAX_ROWS = 300_000
#: The methods: the group method, then the per-step ones.
GROUP_METHOD = "grpo"
PER_STEP = ("ppo_gae", "trepo")

COLUMNS: dict[str, str] = {
    "method": "grpo (std-normalised, as trained), ppo_gae (exact critic, lambda 0.95) or trepo (K continuations)",
    "spec": "canonical estimator spec",
    "source": "exact (all G-tuples enumerated; TRePO with exact continuation values, K -> infinity) or mc",
    "batches": "batches enumerated (exact) or sampled (mc)",
    "p_all_equal": "P(the G rewards of a group are all equal), closed form sum_x rho(x) sum_r P(RM=r|x)^G",
    "frac_zero_grad": "P(the batch gradient is zero, norm < 1e-10)",
    "frac_zero_grad_se": "standard error of frac_zero_grad (0 when exact)",
    "mean_grad_norm": "E|g|, the expected norm of a batch gradient (parameter units)",
    "mean_grad_norm_se": "standard error of mean_grad_norm (0 when exact)",
    "mean_sq_grad_norm": "E|g|^2 (squared parameter units)",
    "frac_nonzero_given_grpo_zero": "P(this method's gradient is non-zero | GRPO's gradient on the same group is "
                                    "zero); NaN when GRPO is never zero",
    "frac_nonzero_given_grpo_zero_se": "standard error of frac_nonzero_given_grpo_zero (0 when exact)",
    "uphill_given_grpo_zero": "E[<g, grad J> | GRPO's gradient on the same group is zero] / |grad J|^2: the "
                              "signal's expected ascent (> 0 uphill; 1 = an average unbiased batch's); NaN when "
                              "GRPO is never zero",
    "uphill_given_grpo_zero_se": "standard error of uphill_given_grpo_zero (0 when exact)",
    "frac_uphill_given_grpo_zero": "P(<g, grad J> > 0 and g non-zero | GRPO zero): one such batch points uphill",
    "uphill_share_grpo_zero": "E[<g, grad J>; GRPO zero] / |grad J|^2: the part of |grad J|^2 the groups where "
                              "GRPO has no gradient contribute",
    "grpo_zero_batches": "batches on which GRPO's gradient is zero (count; mc), or their probability (exact)",
    "grad_j_norm": "|grad J| (parameter units)",
}


@dataclass(frozen=True)
class Cell:
    """``mdp`` (a ``--mdp`` spec of the ``sparse`` or ``first_token`` family, seeded tabular
    policy), ``group_size`` ``G``, ``K`` (TRePO's continuations per prefix), ``samples`` (Monte
    Carlo groups), ``seed``."""

    mdp: str
    group_size: int
    K: int = 2
    samples: int = 4000
    seed: int = 0
    schema: int = 2  # run_cell's output schema, part of the cache key: schema 1 had no uphill columns


QUICK_MDPS = ("first_token:vocab=3,horizon=2,prompts=2,seed=0",
              "sparse:vocab=2,horizon=3,prompts=2,p=0.15,seed=1")
# the last has a prompt whose rewards are all 0: no method gets a signal there
FULL_MDPS = QUICK_MDPS + ("sparse:vocab=3,horizon=3,prompts=2,p=0.1,seed=1",)


def cells(quick: bool) -> list[Cell]:
    if quick:
        return [Cell(m, G, K=2, samples=2000) for m in QUICK_MDPS for G in (2, 4)]
    return [Cell(m, G, K=K, samples=8000) for m in FULL_MDPS for G in (2, 4, 8) for K in (1, 4)]


def specs(K: int) -> list[str]:
    return [GROUP_METHOD, "ppo_gae:critic=exact,lambda=0.95", f"trepo:K={K}"]


# ------------------------------------------------------------------------------ pieces
def p_all_equal(prob, G: int) -> float:
    """``sum_x rho(x) sum_r P(RM = r | x)^G``: the probability that a group's rewards are all equal."""
    tree = prob.mdp.tree
    leaf_prompt = tree.prompt_n[tree.leaf_ids]
    total = 0.0
    for x in range(tree.num_prompts):
        rho = float(prob.mdp.prompt_weights[x])
        if rho <= 0:
            continue
        m = leaf_prompt == x
        rm, q = prob.sol.response_rm[m], prob.sol.response_prob[m] / rho
        for r in torch.unique(rm):
            total += rho * float(q[rm == r].sum()) ** G
    return total


def enumerate_groups(prob, G: int):
    """Every ordered ``G``-tuple of responses of each prompt: ``(rollouts, batch id [n G], probability [n])``."""
    tree = prob.mdp.tree
    leaf_prompt = tree.prompt_n[tree.leaf_ids]
    rows, probs = [], []
    for x in range(tree.num_prompts):
        rho = prob.mdp.prompt_weights[x]
        if float(rho) <= 0:
            continue
        idx = torch.nonzero(leaf_prompt == x).flatten()
        L = idx.numel()
        nums = torch.arange(L ** G)
        digits = torch.stack([(nums // L ** (G - 1 - i)) % L for i in range(G)], 1)  # [L^G, G]
        rows.append(idx[digits])
        probs.append(rho * (prob.sol.response_prob[idx] / rho)[digits].prod(1))
    rows_ng = torch.cat(rows)
    n = rows_ng.shape[0]
    batch_b = torch.arange(n).repeat_interleave(G)
    ro = leaf_rollouts(prob.mdp, prob.sol).index(rows_ng.reshape(-1))
    ro.group = batch_b.clone()
    return ro, batch_b, torch.cat(probs)


def exact_size(prob, G: int) -> int:
    """Responses in the enumerated space: ``G sum_x L_x^G``."""
    tree = prob.mdp.tree
    counts = torch.bincount(tree.prompt_n[tree.leaf_ids], minlength=tree.num_prompts).tolist()
    return G * sum(int(L) ** G for L, w in zip(counts, prob.mdp.prompt_weights.tolist()) if w > 0)


def _summaries(norms: dict, ascents: dict, grpo_zero: torch.Tensor, p: torch.Tensor | None) -> dict:
    """Per method: the zero fraction, ``E|g|``, ``E|g|^2``, the conditional non-zero fraction and the
    conditional ascent ``E[<g, grad J> | GRPO zero] / |grad J|^2`` (probability-weighted when ``p`` is
    given, else sample means with standard errors). ``ascents[name]`` is ``<g_i, grad J> / |grad J|^2``
    per batch."""
    out = {}
    N = grpo_zero.numel()
    w = p if p is not None else torch.full((N,), 1.0 / N, dtype=torch.float64)
    zmass = float(w[grpo_zero].sum())
    n_z = int(grpo_zero.sum())
    for name, nrm in norms.items():
        zero = nrm < ZERO_TOL
        asc = ascents[name]
        fz = float(w[zero].sum())
        mean_norm = float((w * nrm).sum())
        cond = float(w[grpo_zero & ~zero].sum()) / zmass if zmass > 0 else math.nan
        up = float((w * asc)[grpo_zero].sum()) / zmass if zmass > 0 else math.nan
        frac_up = float(w[grpo_zero & ~zero & (asc > 0)].sum()) / zmass if zmass > 0 else math.nan
        if p is None:
            se = (math.sqrt(fz * (1 - fz) / N), float(nrm.std()) / math.sqrt(N),
                  math.sqrt(cond * (1 - cond) / n_z) if n_z > 0 else math.nan,
                  float(asc[grpo_zero].std()) / math.sqrt(n_z) if n_z > 1 else math.nan)
        else:
            se = (0.0, 0.0, 0.0 if zmass > 0 else math.nan, 0.0 if zmass > 0 else math.nan)
        out[name] = {"frac_zero_grad": fz, "frac_zero_grad_se": se[0], "mean_grad_norm": mean_norm,
                     "mean_grad_norm_se": se[1], "mean_sq_grad_norm": float((w * nrm * nrm).sum()),
                     "frac_nonzero_given_grpo_zero": cond, "frac_nonzero_given_grpo_zero_se": se[2],
                     "uphill_given_grpo_zero": up, "uphill_given_grpo_zero_se": se[3],
                     "frac_uphill_given_grpo_zero": frac_up, "uphill_share_grpo_zero": up * zmass,
                     "grpo_zero_batches": float(grpo_zero.sum()) if p is None else zmass}
    return out


def _signals(prob, ests, ro, batch_b, n, make_ctx) -> tuple[dict, dict]:
    """Per estimator: the norm of every batch gradient, and its ascent ``<g_i, grad J> / |grad J|^2``
    (NaN when ``grad J = 0``)."""
    grad_j = prob.grad_j
    gn2 = float(grad_j @ grad_j)
    norms, ascents = {}, {}
    for i, e in enumerate(ests):
        g = batch_gradients(prob, e, ro, batch_b, n, make_ctx(i))[0]
        norms[e.name] = g.norm(dim=1)
        ascents[e.name] = g @ grad_j / gn2 if gn2 > 0 else torch.full((n,), math.nan, dtype=torch.float64)
    return norms, ascents


def run_cell(cell: Cell) -> pd.DataFrame:
    """The cell's rows (columns: :data:`COLUMNS`), on one torch thread (the runner parallelises over cells)."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    prob = load_problem(cell.mdp)
    ests = [get_estimator(s) for s in specs(cell.K)]
    G = cell.group_size
    base = {"p_all_equal": p_all_equal(prob, G), "grad_j_norm": float(prob.grad_j.norm())}
    results = []
    if exact_size(prob, G) <= EXACT_MAX_ROWS:
        ro, batch_b, p = enumerate_groups(prob, G)
        ctx = ExactContext(prob.mdp, prob.policy, seed=cell.seed, sol=prob.sol)
        norms, ascents = _signals(prob, ests, ro, batch_b, p.numel(), lambda i: ctx)
        results.append(("exact", p.numel(), _summaries(norms, ascents, norms[GROUP_METHOD] < ZERO_TOL, p)))
    ro, batch_b = sample_groups(prob, cell.samples, G, cell.seed)
    norms, ascents = _signals(prob, ests, ro, batch_b, cell.samples, lambda i: mc_context(prob, cell.seed + 1 + i))
    results.append(("mc", cell.samples, _summaries(norms, ascents, norms[GROUP_METHOD] < ZERO_TOL, None)))
    rows = [{"method": e.name, "spec": e.spec, "source": src, "batches": n, **base, **summ[e.name]}
            for src, n, summ in results for e in ests]
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ------------------------------------------------------------------------------ the claim
CLAIM = ("claim5", "A group whose rewards are all equal (all 0) gives GRPO a zero gradient, while a per-step "
         "(PPO or TRePO) advantage can still be non-zero, and that signal climbs J")
#: an exact ascent at most this is rounding, not a direction
ASCENT_TOL = 1e-12
RULE = ("premise: in every cell GRPO's zero-gradient probability equals P(all G rewards equal) > 0 (exact, within "
        "1e-9). On the groups where GRPO's gradient is zero, for each per-step method (PPO with the exact critic; "
        "TRePO with K sampled continuations): a signal is P(non-zero gradient) above 3 standard errors, and it "
        "points uphill when m = E[<g, grad J> | GRPO zero] / |grad J|^2 exceeds max(1e-12, 3 standard errors) "
        "(its expected step climbs J; 1 = an average unbiased batch's ascent). Confirmed if the premise holds and "
        "in every cell every per-step method has a signal that points uphill; refuted if the premise fails or no "
        "per-step method has an uphill signal in any cell; qualified otherwise. Number: the smallest m over cells "
        "and per-step methods")


def _per_cell(df: pd.DataFrame):
    for key, c in df.groupby("cell_key" if "cell_key" in df.columns else ["mdp", "group_size", "K"], sort=False):
        yield key, c


def claim5_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, per-step method) with GRPO-zero groups: ``p_all_equal``, ``nonzero`` (+ ``_se``),
    ``uphill`` (+ ``_se``), ``share``, ``source`` (TRePO's finite-K signal is the algorithm's: always its
    sampled rows; PPO's exact rows when enumerated); ``premise`` says whether GRPO's exact zero
    probability matches the closed form in that cell."""
    rows = []
    for key, c in _per_cell(df):
        p_eq = float(c["p_all_equal"].iloc[0])
        g = c[(c["method"] == GROUP_METHOD) & (c["source"] == "exact")]
        premise = p_eq > 0 and not (len(g) and abs(float(g["frac_zero_grad"].iloc[0]) - p_eq) > 1e-9)
        if not p_eq > 0:
            rows.append({"cell": key, "method": "", "premise": premise, "p_all_equal": p_eq})
            continue
        for m in PER_STEP:
            src = "mc" if m == "trepo" or not len(c[(c["method"] == m) & (c["source"] == "exact")]) else "exact"
            r = c[(c["method"] == m) & (c["source"] == src)]
            if not len(r) or math.isnan(float(r["frac_nonzero_given_grpo_zero"].iloc[0])):
                continue
            r = r.iloc[0]
            exact = src == "exact"
            rows.append({"cell": key, "method": m, "premise": premise, "p_all_equal": p_eq, "source": src,
                         "nonzero": float(r["frac_nonzero_given_grpo_zero"]),
                         "nonzero_se": 0.0 if exact else float(r["frac_nonzero_given_grpo_zero_se"]),
                         "uphill": float(r["uphill_given_grpo_zero"]),
                         "uphill_se": 0.0 if exact else float(r["uphill_given_grpo_zero_se"]),
                         "share": float(r["uphill_share_grpo_zero"])})
    return pd.DataFrame(rows)


def claim_rows(df: pd.DataFrame) -> list[dict]:
    if df is None or len(df) == 0:
        return []
    if "uphill_given_grpo_zero" not in df.columns:  # cached before schema 2: the report lists claim 5 as not run
        return []
    t = claim5_table(df)
    if t.empty:
        return []
    premise_ok = bool(t["premise"].all())
    sig = t[t["method"] != ""].copy()
    if sig.empty:
        return []
    sig["has_signal"] = (sig["nonzero"] > 0) & (sig["nonzero"] > 3 * sig["nonzero_se"].fillna(np.inf))
    sig["goes_up"] = sig["uphill"] > np.maximum(ASCENT_TOL, 3 * sig["uphill_se"].fillna(np.inf))
    ok = sig["has_signal"] & sig["goes_up"]
    if not premise_ok or not bool(ok.any()):
        status = "refuted"
    elif bool(ok.all()):
        status = "confirmed"
    else:
        status = "qualified"
    worst = sig.loc[sig["uphill"].fillna(-np.inf).idxmin()]
    per = "; ".join(f"{m}: P(non-zero | GRPO zero) >= {float(s['nonzero'].min()):.3g}, ascent "
                    f"{float(s['uphill'].min()):.3g}..{float(s['uphill'].max()):.3g}, share of |grad J|^2 "
                    f"{float(s['share'].min()):.3g}..{float(s['share'].max()):.3g}"
                    for m, s in sig.groupby("method", sort=False))
    downhill = int((sig["uphill"] < -3 * sig["uphill_se"]).sum())
    detail = (f"P(GRPO group all equal) {float(t['p_all_equal'].min()):.3g}..{float(t['p_all_equal'].max()):.3g} "
              f"over {t['cell'].nunique()} cells; {int(ok.sum())} of {len(sig)} (cell, method) pairs have an uphill "
              f"signal, {downhill} point downhill; {per}")
    se = float(worst["uphill_se"]) if worst["source"] == "mc" else None
    return [claim_row(CLAIM[0], CLAIM[1], status, float(worst["uphill"]), se,
                      "E[<g, grad J> | GRPO zero] / |grad J|^2, smallest over cells and per-step methods",
                      "figures/zero_groups.png", RULE, detail)]


__all__ = ["NAME", "TITLE", "COLUMNS", "FIGURES", "Cell", "cells", "run_cell", "claim_rows"]
