"""Off-policy corrections: exact bias and variance of every policy loss against the size of the mismatch, and
learning curves under a fixed mismatch (docs/THEORY.md section 8).

``pi`` is the policy whose ``grad J(pi)`` is the target, ``mu`` the behaviour the responses come from
(:mod:`tpg.offpolicy`). Three parts, one kind of cell each:

* ``sweep``: one problem (a tabular MDP with a seeded policy, or a tiny transformer on a task), one
  estimator (REINFORCE, or RLOO with ``G = 2``) and one kind of mismatch, swept over its size — the
  engine's temperature ``T``, the mass ``1 - p`` top-p cuts off, the logit noise ``sigma`` (one fixed
  draw) and the staleness ``k`` (``stale:k,lr=eta``: ``k`` exact ascent steps before ``pi``); size 0 (``T = 1``)
  is ``mu = pi``. For every size and every loss of :data:`LOSSES`, :func:`tpg.offpolicy.offpolicy_moments`
  enumerates the batches under ``mu`` and gives ``E_mu[g]`` and ``tr Cov_mu[g]`` exactly, so

      rel_bias = |E_mu g - grad J| / |grad J|,   1 - cos(E_mu g, grad J),
      nsr = n tr Cov_mu[g] / |grad J(pi)|^2      (noise-to-signal per response, n responses per batch),

  ``nsr`` being the variance of one response's share of the gradient measured in units of the target's
  squared norm: comparable across losses (the signal is the same target for all, so a loss that
  shrinks its own mean is not flattered) and across problems.
* ``length``: REINFORCE on stationary problems (:func:`stationary_problem`: one prompt, no EOS, the same
  policy and token reward at every state, so only the length ``H`` changes) for ``H = 1 .. 6`` at one
  fixed per-token mismatch (temperature 2 or logit noise 0.5): how each correction's variance grows with
  the length, against ``E_mu[rho^2]`` (:func:`~tpg.offpolicy.behaviour.mismatch_report`). The variance
  inflation of a loss is ``nsr(loss, mu) / nsr(pg, pi)``, its ``nsr`` over the on-policy REINFORCE's on
  the same problem.
* ``curve``: ``tpg train`` (:class:`~tpg.train.TrainConfig` with ``behaviour`` and ``loss``; one Adam step
  per iteration, RLOO, 8 prompts x 4 responses) under a fixed mismatch (``top_p:0.8``, ``stale:4``: the
  policy of 4 iterations earlier) with each correction of :data:`CURVE_LOSSES`, plus the on-policy
  reference (``behaviour = pi``, loss ``pg``), over seeds; the exact ``J`` after every iteration.

Measured on 2 CPU cores shared with other work (``n_jobs = 2``, ``tpg study offpolicy``, worker start-up
included): quick (46 cells) 13 s at load 1.5 and 26 s at load 3.3 (9 s of compute in one process); full
(182 cells) 90 s at load 3.3, 2 min 20 s beside a test run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import BIAS_TOL, EXACT_TOL, claim_row, single_thread

NAME = "offpolicy"
TITLE = "off-policy corrections: bias and variance of each loss against the mismatch, learning curves under mismatch"
FIGURES = ["offpolicy_bias", "offpolicy_variance", "offpolicy_length", "offpolicy_curves"]

PARTS = ("sweep", "length", "curve")
#: the losses of the sweeps, in the figures' order
LOSSES: tuple[str, ...] = ("pg", "is_token", "is_seq", "tis:2", "tis:2,level=seq", "mis:0.5,2", "ppo_clip:0.2",
                           "gspo", "cispo:0.2")
#: the losses of the length part (the importance corrections whose variance depends on the length)
LENGTH_LOSSES: tuple[str, ...] = ("pg", "is_token", "is_seq", "tis:2", "tis:2,level=seq")
#: the corrections compared in the learning curves
CURVE_LOSSES: tuple[str, ...] = ("pg", "is_token", "is_seq", "tis:2", "ppo_clip:0.2")
KINDS = ("temperature", "top_p", "logit_noise", "stale")
#: mismatch kinds under which mu's support contains pi's (sequence-level IS is unbiased there)
FULL_SUPPORT = ("temperature", "logit_noise", "stale")
#: the sizes of each kind (0 / T = 1: mu = pi), quick and full
SIZES = {"temperature": ((1.0, 1.5, 2.0, 3.0), (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)),
         "top_p": ((0.0, 0.1, 0.2, 0.5), (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)),
         "logit_noise": ((0.0, 0.25, 0.5, 1.0), (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)),
         "stale": ((0.0, 1.0, 2.0, 4.0), (0.0, 1.0, 2.0, 4.0, 8.0, 16.0))}
#: the step of stale:k,lr= per problem kind (a transformer moves far per unit step)
STALE_LR = {"tabular": 0.5, "transformer": 0.02}
TAB_PROBLEMS = tuple(f"mdp:{fam}:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed={s}"
                     for fam in ("dense", "terminal") for s in (0, 1, 2))
TRANSFORMER_PROBLEM = "task:copy:vocab=4,length=2,prompts=4,eos=true"
#: length part: the problem template (``{H}``: the horizon) and the mismatches
LENGTH_TEMPLATE = "stationary:vocab=3,horizon={H},seed={seed}"
LENGTH_MISMATCH = (("temperature", 2.0), ("logit_noise", 0.5))
#: length part: the lengths whose growth decides the rule (the last ones of a series)
TAIL = 3
CURVE_PROBLEMS = ("mdp:dense:vocab=3,horizon=3,eos=0,prompts=2", TRANSFORMER_PROBLEM)
CURVE_BEHAVIOURS = ("top_p:0.8", "stale:4")
#: the last fraction of the iterations whose mean j_norm is a run's final J
FINAL_FRACTION = 0.25

COLUMNS: dict[str, str] = {
    "part": "sweep | length | curve",
    "problem_kind": "tabular (table policy on an MDP) or transformer (tiny transformer on a task)",
    "problem": "the problem: mdp:SPEC or task:SPEC",
    "horizon": "the problem's horizon H (tokens)",
    "series": "length: the series a row belongs to (problem template, seed and mismatch); else empty",
    "estimator": "the estimator spec (sweep/length: verified; curve: trained with)",
    "group_size": "G of a group estimator, 1 otherwise",
    "responses_per_batch": "n: responses in one batch as the verifier lays it out",
    "kind": "sweep/length: the mismatch kind (temperature | top_p | logit_noise | stale); curve: empty",
    "size": "sweep/length: the mismatch size: T (temperature), 1 - p (top_p), sigma (logit_noise), k (stale)",
    "on_policy": "sweep/length: mu = pi on every state mu visits (always at T = 1, p = 1, sigma = 0, k = 0)",
    "behaviour": "the behaviour spec mu",
    "loss": "the policy loss's canonical spec",
    "loss_name": "the loss's catalog name, with the level for tis (tis, tis_seq)",
    "verdict": "sweep/length: exact verdict of E_mu[g] against grad J(pi): unbiased | scaled | biased | error",
    "scale": "best-fit c in E_mu g ~ c grad J (dimensionless)",
    "cosine": "cosine between E_mu[g] and grad J(pi) (dimensionless)",
    "one_minus_cos": "1 - cosine (dimensionless)",
    "rel_bias": "|E_mu g - grad J| / |grad J| (dimensionless)",
    "variance_trace": "tr Cov_mu[g] of one batch's gradient (squared parameter units)",
    "nsr": "noise-to-signal per response: responses_per_batch * tr Cov_mu[g] / |grad J(pi)|^2 (dimensionless)",
    "grad_norm": "|grad J(pi)| in parameter space",
    "kl_token": "KL(mu || pi) per token along mu's responses (nats)",
    "kl_seq": "KL(P_mu || P_pi) per response (nats)",
    "max_token_ratio": "largest pi/mu over the (state, token) pairs mu can sample",
    "max_seq_ratio": "largest P_pi(W)/P_mu(W) over mu's responses",
    "pi_mass_outside_seq": "P_pi(mu never samples W): the mass mu's support leaves out",
    "seq_ratio_second_moment": "E_mu[rho^2], rho = P_pi(W)/P_mu(W): sequence-level IS's variance factor",
    "error": "the error message of a (size, loss) that could not be computed, else empty",
    "seed": "curve: training seed",
    "iter": "curve: training iteration (0 = the initial policy)",
    "J": "curve: exact J after the iteration (reward units)",
    "j_norm": "curve: (J - J_min) / (J_max - J_min), J_min/J_max the worst/best deterministic policy's J",
    "kl_mu_pi": "curve: exact KL(mu || pi) per token of the iteration's behaviour (nats; 0 on-policy)",
    "tokens_total": "curve: policy tokens sampled so far",
    "clip_frac": "curve: fraction of tokens whose gradient the loss zeroed (clipped or masked)",
}


@dataclass(frozen=True)
class Cell:
    """``part`` (sweep | length | curve) and ``problem`` (``mdp:SPEC`` or ``task:SPEC``); sweep and
    length: ``estimator``, ``group_size``, ``kind`` of mismatch and its ``sizes``, the ``losses``,
    ``stale_lr`` (eta of ``stale:k,lr=``), ``noise_seed`` (of ``logit_noise``), ``series`` (length part);
    curve: ``behaviour``, ``loss`` (one correction), training ``seed``, ``iters``, ``prompts`` (with
    ``group_size`` responses each)."""

    part: str
    problem: str
    estimator: str = "rloo"
    group_size: int = 2
    kind: str = ""
    sizes: tuple[float, ...] = ()
    losses: tuple[str, ...] = LOSSES
    stale_lr: float = 0.5
    noise_seed: int = 0
    series: str = ""
    behaviour: str = ""
    loss: str = ""
    seed: int = 0
    iters: int = 0
    prompts: int = 8


def _sweeps(quick: bool) -> list[Cell]:
    q = 0 if quick else 1
    out = []
    tab = TAB_PROBLEMS[:1] if quick else TAB_PROBLEMS
    ests = (("rloo", 2),) if quick else (("reinforce", 1), ("rloo", 2))
    for prob in tab:
        for est, G in ests:
            out += [Cell("sweep", prob, est, G, kind, SIZES[kind][q], stale_lr=STALE_LR["tabular"]) for kind in KINDS]
    t_ests = (("reinforce", 1),) if quick else (("reinforce", 1), ("rloo", 2))
    for est, G in t_ests:
        for kind in KINDS:
            sizes = SIZES[kind][q]
            if kind == "stale":  # each exact ascent step of the transformer costs a solve: keep k small
                sizes = (0.0, 1.0, 2.0) if quick else (0.0, 1.0, 2.0, 4.0)
            out.append(Cell("sweep", TRANSFORMER_PROBLEM, est, G, kind, sizes, stale_lr=STALE_LR["transformer"]))
    return out


def _lengths(quick: bool) -> list[Cell]:
    horizons = range(1, 6) if quick else range(1, 7)
    seeds = (0,) if quick else (0, 1, 2)
    mismatches = LENGTH_MISMATCH[:1] if quick else LENGTH_MISMATCH
    out = []
    for kind, size in mismatches:
        for seed in seeds:
            template = LENGTH_TEMPLATE.replace("{seed}", str(seed))
            series = f"{template.replace('{H}', 'H')} under {_behaviour_spec(kind, size, 0.5, 0)}"
            out += [Cell("length", template.replace("{H}", str(H)), "reinforce", 1, kind,
                         (identity_size(kind), size), LENGTH_LOSSES, series=series) for H in horizons]
    return out


def _curves(quick: bool) -> list[Cell]:
    out = []
    for prob in (CURVE_PROBLEMS[:1] if quick else CURVE_PROBLEMS):
        transformer = prob.startswith("task:")
        seeds = range(3) if quick else range(4 if transformer else 6)
        iters = 15 if quick else (25 if transformer else 40)
        behaviours = CURVE_BEHAVIOURS[1:] if transformer else CURVE_BEHAVIOURS
        runs = [("pi", "pg")] + [(b, l) for b in behaviours for l in CURVE_LOSSES]
        out += [Cell("curve", prob, "rloo", 4, behaviour=b, loss=l, seed=s, iters=iters, losses=())
                for b, l in runs for s in seeds]
    return out


def cells(quick: bool = False) -> list[Cell]:
    """quick: the tabular dense MDP (RLOO) and the copy transformer (REINFORCE) swept over four sizes of
    each mismatch kind (three staleness steps for the transformer), lengths 1..5 under temperature 2 (one
    seed), tabular learning curves (3 seeds, 15 iterations); full: six tabular MDPs and the transformer with
    REINFORCE and RLOO over six sizes (four for the transformer's staleness), lengths 1..6 under temperature
    2 and logit noise 0.5 (three seeds each), tabular learning curves under top_p:0.8 and stale:4 (6 seeds,
    40 iterations) and transformer ones under stale:4 (4 seeds, 25 iterations)."""
    return _sweeps(quick) + _lengths(quick) + _curves(quick)


# ------------------------------------------------------------------------------ the cells
def _behaviour_spec(kind: str, size: float, stale_lr: float, noise_seed: int) -> str:
    if kind == "temperature":
        return f"temperature:{size:g}"
    if kind == "top_p":
        return f"top_p:{1.0 - size:.10g}"
    if kind == "logit_noise":
        return f"logit_noise:{size:g},{noise_seed}"
    if kind == "stale":
        return f"stale:{int(size)},lr={stale_lr:g}"
    raise ValueError(f"offpolicy: kind must be one of {', '.join(KINDS)}, got {kind!r}")


def identity_size(kind: str) -> float:
    """The size at which a kind's spec is the identity (``mu = pi``): ``T = 1``, else 0."""
    return 1.0 if kind == "temperature" else 0.0


def _loss_name(spec: str) -> str:
    name = spec.split(":", 1)[0]
    if name == "tis" and "level=" in spec:
        return f"tis_{spec.split('level=', 1)[1].split(',', 1)[0]}"
    return name


def stationary_problem(vocab: int, horizon: int, seed: int):
    """``(mdp, policy)`` with nothing but the length changing with ``horizon``: one prompt, no EOS, the token
    reward ``r(s, w) = c_w`` and the policy ``pi(. | s) = softmax(z)`` the same at every state (``c, z ~ N(0, 1)``
    from ``seed``), so that a per-state behaviour (temperature) puts i.i.d. ratios on the tokens and
    ``E_mu[rho^2] = E_mu[r^2]^H`` exactly."""
    import torch

    from tpg.mdp.mdp import TokenMDP
    from tpg.mdp.rewards import CompactRewards
    from tpg.policies.tabular import TabularSoftmax

    gen = torch.Generator().manual_seed(int(seed))
    c = torch.randn(vocab, generator=gen, dtype=torch.float64)
    z = torch.randn(vocab, generator=gen, dtype=torch.float64)
    mdp = TokenMDP(vocab, horizon, [1.0], CompactRewards(c.expand(horizon, vocab + 1, vocab).clone()),
                   name=f"stationary:vocab={vocab},horizon={horizon},seed={seed}")
    return mdp, TabularSoftmax(mdp.tree, logits=z.expand(mdp.tree.num_nonterminal, vocab).clone())


def load_problem(problem: str):
    """``(mdp, policy, kind)`` of ``mdp:SPEC`` (tabular), ``task:SPEC`` (transformer) or
    ``stationary:vocab=V,horizon=H,seed=S`` (:func:`stationary_problem`, tabular)."""
    from tpg.train.problem import load_train_problem

    kind, sep, spec = problem.partition(":")
    if kind == "stationary":
        kw = dict(item.split("=", 1) for item in spec.split(","))
        if set(kw) != {"vocab", "horizon", "seed"}:
            raise ValueError(f"offpolicy: a stationary problem is stationary:vocab=V,horizon=H,seed=S, got {problem!r}")
        mdp, policy = stationary_problem(int(kw["vocab"]), int(kw["horizon"]), int(kw["seed"]))
        return mdp, policy, "tabular"
    if kind not in ("mdp", "task") or not sep or not spec:
        raise ValueError(f"offpolicy: problem must be mdp:SPEC, task:SPEC or stationary:..., got {problem!r}")
    prob = load_train_problem(**{kind: spec})
    return prob.mdp, prob.policy, prob.kind


def _moments_rows(cell: Cell) -> pd.DataFrame:
    import torch

    from tpg.estimators import get_estimator
    from tpg.exact import solve
    from tpg.offpolicy import offpolicy_moments, resolve_behaviour
    from tpg.offpolicy.exact import layout_shape
    from tpg.verify.exact_moments import batch_layout
    from tpg.verify.score import ParamMap
    from tpg.verify.verdict import exact_verdict

    mdp, policy, pkind = load_problem(cell.problem)
    sol = solve(mdp, policy)
    pmap = ParamMap(policy, mdp.tree)
    grad_j = sol.flat_grad().to(torch.float64)
    gn2 = float(grad_j @ grad_j)
    est = get_estimator(cell.estimator)
    layout, G = batch_layout(est, cell.group_size)
    n = layout_shape(layout, G)[0]
    rows = []
    for size in cell.sizes:
        spec = _behaviour_spec(cell.kind, float(size), cell.stale_lr, cell.noise_seed)
        beh = resolve_behaviour(spec, mdp, policy, sol_pi=sol)
        m = beh.mismatch
        base = {"part": cell.part, "problem_kind": pkind, "problem": cell.problem, "horizon": mdp.horizon,
                "series": cell.series, "estimator": est.spec, "group_size": cell.group_size,
                "responses_per_batch": n, "kind": cell.kind, "size": float(size),
                # mu = pi wherever mu goes (top_p:0.95 may keep every token of every state it visits)
                "on_policy": float(m["max_abs_log_ratio"]) == 0.0 and float(m["pi_mass_outside_token"]) == 0.0,
                "behaviour": beh.spec, "grad_norm": math.sqrt(gn2),
                **{k: float(m[k]) for k in ("kl_token", "kl_seq", "max_token_ratio", "max_seq_ratio",
                                            "pi_mass_outside_seq", "seq_ratio_second_moment")}}
        for loss in cell.losses:
            row = {**base, "loss": loss, "loss_name": _loss_name(loss), "error": ""}
            try:
                mom = offpolicy_moments(mdp, policy, est, beh, loss, cell.group_size, sol=sol, param_map=pmap)
            except ValueError as exc:  # a ratio that overflows: the row says so, the others go on
                row.update(verdict="error", error=str(exc))
                rows.append(row)
                continue
            v = exact_verdict(mom.mean, grad_j)
            row.update(loss=mom.loss, verdict=v.verdict, scale=v.scale, cosine=v.cosine,
                       one_minus_cos=1.0 - v.cosine, rel_bias=v.rel_bias, variance_trace=mom.variance_trace,
                       nsr=n * mom.variance_trace / gn2 if gn2 > 0 else math.nan)
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=list(COLUMNS))


def _curve_rows(cell: Cell) -> pd.DataFrame:
    from tpg.train import TrainConfig, train
    from tpg.train.problem import load_train_problem

    from .learning import j_bounds

    kind, _, spec = cell.problem.partition(":")
    cfg = TrainConfig(estimator=cell.estimator, **{kind: spec}, behaviour=cell.behaviour, loss=cell.loss,
                      seed=cell.seed, iters=cell.iters, prompts=cell.prompts, group_size=cell.group_size, epochs=1,
                      minibatches=1, progress=False, measure_memory=False)
    prob = load_train_problem(cfg.task, cfg.mdp, cfg.case, cfg.reward)
    lo, hi = j_bounds(prob.mdp, prob.policy)
    log = train(cfg)
    out = pd.DataFrame({"part": "curve", "problem_kind": prob.kind, "problem": cell.problem,
                        "horizon": prob.mdp.horizon, "series": "", "estimator": log["spec"],
                        "group_size": cell.group_size, "kind": "", "behaviour": log["behaviour"],
                        "loss": log["policy_loss"], "loss_name": _loss_name(cell.loss), "seed": cell.seed,
                        "iter": log["iter"], "J": log["J"], "j_norm": (log["J"] - lo) / (hi - lo),
                        "kl_mu_pi": log["kl_mu_pi"], "tokens_total": log["tokens_total"],
                        "clip_frac": log["clip_frac"], "error": ""})
    return out.reindex(columns=list(COLUMNS))


def run_cell(cell: Cell) -> pd.DataFrame:
    """The cell's rows (columns: :data:`COLUMNS`), on one torch thread (the runner parallelises over cells)."""
    if cell.part not in PARTS:
        raise ValueError(f"offpolicy: part must be one of {', '.join(PARTS)}, got {cell.part!r}")
    with single_thread():
        return _curve_rows(cell) if cell.part == "curve" else _moments_rows(cell)


# ------------------------------------------------------------------------------ the rules
def _rank_corr(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 points or a constant."""
    x, y = pd.Series(np.asarray(x, float)), pd.Series(np.asarray(y, float))
    if len(x) < 3:
        return math.nan
    rx, ry = x.rank(), y.rank()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _moments(df: pd.DataFrame, part: str = "sweep") -> pd.DataFrame:
    d = df[df["part"] == part] if "part" in df.columns else df
    return d[d["grad_norm"].astype(float) > 1e-12] if "grad_norm" in d.columns else d


def _bias(d: pd.DataFrame) -> pd.Series:
    """Relative bias with an error (or a non-finite number) counted as infinitely biased."""
    return d["rel_bias"].astype(float).where(d["verdict"] != "error", np.inf).fillna(np.inf)


SWEEP_KEY = ("problem", "estimator", "group_size", "kind")


def _sweep_groups(d: pd.DataFrame):
    return d.groupby([c for c in SWEEP_KEY if c in d.columns], sort=False)


def _largest(g: pd.DataFrame) -> pd.DataFrame:
    """The rows of a sweep's largest mismatch (largest size)."""
    return g[g["size"] == g["size"].max()]


def _claim(id_: str) -> str:
    from ..report import OFFPOLICY_CLAIMS

    return dict((i, c) for i, c, _ in OFFPOLICY_CLAIMS)[id_]


FIG_BIAS = "figures/offpolicy_bias.png"
FIG_VAR = "figures/offpolicy_variance.png"
FIG_LEN = "figures/offpolicy_length.png"
FIG_CURVES = "figures/offpolicy_curves.png"

RULE_IS_SEQ = (f"refuted if is_seq's exact relative bias exceeds {EXACT_TOL:g} anywhere mu has full support "
               f"(temperature, logit noise, staleness; sweeps and lengths); else, per length series (REINFORCE on a "
               f"stationary problem, H = 1..6, one fixed per-token mismatch), the variance inflation v(H) = "
               f"nsr(is_seq, mu) / nsr(pg, pi) grows geometrically when it increases over the last {TAIL} lengths; "
               f"its tail factor per token is e^b, b the least-squares slope of log v there. Confirmed if every series "
               f"grows so, refuted if none does, qualified otherwise. Number: the tail factor, median over series "
               f"(E_mu[rho^2]'s factor per token, the variance factor theory predicts, beside it)")
RULE_TIS = (f"per sweep with full support (temperature, logit noise, staleness): tis:2's relative bias grows with the "
            f"mismatch (rank correlation with KL(mu||pi) >= 0.8, and > {BIAS_TOL:g} at the largest) and its noise-to-"
            f"signal ratio is below is_seq's at the largest mismatch; confirmed if every sweep shows both, refuted if "
            f"none does, qualified otherwise. Number: nsr(is_seq) / nsr(tis:2) at the largest mismatch, median over "
            f"sweeps")
RULE_GSPO = (f"refuted if GSPO's relative bias exceeds {EXACT_TOL:g} at mu = pi in any sweep, or is at most "
             f"{BIAS_TOL:g} at every mu != pi; confirmed if it exceeds {BIAS_TOL:g} at every mu != pi of every sweep; "
             f"qualified otherwise. Number: its relative bias at each sweep's largest mismatch, median over sweeps")
RULE_TOP_P = (f"uncorrected (pg) under top-p: refuted if biased (> {EXACT_TOL:g}) at p = 1 or unbiased (<= "
              f"{BIAS_TOL:g}) at every p < 1; confirmed if biased at every p < 1 of every sweep and, in every sweep, "
              f"the bias falls as p -> 1 (rank correlation between 1 - p and the bias >= 0.8); qualified otherwise. "
              f"Number: pg's relative bias at p = 0.9, median over sweeps")
RULE_CURVES = (f"per problem and behaviour, each run's final J is its mean j_norm = (J - J_min)/(J_max - J_min) over "
               f"the last {FINAL_FRACTION:.0%} of iterations; for every pair of corrections the seed-paired difference "
               f"of final J and its standard error; a setting shows an effect when some pair differs by more than 3 "
               f"standard errors. Confirmed if every setting does, refuted if none does (the corrections end within "
               f"their seed spread), qualified otherwise. Number: the largest paired gap (in j_norm) of the setting "
               f"where it is largest in standard errors")


def is_seq_row(df: pd.DataFrame) -> dict | None:
    parts = [d for d in (_moments(df, "sweep"), _moments(df, "length")) if len(d)]
    if not parts:
        return None
    allm = pd.concat(parts)
    seq = allm[(allm["loss_name"] == "is_seq") & allm["kind"].isin(FULL_SUPPORT)]
    if not len(seq):
        return None
    worst = float(_bias(seq).max())
    notes = [f"is_seq's largest relative bias under full support {worst:.2g} over {len(seq)} points"]
    growth, factors, rho_factors, tok_factors = [], [], [], []
    lens = _moments(df, "length")
    for series, s in (lens.groupby("series", sort=False) if len(lens) else []):
        ref = s[s["on_policy"].astype(bool) & (s["loss_name"] == "pg")].set_index("horizon")["nsr"].astype(float)
        off = s[~s["on_policy"].astype(bool)]

        def inflation(name):
            return (off[off["loss_name"] == name].set_index("horizon")["nsr"].astype(float) / ref).dropna().sort_index()

        infl = inflation("is_seq")
        if len(infl) < TAIL:
            continue
        tail = infl.iloc[-TAIL:]
        b = float(np.polyfit(tail.index.to_numpy(float), np.log(tail.to_numpy()), 1)[0])
        grows = bool((np.diff(tail.to_numpy()) > 0).all())
        growth.append(grows)
        factors.append(math.exp(b))
        sec = off[off["loss_name"] == "is_seq"].set_index("horizon")["seq_ratio_second_moment"].astype(float)
        sec = sec.sort_index().iloc[-TAIL:]
        f_rho = math.exp(float(np.polyfit(sec.index.to_numpy(float), np.log(sec.to_numpy()), 1)[0]))
        rho_factors.append(f_rho)
        tok = inflation("is_token").iloc[-TAIL:]
        if len(tok) >= 2:
            tok_factors.append(math.exp(float(np.polyfit(tok.index.to_numpy(float), np.log(tok.to_numpy()), 1)[0])))
        notes.append(f"{series}: v(H) {infl.iloc[0]:.3g} -> {infl.iloc[-1]:.3g} over H = {int(infl.index[0])}.."
                     f"{int(infl.index[-1])}, tail factor {math.exp(b):.3g} per token (E_mu[rho^2]: {f_rho:.3g})"
                     + ("" if grows else ", not growing over the last lengths"))
    if not worst <= EXACT_TOL:
        status = "refuted"
    elif not growth:
        status = "qualified"
        notes.append("no length series: the growth with length is not measured")
    elif not any(growth):
        status = "refuted"
    else:
        status = "confirmed" if all(growth) else "qualified"
    if rho_factors:
        notes.append(f"E_mu[rho^2] grows by {np.median(rho_factors):.3g} per token (median over series)")
    if tok_factors:
        notes.append(f"is_token's inflation changes by {np.median(tok_factors):.3g} per token (median)")
    number = float(np.median(factors)) if factors else math.nan
    return claim_row("offpolicy_is_seq", _claim("offpolicy_is_seq"), status, number, None,
                     "tail growth factor per token of is_seq's variance inflation, median over length series", FIG_LEN,
                     RULE_IS_SEQ, "; ".join(notes))


def tis_row(df: pd.DataFrame) -> dict | None:
    d = _moments(df)
    d = d[d["kind"].isin(FULL_SUPPORT)] if len(d) else d
    if not len(d):
        return None
    results, ratios, biases = [], [], []
    for key, g in _sweep_groups(d):
        tis, seq = g[g["loss"] == "tis:2"], g[g["loss_name"] == "is_seq"]
        if len(tis) < 2 or not len(seq):
            continue
        corr = _rank_corr(tis["kl_token"], _bias(tis))
        big_t, big_s = _largest(tis), _largest(seq)
        b_big = float(_bias(big_t).max())
        grows = corr >= 0.8 and b_big > BIAS_TOL
        n_t, n_s = float(big_t["nsr"].astype(float).iloc[0]), float(big_s["nsr"].astype(float).iloc[0])
        lower = n_t < n_s
        results.append((grows, lower))
        ratios.append(n_s / n_t if n_t > 0 else math.inf)
        biases.append(b_big)
    if not results:
        return None
    both = [g and low for g, low in results]
    status = "confirmed" if all(both) else ("refuted" if not any(both) else "qualified")
    detail = (f"{sum(both)} of {len(results)} sweeps show both; bias grows in {sum(g for g, _ in results)}, variance "
              f"below is_seq's in {sum(low for _, low in results)}; tis:2's relative bias at the largest mismatch "
              f"{np.median(biases):.3g} (median, {min(biases):.3g}..{max(biases):.3g}); nsr ratio is_seq/tis:2 "
              f"{min(ratios):.3g}..{max(ratios):.3g}")
    return claim_row("offpolicy_tis", _claim("offpolicy_tis"), status, float(np.median(ratios)), None,
                     "nsr(is_seq) / nsr(tis:2) at the largest mismatch, median over full-support sweeps", FIG_VAR,
                     RULE_TIS, detail)


def gspo_row(df: pd.DataFrame) -> dict | None:
    d = _moments(df)
    g = d[d["loss_name"] == "gspo"] if len(d) else d
    if not len(g):
        return None
    on = g[g["on_policy"].astype(bool)]
    off = g[~g["on_policy"].astype(bool)]
    on_max = float(_bias(on).max()) if len(on) else math.nan
    off_b = _bias(off)
    n_biased = int((off_b > BIAS_TOL).sum())
    if (len(on) and not on_max <= EXACT_TOL) or (len(off) and n_biased == 0):
        status = "refuted"
    elif len(off) and len(on) and n_biased == len(off):
        status = "confirmed"
    else:
        status = "qualified"
    heads = [float(_bias(_largest(s)).max()) for _, s in _sweep_groups(off)] if len(off) else []
    detail = (f"mu = pi: largest relative bias {on_max:.2g} over {len(on)} sweeps; mu != pi: biased at {n_biased} of "
              f"{len(off)} points, smallest bias {float(off_b.min()) if len(off) else math.nan:.3g}")
    return claim_row("offpolicy_gspo", _claim("offpolicy_gspo"), status,
                     float(np.median(heads)) if heads else math.nan, None,
                     "GSPO's relative bias at the largest mismatch, median over sweeps", FIG_BIAS, RULE_GSPO, detail)


def top_p_row(df: pd.DataFrame) -> dict | None:
    d = _moments(df)
    d = d[(d["kind"] == "top_p")] if len(d) else d
    pg = d[d["loss_name"] == "pg"] if len(d) else d
    if not len(pg):
        return None
    on = pg[pg["on_policy"].astype(bool)]
    off = pg[~pg["on_policy"].astype(bool)]
    on_max = float(_bias(on).max()) if len(on) else math.nan
    off_b = _bias(off)
    falls, heads = [], []
    for _, s in _sweep_groups(pg):
        falls.append(_rank_corr(s["size"], _bias(s)) >= 0.8)
        s_off = s[~s["on_policy"].astype(bool)]
        if len(s_off):
            near = s_off.iloc[(s_off["size"] - 0.1).abs().argsort()[:1]]
            heads.append(float(_bias(near).iloc[0]))
    if (len(on) and not on_max <= EXACT_TOL) or (len(off) and not (off_b > BIAS_TOL).any()):
        status = "refuted"
    elif len(off) and len(on) and bool((off_b > BIAS_TOL).all()) and all(falls):
        status = "confirmed"
    else:
        status = "qualified"
    seq = d[(d["loss_name"] == "is_seq") & ~d["on_policy"].astype(bool)]
    seq_b = _bias(seq)
    detail = (f"p = 1: largest relative bias {on_max:.2g}; p < 1: biased at {int((off_b > BIAS_TOL).sum())} of "
              f"{len(off)} points; bias falls as p -> 1 in {sum(falls)} of {len(falls)} sweeps"
              + (f"; is_seq cannot reweight the mass top-p never samples: biased at {int((seq_b > BIAS_TOL).sum())} "
                 f"of {len(seq)} points (unbiased only where the cut responses add nothing to grad J, e.g. "
                 f"REINFORCE's with RM = 0), median bias {float(seq_b.median()):.3g}" if len(seq) else ""))
    return claim_row("offpolicy_top_p", _claim("offpolicy_top_p"), status,
                     float(np.median(heads)) if heads else math.nan, None,
                     "relative bias of pg under top_p:0.9 (1 - p = 0.1), median over sweeps", FIG_BIAS, RULE_TOP_P,
                     detail)


def final_j(df: pd.DataFrame) -> pd.DataFrame:
    """Per curve run (problem, behaviour, loss, seed): its final J, the mean ``j_norm`` over the last
    :data:`FINAL_FRACTION` of its iterations (``iter > (1 - FINAL_FRACTION) * last iteration``)."""
    c = df[df["part"] == "curve"] if "part" in df.columns else df
    if "iter" not in c.columns or "j_norm" not in c.columns:
        c = c.iloc[0:0]
    else:
        c = c[c["iter"].notna()]
    if not len(c):
        return pd.DataFrame(columns=["problem", "behaviour", "loss", "seed", "final"])
    last = c.groupby(["problem", "behaviour", "loss", "seed"])["iter"].transform("max")
    tail = c[c["iter"] > (1.0 - FINAL_FRACTION) * last]
    return tail.groupby(["problem", "behaviour", "loss", "seed"], sort=False)["j_norm"].mean().rename("final") \
        .reset_index()


def curves_row(df: pd.DataFrame) -> dict | None:
    fin = final_j(df)
    if not len(fin):
        return None
    ref = fin[fin["behaviour"] == "pi"]
    fin = fin[fin["behaviour"] != "pi"]
    best, effects, notes = None, [], []
    for (prob, beh), s in fin.groupby(["problem", "behaviour"], sort=False):
        wide = s.pivot_table(index="seed", columns="loss", values="final", aggfunc="first").dropna()
        if wide.shape[1] < 2 or len(wide) < 2:
            continue
        top = None  # (z, gap, se, a, b)
        for i, a in enumerate(wide.columns):
            for b in wide.columns[i + 1:]:
                d = wide[a] - wide[b]
                gap, se = float(d.mean()), float(d.std()) / math.sqrt(len(d))
                z = abs(gap) / se if se > 0 else (0.0 if gap == 0 else math.inf)
                if top is None or z > top[0]:
                    top = (z, gap, se, a, b)
        effects.append(top[0] > 3)
        means = wide.mean()
        r = ref[ref["problem"] == prob]["final"]
        kind = "transformer" if str(prob).startswith("task:") else "tabular"
        notes.append(f"{kind} {beh}: final J {means.min():.3f} ({means.idxmin()})..{means.max():.3f} "
                     f"({means.idxmax()}) over {len(wide)} seeds, largest pair {top[3]} - {top[4]} {top[1]:+.3f} +/- "
                     f"{top[2]:.2g} ({top[0]:.1f} SE)" + (f"; on-policy reference {r.mean():.3f}" if len(r) else ""))
        if best is None or top[0] > best[0]:
            best = top
    if not effects:
        return None
    status = "confirmed" if all(effects) else ("refuted" if not any(effects) else "qualified")
    return claim_row("offpolicy_curves", _claim("offpolicy_curves"), status, abs(best[1]), best[2],
                     "|seed-paired gap| in final normalised J between two corrections (the setting's largest in SE)",
                     FIG_CURVES, RULE_CURVES, "; ".join(notes))


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """offpolicy_is_seq, offpolicy_tis, offpolicy_gspo, offpolicy_top_p (exact sweeps and lengths) and
    offpolicy_curves (learning curves), each from the rows of its part."""
    if df is None or len(df) == 0:
        return []
    return [r for r in (is_seq_row(df), tis_row(df), gspo_row(df), top_p_row(df), curves_row(df)) if r is not None]


__all__ = ["NAME", "TITLE", "COLUMNS", "FIGURES", "Cell", "cells", "run_cell", "claim_rows", "LOSSES", "KINDS",
           "final_j"]
