"""Centering and std division (the paper's claims 3 and 4), on one batch: one prompt ``x ~ rho``
and ``G`` responses, aggregated ``seq-mean-token-sum`` (``g = (1/G) sum_i A_i sum_t grad log pi``).

Claim 3, "centering by subtracting the mean does not reduce variance". Compared like with like:
REINFORCE on the same ``G`` responses (``A_i = R_i``), RLOO (``A_i = R_i - mean_{j != i} R_j``) and
GRPO mean-only / Dr. GRPO (``A_i = R_i - mean_j R_j``, expectation ``(1 - 1/G) grad J``), each
divided by its scale so that every one has expectation ``grad J``:

    trace_equal_scale = tr Cov[g] / c^2,   c = 1 (REINFORCE, RLOO), 1 - 1/G (mean-only),

and ``var_ratio = trace_equal_scale / tr Cov[g_REINFORCE]`` (below 1: centering reduces the
variance). RLOO is the mean-only estimator times ``G / (G - 1)``, so their ratios coincide (a check).

Claim 4, "dividing by the std acts like a smaller learning rate". GRPO's std-normalised
``A_i = (R_i - mean) / (std + eps)``: a pure learning-rate change would keep ``E[g]`` parallel to
``grad J`` (cosine 1) and only rescale it. The cell reports the cosine of ``E[g]`` with ``grad J``,
its best-fit scale ``c`` and ``lr_multiplier = c / (1 - 1/G)``, the step size relative to the
mean-only form (below 1: a smaller learning rate; above 1: a larger one).

``source = exact``: :func:`tpg.verify.exact_moments` over every ``G``-tuple (REINFORCE through a
group-layout copy, so that its ``G`` responses share the prompt as the others' do). ``source =
mc``: ``samples`` sampled groups with every estimator on the same groups; ``var_ratio``'s standard
error is the delta method's on the paired per-batch terms.

Measured run time (``run_study(..., n_jobs=2)``, 2 cores shared with other work, load ~3-4):
quick ~2 s, full ~17 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ...estimators import get_estimator
from ...estimators.reinforce import Reinforce
from ...verify.exact_moments import exact_moments
from . import claim_row, single_thread
from .variance import (batch_gradients, geometry, load_problem, mc_context, ratio_with_se, sample_groups,
                       trace_terms)

NAME = "centering"
TITLE = "Does centering reduce variance (claim 3); what does the std division do to direction and scale (claim 4)"
FIGURES = ["centering"]

METHODS = ("reinforce", "rloo", "dr_grpo", "grpo")

COLUMNS: dict[str, str] = {
    "method": "reinforce (on the group's G responses), rloo, dr_grpo (GRPO mean-only), grpo (std-normalised)",
    "spec": "canonical estimator spec (seq-mean-token-sum aggregation throughout)",
    "source": "exact (every G-tuple enumerated) or mc (sampled groups)",
    "variance_trace": "tr Cov[g] of one batch's gradient (squared parameter units)",
    "variance_trace_se": "standard error of variance_trace (0 when exact)",
    "scale": "best-fit c in E[g] ~ c grad J",
    "nominal_scale": "the scale divided out: 1 (reinforce, rloo), 1 - 1/G (dr_grpo), the best-fit c (grpo)",
    "trace_equal_scale": "variance_trace / nominal_scale^2: the variance at expectation grad J",
    "var_ratio": "trace_equal_scale / REINFORCE's variance_trace on the same batches (< 1: centering helps)",
    "var_ratio_se": "standard error of var_ratio (0 when exact)",
    "cosine": "cosine between E[g] and grad J",
    "rel_bias": "|E[g] - grad J| / |grad J|",
    "lr_multiplier": "scale / (1 - 1/G): the step relative to GRPO mean-only (grpo); scale / nominal (others)",
    "grad_j_norm": "|grad J| (parameter units); settings with |grad J| < 1e-8 are left out of the claims",
}


@dataclass(frozen=True)
class Cell:
    """``mdp`` (a ``--mdp`` spec, seeded tabular policy), ``group_size`` ``G``, ``mode`` (``exact``
    or ``mc``), ``samples`` (Monte Carlo groups), ``seed``."""

    mdp: str
    group_size: int
    mode: str = "exact"
    samples: int = 20000
    seed: int = 0


class GroupReinforce(Reinforce):
    """REINFORCE (``A_i = R_i``) drawn like a group method: ``G`` responses to one prompt per batch,
    so its variance is comparable with RLOO's and GRPO's on the same batch."""

    needs_groups = True


# seeds chosen so that grad J is not 0 (first_token seeds 3, 4, 6 give every response of a prompt one reward)
QUICK_MDPS = tuple(f"{fam}:vocab=2,horizon=3,prompts=2,seed={s}"
                   for fam, s in (("dense", 0), ("terminal", 1), ("sparse", 2), ("first_token", 9), ("length", 4)))
# a second seed of every family, then three-token vocabularies with EOS (variable lengths)
SECOND_SEEDS = tuple(f"{fam}:vocab=2,horizon=3,prompts=2,weights=random,seed={s}"
                     for fam, s in (("dense", 20), ("terminal", 21), ("sparse", 22), ("first_token", 11),
                                    ("length", 24)))
FULL_MDPS = QUICK_MDPS + SECOND_SEEDS + tuple(f"{fam}:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed={10 + s}"
                               for s, fam in enumerate(("dense", "terminal", "sparse", "length")))


def cells(quick: bool) -> list[Cell]:
    if quick:
        return [Cell(m, G) for m in QUICK_MDPS for G in (2, 4)]
    exact = [Cell(m, G) for m in FULL_MDPS for G in (2, 3, 4)]
    return exact + [Cell(m, G, mode="mc", samples=20000) for m in QUICK_MDPS for G in (8, 16)]


def estimators() -> dict:
    return {"reinforce": GroupReinforce(), "rloo": get_estimator("rloo"), "dr_grpo": get_estimator("dr_grpo"),
            "grpo": get_estimator("grpo")}


def run_cell(cell: Cell) -> pd.DataFrame:
    """The cell's rows (columns: :data:`COLUMNS`), on one torch thread (the runner parallelises over cells)."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    if cell.mode not in ("exact", "mc"):
        raise ValueError(f"centering: mode must be exact or mc, got {cell.mode!r}")
    prob = load_problem(cell.mdp)
    G = cell.group_size
    grad_j = prob.grad_j
    ests = estimators()
    stats = {}
    if cell.mode == "exact":
        for name, est in ests.items():
            mom = exact_moments(prob.mdp, prob.policy, est, G, with_cov=False, param_map=prob.pmap)
            stats[name] = (mom.mean, mom.variance_trace, 0.0, None)
    else:
        ro, batch_b = sample_groups(prob, cell.samples, G, cell.seed)
        for i, (name, est) in enumerate(ests.items()):
            g, _ = batch_gradients(prob, est, ro, batch_b, cell.samples, mc_context(prob, cell.seed + 1 + i))
            q = trace_terms(g)
            stats[name] = (g.mean(0), float(q.mean()), float(q.std()) / math.sqrt(q.numel()), q)
    ref_trace, ref_q = stats["reinforce"][1], stats["reinforce"][3]
    gn = float(grad_j.norm())
    rows = []
    for name, est in ests.items():
        mean, trace, se, q = stats[name]
        cos, scale, bias_sq = geometry(mean, grad_j)
        nominal = {"reinforce": 1.0, "rloo": 1.0, "dr_grpo": 1.0 - 1.0 / G, "grpo": scale}[name]
        if q is None:
            ratio, ratio_se = trace / nominal**2 / ref_trace, 0.0
        else:
            ratio, ratio_se = ratio_with_se(q / nominal**2, ref_q)
        rows.append({"method": name, "spec": est.spec, "source": cell.mode, "variance_trace": trace,
                     "variance_trace_se": se, "scale": scale, "nominal_scale": nominal,
                     "trace_equal_scale": trace / nominal**2, "var_ratio": ratio, "var_ratio_se": ratio_se,
                     "cosine": cos, "rel_bias": math.sqrt(bias_sq) / gn,
                     "lr_multiplier": scale / (1.0 - 1.0 / G) if name == "grpo" else scale / nominal,
                     "grad_j_norm": gn})
    return pd.DataFrame(rows, columns=list(COLUMNS))


# ------------------------------------------------------------------------------ the claims
#: A relative variance change smaller than this counts as none in exact cells (rounding).
EXACT_TOL = 1e-9
#: Direction "changes measurably" below this cosine.
COS_TOL = 1e-6
#: Below this cosine the std division is not a step-size change at all.
COS_REFUTE = 0.9

CLAIM3 = ("claim3", "Centering by subtracting the group mean does not reduce variance")
RULE3 = ("per setting (MDP, G), var_ratio = tr Cov of RLOO (= GRPO mean-only at equal scale) / tr Cov of "
         "REINFORCE on the same G responses; a setting shows a reduction when var_ratio < 1 by more than "
         "max(1e-9, 3 SE). Refuted if more than half of the settings show a reduction, confirmed if none does, "
         "qualified otherwise. Number: the median var_ratio")
CLAIM4 = ("claim4", "Dividing by the group std acts like a smaller learning rate")
RULE4 = ("from GRPO's exact E[g] per setting: a learning-rate change keeps the direction (cosine with grad J "
         "> 1 - 1e-6). Confirmed if it does in every setting; qualified if the direction changes measurably "
         "somewhere (cosine < 1 - 1e-6) while the median cosine stays >= 0.9 (a rescaling plus a tilt); refuted "
         "if the median cosine is below 0.9. The step's size (lr_multiplier = scale / (1 - 1/G)) is reported, "
         "not ruled on: the std division makes the advantage unit-free, so whether the step shrinks or grows "
         "depends on the rewards' units. Number: the smallest cosine")


#: Settings whose |grad J| is below this have no direction to compare with.
MIN_GRAD = 1e-8


def _settings(df: pd.DataFrame):
    key = "cell_key" if "cell_key" in df.columns else ["mdp", "group_size", "mode"]
    return [c for _, c in df.groupby(key, sort=False) if float(c["grad_j_norm"].iloc[0]) >= MIN_GRAD]


def _row(c: pd.DataFrame, method: str):
    r = c[c["method"] == method]
    return None if not len(r) else r.iloc[0]


def claim3_row(df: pd.DataFrame) -> dict | None:
    ratios = []
    for c in _settings(df):
        r = _row(c, "rloo")
        if r is not None and math.isfinite(float(r["var_ratio"])):
            ratios.append((float(r["var_ratio"]), float(r["var_ratio_se"]), r["source"]))
    if not ratios:
        return None
    reduces = [v < 1 - max(EXACT_TOL, 3 * se) for v, se, _ in ratios]
    n_red = sum(reduces)
    status = "refuted" if n_red > len(ratios) / 2 else ("confirmed" if n_red == 0 else "qualified")
    vals = [v for v, _, _ in ratios]
    mc_se = [se for _, se, src in ratios if src == "mc"]
    n_inc = sum(v > 1 + max(EXACT_TOL, 3 * se) for v, se, _ in ratios)
    detail = (f"{n_red} of {len(ratios)} settings show a reduction, {n_inc} an increase; var_ratio "
              f"{min(vals):.3g}..{max(vals):.3g}")
    return claim_row(CLAIM3[0], CLAIM3[1], status, float(pd.Series(vals).median()),
                     float(pd.Series(mc_se).median()) if mc_se else None,
                     "variance ratio (centred / uncentred, equal scale)", "figures/centering.png", RULE3, detail)


def claim4_row(df: pd.DataFrame) -> dict | None:
    cosines, mults = [], []
    for c in _settings(df):
        r = _row(c, "grpo")
        if r is not None and r["source"] == "exact" and math.isfinite(float(r["cosine"])):
            cosines.append(float(r["cosine"]))
            mults.append(float(r["lr_multiplier"]))
    if not cosines:
        return None
    if float(pd.Series(cosines).median()) < COS_REFUTE:
        status = "refuted"
    elif all(cos > 1 - COS_TOL for cos in cosines):
        status = "confirmed"
    else:
        status = "qualified"
    detail = (f"cosine median {float(pd.Series(cosines).median()):.4g} over {len(cosines)} settings; step size "
              f"relative to mean-only (lr_multiplier) {min(mults):.3g}..{max(mults):.3g}, smaller in "
              f"{sum(m < 1 for m in mults)} of {len(mults)}")
    return claim_row(CLAIM4[0], CLAIM4[1], status, min(cosines), None, "cosine(E[g_GRPO], grad J)",
                     "figures/centering.png", RULE4, detail)


def claim_rows(df: pd.DataFrame) -> list[dict]:
    if df is None or len(df) == 0:
        return []
    return [r for r in (claim3_row(df), claim4_row(df)) if r is not None]


__all__ = ["NAME", "TITLE", "COLUMNS", "FIGURES", "Cell", "cells", "run_cell", "claim_rows", "GroupReinforce"]
