"""Variance against response length: REINFORCE, RLOO, GRPO, PPO and TRePO at H = 64 .. 1024.

The variance study (:mod:`~tpg.experiments.studies.variance`) runs on trees of a few hundred
responses, where every estimator's moments can be enumerated. Long chains of thought are where the
estimators part ways: a response-level baseline (RLOO, GRPO) leaves every token with the noise of the
whole response's reward, while a per-step advantage (PPO's critic, TRePO's continuations) leaves each
token with the noise of its own step. This study measures that at lengths no tree can hold, on
problems the Markov engine solves exactly (docs/THEORY.md section 3.1):

* a :class:`~tpg.policies.SharedSoftmax` policy (logits ``theta[t, prev]``, ``N(0, 1)``, one prompt,
  ``V = 4``) on compact rewards (a table over (position, previous token, token)) of the ``dense``
  (``N(0, 1)`` on every token) or ``terminal`` (``N(0, 1)`` on the last token only) family;
* with EOS (``eos_rate > 0``: token 0 with ``pi(EOS | t, prev) = eos_rate / H`` in every row, so
  lengths are near-geometric with mean about ``0.43 H`` for ``eos_rate = 2``) or without (every
  response has ``H`` tokens);
* ``grad J`` exact (:func:`tpg.exact.solve_markov`), the estimators' gradients from ``samples``
  Monte Carlo batches in the policy's own logit rows (:func:`tpg.verify.sample_gradient_terms` with
  ``engine="markov"``), exactly what ``tpg verify --mode mc`` does at these lengths.

The estimators (``group_size`` ``G = 4`` for the group methods; a batch is one prompt with its
``G`` responses, else one response):

* ``reinforce``: ``A = RM``;
* ``rloo``: ``A_i = RM_i - mean_{j != i} RM_j`` (unbiased);
* ``grpo_mean``: ``grpo:std_norm=false``, ``E g = (1 - 1/G) grad J``;
* ``grpo_std``: ``grpo``, the std division (biased);
* ``ppo_exact``: ``ppo_gae:critic=exact,lambda=0``, ``A_t = V'(s_{t+1}) - V'(s_t)`` with the exact
  critic (Theorem 2; unbiased; the critic is an oracle and costs no tokens);
* ``ppo_learned``: ``ppo_gae:critic=tabular,lambda=0``, a table over the states ``(t, prev)``
  fitted to 20 x 64 sampled returns (cost reported as ``critic_fit_tokens``, not in
  ``tokens_per_batch``); a fixed inexact critic at ``lambda < 1``: biased by construction, and on
  dense rewards the ``(t, prev)`` table cannot represent the reward already earned (aliasing);
* ``trepo``: ``trepo:anchors=every:H/8,K=2`` (segment fill): 8 segments, each valued by ``K = 2``
  continuations of its start; the continuations are counted in ``tokens_per_batch``.

Per cell (one estimator, one problem, one length), one row: ``tr Cov[g]`` with its standard error,
per batch and per response, ``|grad J|^2``, noise-to-signal ratios, tokens per batch and the Monte
Carlo verdict at ``samples`` batches (:func:`tpg.verify.mc_test`, the estimator as its own Holm
family at ``alpha = 0.01``: the record ``tpg verify`` prints for that estimator alone).

Measured run time (``tpg study long_horizon``, ``--jobs 2`` on 2 cores shared with other work, load
average about 3, fresh cache): quick (28 cells) 11 s; full (140 cells) 111 s. A cell at ``H = 1024``
takes 2-10 s and peaks near 1.3 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import claim_row, single_thread

NAME = "long_horizon"
TITLE = "Variance against response length (H = 64 .. 1024): exact grad J by the Markov engine, Monte Carlo moments"
FIGURES = ["variance_length"]

HORIZONS = (64, 128, 256, 512, 1024)
QUICK_HORIZONS = (64, 256)
FAMILIES = ("dense", "terminal")
#: pi(EOS | t, prev) = EOS_RATE / H in the EOS problems (mean length ~ 0.43 H)
EOS_RATE = 2.0
GROUP = 4
SEGMENTS = 8
CONTINUATIONS = 2
ALPHA = 0.01
#: the methods, in the figures' order: (key, label)
METHODS: tuple[tuple[str, str], ...] = (
    ("reinforce", "REINFORCE"),
    ("rloo", "RLOO (G=4)"),
    ("grpo_mean", "GRPO mean-only (G=4)"),
    ("grpo_std", "GRPO std (G=4)"),
    ("ppo_exact", "PPO, exact critic (λ=0)"),
    ("ppo_learned", "PPO, learned critic (λ=0)"),
    ("trepo", "TRePO (8 segments, K=2)"),
)
#: the methods whose expected gradient is grad J by theorem
UNBIASED = ("reinforce", "rloo", "ppo_exact", "trepo")

COLUMNS: dict[str, str] = {
    "method": "role of the estimator: " + ", ".join(k for k, _ in METHODS),
    "label": "display name of the method",
    "spec": "the estimator spec (TRePO's anchor spacing is H / 8)",
    "responses_per_batch": "responses in one batch: G for the group methods, else 1",
    "expected_length": "exact E[T] of the policy (tokens)",
    "grad_norm_sq": "exact |grad J|^2 (squared reward units per squared logit)",
    "variance_trace": "tr Cov[g] of one batch's gradient, unbiased Monte Carlo estimate (squared reward units per "
                      "squared logit)",
    "variance_trace_se": "standard error of variance_trace",
    "variance_per_response": "variance_trace * responses_per_batch: the variance at a budget of one response",
    "variance_per_response_se": "standard error of variance_per_response",
    "nsr": "variance_per_response / |grad J|^2: noise-to-signal per response (dimensionless)",
    "nsr_se": "standard error of nsr",
    "scale": "best-fit c in E g ~ c grad J (mean of the per-batch scales)",
    "scale_se": "standard error of scale",
    "nsr_own_scale": "nsr / c^2: noise-to-signal against the estimator's own mean c grad J (step-size invariant; "
                     "NaN when c <= 0)",
    "nsr_own_scale_se": "standard error of nsr_own_scale (delta method: trace and scale errors)",
    "tokens_per_batch": "policy tokens sampled per batch: responses plus TRePO's continuations (tokens)",
    "hook_tokens_per_batch": "of which continuations (tokens)",
    "critic_fit_tokens": "tokens sampled once to fit the learned critic (not in tokens_per_batch)",
    "nsr_x_tokens": "variance_trace * tokens_per_batch / |grad J|^2: noise-to-signal of the gradient averaged over "
                    "a budget of one token (divide by the budget; tokens)",
    "nsr_x_tokens_se": "standard error of nsr_x_tokens",
    "verdict": "Monte Carlo verdict at `samples` batches: consistent, consistent-scaled or biased (alpha = 0.01)",
    "p_value": "raw p-value of the scale test c = 1",
    "p_value_direction": "raw p-value of the direction test E g || grad J",
    "mde_rel_bias": "smallest |b| / |grad J| the direction test detects with 80% power at this N",
    "cosine": "cosine between the sample mean and grad J (noisy)",
}


@dataclass(frozen=True)
class Cell:
    """One estimator (``method``, ``spec``, ``group_size``) on one problem: the reward ``family``
    (``dense`` | ``terminal``), ``eos_rate`` (0: no EOS; else ``pi(EOS) = eos_rate / horizon``),
    ``horizon``, ``vocab``, with ``samples`` Monte Carlo batches; ``seed`` seeds the rewards, the
    policy (``seed + 1000``), the batches and the critic."""

    family: str
    eos_rate: float
    horizon: int
    method: str
    spec: str
    group_size: int
    vocab: int = 4
    samples: int = 1000
    seed: int = 0


def method_spec(method: str, horizon: int) -> tuple[str, int]:
    """``(spec, group size)`` of a method at a length."""
    specs = {"reinforce": ("reinforce", 1), "rloo": ("rloo", GROUP), "grpo_mean": ("grpo:std_norm=false", GROUP),
             "grpo_std": ("grpo", GROUP), "ppo_exact": ("ppo_gae:critic=exact,lambda=0", 1),
             "ppo_learned": ("ppo_gae:critic=tabular,lambda=0", 1),
             "trepo": (f"trepo:anchors=every:{max(1, horizon // SEGMENTS)},K={CONTINUATIONS}", 1)}
    if method not in specs:
        raise ValueError(f"method must be one of {', '.join(specs)}; got {method!r}")
    return specs[method]


def cells(quick: bool = False) -> list[Cell]:
    """quick: H in {64, 256}, both families with EOS (28 cells); full: H in {64, ..., 1024}, both
    families, with and without EOS (140 cells); every method, 1000 batches each."""
    horizons = QUICK_HORIZONS if quick else HORIZONS
    rates = (EOS_RATE,) if quick else (EOS_RATE, 0.0)
    out = []
    for family in FAMILIES:
        for rate in rates:
            for H in horizons:
                for method, _ in METHODS:
                    spec, G = method_spec(method, H)
                    out.append(Cell(family=family, eos_rate=rate, horizon=H, method=method, spec=spec, group_size=G))
    return out


# ------------------------------------------------------------------------------ the problem
def set_eos_probability(policy, eos_token: int, prob: float) -> None:
    """Set the EOS logit of every row of a shared policy so that ``pi(eos | t, prev) = prob``:
    ``theta[t, prev, e] = logsumexp_{w != e} theta[t, prev, w] + log(prob / (1 - prob))`` (in place)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"the EOS probability must be in (0, 1), got {prob!r}")
    V = policy.vocab_size
    others = [w for w in range(V) if w != eos_token]
    with torch.no_grad():
        rest = torch.logsumexp(policy.logits[..., others], -1)
        policy.logits[..., eos_token] = rest + math.log(prob / (1.0 - prob))


def long_problem(family: str, horizon: int, vocab: int = 4, eos_rate: float = EOS_RATE, seed: int = 0):
    """``(mdp, policy)``: compact ``family`` rewards (seed ``seed``) and a seeded shared policy
    (``seed + 1000``), with EOS token 0 at ``pi(EOS) = eos_rate / horizon`` when ``eos_rate > 0``."""
    from tpg.cases import make_policy
    from tpg.mdp import make_mdp

    if not eos_rate >= 0.0 or (eos_rate > 0 and eos_rate >= horizon):
        raise ValueError(f"eos_rate must be 0 (no EOS) or in (0, horizon = {horizon}), got {eos_rate!r}")
    mdp = make_mdp(family, vocab=vocab, horizon=horizon, eos=0 if eos_rate > 0 else None, prompts=1, seed=seed,
                   compact=True)
    policy = make_policy(mdp, "shared", seed=seed)
    if eos_rate > 0:
        set_eos_probability(policy, 0, eos_rate / horizon)
    return mdp, policy


def trace_terms(samples, pi_rv: torch.Tensor, pmap) -> torch.Tensor:
    """Per-batch terms ``q_i = N/(N-1) |g_i - g_bar|^2`` (mean: the unbiased ``tr Cov[g]``), in the
    policy's logit rows without dense gradients: ``|g_i - g_bar|^2 = |g_i|^2 - 2 <g_i, g_bar> + |g_bar|^2``
    with ``|g_i|^2`` from :func:`tpg.verify.score.batch_sq_norms` and ``<g_i, g_bar>`` a projection
    (:func:`tpg.verify.score.batch_projections`)."""
    from tpg.verify.montecarlo import sample_mean
    from tpg.verify.score import batch_projections, batch_sq_norms, centered_directions

    N = samples.num_batches
    mean = sample_mean(samples, pi_rv, pmap)
    sq = batch_sq_norms(samples.coef_bt, samples.nt_bt, samples.tok_bt, pi_rv, samples.batch_b, N)
    a = centered_directions(pmap.to_logits(mean.unsqueeze(1)), pi_rv)
    dot = batch_projections(samples.coef_bt, samples.nt_bt, samples.tok_bt, a, samples.batch_b, N)[:, 0]
    return (sq - 2.0 * dot + float(mean @ mean)).clamp(min=0.0) * (N / (N - 1))


# ------------------------------------------------------------------------------ the cell
def run_cell(cell: Cell) -> pd.DataFrame:
    """The cell's row (columns: :data:`COLUMNS`), on one torch thread (the runner parallelises over cells)."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    from tpg.estimators import get_estimator
    from tpg.exact import solve_markov
    from tpg.verify.markov_context import MarkovMonteCarloContext
    from tpg.verify.montecarlo import mc_test, sample_gradient_terms
    from tpg.verify.exact_moments import batch_layout, rows_per_batch
    from tpg.verify.score import RowParamMap

    labels = dict(METHODS)
    if cell.method not in labels:
        raise ValueError(f"method must be one of {', '.join(labels)}; got {cell.method!r}")
    mdp, policy = long_problem(cell.family, cell.horizon, cell.vocab, cell.eos_rate, cell.seed)
    sol = solve_markov(mdp, policy)
    grad_j = sol.flat_grad()
    pmap = RowParamMap(policy, mdp.horizon)
    pi = sol.logp.exp().reshape(-1, mdp.vocab_size)
    est = get_estimator(cell.spec)
    # the seeds and calls of tpg.verify's Monte Carlo mode, so a cell's verdict is that of
    # `tpg verify --mode mc --samples N --seed S` for this estimator alone
    gen = torch.Generator().manual_seed(int(cell.seed))
    ctx = MarkovMonteCarloContext(mdp, policy, generator=gen, seed=cell.seed, sol=sol)
    gs = sample_gradient_terms(mdp, policy, est, cell.samples, cell.group_size, generator=gen, context=ctx,
                               engine="markov")
    res = mc_test(gs, grad_j, pi, pmap, alpha=ALPHA, seed=cell.seed)
    q = trace_terms(gs, pi, pmap)
    N = gs.num_batches
    trace, trace_se = float(q.mean()), float(q.std()) / math.sqrt(N)
    layout, G = batch_layout(est, cell.group_size)
    G = rows_per_batch(layout, G)
    gn2 = float(grad_j @ grad_j)
    c, c_se = float(res.scale_mean), float(res.scale_se)
    nsr, nsr_se = trace * G / gn2, trace_se * G / gn2
    if c > 0:
        own = nsr / c ** 2
        own_se = own * math.sqrt((nsr_se / nsr) ** 2 + (2.0 * c_se / c) ** 2) if nsr > 0 else 0.0
    else:
        own = own_se = float("nan")
    v = res.verdict
    row = {"method": cell.method, "label": labels[cell.method], "spec": est.spec, "responses_per_batch": G,
           "expected_length": float(sol.expected_length), "grad_norm_sq": gn2,
           "variance_trace": trace, "variance_trace_se": trace_se,
           "variance_per_response": trace * G, "variance_per_response_se": trace_se * G,
           "nsr": nsr, "nsr_se": nsr_se, "scale": c, "scale_se": c_se, "nsr_own_scale": own,
           "nsr_own_scale_se": own_se, "tokens_per_batch": float(gs.tokens_per_batch),
           "hook_tokens_per_batch": float(gs.hook_tokens_per_batch), "critic_fit_tokens": float(ctx.critic_tokens),
           "nsr_x_tokens": trace * gs.tokens_per_batch / gn2, "nsr_x_tokens_se": trace_se * gs.tokens_per_batch / gn2,
           "verdict": v.verdict, "p_value": float(v.p_value), "p_value_direction": float(v.p_value_direction),
           "mde_rel_bias": float(v.mde_rel_bias), "cosine": float(v.cosine)}
    return pd.DataFrame([row], columns=list(COLUMNS))


# ------------------------------------------------------------------------------ claims
def _problems(df: pd.DataFrame) -> list[tuple[str, float]]:
    return sorted({(r.family, float(r.eos_rate)) for r in df[["family", "eos_rate"]].itertuples()})


def _problem_name(family: str, rate: float) -> str:
    return f"{family}, {'EOS' if rate > 0 else 'no EOS'}"


def _ratio(df: pd.DataFrame, num: str, den: str, column: str) -> pd.DataFrame:
    """Per (problem, horizon): ``column`` of ``num`` over that of ``den``, with the standard error of its
    logarithm (independent cells: ``sqrt((se_a/a)^2 + (se_b/b)^2)``)."""
    key = ["family", "eos_rate", "horizon"]
    cols = [column, column + "_se"]
    a = df[df["method"] == num].set_index(key)[cols].rename(columns=lambda c: c + "_a")
    b = df[df["method"] == den].set_index(key)[cols].rename(columns=lambda c: c + "_b")
    j = a.join(b, how="inner")
    out = pd.DataFrame(index=j.index)
    out["ratio"] = j[column + "_a"] / j[column + "_b"]
    rel_a, rel_b = j[column + "_se_a"] / j[column + "_a"], j[column + "_se_b"] / j[column + "_b"]
    out["log_se"] = np.sqrt(rel_a ** 2 + rel_b ** 2)
    return out.reset_index()


#: a difference counts when it is this many standard errors from 0
Z = 2.0


def critic_gain_row(df: pd.DataFrame) -> dict | None:
    """long_critic_gain: the ratio ``r(H) = nsr(RLOO) / nsr(PPO, exact critic)`` grows with length.

    Per problem: ``growth = log r(H_max) - log r(H_min)`` with standard error from both cells of both
    lengths. Confirmed if ``growth > Z se`` in every problem; refuted if ``growth < -Z se`` in any;
    qualified otherwise (a growth within noise somewhere)."""
    r = _ratio(df, "rloo", "ppo_exact", "nsr")
    if r.empty or r["horizon"].nunique() < 2:
        return None
    parts, growths, ses, status = [], [], [], "confirmed"
    for fam, rate in _problems(r):
        p = r[(r["family"] == fam) & (r["eos_rate"] == rate)].sort_values("horizon")
        if len(p) < 2:
            continue
        lo, hi = p.iloc[0], p.iloc[-1]
        g = math.log(hi["ratio"]) - math.log(lo["ratio"])
        se = math.sqrt(hi["log_se"] ** 2 + lo["log_se"] ** 2)
        growths.append(g)
        ses.append(se)
        if g < -Z * se:
            status = "refuted"
        elif g <= Z * se and status == "confirmed":
            status = "qualified"
        parts.append(f"{_problem_name(fam, rate)}: {lo['ratio']:.3g} at H={int(lo['horizon'])} -> {hi['ratio']:.3g} at "
                     f"H={int(hi['horizon'])}")
    if not growths:
        return None
    i = int(np.argmin(growths))
    factor = math.exp(growths[i])
    return claim_row(
        "long_critic_gain", "A per-step critic's variance advantage over a response-level baseline grows with length: "
                            "nsr(RLOO) / nsr(PPO, exact critic) is larger at H_max than at H_min",
        status, factor, factor * ses[i], "smallest growth factor of the ratio from H_min to H_max over the problems",
        "figures/variance_length.png",
        f"per problem (family x EOS): growth = log r(H_max) - log r(H_min), se from the four cells' standard errors; "
        f"confirmed if growth > {Z:g} se in every problem, refuted if growth < -{Z:g} se in any, qualified otherwise",
        "; ".join(parts))


def trepo_tokens_row(df: pd.DataFrame) -> dict | None:
    """long_trepo_tokens: at the largest length, TRePO's noise-to-signal per token spent (continuations
    included) is below RLOO's. Confirmed if ``log(ratio) < -Z se`` in every problem; refuted if
    ``log(ratio) > Z se`` in every problem; qualified otherwise (mixed, or within noise)."""
    r = _ratio(df, "trepo", "rloo", "nsr_x_tokens")
    if r.empty:
        return None
    H = int(r["horizon"].max())
    top = r[r["horizon"] == H]
    logs = np.log(top["ratio"].to_numpy())
    ses = top["log_se"].to_numpy()
    below, above = logs < -Z * ses, logs > Z * ses
    status = "confirmed" if below.all() else ("refuted" if above.all() else "qualified")
    i = int(np.argmax(logs))  # the least favourable problem for the claim
    parts = [f"{_problem_name(row.family, row.eos_rate)}: {row.ratio:.3g}" for row in top.itertuples()]
    small = r[r["horizon"] == r["horizon"].min()]
    return claim_row(
        "long_trepo_tokens", f"At long lengths (H = {H}), TRePO (8 segments, K = 2) spends its tokens better than RLOO "
                             f"(G = 4): a lower tr Cov[g] x tokens per batch, continuations included",
        status, float(top["ratio"].iloc[i]), float(top["ratio"].iloc[i] * ses[i]),
        f"largest ratio nsr_x_tokens(TRePO) / nsr_x_tokens(RLOO) at H = {H} over the problems",
        "figures/variance_length.png",
        f"at the largest H, per problem: confirmed if log ratio < -{Z:g} se in every problem, refuted if > {Z:g} se "
        f"in every problem, qualified otherwise",
        f"H = {H}: " + "; ".join(parts) + f"; at H = {int(small['horizon'].iloc[0])}: "
        + "; ".join(f"{_problem_name(row.family, row.eos_rate)}: {row.ratio:.3g}" for row in small.itertuples()))


def binomial_upper(n: int, p: float, q: float = 0.99) -> int:
    """The smallest ``k`` with ``P(Binomial(n, p) <= k) >= q``."""
    from scipy import stats

    return int(stats.binom.ppf(q, n, p)) if n > 0 else 0


def verdicts_row(df: pd.DataFrame) -> dict | None:
    """long_mc_verdicts: Monte Carlo verification at long lengths says what the theory does. The unbiased
    methods' cells (REINFORCE, RLOO, PPO exact, TRePO segment) are tests at level ``alpha`` each, so some
    false alarms are expected: confirmed if none is flagged and every GRPO (std) cell is flagged (not
    ``consistent``); qualified if the flagged unbiased cells are within the 99% binomial bound of
    ``alpha n`` or a GRPO (std) cell goes unflagged; refuted past that bound."""
    unb = df[df["method"].isin(UNBIASED)]
    std = df[df["method"] == "grpo_std"]
    if unb.empty:
        return None
    flagged = int((unb["verdict"] != "consistent").sum())
    n = len(unb)
    bound = binomial_upper(n, ALPHA)
    missed = int((std["verdict"] == "consistent").sum())
    if flagged > bound:
        status = "refuted"
    elif flagged == 0 and missed == 0:
        status = "confirmed"
    else:
        status = "qualified"
    kinds = ", ".join(f"{n} {v}" for v, n in std["verdict"].value_counts().items()) or "none"
    return claim_row(
        "long_mc_verdicts", "Monte Carlo verification at H = 64 .. 1024 against the Markov engine's exact grad J: "
                            "REINFORCE, RLOO, PPO (exact critic) and TRePO (segment) consistent; GRPO (std) flagged",
        status, float(flagged), None, f"unbiased cells flagged, of {n} (alpha = {ALPHA:g} each)",
        "figures/variance_length.png",
        f"confirmed if no unbiased cell is flagged and every GRPO (std) cell is; qualified if the flagged count is "
        f"<= {bound} (the 99% binomial bound of alpha n) or a GRPO (std) cell reads consistent; refuted above {bound}",
        f"GRPO (std) verdicts: {kinds}; GRPO (std) cells read consistent: {missed} of {len(std)}")


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """long_critic_gain, long_trepo_tokens, long_mc_verdicts (docs/THEORY.md section 3.1)."""
    if df is None or df.empty:
        return []
    rows = [critic_gain_row(df), trepo_tokens_row(df), verdicts_row(df)]
    return [r for r in rows if r is not None]


__all__ = ["NAME", "TITLE", "COLUMNS", "FIGURES", "Cell", "cells", "run_cell", "claim_rows", "long_problem",
           "set_eos_probability", "method_spec", "trace_terms", "METHODS", "UNBIASED"]
