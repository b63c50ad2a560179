"""TRePO variants at equal rollout budget: bias, variance, and where interpolation loses credit.

TRePO estimates Theorem 2's per-step advantage ``V'(s_{t+1}) - V'(s_t)`` by Monte Carlo
continuations (``K`` per anchor prefix, scored by ``RM``); the variants (docs/THEORY.md section 3):

* ``fill=segment`` (anchors ``all``, ``every:2``, ``random:1``): unbiased (``V'`` is a martingale);
* ``fill=interpolate`` (anchors ``every:2``, ``random:1``): per-step MC advantages at the anchor
  steps, linear interpolation between them, as the paper describes TRePO: biased;
* ``fill=ipw`` (``random:m``): MC advantage at random steps over their inclusion probability: unbiased.

For each MDP the study gives, per variant,

* the exact bias (exact mode: expectation over continuations and anchor draws);
* the Monte Carlo ``tr Cov[g]``, continuation noise included (``samples`` batches per MC seed),
  and the policy tokens per batch (continuations included); ``cost_variance = tr Cov * tokens``
  is the variance of the average gradient at a budget of one token (divide by the budget): the
  equal-budget comparison, with REINFORCE as the zero-continuation reference;
* per token position ``t`` (exact): the gradient the variant puts at that position,
  ``m_t = E[A_t grad log pi(w_t|s_t)]``, against Theorem 2's ``m*_t`` (whose sum is ``grad J``):
  ``pos_rel_bias = |m_t - m*_t| / |grad J|`` and ``pos_credit = |m*_t| / |grad J|``, and the RMS error of
  the advantage itself ``sqrt(E[(A_t - A*_t)^2])``. Interpolated positions lose their own credit.

Measured on 2 CPU cores shared with other work (``n_jobs = 2``, ``tpg study trepo``):
quick (2 cells) about 3 s; full (18 cells) about 56 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import BIAS_TOL, EXACT_TOL, claim_row, single_thread, solved_cell

NAME = "trepo"
TITLE = "TRePO variants (segment, interpolate, ipw) at equal rollout budget: bias, variance, lost credit"
FIGURES = ["trepo_variants"]

VARIANTS: tuple[str, ...] = (
    "reinforce",
    "trepo:anchors=all,K=1",
    "trepo:anchors=all,K=2",
    "trepo:anchors=all,K=4",
    "trepo:anchors=all,K=8",
    "trepo:anchors=every:2,K=4",
    "trepo:anchors=random:1,K=4",
    "trepo:anchors=every:2,fill=interpolate,K=4",
    "trepo:anchors=random:1,fill=interpolate,K=4",
    "trepo:anchors=random:1,fill=ipw,K=4",
    "trepo:anchors=random:2,fill=ipw,K=4",
)

COLUMNS: dict[str, str] = {
    "kind": "summary (one row per variant and MC seed) or position (one row per variant and token position)",
    "spec": "the estimator spec",
    "fill": "segment | interpolate | ipw | none (REINFORCE)",
    "anchors": "all | every:k | random:m | none",
    "K": "continuations per anchor prefix (0 for REINFORCE)",
    "rel_bias": "exact |E g - grad J| / |grad J| (dimensionless)",
    "cosine": "exact cosine between E g and grad J (dimensionless)",
    "scale": "exact best-fit scale <E g, grad J> / |grad J|^2 (dimensionless)",
    "exact_variance_trace": "exact tr Cov[g] given exact continuation values (squared reward units per squared logit)",
    "mc_seed": "seed of the Monte Carlo batches (summary rows)",
    "mc_variance_trace": "Monte Carlo tr Cov[g], continuation noise included (squared reward units per squared logit)",
    "mc_tokens_per_batch": "policy tokens per batch, continuations included (tokens)",
    "cost_variance": "mc_variance_trace * mc_tokens_per_batch: variance at a budget of one token (token x squared "
                     "reward units per squared logit)",
    "position": "token position t, 1-based (position rows)",
    "pos_rel_bias": "|m_t - m*_t| / |grad J| at position t (dimensionless)",
    "pos_credit": "|m*_t| / |grad J|, Theorem 2's gradient at position t (dimensionless)",
    "pos_adv_rmse": "sqrt(E[(A_t - A*_t)^2]) over responses reaching t (reward units)",
    "pos_reach": "probability that a response has a token at position t",
    "grad_norm": "|grad J| (reward units per logit)",
}


@dataclass(frozen=True)
class Cell:
    """One MDP with a seeded tabular policy; every variant, exact and Monte Carlo."""

    family: str = "dense"
    vocab: int = 3
    horizon: int = 5
    eos: str = "0"
    prompts: int = 2
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS
    samples: int = 4000
    mc_seeds: tuple[int, ...] = (0, 1, 2)

    def mdp_spec(self) -> str:
        return (f"{self.family}:vocab={self.vocab},horizon={self.horizon},eos={self.eos},prompts={self.prompts},"
                f"weights=random,gamma=1,seed={self.seed}")


def cells(quick: bool = False) -> list[Cell]:
    """quick: dense and terminal rewards with EOS, 1000 MC batches, one MC seed, K in {1, 4} (2 cells);
    full: dense, terminal and first_token rewards, EOS or not, seeds 0, 1, 2, 4000 batches x 3 MC
    seeds, K in {1, 2, 4, 8} for the every-step segment fill (18 cells)."""
    if quick:
        quick_variants = tuple(v for v in VARIANTS if v not in ("trepo:anchors=all,K=2", "trepo:anchors=all,K=8"))
        return [Cell(family=f, samples=1000, mc_seeds=(0,), variants=quick_variants) for f in ("dense", "terminal")]
    return [Cell(family=f, eos=e, seed=s) for f in ("dense", "terminal", "first_token") for e in ("none", "0")
            for s in (0, 1, 2)]


def describe_spec(spec: str) -> dict:
    """``{"fill", "anchors", "K"}`` of a variant spec (REINFORCE: none, none, 0)."""
    from tpg.estimators import get_estimator

    est = get_estimator(spec)
    if est.name != "trepo":
        return {"fill": "none", "anchors": "none", "K": 0}
    kind, arg = est.options["anchors"]
    return {"fill": est.options["fill"], "anchors": kind if arg is None else f"{kind}:{arg}", "K": int(est.options["K"])}


def position_analysis(mdp, policy, sol, spec: str) -> pd.DataFrame:
    """Per token position (exact): ``pos_rel_bias``, ``pos_credit``, ``pos_adv_rmse``, ``pos_reach``.

    ``m_t = sum_W P(W) A_t(W) (e_{w_t} - pi(.|s_t))`` in node-logit space, mapped to parameters;
    ``A*_t = V'(s_{t+1}) - V'(s_t)`` from the exact solution (Theorem 2)."""
    import torch

    from tpg.estimators import get_estimator
    from tpg.verify.context import ExactContext
    from tpg.verify.exact_moments import checked_coef, leaf_rollouts, make_batch
    from tpg.verify.score import ParamMap, logit_gradient, token_nt

    tree = mdp.tree
    est = get_estimator(spec)
    ro = leaf_rollouts(mdp, sol)
    L, H = ro.tokens.shape
    ctx = ExactContext(mdp, policy, sol=sol)
    # each response its own batch: aggregation weight 1, E[g] = sum_W P(W) g(W)
    rb = make_batch(est, ro, torch.arange(L), torch.float64)
    coef = checked_coef(est, est(rb, ctx), (L, H))
    nt = token_nt(tree, ro.nodes)
    V, P = tree.vocab_size, tree.num_prompts
    child = torch.where(nt >= 0, P + nt.clamp(min=0) * V + ro.tokens, torch.zeros_like(nt))
    state = ro.nodes.clamp(min=0)
    star = torch.where(nt >= 0, sol.value_resp[child] - sol.value_resp[state], torch.zeros((), dtype=torch.float64))
    p = sol.response_prob.to(torch.float64)
    pi = sol.logp.exp()
    pmap = ParamMap(policy, tree)
    gnorm = float(sol.flat_grad().norm())
    rows = []
    for t in range(H):
        keep = torch.zeros(L, H, dtype=torch.bool)
        keep[:, t] = True
        m = pmap.to_params(logit_gradient(torch.where(keep, coef, 0.0), nt, ro.tokens, pi, p).reshape(-1))
        ms = pmap.to_params(logit_gradient(torch.where(keep, star, 0.0), nt, ro.tokens, pi, p).reshape(-1))
        reach = ro.mask[:, t]
        p_reach = float(p[reach].sum())
        err2 = float((p[reach] * (coef[reach, t] - star[reach, t]) ** 2).sum())
        rows.append({"position": t + 1, "pos_rel_bias": float((m - ms).norm()) / gnorm if gnorm > 0 else np.nan,
                     "pos_credit": float(ms.norm()) / gnorm if gnorm > 0 else np.nan,
                     "pos_adv_rmse": float(np.sqrt(err2 / p_reach)) if p_reach > 0 else np.nan,
                     "pos_reach": p_reach})
    return pd.DataFrame(rows)



def run_cell(cell: Cell) -> pd.DataFrame:
    """Summary rows (exact bias, MC variance and cost per MC seed) and position rows per variant."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    """Summary rows (exact bias, MC variance and cost per MC seed) and position rows per variant."""
    from tpg.verify import verify

    mdp, policy, sol = solved_cell(cell)
    grad_norm = float(sol.flat_grad().norm())
    specs = list(cell.variants)
    exact = verify(mdp, policy, specs, mode="exact", seed=cell.seed)
    mc = {s: verify(mdp, policy, specs, mode="mc", samples=cell.samples, seed=s) for s in cell.mc_seeds}
    frames = []
    for i, spec in enumerate(specs):
        d = describe_spec(spec)
        ex = exact[i]
        base = {"spec": spec, **d, "rel_bias": ex["rel_bias"], "cosine": ex["cosine"], "scale": ex["scale"],
                "exact_variance_trace": ex["variance_trace"]}
        summary = [{"kind": "summary", **base, "mc_seed": s, "mc_variance_trace": mc[s][i]["variance_trace"],
                    "mc_tokens_per_batch": mc[s][i]["tokens_per_batch"],
                    "cost_variance": mc[s][i]["variance_trace"] * mc[s][i]["tokens_per_batch"]}
                   for s in cell.mc_seeds]
        frames.append(pd.DataFrame(summary))
        pos = position_analysis(mdp, policy, sol, spec)
        for k, v in base.items():
            pos[k] = v
        pos["kind"] = "position"
        frames.append(pos)
    df = pd.concat(frames, ignore_index=True)
    df["grad_norm"] = grad_norm
    for c in ("rel_bias", "cosine", "scale", "exact_variance_trace", "mc_variance_trace", "mc_tokens_per_batch",
              "cost_variance", "pos_rel_bias", "pos_credit", "pos_adv_rmse", "pos_reach", "mc_seed", "position"):
        df[c] = df[c].astype(float)
    return df


# ------------------------------------------------------------------------------ claims
def efficiency_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per spec: mean and standard error (over MDPs and MC seeds) of ``cost_variance`` relative to
    REINFORCE's on the same MDP and MC seed."""
    s = df[df["kind"] == "summary"]
    key = [c for c in ("family", "eos", "seed", "mc_seed") if c in s.columns]
    ref = s[s["spec"] == "reinforce"].set_index(key)["cost_variance"].rename("ref")
    s = s.join(ref, on=key)
    s = s.assign(rel=s["cost_variance"] / s["ref"])
    g = s.groupby("spec", sort=False)["rel"]
    return pd.DataFrame({"mean": g.mean(), "se": g.std(ddof=1) / np.sqrt(g.count()), "n": g.count()})


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """trepo_fill (docs/THEORY.md section 3): segment and ipw fills unbiased, interpolation biased."""
    if df is None or df.empty:
        return []
    s = df[(df["kind"] == "summary") & (df["grad_norm"] > 1e-12)]
    unb = s[s["fill"].isin(["segment", "ipw"])]["rel_bias"].fillna(np.inf)
    interp = s[(s["fill"] == "interpolate") & (s["anchors"] != "all")]["rel_bias"].fillna(np.inf)
    if unb.empty or interp.empty:
        return []
    max_unb, min_int = float(unb.max()), float(interp.min())
    if not max_unb <= EXACT_TOL:
        status = "refuted"
    elif min_int > BIAS_TOL:
        status = "confirmed"
    else:
        status = "qualified"
    eff = efficiency_table(df)
    parts = []
    for spec in ("trepo:anchors=all,K=1", "trepo:anchors=all,K=4"):
        if spec in eff.index:
            parts.append(f"{spec}: {eff.loc[spec, 'mean']:.2f} +/- {eff.loc[spec, 'se']:.2f}")
    flat = s[(s["fill"] == "interpolate") & (s["anchors"] != "all") & ~(s["rel_bias"].fillna(np.inf) > BIAS_TOL)]
    where = sorted({f"{r.family}, eos={r.eos}" for r in flat.itertuples()}) if "family" in flat.columns else []
    detail = (f"interpolation: min relative bias {min_int:.3g}, median {float(interp.median()):.3g}"
              + (f", unbiased on {'; '.join(where)} (credit only where anchors sit)" if where else "") + "; "
              + ("variance x tokens relative to REINFORCE (equal budget): " + "; ".join(parts) if parts else ""))
    return [claim_row(
        "trepo_fill", "TRePO's segment and inverse-probability fills are unbiased; linear interpolation between "
                      "anchors is biased (interpolated tokens lose their credit)",
        status, max_unb, None, "max relative bias of the segment and ipw fills", "figures/trepo_variants.png",
        f"confirmed if segment/ipw relative bias <= {EXACT_TOL:g} in every cell and every interpolating variant "
        f"(anchors not all) has relative bias > {BIAS_TOL:g}; qualified if some interpolating cell is unbiased; "
        f"refuted if a segment/ipw cell is biased",
        detail)]
