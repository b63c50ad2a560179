"""Loss aggregation under variable lengths, and KL estimators and placements against the exact KL gradient.

Part ``agg`` (docs/THEORY.md section 4). With EOS, responses have random lengths ``|o_i|``; each
aggregation mode (verl's ``loss_agg_mode``) weights token terms differently:
``seq-mean-token-sum`` ``1/n`` (unbiased), ``seq-mean-token-sum-norm`` ``1/(n H)`` (scaled by ``1/H``),
``seq-mean-token-mean`` ``1/(n |o_i|)`` (length-biased direction), ``token-mean`` ``1 / sum_i |o_i|``
(random denominator: biased, less so as the batch grows), ``token-sum`` ``1``. The exact verifier
gives each mode's relative bias, cosine and ``rel_residual`` (the sine of the angle to ``grad J``,
the part of the bias a learning rate cannot absorb) against the batch size ``G``.

Part ``kl`` (docs/THEORY.md section 5). With reference policy ``pi_ref`` (a seeded perturbation of the
policy) and ``beta``, an estimator's KL option changes its expected gradient by ``- beta k_hat``;
the study recovers ``k_hat = (E g_none - E g_kl) / beta`` exactly for ``kl`` in ``k1_reward`` (k1
in the reward), ``k1``, ``k2``, ``k3`` (as loss terms) and compares it with the exact gradient of
the sequence KL ``KL_seq = E sum_t log pi(w_t|s_t) - log pi_ref(w_t|s_t)``
(:func:`tpg.exact.exact_kl`): ``kl_rel_err = |k_hat - grad KL_seq| / |grad KL_seq|``, ``kl_cosine``
and ``kl_norm_ratio = |k_hat| / |grad KL_seq|``. Expected: k1_reward exact; k1 loss zero; k2, k3
losses something else (per-state reverse / forward KL).

Measured on 2 CPU cores shared with other work (``n_jobs = 2``, ``tpg study aggregation_kl``):
quick (4 cells) about 1 s; full (24 cells) about 6 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import BIAS_TOL, EXACT_TOL, claim_row, single_thread, solved_cell

NAME = "aggregation_kl"
TITLE = "bias of each loss aggregation mode under variable lengths; KL estimators and placements vs the exact KL gradient"
FIGURES = ["aggregation_kl"]

AGG_MODES = ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-mean", "token-sum")
AGG_ESTIMATORS = ("reinforce", "rloo", "ppo_gae")
KL_KINDS = ("k1_reward", "k1", "k2", "k3")
KL_ESTIMATORS = ("reinforce", "rloo", "ppo_gae", "trepo")

COLUMNS: dict[str, str] = {
    "part": "agg (aggregation modes) or kl (KL estimators)",
    "spec": "the estimator spec without agg/kl options",
    "agg_mode": "aggregation mode (agg rows)",
    "kl_kind": "k1_reward | k1 | k2 | k3 (kl rows)",
    "batch_size": "responses per batch: G responses to one prompt (group estimators) or G independent "
                  "prompt-response pairs (agg rows); the group size of group estimators (kl rows)",
    "layout": "single | group | independent: how the verifier draws a batch",
    "rel_bias": "|E g - grad J| / |grad J| (agg rows; dimensionless)",
    "cosine": "cosine between E g and grad J (agg rows; dimensionless)",
    "scale": "best-fit scale <E g, grad J> / |grad J|^2 (agg rows; dimensionless)",
    "rel_residual": "|E g - c grad J| / |E g|, the sine of the angle to grad J (agg rows; dimensionless)",
    "kl_rel_err": "|k_hat - grad KL_seq| / |grad KL_seq| (kl rows; dimensionless)",
    "kl_cosine": "cosine between k_hat and grad KL_seq (kl rows; NaN when k_hat = 0)",
    "kl_norm_ratio": "|k_hat| / |grad KL_seq| (kl rows; dimensionless)",
    "beta": "KL coefficient (kl rows)",
    "kl_seq": "the exact sequence KL(pi || pi_ref) (nats)",
    "mean_length": "expected response length E|o| (tokens)",
    "grad_norm": "|grad J| (reward units per logit)",
}


@dataclass(frozen=True)
class Cell:
    """One MDP with EOS; ``part="agg"``: every estimator and mode at batch size ``group_size``;
    ``part="kl"``: every estimator and KL kind (group size ``group_size``)."""

    part: str = "agg"
    family: str = "length"
    vocab: int = 3
    horizon: int = 3
    eos: str = "0"
    prompts: int = 1
    seed: int = 0
    group_size: int = 2
    beta: float = 0.1

    def mdp_spec(self) -> str:
        return (f"{self.family}:vocab={self.vocab},horizon={self.horizon},eos={self.eos},prompts={self.prompts},"
                f"gamma=1,seed={self.seed}")


def cells(quick: bool = False) -> list[Cell]:
    """quick: length rewards, batch sizes 1 and 3 for agg, one KL cell, plus one dense KL cell (4 cells);
    full: length, dense and terminal rewards, seeds 0 and 1, batch sizes 1..4 for agg and one KL cell
    each (24 cells)."""
    if quick:
        return ([Cell(part="agg", family="length", group_size=G) for G in (1, 3)]
                + [Cell(part="kl", family=f) for f in ("length", "dense")])
    out = []
    for f in ("length", "dense", "terminal"):
        for s in (0, 1):
            out += [Cell(part="agg", family=f, seed=s, group_size=G) for G in (1, 2, 3, 4)]
            out.append(Cell(part="kl", family=f, seed=s))
    return out


def _agg_rows(mdp, policy, cell: Cell) -> list[dict]:
    from tpg.verify import verify

    specs = [(e, m, f"{e}:agg={m}") for e in AGG_ESTIMATORS for m in AGG_MODES]
    recs = verify(mdp, policy, [s for _, _, s in specs], group_size=cell.group_size, mode="exact", seed=cell.seed,
                  on_error="record")
    return [{"part": "agg", "spec": e, "agg_mode": m, "kl_kind": "", "batch_size": cell.group_size,
             "layout": r["layout"] or "", "rel_bias": r["rel_bias"], "cosine": r["cosine"], "scale": r["scale"],
             "rel_residual": r["rel_residual"]} for (e, m, _), r in zip(specs, recs)]


def _kl_rows(mdp, policy, sol, cell: Cell) -> list[dict]:
    import torch

    from tpg.estimators import get_estimator
    from tpg.exact import exact_kl
    from tpg.verify.context import ExactContext
    from tpg.verify.exact_moments import batch_layout, exact_moments
    from tpg.verify.harness import default_reference
    from tpg.verify.score import ParamMap

    ref = default_reference(policy, cell.seed)
    _, grads = exact_kl(mdp, policy, ref)
    kl_grad = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
    kl_norm = float(kl_grad.norm())
    pmap = ParamMap(policy, mdp.tree)
    ctx = ExactContext(mdp, policy, seed=cell.seed, sol=sol, ref_policy=ref)
    rows = []
    for e in KL_ESTIMATORS:
        base = get_estimator(e)
        m0 = exact_moments(mdp, policy, base, cell.group_size, with_cov=False, ref_policy=ref, context=ctx,
                           param_map=pmap).mean
        for kind in KL_KINDS:
            est = get_estimator(f"{e}:kl={kind},kl_beta={cell.beta:g}")
            m = exact_moments(mdp, policy, est, cell.group_size, with_cov=False, ref_policy=ref, context=ctx,
                              param_map=pmap).mean
            k_hat = (m0 - m) / cell.beta
            kn = float(k_hat.norm())
            rows.append({"part": "kl", "spec": e, "agg_mode": "seq-mean-token-sum", "kl_kind": kind,
                         "batch_size": cell.group_size, "layout": batch_layout(est, cell.group_size)[0],
                         "kl_rel_err": float((k_hat - kl_grad).norm()) / kl_norm,
                         "kl_cosine": float(k_hat @ kl_grad) / (kn * kl_norm) if kn > 0 else np.nan,
                         "kl_norm_ratio": kn / kl_norm})
    kl_value, _ = exact_kl(mdp, policy, ref)
    for r in rows:
        r["kl_seq"] = float(kl_value)
    return rows



def run_cell(cell: Cell) -> pd.DataFrame:
    """Rows per (estimator, mode) or (estimator, KL kind); see :data:`COLUMNS`."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    """Rows per (estimator, mode) or (estimator, KL kind); see :data:`COLUMNS`."""
    import torch

    mdp, policy, sol = solved_cell(cell)
    if cell.part == "agg":
        rows = _agg_rows(mdp, policy, cell)
    elif cell.part == "kl":
        rows = _kl_rows(mdp, policy, sol, cell)
    else:
        raise ValueError(f"part must be 'agg' or 'kl', got {cell.part!r}")
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns and c not in ("beta",):
            df[c] = np.nan
    df["beta"] = cell.beta if cell.part == "kl" else np.nan
    df["grad_norm"] = float(sol.flat_grad().norm())
    lengths = mdp.tree.depth_n[sol.leaf_ids].to(torch.float64)
    df["mean_length"] = float((sol.response_prob * lengths).sum())
    for c in ("rel_bias", "cosine", "scale", "rel_residual", "kl_rel_err", "kl_cosine", "kl_norm_ratio", "kl_seq",
              "beta"):
        df[c] = df[c].astype(float)
    return df


# ------------------------------------------------------------------------------ claims
def token_mean_trend(df: pd.DataFrame) -> pd.DataFrame:
    """token-mean's ``rel_residual`` at the smallest and the largest batch size, per (MDP, estimator)."""
    a = df[(df["part"] == "agg") & (df["agg_mode"] == "token-mean")]
    key = [c for c in ("family", "seed", "spec") if c in a.columns]
    if a.empty:
        return pd.DataFrame(columns=key + ["first", "last", "n_sizes"])
    a = a.sort_values("batch_size")
    g = a.groupby(key)["rel_residual"]
    return pd.DataFrame({"first": g.first(), "last": g.last(), "n_sizes": g.count()}).reset_index()


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """agg_modes (section 4) and kl_placement (section 5)."""
    if df is None or df.empty:
        return []
    out = []
    a = df[(df["part"] == "agg") & (df["grad_norm"] > 1e-12)]
    if len(a):
        unb = a[a["agg_mode"] == "seq-mean-token-sum"]["rel_bias"].fillna(np.inf)
        smtm = a[a["agg_mode"] == "seq-mean-token-mean"]["rel_residual"].fillna(0.0)
        trend = token_mean_trend(a)
        multi = trend[trend["n_sizes"] > 1]
        shrinks = bool(len(multi)) and bool((multi["last"] < multi["first"]).all())
        max_unb = float(unb.max()) if len(unb) else float("nan")
        min_smtm = float(smtm.min()) if len(smtm) else float("nan")
        if not max_unb <= EXACT_TOL:
            status = "refuted"
        elif min_smtm > BIAS_TOL and shrinks:
            status = "confirmed"
        else:
            status = "qualified"
        tm = a[a["agg_mode"] == "token-mean"].groupby("batch_size")["rel_residual"].median()
        out.append(claim_row(
            "agg_modes", "under variable lengths seq-mean-token-sum is unbiased, seq-mean-token-mean biases the "
                         "direction, token-mean's bias shrinks with the batch size",
            status, min_smtm, None, "min sine of the angle to grad J, seq-mean-token-mean",
            "figures/aggregation_kl.png",
            f"confirmed if seq-mean-token-sum has relative bias <= {EXACT_TOL:g} everywhere, seq-mean-token-mean a "
            f"direction error (sine) > {BIAS_TOL:g} everywhere, and token-mean's sine is smaller at the largest "
            f"batch size than at the smallest for every MDP and estimator; qualified if either of the last two "
            f"fails; refuted if seq-mean-token-sum is biased",
            f"seq-mean-token-sum max relative bias {max_unb:.2g}; token-mean median sine by batch size: "
            + ", ".join(f"{int(k)}: {v:.3g}" for k, v in tm.items())))
    k = df[df["part"] == "kl"]
    if len(k):
        r1 = k[k["kl_kind"] == "k1_reward"]["kl_rel_err"].fillna(np.inf)
        l1 = k[k["kl_kind"] == "k1"]["kl_norm_ratio"].fillna(np.inf)
        other = k[k["kl_kind"].isin(["k2", "k3"])]["kl_rel_err"].fillna(0.0)
        max_r1 = float(r1.max()) if len(r1) else float("nan")
        max_l1 = float(l1.max()) if len(l1) else float("nan")
        min_other = float(other.min()) if len(other) else float("nan")
        if not (max_r1 <= EXACT_TOL and max_l1 <= EXACT_TOL):
            status = "refuted"
        elif len(other) and min_other > BIAS_TOL:
            status = "confirmed"
        else:
            status = "qualified"
        med = k.groupby("kl_kind")["kl_rel_err"].median()
        out.append(claim_row(
            "kl_placement", "k1 in the reward gives the exact gradient of the sequence KL; k1 as a loss has zero "
                            "expected gradient; k2 and k3 as losses follow other divergences",
            status, max_r1, None, "max relative error of k1-in-reward against grad KL_seq",
            "figures/aggregation_kl.png",
            f"confirmed if k1_reward's relative error and k1-loss's |gradient| / |grad KL_seq| are <= {EXACT_TOL:g} "
            f"for every estimator and k2/k3's relative error > {BIAS_TOL:g}; qualified if k2 or k3 matches; "
            f"refuted if k1_reward or k1 loss does not",
            "median relative error: " + ", ".join(f"{kk}: {v:.3g}" for kk, v in med.items())))
    return out
