"""The exact verdict matrix: every estimator by reward family, EOS, gamma, group size and aggregation.

For each cell (one generated MDP with a seeded tabular policy, one group size ``G``, one
aggregation mode) every estimator of :data:`ESTIMATORS` is verified in exact mode
(:func:`tpg.verify.verify`): ``E[g]`` over the whole sample space against ``grad J``, giving

    scale c = <E g, grad J> / |grad J|^2,   cosine,   rel_bias = |E g - grad J| / |grad J|,

and the exact ``tr Cov[g]``. docs/THEORY.md section 2.3 (Theorem 1) says REINFORCE on ``RM`` alone is unbiased for
every reward family and ``gamma`` (``rel_bias`` at rounding level); Theorem 2 says the same of the
per-step advantage ``V'(s_{t+1}) - V'(s_t)`` (TRePO's segment fill with exact continuation
values). The matrix also shows Dr. GRPO's ``(1 - 1/G)`` scale, GRPO's std-normalised direction
bias, REINFORCE++'s batch whitening, the noisy-critic bias of GAE with ``lambda < 1``, TRePO's
interpolation bias, and the length bias of ``seq-mean-token-mean`` / ``token-mean``.

MDPs are small on purpose (``V = 2``, ``H = 3``, two prompts with random weights): group and
batch-coupled estimators enumerate every ordered ``G``-tuple of responses.

Measured on 2 CPU cores shared with other work (``n_jobs = 2``, ``tpg study bias``):
quick (12 cells) about 11 s, worker start-up included; full (600 cells) about 60 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import EXACT_TOL, claim_row, single_thread, solved_cell

NAME = "bias"
TITLE = "exact verdict matrix: estimator x reward family x EOS x gamma x group size x aggregation"
FIGURES = ["bias_heatmap"]

#: the estimators of the matrix (each gets ``agg=<cell's mode>`` appended)
ESTIMATORS: tuple[str, ...] = (
    "reinforce",
    "reward_to_go",
    "reinforce_baseline",
    "rloo",
    "remax",
    "grpo",
    "dr_grpo",
    "opo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "ppo_gae",
    "ppo_gae:lambda=0.95",
    "ppo_gae:lambda=0.95,critic=noisy,sigma=0.2",
    "trepo",
    "trepo:anchors=every:2,fill=interpolate",
    "trepo:anchors=random:1,fill=ipw",
)
AGG_MODES = ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-mean", "token-sum")
FAMILIES = ("dense", "terminal", "sparse", "first_token", "length")
#: Theorem 1's estimator and Theorem 2's (per-step advantage from exact continuation values)
THM1_SPEC = "reinforce"
THM2_SPECS = ("trepo",)

COLUMNS: dict[str, str] = {
    "spec": "estimator spec without the aggregation option (catalog NAME[:options])",
    "estimator": "catalog name of the estimator",
    "full_spec": "the spec as verified, aggregation included",
    "verdict": "exact verdict: unbiased | scaled | biased | error",
    "scale": "best-fit scale c = <E g, grad J> / |grad J|^2 (dimensionless)",
    "cosine": "cosine between E[g] and grad J (dimensionless)",
    "rel_bias": "|E g - grad J| / |grad J| (dimensionless; NaN when grad J = 0)",
    "rel_residual": "|E g - c grad J| / |E g|, the sine of the angle (dimensionless)",
    "variance_trace": "tr Cov[g] of one batch's gradient (squared reward units per squared logit)",
    "tokens_per_batch": "expected policy tokens per batch, hook tokens (continuations, greedy) included",
    "responses_per_batch": "responses in one batch as the verifier lays it out (G for group estimators, else 1)",
    "layout": "single | group | independent: how the batch is drawn",
    "grad_norm": "|grad J| in parameter space (reward units per logit)",
    "error": "the error message when the estimator could not be verified, else empty",
}


@dataclass(frozen=True)
class Cell:
    """One MDP (family, EOS, gamma, seed) at one group size and one aggregation mode."""

    family: str = "dense"
    vocab: int = 2
    horizon: int = 3
    eos: str = "none"
    prompts: int = 2
    gamma: float = 1.0
    seed: int = 0
    group_size: int = 2
    agg: str = "seq-mean-token-sum"
    estimators: tuple[str, ...] = ESTIMATORS

    def mdp_spec(self) -> str:
        return (f"{self.family}:vocab={self.vocab},horizon={self.horizon},eos={self.eos},prompts={self.prompts},"
                f"weights=random,gamma={self.gamma:g},seed={self.seed}")


def cells(quick: bool = False) -> list[Cell]:
    """quick: dense and terminal, EOS or not, gamma 1, G = 2, three aggregation modes (12 cells);
    full: every family, EOS or not, gamma 1 and 0.9, G = 2 and 3, every mode, seeds 0, 1, 2 (600 cells)."""
    if quick:
        return [Cell(family=f, eos=e, gamma=1.0, group_size=2, agg=a, seed=0)
                for f in ("dense", "terminal") for e in ("none", "0")
                for a in ("seq-mean-token-sum", "seq-mean-token-mean", "token-mean")]
    return [Cell(family=f, eos=e, gamma=g, group_size=G, agg=a, seed=s)
            for f in FAMILIES for e in ("none", "0") for g in (1.0, 0.9) for G in (2, 3) for a in AGG_MODES
            for s in (0, 1, 2)]


def with_agg(spec: str, agg: str) -> str:
    """``spec`` with ``agg=<mode>`` appended as an option."""
    return f"{spec}{',' if ':' in spec else ':'}agg={agg}"



def run_cell(cell: Cell) -> pd.DataFrame:
    """One row per estimator: the exact verdict and its numbers (see :data:`COLUMNS`)."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    """One row per estimator: the exact verdict and its numbers (see :data:`COLUMNS`)."""
    from tpg.verify import verify

    mdp, policy, sol = solved_cell(cell)
    grad_norm = float(sol.flat_grad().norm())
    specs = [with_agg(s, cell.agg) for s in cell.estimators]
    records = verify(mdp, policy, specs, group_size=cell.group_size, mode="exact", seed=cell.seed,
                     on_error="record")
    rows = []
    for base, rec in zip(cell.estimators, records):
        rows.append({"spec": base, "estimator": base.split(":", 1)[0], "full_spec": rec["spec"],
                     "verdict": rec["verdict"], "scale": rec["scale"], "cosine": rec["cosine"],
                     "rel_bias": rec["rel_bias"], "rel_residual": rec["rel_residual"],
                     "variance_trace": rec["variance_trace"], "tokens_per_batch": rec["tokens_per_batch"],
                     "responses_per_batch": rec["group_size"], "layout": rec["layout"] or "",
                     "grad_norm": grad_norm, "error": rec["error"] or ""})
    df = pd.DataFrame(rows)
    for c in ("scale", "cosine", "rel_bias", "rel_residual", "variance_trace", "tokens_per_batch"):
        df[c] = df[c].astype(float)
    return df


# ------------------------------------------------------------------------------ claims
def _max_bias(df: pd.DataFrame, specs) -> tuple[float, pd.DataFrame]:
    sub = df[df["spec"].isin(list(specs)) & (df["agg"] == "seq-mean-token-sum") & (df["grad_norm"] > 1e-12)]
    vals = sub["rel_bias"].astype(float)
    if sub.empty:
        return float("nan"), sub
    # an estimator that errored, or a non-finite bias, counts as biased
    return float(np.nanmax(vals.fillna(np.inf).to_numpy())), sub


def _status(max_bias: float, sub: pd.DataFrame, need_families=("dense", "terminal")) -> str:
    covered = set(sub["family"]) >= set(need_families)
    if not max_bias <= EXACT_TOL:
        return "refuted"
    return "confirmed" if covered else "qualified"


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """thm1 (REINFORCE on RM only) and thm2 (per-step advantage V'(s_{t+1}) - V'(s_t)), both over the
    unbiased aggregation ``seq-mean-token-sum``."""
    if df is None or df.empty:
        return []
    out = []
    rule = (f"confirmed if the max exact relative bias over all cells (agg seq-mean-token-sum, grad J != 0) is "
            f"<= {EXACT_TOL:g} and the cells cover dense and terminal rewards; qualified if <= {EXACT_TOL:g} but "
            f"one of the two families is missing; refuted if any cell exceeds {EXACT_TOL:g}")
    m1, sub1 = _max_bias(df, [THM1_SPEC])
    if not sub1.empty:
        out.append(claim_row(
            "thm1", "REINFORCE on the response-level reward alone is an unbiased estimate of grad J, for dense "
                    "and terminal token rewards and any gamma (Theorem 1)",
            _status(m1, sub1), m1, None, "max relative bias", "figures/bias_heatmap.png", rule))
    m2, sub2 = _max_bias(df, THM2_SPECS)
    if not sub2.empty:
        out.append(claim_row(
            "thm2", "the per-step advantage V'(s_{t+1}) - V'(s_t) (TRePO, segment fill, every step, exact "
                    "continuation values) gives an unbiased gradient (Theorem 2)",
            _status(m2, sub2), m2, None, "max relative bias", "figures/bias_heatmap.png", rule))
    return out
