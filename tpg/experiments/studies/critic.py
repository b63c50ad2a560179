"""PPO/GAE against critic error: bias and variance for lambda in {0, 0.5, 0.9, 1}.

PPO's advantage is GAE(gamma = 1, lambda) on ZRA rewards with a critic ``V_hat``:
``delta_t = r'_t + V_hat(s_{t+1}) - V_hat(s_t)``, ``A_t = sum_l lambda^l delta_{t+l}``. The critic is
the exact ZRA value plus a fixed, seeded Gaussian error of standard deviation ``sigma`` per state
(``critic=noisy,noise=fixed``; one draw per critic seed). docs/THEORY.md section 2.8 (response-level critic
identity): with an exact critic (``sigma = 0``) GAE is unbiased for every lambda; with an inexact one
only ``lambda = 1`` is (then ``V_hat(s_t)`` is a mere baseline).

For each cell the exact moments of the single-batch gradient (:func:`tpg.verify.exact_moments`)
give the relative bias, ``tr Cov[g]`` and, per response, the noise-to-signal ratio

    nsr = responses_per_batch * tr Cov[g] / |E g|^2,

(a batch of ``n`` i.i.d. responses has ``tr Cov`` divided by ``n``, so ``nsr`` compares methods
at an equal number of sampled responses, and it is free of each method's scale). The
``baselines`` cells compute the same for the critic-free GRPO, Dr. GRPO, RLOO (group size ``G``),
ReMax and REINFORCE minus the exact prompt value ``V'(s_1) = E[RM(W^(1))]`` (the *global*
baseline), to put two analysis claims to the test:

* claim 1: with a good critic PPO's gradient has lower variance than GRPO, ReMax and RLOO. "Good"
  is measured, not assumed: every PPO row carries its critic's error, the root-mean-square of
  ``V_hat(s_t) - V'(s_t)`` over the states responses visit, relative to the standard deviation of
  ``RM`` (``critic_rel_error``); the rule finds, per MDP, the critic error at which PPO's
  noise-to-signal ratio stops being below the best critic-free method's (the crossover), and calls
  the claim confirmed only if that crossover lies above :data:`GOOD_CRITIC_ERROR` on every MDP;
* claim 2: their baselines amount to one global baseline per prompt (RLOO's per-response variance
  approaches the exact global baseline's as ``G`` grows), where a per-step one would lower it. The
  per-step baseline a practitioner can use is ``V'(s_t)`` subtracted from the Monte Carlo return,
  ``A_t = RM(W) - V'(s_t)`` (PPO's lambda = 1 with an exact critic, ``step_mc``); the rule decides on
  that one: it stays unbiased with any critic (``V_hat(s_t)`` is a baseline). Theorem 2's
  ``V'(s_{t+1}) - V'(s_t)`` (lambda = 0, ``step_td``) is unbiased only with the exact critic, an
  oracle, and is reported beside it.

One prompt per MDP, so that a group of ``G`` responses and ``G`` independent responses differ only
in their baselines, not in how many prompts they cover.

Measured on 2 CPU cores shared with other work (``n_jobs = 2``, ``tpg study critic``):
quick (6 cells) about 4 s; full (90 cells) about 12 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import BIAS_TOL, EXACT_TOL, claim_row, single_thread, solved_cell

NAME = "critic"
TITLE = "PPO/GAE bias and variance against critic error, lambda in {0, 0.5, 0.9, 1}; critic-free and global baselines"
FIGURES = ["critic_error"]

SIGMAS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LAMBDAS: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
BASELINES: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "remax", "reinforce_baseline")
#: the global baseline of claim 2: REINFORCE minus the exact prompt value V'(s_1) = E[RM(W^(1))]
GLOBAL_BASELINE = "reinforce_baseline"
#: group sizes at which RLOO's estimated global baseline is compared with the exact one (claim 2)
CLAIM2_GROUP_SIZES: tuple[int, ...] = (2, 4)
#: the critic-free methods of claim 1 (the paper names GRPO, ReMax and RLOO)
CLAIM1_BASELINES: tuple[str, ...] = ("grpo", "rloo", "remax")
#: PPO's lambda in claim 1 (a common default)
CLAIM1_LAMBDA = 0.9
#: the unbiased critic-free methods PPO's mean squared error is compared with (same scale as grad J)
MSE_BASELINES: tuple[str, ...] = ("rloo", "remax")
#: a good critic (claim 1): root-mean-square error over visited states at most this fraction of std RM
GOOD_CRITIC_ERROR = 0.1
#: the output schema of run_cell; part of every cell's cache key, so cells cached before a change of
#: the columns (schema 1 had no critic error) are recomputed rather than read as current
SCHEMA = 2

COLUMNS: dict[str, str] = {
    "method": "ppo_gae, or a critic-free baseline (grpo, dr_grpo, rloo, remax, reinforce_baseline = exact global)",
    "spec": "the estimator spec verified",
    "sigma": "std of the critic's fixed per-state error (reward units; NaN for baselines)",
    "gae_lambda": "GAE lambda (dimensionless; NaN for baselines)",
    "rel_bias": "|E g - grad J| / |grad J| (dimensionless)",
    "cosine": "cosine between E g and grad J (dimensionless)",
    "scale": "best-fit scale <E g, grad J> / |grad J|^2 (dimensionless)",
    "variance_trace": "tr Cov[g] of one batch's gradient (squared reward units per squared logit)",
    "mean_norm": "|E g| (reward units per logit)",
    "responses_per_batch": "responses in one batch (G for group estimators, else 1)",
    "nsr": "noise-to-signal ratio per response: responses_per_batch * tr Cov[g] / |E g|^2 (dimensionless)",
    "mse_per_response": "responses_per_batch * tr Cov[g] + |E g - grad J|^2, over |grad J|^2 (dimensionless)",
    "critic_rmse": "root-mean-square of V_hat(s_t) - V'(s_t) over the states responses visit, each weighted by "
                   "its visit probability (reward units; 0 for the exact critic, NaN for baselines)",
    "critic_rel_error": "critic_rmse / rm_std: the critic's measured error in units of the reward's spread "
                        "(dimensionless; NaN for baselines)",
    "grad_norm": "|grad J| (reward units per logit)",
    "rm_std": "standard deviation of RM(W) over responses and prompts (reward units)",
}


@dataclass(frozen=True)
class Cell:
    """One MDP; ``part="ppo"``: the sigma x lambda grid with one critic seed;
    ``part="baselines"``: the critic-free estimators at group size ``group_size``."""

    family: str = "terminal"
    vocab: int = 2
    horizon: int = 4
    eos: str = "none"
    prompts: int = 1
    seed: int = 0
    part: str = "ppo"
    critic_seed: int = 0
    sigmas: tuple[float, ...] = SIGMAS
    lambdas: tuple[float, ...] = LAMBDAS
    group_size: int = 4
    baselines: tuple[str, ...] = BASELINES
    schema: int = SCHEMA

    def mdp_spec(self) -> str:
        return (f"{self.family}:vocab={self.vocab},horizon={self.horizon},eos={self.eos},prompts={self.prompts},"
                f"weights=random,gamma=1,seed={self.seed}")


def cells(quick: bool = False) -> list[Cell]:
    """quick: terminal and dense rewards, no EOS, one critic seed (6 cells); full: terminal, dense
    and sparse rewards, EOS or not, three MDP seeds, three critic seeds (90 cells)."""
    if quick:
        mdps = [("terminal", "none", 0), ("dense", "none", 0)]
        seeds = (0,)
    else:
        mdps = [(f, e, s) for f in ("terminal", "dense", "sparse") for e in ("none", "0") for s in (0, 1, 2)]
        seeds = (0, 1, 2)
    out = []
    for fam, eos, s in mdps:
        out += [Cell(family=fam, eos=eos, seed=s, part="ppo", critic_seed=c) for c in seeds]
        out.append(Cell(family=fam, eos=eos, seed=s, part="baselines", group_size=max(CLAIM2_GROUP_SIZES)))
        out += [Cell(family=fam, eos=eos, seed=s, part="baselines", group_size=G, baselines=("rloo",))
                for G in CLAIM2_GROUP_SIZES if G != max(CLAIM2_GROUP_SIZES)]
    return out


def _moments(mdp, policy, sol, pmap, grad_j, spec: str, group_size: int, ctx) -> dict:
    from tpg.estimators import get_estimator
    from tpg.verify.exact_moments import batch_layout, exact_moments
    from tpg.verify.verdict import exact_verdict

    est = get_estimator(spec)
    _, n = batch_layout(est, group_size)
    mom = exact_moments(mdp, policy, est, group_size, with_cov=False, context=ctx, param_map=pmap)
    v = exact_verdict(mom.mean, grad_j)
    mean_norm = float(mom.mean.norm())
    gn2 = float(grad_j.norm()) ** 2
    bias2 = float((mom.mean - grad_j).norm()) ** 2
    return {"spec": spec, "rel_bias": v.rel_bias, "cosine": v.cosine, "scale": v.scale,
            "variance_trace": mom.variance_trace, "mean_norm": mean_norm, "responses_per_batch": n,
            "nsr": n * mom.variance_trace / mean_norm ** 2 if mean_norm > 0 else np.inf,
            "mse_per_response": (n * mom.variance_trace + bias2) / gn2 if gn2 > 0 else np.nan}



def critic_rmse(ctx, rollouts, prob_b, sigma: float) -> float:
    """The critic's measured error: ``sqrt( sum_W P(W) sum_{t <= T} (V_hat(s_t) - V'(s_t))^2 /
    sum_W P(W) T )`` over every response ``W`` (``rollouts``, probabilities ``prob_b``), i.e. the
    root-mean-square error over the states responses visit, each weighted by its visit
    probability. ``V_hat`` is the critic ``ppo_gae`` uses at ``sigma`` (``critic=noisy,noise=fixed``
    with the context's seed; the exact critic at ``sigma = 0``), ``V'`` the exact ZRA value."""
    import torch

    exact_bt = ctx.critic_values(rollouts, "exact", 1.0, {})
    critic_bt = exact_bt if sigma == 0 else ctx.critic_values(rollouts, "noisy", 1.0,
                                                                {"sigma": float(sigma), "noise": "fixed"})
    H = rollouts.mask.shape[1]
    mask_bt = rollouts.mask.to(torch.float64)
    sq_b = ((critic_bt - exact_bt)[:, :H] ** 2 * mask_bt).sum(1)
    return float(torch.sqrt((prob_b * sq_b).sum() / (prob_b * mask_bt.sum(1)).sum()))


def run_cell(cell: Cell) -> pd.DataFrame:
    """Rows per (sigma, lambda) of PPO/GAE, or per baseline; see :data:`COLUMNS`."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    """Rows per (sigma, lambda) of PPO/GAE, or per baseline; see :data:`COLUMNS`."""
    import torch

    from tpg.verify.context import ExactContext
    from tpg.verify.exact_moments import leaf_rollouts
    from tpg.verify.score import ParamMap

    mdp, policy, sol = solved_cell(cell)
    grad_j = sol.flat_grad().to(torch.float64)
    pmap = ParamMap(policy, mdp.tree)
    ctx = ExactContext(mdp, policy, seed=cell.critic_seed, sol=sol)
    rm, p = sol.response_rm.to(torch.float64), sol.response_prob.to(torch.float64)
    rm_std = float(torch.sqrt((p * (rm - (p * rm).sum()) ** 2).sum()))
    rows = []
    if cell.part == "ppo":
        leaves = leaf_rollouts(mdp, sol)
        for s in cell.sigmas:
            err = critic_rmse(ctx, leaves, p, s)
            for lam in cell.lambdas:
                spec = (f"ppo_gae:lambda={lam:g},critic=exact" if s == 0 else
                        f"ppo_gae:lambda={lam:g},critic=noisy,noise=fixed,sigma={s:g}")
                row = _moments(mdp, policy, sol, pmap, grad_j, spec, 1, ctx)
                rows.append({"method": "ppo_gae", "sigma": float(s), "gae_lambda": float(lam), **row,
                             "critic_rmse": err, "critic_rel_error": err / rm_std if rm_std > 0 else np.inf})
    elif cell.part == "baselines":
        for spec in cell.baselines:
            row = _moments(mdp, policy, sol, pmap, grad_j, spec, cell.group_size, ctx)
            rows.append({"method": spec.split(":", 1)[0], "sigma": np.nan, "gae_lambda": np.nan, **row,
                         "critic_rmse": np.nan, "critic_rel_error": np.nan})
    else:
        raise ValueError(f"part must be 'ppo' or 'baselines', got {cell.part!r}")
    df = pd.DataFrame(rows)
    df["grad_norm"] = float(grad_j.norm())
    df["rm_std"] = rm_std
    for c in ("rel_bias", "cosine", "scale", "variance_trace", "mean_norm", "nsr", "mse_per_response", "critic_rmse",
              "critic_rel_error"):
        df[c] = df[c].astype(float)
    return df


# ------------------------------------------------------------------------------ claims
def _mdp_key(df: pd.DataFrame) -> list[str]:
    return [c for c in ("family", "eos", "seed", "vocab", "horizon", "prompts") if c in df.columns]


def _largest_group(base: pd.DataFrame) -> pd.DataFrame:
    """The baseline rows at the largest group size run (RLOO is also run at smaller ones for claim 2)."""
    if "group_size" not in base.columns or base.empty:
        return base
    return base[base["group_size"] == base["group_size"].max()]


def claim1_ratios(df: pd.DataFrame, lam: float = CLAIM1_LAMBDA, sigma: float = 0.0) -> pd.Series:
    """Per MDP: nsr(PPO, exact critic or the given sigma, lambda) / min nsr of the claim-1 baselines
    (mean over critic seeds)."""
    key = _mdp_key(df)
    ppo = df[(df["method"] == "ppo_gae") & np.isclose(df["sigma"], sigma) & np.isclose(df["gae_lambda"], lam)]
    base = _largest_group(df[df["method"].isin(CLAIM1_BASELINES)])
    if ppo.empty or base.empty:
        return pd.Series(dtype=float)
    p = ppo.groupby(key)["nsr"].mean()
    b = base.groupby(key)["nsr"].min()
    return (p / b).dropna()


def claim1_curves(df: pd.DataFrame, lam: float = CLAIM1_LAMBDA) -> pd.DataFrame:
    """Per MDP and critic noise ``sigma``: the measured relative critic error ``critic_rel_error`` and
    ``ratio`` = nsr(PPO, lambda) / min nsr(GRPO, RLOO, ReMax), both means over critic seeds, sorted
    by ``sigma`` within each MDP (the error grows with ``sigma``: the noise is ``sigma`` times a fixed draw)."""
    if "critic_rel_error" not in df.columns:
        raise ValueError("the critic results lack critic_rel_error (cached before schema 2): "
                         "rerun `tpg study critic`")
    key = _mdp_key(df)
    ppo = df[(df["method"] == "ppo_gae") & np.isclose(df["gae_lambda"], lam)]
    base = _largest_group(df[df["method"].isin(CLAIM1_BASELINES)]).groupby(key)["nsr"].min().rename("best")
    if ppo.empty or base.empty:
        return pd.DataFrame(columns=key + ["sigma", "critic_rel_error", "ratio"])
    m = ppo.groupby(key + ["sigma"])[["nsr", "critic_rel_error"]].mean().reset_index().join(base, on=key)
    m["ratio"] = m["nsr"] / m["best"]
    return m.dropna(subset=["ratio"]).sort_values(key + ["sigma"])[key + ["sigma", "critic_rel_error", "ratio"]]


def crossover_error(error_s, ratio_s) -> tuple[float, bool]:
    """``(e*, censored)``: the critic error at which PPO's noise-to-signal ratio to the best critic-free
    method first reaches 1, linearly interpolated between the two measured errors that bracket it.

    ``e* = e_(i-1) + (1 - r_(i-1)) (e_i - e_(i-1)) / (r_i - r_(i-1))`` for the first ``i`` with
    ``r_i >= 1``; ``0`` when the exact critic (the first point) already has ``r >= 1``; the largest
    measured error with ``censored = True`` when the ratio stays below 1 throughout (``e*`` is then a
    lower bound)."""
    e = np.asarray(error_s, dtype=float)
    r = np.asarray(ratio_s, dtype=float)
    if e.shape != r.shape or e.ndim != 1 or not len(e):
        raise ValueError(f"error_s and ratio_s must be 1-D of one length >= 1, got {e.shape} and {r.shape}")
    above = np.nonzero(r >= 1.0)[0]
    if not len(above):
        return float(e[-1]), True
    i = int(above[0])
    if i == 0:
        return 0.0, False
    return float(e[i - 1] + (1.0 - r[i - 1]) * (e[i] - e[i - 1]) / (r[i] - r[i - 1])), False


def claim1_table(df: pd.DataFrame, lam: float = CLAIM1_LAMBDA) -> pd.DataFrame:
    """Per MDP: ``exact_ratio`` (the ratio with the exact critic), ``crossover`` ``e*`` and ``censored``
    (:func:`crossover_error` on :func:`claim1_curves`)."""
    curves = claim1_curves(df, lam)
    key = _mdp_key(curves)
    rows = []
    for k, c in curves.groupby(key, sort=False):
        e_star, cens = crossover_error(c["critic_rel_error"], c["ratio"])
        exact = c[np.isclose(c["sigma"], 0.0)]["ratio"]
        rows.append({**dict(zip(key, k if isinstance(k, tuple) else (k,))), "crossover": e_star, "censored": cens,
                     "exact_ratio": float(exact.iloc[0]) if len(exact) else np.nan})
    return pd.DataFrame(rows, columns=key + ["crossover", "censored", "exact_ratio"])


def crossover_sigma(df: pd.DataFrame, lam: float = CLAIM1_LAMBDA) -> float:
    """The smallest sigma at which PPO's per-response MSE (variance + bias^2, over |grad J|^2, mean
    over critic seeds) exceeds the best unbiased baseline's (RLOO, ReMax) in some MDP (inf if never).
    GRPO is left out: its shrunken scale lowers its MSE without a better direction."""
    key = _mdp_key(df)
    ppo = df[(df["method"] == "ppo_gae") & np.isclose(df["gae_lambda"], lam)]
    base = _largest_group(df[df["method"].isin(MSE_BASELINES)]).groupby(key)["mse_per_response"].min()
    if ppo.empty or base.empty:
        return float("nan")
    m = ppo.groupby(key + ["sigma"])["mse_per_response"].mean().reset_index()
    m = m.join(base.rename("best"), on=key)
    worse = m[m["mse_per_response"] > m["best"]]
    return float(worse["sigma"].min()) if len(worse) else float("inf")


def claim2_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per MDP, per-response ``tr Cov`` relative to the exact global baseline (REINFORCE minus
    ``V'(s_1) = E[RM(W^(1))]``): RLOO at each group size (``rloo_G<n>``), the per-step advantages
    of an exact critic (``step_mc``: lambda = 1, ``RM - V'(s_t)``, the per-step baseline a
    practitioner can use; ``step_td``: lambda = 0, ``V'(s_{t+1}) - V'(s_t)``, Theorem 2's oracle)."""
    key = _mdp_key(df)
    glob = df[df["method"] == GLOBAL_BASELINE]
    if glob.empty:
        return pd.DataFrame()
    g = glob.groupby(key)["variance_trace"].first().rename("global")
    out = pd.DataFrame(g)
    rloo = df[df["method"] == "rloo"]
    if "group_size" in rloo.columns:
        for G, sub in rloo.groupby("group_size"):
            v = (sub["responses_per_batch"] * sub["variance_trace"]).groupby([sub[k] for k in key]).first()
            out[f"rloo_G{int(G)}"] = v / out["global"]
    ppo = df[(df["method"] == "ppo_gae") & (df["sigma"] == 0)]
    for name, lam in (("step_td", 0.0), ("step_mc", 1.0)):
        sub = ppo[np.isclose(ppo["gae_lambda"], lam)]
        if len(sub):
            out[name] = sub.groupby(key)["variance_trace"].mean() / out["global"]
    return out.reset_index()


RULE1 = (f"the critic's error is measured: e = RMS over visited states of V_hat(s_t) - V'(s_t), over std RM; per MDP, "
         f"ratio(e) = nsr(PPO, lambda={CLAIM1_LAMBDA:g}) / min nsr(GRPO, RLOO, ReMax), nsr = n tr Cov[g] / |E g|^2 "
         f"per sampled response (exact), and the crossover e* is the error at which ratio first reaches 1 "
         f"(interpolated between measured critics). A good critic has e <= {GOOD_CRITIC_ERROR:g}. Confirmed if "
         f"e* > {GOOD_CRITIC_ERROR:g} on every MDP (every good critic beats the critic-free methods); refuted if "
         f"even the exact critic (e = 0) has ratio >= 1 on every MDP; qualified otherwise (the advantage needs a "
         f"better than good critic, or holds on some MDPs only). Number: the smallest e* over the MDPs")
RULE2 = ("per response, exact, relative to REINFORCE with the exact global baseline V'(s_1) = E[RM(W^(1))]. The "
         "per-step baseline ruled on is the one a practitioner can use, RM - V'(s_t) (PPO lambda = 1, exact "
         "critic). Confirmed if RLOO's variance stays >= 0.99 of the global baseline's and falls as the group grows "
         "(it estimates that one baseline) and RM - V'(s_t) is below the global baseline on every MDP; refuted if "
         "RLOO beats the exact global baseline or RM - V'(s_t) is below it on no MDP; qualified otherwise. Number: "
         "the largest tr Cov(RM - V'(s_t)) / tr Cov(global) over the MDPs")


def _gae_row(ppo: pd.DataFrame) -> dict:
    exact = ppo[ppo["sigma"] == 0]["rel_bias"].fillna(np.inf)
    noisy1 = ppo[(ppo["sigma"] > 0) & (ppo["gae_lambda"] == 1.0)]["rel_bias"].fillna(np.inf)
    noisy_lt1 = ppo[(ppo["sigma"] > 0) & (ppo["gae_lambda"] < 1.0)]["rel_bias"].fillna(np.inf)
    max_unb = float(max(exact.max() if len(exact) else 0.0, noisy1.max() if len(noisy1) else 0.0))
    min_b = float(noisy_lt1.min()) if len(noisy_lt1) else float("nan")
    if not max_unb <= EXACT_TOL:
        status = "refuted"
    elif len(exact) and len(noisy1) and len(noisy_lt1) and min_b > BIAS_TOL:
        status = "confirmed"
    else:
        status = "qualified"
    return claim_row(
        "gae", "GAE with an exact critic is unbiased for every lambda; with an inexact critic only lambda = 1 is",
        status, max_unb, None, "max relative bias (exact critic, any lambda; noisy critic, lambda = 1)",
        "figures/critic_error.png",
        f"confirmed if that max is <= {EXACT_TOL:g} and every noisy critic with lambda < 1 has relative bias "
        f"> {BIAS_TOL:g}; qualified if some noisy lambda < 1 cell is unbiased or a part of the grid is missing; "
        f"refuted if the max exceeds {EXACT_TOL:g}",
        f"noisy critic, lambda < 1: min relative bias {min_b:.3g}")


def _claim1_row(df: pd.DataFrame) -> dict | None:
    if "critic_rel_error" not in df.columns:  # cached before schema 2: the report lists claim 1 as not run
        return None
    table = claim1_table(df)
    if table.empty or table["exact_ratio"].isna().all():
        return None
    exact = table["exact_ratio"].dropna()
    e_star = table["crossover"]
    worst = int(e_star.idxmin())
    if bool((exact >= 1.0).all()):
        status = "refuted"
    elif bool((e_star > GOOD_CRITIC_ERROR).all()):
        status = "confirmed"
    else:
        status = "qualified"
    ppo = df[df["method"] == "ppo_gae"]
    per_lam = "; ".join(f"lambda={lam:g}: max {float(claim1_ratios(df, lam).max()):.3g}"
                        for lam in sorted(set(ppo["gae_lambda"].dropna())) if len(claim1_ratios(df, lam)))
    cens = int(table["censored"].sum())
    lower = " (a lower bound: PPO stays ahead up to the largest error measured)" if bool(table.loc[worst, "censored"]) \
        else ""
    detail = (f"exact critic: PPO ahead on {int((exact < 1).sum())} of {len(exact)} MDPs, nsr ratios {per_lam}; "
              f"crossover e* median {float(e_star.median()):.3g}, range {float(e_star.min()):.3g}.."
              f"{float(e_star.max()):.3g}{lower}; {cens} of {len(table)} MDPs never cross within the measured errors; "
              f"PPO's per-response MSE (lambda={CLAIM1_LAMBDA:g}) exceeds RLOO's/ReMax's from critic noise sigma = "
              f"{crossover_sigma(df):g} (reward units) in some MDP")
    return claim_row(
        "claim1", "with a good critic PPO's gradient has lower variance than the critic-free GRPO, ReMax and "
                  "RLOO (per sampled response)",
        status, float(e_star.min()), None,
        f"critic error e* (RMS over visited states / std RM) at which PPO's (lambda={CLAIM1_LAMBDA:g}) "
        f"noise-to-signal advantage disappears, min over MDPs",
        "figures/critic_error.png", RULE1, detail)


def _claim2_row(df: pd.DataFrame) -> dict | None:
    t2 = claim2_table(df)
    rloo_cols = sorted((c for c in t2.columns if c.startswith("rloo_G")), key=lambda c: int(c[6:]))
    if not len(t2) or "step_mc" not in t2.columns or not rloo_cols:
        return None
    r = t2[rloo_cols]
    decreasing = bool((r.diff(axis=1).iloc[:, 1:] < 0).all().all()) if len(rloo_cols) > 1 else False
    lowest = float(r.min().min())
    mc = t2["step_mc"].dropna()
    if lowest < 0.99 or not bool((mc < 1.0).any()):
        status = "refuted"
    elif decreasing and bool((mc < 1.0).all()):
        status = "confirmed"
    else:
        status = "qualified"
    med = ", ".join(f"G={c[6:]}: {float(t2[c].median()):.3g}" for c in rloo_cols)
    td = (f"; Theorem 2's V'(s_(t+1)) - V'(s_t) (lambda=0, unbiased with the exact critic only): "
          f"{float(t2['step_td'].min()):.3g}..{float(t2['step_td'].max()):.3g}" if "step_td" in t2.columns else "")
    detail = (f"RM - V'(s_t) / global baseline: lower on {int((mc < 1).sum())} of {len(mc)} MDPs, "
              f"{float(mc.min()):.3g}..{float(mc.max()):.3g}, median {float(mc.median()):.3g}{td}; "
              f"RLOO / global baseline, median over MDPs: {med}")
    return claim_row(
        "claim2", "the GRPO/ReMax/RLOO baseline amounts to one global baseline E[RM(W^(1))] per prompt, "
                  "where a per-step one would lower the variance",
        status, float(mc.max()), None, "max over MDPs of tr Cov(per-step baseline RM - V'(s_t)) / "
                                       "tr Cov(exact global baseline)",
        "figures/critic_error.png", RULE2, detail)


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """gae (exact critic unbiased for every lambda; inexact only lambda = 1), claim1 (PPO with a
    good critic, by measured critic error, has lower variance than GRPO/ReMax/RLOO) and claim2 (their
    baseline is one global baseline; the per-step RM - V'(s_t) is better)."""
    if df is None or df.empty:
        return []
    ppo = df[df["method"] == "ppo_gae"]
    out = [_gae_row(ppo)] if len(ppo) else []
    return out + [r for r in (_claim1_row(df), _claim2_row(df)) if r is not None]
