"""Eq. 26: PPO/GAE with ``gamma < 1`` on zero-reward-assumption rewards, bias against ``gamma``.

Under ZRA the reward model reports ``RM(W)`` on the last token, undiscounted (the MDP's own
``gamma`` is 1, so ``J = E RM``). GAE run with a discount ``gamma`` on those rewards has returns
``G_t = gamma^(T-t) RM(W)``, and its expected update (first on-policy step, ``lambda = 1``) is

    E[g](gamma) = E_W sum_t gamma^(T-t) RM(W) grad log pi(w_t | s_t),

which equals ``grad J`` at ``gamma = 1`` (Theorem 1) and not otherwise. For each ZRA MDP
(``terminal`` and ``first_token`` rewards, and the zero-reward twins of ``dense`` and ``sparse``
rewards, which keep ``RM``) and each GAE discount of :data:`GAMMAS`, the study computes the relative
bias ``|E g - grad J| / |grad J|`` twice, independently:

* ``method = "eq26"``: the closed form above by enumeration
  (:func:`tpg.proofs_checks.eq26_gamma.mismatch_bias`);
* ``method = "ppo_gae"`` with ``lambda = 1`` and ``0.95``: the verifier's exact mode on
  ``ppo_gae:gamma=g,lambda=l,critic=exact`` (the critic is the exact discounted ZRA value).

The two ``lambda = 1`` numbers must agree (column ``agreement``); at ``gamma = 1`` both vanish.

Measured on 2 CPU cores shared with other work (``n_jobs = 2``, ``tpg study gamma``):
quick (4 cells) about 1 s; full (32 cells) about 4 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import BIAS_TOL, EXACT_TOL, claim_row, single_thread, solved_cell

NAME = "gamma"
TITLE = "bias of GAE with gamma < 1 on zero-reward-assumption rewards (Eq. 26)"
FIGURES = ["gamma_bias"]

GAMMAS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
LAMBDAS: tuple[float, ...] = (1.0, 0.95)
FAMILIES = ("terminal", "first_token", "dense", "sparse")

COLUMNS: dict[str, str] = {
    "method": "eq26 (closed form by enumeration) or ppo_gae (the verifier on the PPO/GAE estimator)",
    "gae_gamma": "the discount GAE uses on the ZRA rewards (dimensionless)",
    "gae_lambda": "GAE lambda (dimensionless; 1 for eq26)",
    "rel_bias": "|E g - grad J| / |grad J| (dimensionless)",
    "cosine": "cosine between E g and grad J (dimensionless; NaN for eq26)",
    "scale": "best-fit scale <E g, grad J> / |grad J|^2 (dimensionless; NaN for eq26)",
    "verdict": "exact verdict of ppo_gae (unbiased | scaled | biased); empty for eq26",
    "agreement": "|rel_bias(ppo_gae, lambda=1) - rel_bias(eq26)| at the same gamma (dimensionless; NaN otherwise)",
    "grad_norm": "|grad J| (reward units per logit)",
}


@dataclass(frozen=True)
class Cell:
    """One ZRA MDP (its twin for dense/sparse rewards) with a seeded tabular policy; all discounts."""

    family: str = "terminal"
    vocab: int = 3
    horizon: int = 4
    eos: str = "none"
    prompts: int = 2
    seed: int = 0
    gammas: tuple[float, ...] = GAMMAS
    lambdas: tuple[float, ...] = LAMBDAS

    def mdp_spec(self) -> str:
        twin = ",twin=true" if self.family in ("dense", "sparse", "length") else ""
        return (f"{self.family}:vocab={self.vocab},horizon={self.horizon},eos={self.eos},prompts={self.prompts},"
                f"weights=random,gamma=1,seed={self.seed}{twin}")


def cells(quick: bool = False) -> list[Cell]:
    """quick: terminal and dense-twin rewards, EOS or not, H = 3 (4 cells); full: four families,
    EOS or not, H = 3 and 4, seeds 0 and 1 (32 cells)."""
    if quick:
        return [Cell(family=f, eos=e, horizon=3) for f in ("terminal", "dense") for e in ("none", "0")]
    return [Cell(family=f, eos=e, horizon=h, seed=s) for f in FAMILIES for e in ("none", "0") for h in (3, 4)
            for s in (0, 1)]



def run_cell(cell: Cell) -> pd.DataFrame:
    """Rows per (method, gamma, lambda); see :data:`COLUMNS`."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    """Rows per (method, gamma, lambda); see :data:`COLUMNS`."""
    from tpg.proofs_checks.eq26_gamma import mismatch_bias
    from tpg.verify import verify

    mdp, policy, sol = solved_cell(cell)
    grad_norm = float(sol.flat_grad().norm())
    rows = []
    closed = {}
    for g in cell.gammas:
        closed[g] = float(mismatch_bias(mdp, policy, g))
        rows.append({"method": "eq26", "gae_gamma": g, "gae_lambda": 1.0, "rel_bias": closed[g],
                     "cosine": np.nan, "scale": np.nan, "verdict": "", "agreement": np.nan})
    specs = [(g, lam, f"ppo_gae:gamma={g:g},lambda={lam:g},critic=exact") for g in cell.gammas for lam in cell.lambdas]
    records = verify(mdp, policy, [s for _, _, s in specs], mode="exact", seed=cell.seed)
    for (g, lam, _), rec in zip(specs, records):
        rb = np.nan if rec["rel_bias"] is None else float(rec["rel_bias"])
        rows.append({"method": "ppo_gae", "gae_gamma": g, "gae_lambda": lam, "rel_bias": rb,
                     "cosine": rec["cosine"], "scale": rec["scale"], "verdict": rec["verdict"],
                     "agreement": abs(rb - closed[g]) if lam == 1.0 else np.nan})
    df = pd.DataFrame(rows)
    df["grad_norm"] = grad_norm
    for c in ("rel_bias", "cosine", "scale", "agreement"):
        df[c] = df[c].astype(float)
    return df


#: the discount whose bias is eq26's headline number (a common PPO setting)
HEADLINE_GAMMA = 0.9

RULE = (f"confirmed if the relative bias is <= {EXACT_TOL:g} at gamma = 1 in every cell and > {BIAS_TOL:g} at "
        f"every gamma < 1; qualified if some gamma < 1 cell is unbiased; refuted if gamma = 1 is biased. Number: the "
        f"median over cells of the relative bias of PPO/GAE (lambda = 1) at gamma = {HEADLINE_GAMMA:g}; the slope "
        f"k of bias ~ k (1 - gamma) near gamma = 1 is reported beside it")


def _cell_key(df: pd.DataFrame):
    return "cell_key" if "cell_key" in df.columns else [c for c in ("family", "eos", "horizon", "seed") if c in df]


def bias_table(df: pd.DataFrame) -> pd.DataFrame:
    """PPO/GAE's (``lambda = 1``) relative bias per cell (rows) and discount (columns), cells whose
    ``|grad J|`` is not 0 only."""
    d = df[(df["method"] == "ppo_gae") & (df["gae_lambda"] == 1.0) & (df["grad_norm"] > 1e-12)]
    if d.empty:
        return pd.DataFrame()
    return d.pivot_table(index=_cell_key(d), columns="gae_gamma", values="rel_bias", aggfunc="first")


def slope_near_one(table: pd.DataFrame, rank: int = 0) -> tuple[float, pd.Series]:
    """``(gamma, k)``: the slope ``k = bias(gamma) / (1 - gamma)`` per cell at the ``rank``-th largest
    discount below 1 of :func:`bias_table`, i.e. the secant from ``gamma = 1``, where the bias is 0
    (Theorem 1), to ``gamma``: near 1, ``bias ~ k (1 - gamma)``."""
    below = sorted((g for g in table.columns if g < 1.0), reverse=True)
    if len(below) <= rank:
        return float("nan"), pd.Series(dtype=float)
    g = float(below[rank])
    return g, table[g] / (1.0 - g)


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """eq26: biased for every gamma < 1, unbiased at gamma = 1 (PPO/GAE, lambda = 1 and 0.95); the
    headline is the bias at gamma = 0.9, with its slope against 1 - gamma near 1."""
    if df is None or df.empty:
        return []
    d = df[(df["method"] == "ppo_gae") & (df["grad_norm"] > 1e-12)]
    if d.empty:
        return []
    at1 = d[d["gae_gamma"] == 1.0]["rel_bias"].fillna(np.inf)
    below = d[d["gae_gamma"] < 1.0]["rel_bias"].fillna(np.inf)
    max1 = float(at1.max()) if len(at1) else float("nan")
    min_below = float(below.min()) if len(below) else float("nan")
    agree = df.loc[df["method"] == "ppo_gae", "agreement"].dropna()
    max_agree = float(agree.max()) if len(agree) else float("nan")
    if not max1 <= EXACT_TOL:
        status = "refuted"
    elif len(below) and min_below > BIAS_TOL:
        status = "confirmed"
    else:
        status = "qualified"
    table = bias_table(df)
    lt1 = [g for g in table.columns if g < 1.0]
    if not lt1:
        number, g_head, spread = float("nan"), HEADLINE_GAMMA, ""
    else:
        g_head = float(min(lt1, key=lambda g: (abs(g - HEADLINE_GAMMA), -g)))
        col = table[g_head].fillna(np.inf)
        number = float(col.median())
        spread = f"gamma={g_head:g}: relative bias {float(col.min()):.3g}..{float(col.max()):.3g} over {len(col)} cells; "
    slopes = []
    for rank in (0, 1):
        g, k = slope_near_one(table, rank)
        if len(k):
            slopes.append(f"at gamma={g:g} k median {float(k.median()):.3g} ({float(k.min()):.3g}..{float(k.max()):.3g})")
    worst = d[d["gae_gamma"] < 1.0].loc[below.idxmin()] if len(below) else None
    detail = (spread
              + ("near gamma = 1 the bias is k (1 - gamma): " + "; ".join(slopes) + "; " if slopes else "")
              + f"gamma=1: max relative bias {max1:.2g}; "
              + (f"smallest bias below gamma = 1: {min_below:.3g} (at gamma={float(worst['gae_gamma']):g}, "
                 f"lambda={float(worst['gae_lambda']):g}); " if worst is not None else "")
              + f"closed form vs verifier (lambda=1): max difference {max_agree:.2g}")
    return [claim_row(
        "eq26", "PPO/GAE with gamma < 1 on zero-reward-assumption rewards is biased; the bias vanishes only at "
                "gamma = 1 (Eq. 26)",
        status, number, None, f"relative bias at gamma = {g_head:g}, PPO/GAE lambda = 1, median over cells",
        "figures/gamma_bias.png", RULE, detail)]
