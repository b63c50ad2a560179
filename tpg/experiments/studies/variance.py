"""Variance and mean squared error against compute: the cost-efficiency frontier of the estimators.

For one batch (one prompt ``x ~ rho`` with its ``G`` responses for group methods, one response
otherwise) an estimator's gradient ``g`` has ``E[g]`` and ``Cov[g]``. Averaging ``n`` independent
batches costs ``n c`` sampled tokens (``c`` = tokens per batch, continuations and greedy responses
included) and has

    MSE(n) = E|g_bar_n - grad J|^2 = tr Cov[g] / n + |E[g] - grad J|^2,

so every method is a curve in the (tokens, MSE) plane; for unbiased methods ``MSE x tokens =
tr Cov[g] c`` (the variance-cost product) ranks them at any budget. GRPO's ``E[g]`` is not ``grad
J`` (std division; the mean-only form is ``(1 - 1/G) grad J``), so its curve flattens at its
squared bias.

Where the numbers come from (column ``variance_source``):

* ``exact``: :func:`tpg.verify.exact_moments` enumerates the batch sample space, for estimators
  without Monte Carlo continuations (REINFORCE, the token oracle, ReMax, RLOO, GRPO, PPO with the
  exact critic) when the space has at most :data:`EXACT_MAX_ROWS` responses;
* ``mc``: ``samples`` sampled batches with a :class:`~tpg.verify.MonteCarloContext`, the unbiased
  sample ``tr Cov`` and its standard error. TRePO always: the exact covariance takes the
  continuations' expectation and so leaves out their noise, which is the price of small ``K``.

The squared bias is exact whenever ``E[g]`` can be enumerated (TRePO included: its advantage is
linear in the continuation values), else the unbiased Monte Carlo estimate
``|g_bar - grad J|^2 - tr Cov / N``. Tokens per batch are exact for the responses and measured on
sampled batches for the hooks (continuations, greedy responses). PPO's exact critic is an oracle
and costs no tokens here; a learned critic would cost its own training samples and a second model
(see the critic study for inexact critics, the learning study for memory).

Also home of the helpers the zero-group and centering studies share: per-batch gradients of
several estimators on the same sampled batches, and ``tr Cov`` with its standard error.

Measured run time (``run_study(..., n_jobs=2)``, 2 cores shared with other work, load ~3-4):
quick ~9 s, full ~35 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ...cases import mdp_from_spec
from ...estimators import get_estimator
from ...exact.engine import solve
from ...rollouts import sample
from ...verify.context import MonteCarloContext, node_paths
from ...verify.exact_moments import checked_coef, exact_moments, make_batch
from ...verify.score import ParamMap, batch_logit_gradients, token_nt
from . import single_thread

NAME = "variance"
TITLE = "Variance and MSE to grad J against tokens sampled: the cost-efficiency frontier"
FIGURES = ["variance_frontier"]

#: Largest exact sample space (responses) enumerated for a cell's moments.
EXACT_MAX_ROWS = 500_000
#: Batches averaged per gradient step: one row of output each.
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

COLUMNS: dict[str, str] = {
    "method": "estimator name in the catalog (reinforce, reward_to_go, remax, rloo, grpo, ppo_gae, trepo)",
    "spec": "canonical estimator spec (name and the options that differ from the defaults)",
    "variance_trace": "tr Cov[g] of one batch's gradient (squared parameter units)",
    "variance_trace_se": "standard error of variance_trace (0 when exact)",
    "variance_source": "exact (enumerated sample space) or mc (sampled batches; continuation noise included)",
    "bias_sq": "|E[g] - grad J|^2 (squared parameter units)",
    "bias_source": "exact (enumerated E[g]) or mc (unbiased estimate from the sampled batches)",
    "grad_norm_sq": "|grad J|^2, the normaliser of rel_mse (squared parameter units)",
    "cosine": "cosine between E[g] and grad J",
    "scale": "best-fit c in E[g] ~ c grad J",
    "tokens_per_batch": "expected policy tokens sampled per batch: responses plus hook tokens (tokens)",
    "hook_tokens_per_batch": "of which continuations / greedy responses, measured on sampled batches (tokens)",
    "batches": "independent batches averaged into one gradient (n)",
    "tokens": "tokens spent on the averaged gradient, batches * tokens_per_batch (tokens)",
    "mse": "E|g_bar - grad J|^2 = variance_trace / batches + bias_sq (squared parameter units)",
    "mse_se": "standard error of mse (from variance_trace_se; 0 when exact)",
    "rel_mse": "mse / |grad J|^2 (dimensionless)",
    "variance_x_tokens": "tr Cov[g] * tokens_per_batch: the MSE-cost product of an unbiased method (tokens)",
}


@dataclass(frozen=True)
class Cell:
    """One estimator on one MDP: ``mdp`` (a ``--mdp`` spec with its seeded tabular policy),
    ``estimator`` (a catalog spec), ``group_size`` (``G`` of group methods, 1 otherwise),
    ``samples`` (Monte Carlo batches when the variance is sampled; also the hook-token probe),
    ``seed`` (sampling)."""

    mdp: str
    estimator: str
    group_size: int = 1
    samples: int = 4000
    seed: int = 0


QUICK_MDPS = ("dense:vocab=3,horizon=3,eos=0,prompts=2,seed=0",)
# the horizon-4 MDP leaves room for TRePO's anchors; its groups of 3 and 4 are sampled (too many to enumerate)
FULL_MDPS = QUICK_MDPS + ("terminal:vocab=3,horizon=3,eos=0,prompts=2,weights=random,seed=1",
                          "sparse:vocab=3,horizon=3,eos=0,prompts=2,p=0.3,seed=2",
                          "dense:vocab=3,horizon=4,eos=0,prompts=2,seed=3")


def _specs(quick: bool) -> list[tuple[str, int]]:
    singles = ["reinforce", "reward_to_go", "remax", "ppo_gae:critic=exact,lambda=0",
               "ppo_gae:critic=exact,lambda=0.95"]
    groups = [(s, G) for s in ("rloo", "grpo") for G in ((2, 4) if quick else (2, 3, 4))]
    Ks = (1, 4) if quick else (1, 2, 4, 8)
    anchors = ("all", "random:1") if quick else ("all", "every:2", "random:1")
    trepo = [f"trepo:K={K},anchors={a}" for a in anchors for K in Ks]
    return [(s, 1) for s in singles] + groups + [(s, 1) for s in trepo]


def cells(quick: bool) -> list[Cell]:
    samples = 2000 if quick else 8000
    return [Cell(mdp=m, estimator=s, group_size=G, samples=samples, seed=0)
            for m in (QUICK_MDPS if quick else FULL_MDPS) for s, G in _specs(quick)]


# ------------------------------------------------------------------------------ shared helpers
@dataclass
class Problem:
    """An MDP with its policy, exact solution, parameter map and ``pi [N_nt, V]``."""

    mdp: object
    policy: object
    sol: object
    pmap: ParamMap
    pi: torch.Tensor

    @property
    def grad_j(self) -> torch.Tensor:
        return self.sol.flat_grad().to(torch.float64)


def load_problem(mdp_spec: str) -> Problem:
    mdp, policy = mdp_from_spec(mdp_spec)
    sol = solve(mdp, policy)
    return Problem(mdp, policy, sol, ParamMap(policy, mdp.tree), sol.logp.exp().detach())


def sample_groups(prob: Problem, num_batches: int, group_size: int, seed: int):
    """``num_batches`` batches of one prompt and ``group_size`` responses each (rows ``i*G .. i*G+G-1``
    form batch ``i``): ``(rollouts with node ids, batch id of each row [B])``."""
    gen = torch.Generator().manual_seed(int(seed))
    ro = sample(prob.mdp, prob.policy, num_prompts=num_batches, group_size=group_size, generator=gen)
    if ro.nodes is None:  # the sampler stores node ids only when it walks the tree
        H = ro.horizon
        ro.nodes = torch.where(ro.mask, node_paths(prob.mdp.tree, ro.prompt, ro.tokens, ro.mask)[:, :H], -1)
    return ro, ro.group.clone()


def batch_gradients(prob: Problem, estimator, ro, batch_b: torch.Tensor, num_batches: int, ctx) -> tuple:
    """The parameter-space gradient of every batch id, ``[num_batches, num_params]``, and the hook
    tokens the estimator had the context sample (continuations, greedy responses)."""
    if hasattr(estimator, "reset"):
        estimator.reset()
    before = float(getattr(ctx, "tokens_sampled", 0.0))
    out = estimator(make_batch(estimator, ro, batch_b, torch.float64), ctx)
    coef = checked_coef(estimator, out, ro.tokens.shape)
    g = batch_logit_gradients(coef, token_nt(prob.mdp.tree, ro.nodes), ro.tokens, prob.pi, batch_b, num_batches)
    return prob.pmap.to_params(g), float(getattr(ctx, "tokens_sampled", 0.0)) - before


def mc_context(prob: Problem, seed: int) -> MonteCarloContext:
    """A Monte Carlo context with its own seeded generator (continuations, random anchors)."""
    return MonteCarloContext(prob.mdp, prob.policy, generator=torch.Generator().manual_seed(int(seed)),
                             seed=int(seed), sol=prob.sol)


def trace_terms(g_np: torch.Tensor) -> torch.Tensor:
    """Per-batch terms ``q_i = N/(N-1) |g_i - g_bar|^2`` whose mean is the unbiased ``tr Cov``."""
    N = g_np.shape[0]
    dev = g_np - g_np.mean(0, keepdim=True)
    return (dev * dev).sum(1) * (N / (N - 1))


def trace_with_se(g_np: torch.Tensor) -> tuple[float, float]:
    """Unbiased ``tr Cov`` of the rows of ``g [N, P]`` and its standard error ``sd(q) / sqrt(N)``."""
    q = trace_terms(g_np)
    return float(q.mean()), float(q.std()) / math.sqrt(q.numel())


def ratio_with_se(q_a: torch.Tensor, q_b: torch.Tensor) -> tuple[float, float]:
    """``mean(q_a) / mean(q_b)`` of paired per-batch terms and its delta-method standard error."""
    ma, mb = float(q_a.mean()), float(q_b.mean())
    n = q_a.numel()
    va, vb = float(q_a.var()), float(q_b.var())
    cab = float(((q_a - ma) * (q_b - mb)).sum()) / (n - 1)
    r = ma / mb
    var = (va / mb**2 + ma**2 * vb / mb**4 - 2 * ma * cab / mb**3) / n
    return r, math.sqrt(max(var, 0.0))


def geometry(mean: torch.Tensor, grad_j: torch.Tensor) -> tuple[float, float, float]:
    """``(cosine, best-fit scale c, |mean - grad J|^2)`` of an expected gradient against ``grad J``."""
    d = grad_j.reshape(-1)
    m = mean.reshape(-1).to(torch.float64)
    dd = float(d @ d)
    md = float(m @ d)
    mn = float(m.norm())
    cos = md / (mn * math.sqrt(dd)) if mn > 0 and dd > 0 else float("nan")
    return cos, md / dd if dd > 0 else float("nan"), float(((m - d) ** 2).sum())


# ------------------------------------------------------------------------------ the cell
def run_cell(cell: Cell) -> pd.DataFrame:
    """The cell's rows (columns: :data:`COLUMNS`), on one torch thread (the runner parallelises over cells)."""
    with single_thread():
        return _run_cell(cell)


def _run_cell(cell: Cell) -> pd.DataFrame:
    prob = load_problem(cell.mdp)
    est = get_estimator(cell.estimator)
    grad_j = prob.grad_j
    mom = None
    try:
        mom = exact_moments(prob.mdp, prob.policy, est, cell.group_size, with_cov=False, max_rows=EXACT_MAX_ROWS,
                            param_map=prob.pmap)
    except ValueError:  # too large to enumerate: everything from the sampled batches
        pass
    sampled = mom is None or "continuation_values" in mom.hook_calls
    needs_probe = mom is not None and any(h in mom.hook_calls for h in ("continuation_values", "greedy_rm"))
    hook_tokens = 0.0
    if sampled or needs_probe:
        n = cell.samples if sampled else min(cell.samples, 256)
        ro, batch_b = sample_groups(prob, n, cell.group_size, cell.seed)
        g, spent = batch_gradients(prob, est, ro, batch_b, n, mc_context(prob, cell.seed + 1))
        hook_tokens = spent / n
    if sampled:
        trace, trace_se = trace_with_se(g)
        response_tokens = ro.num_tokens / n
    else:
        trace, trace_se = mom.variance_trace, 0.0
        response_tokens = mom.tokens_per_batch
    if mom is not None:
        cos, scale, bias_sq = geometry(mom.mean, grad_j)
        bias_source = "exact"
    else:
        cos, scale, bias_sq = geometry(g.mean(0), grad_j)
        bias_sq -= trace / g.shape[0]
        bias_source = "mc"
    tokens_per_batch = response_tokens + hook_tokens
    gn2 = float(grad_j @ grad_j)
    rows = []
    for n in BATCHES:
        mse = trace / n + bias_sq
        rows.append({"method": est.name, "spec": est.spec, "variance_trace": trace, "variance_trace_se": trace_se,
                     "variance_source": "mc" if sampled else "exact", "bias_sq": bias_sq, "bias_source": bias_source,
                     "grad_norm_sq": gn2, "cosine": cos, "scale": scale, "tokens_per_batch": tokens_per_batch,
                     "hook_tokens_per_batch": hook_tokens, "batches": n, "tokens": n * tokens_per_batch,
                     "mse": mse, "mse_se": trace_se / n, "rel_mse": mse / gn2,
                     "variance_x_tokens": trace * tokens_per_batch})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def claim_rows(df: pd.DataFrame) -> list[dict]:
    """None: the frontier feeds the figure (claim 1, PPO's critic against single-sample baselines,
    is the critic study's)."""
    return []


__all__ = ["NAME", "TITLE", "COLUMNS", "FIGURES", "Cell", "cells", "run_cell", "claim_rows"]
