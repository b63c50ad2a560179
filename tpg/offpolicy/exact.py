"""Exact moments of an off-policy gradient estimate: the sample space enumerated under ``mu``.

A batch is drawn as on-policy (:func:`tpg.verify.exact_moments.batch_layout`: one prompt and ``G``
responses, ``G`` independent pairs, one pair, or ``P`` prompt draws with ``N`` responses each where the
verifier has verl's ``batch:PxN`` layout) but from the behaviour ``mu``: the batch ``b`` of
prompts ``x_i`` and responses ``W_i`` has probability ``p_b = prod_i rho(x_i) P_mu(W_i | x_i)`` (a group
shares its prompt), and only batches with ``p_b > 0`` (``mu``'s support) are enumerated. On each batch

1. the estimator runs on the batch as the trainer has it: tokens and rewards as sampled, and
   ``logp`` = ``log pi`` of the sampled tokens (the trainer recomputes the log-probabilities with its own
   parameters: verl's ``old_log_prob``; used by the KL options); hooks (continuations, critic, greedy
   response, prompt values) come from ``mu``'s context by default (``hooks="behaviour"``: what the
   engine samples and what a critic fitted on ``mu``'s rollouts estimates) or from ``pi``'s
   (``hooks="policy"``);
2. the loss (:mod:`tpg.offpolicy.losses`) turns advantages, weights and the two log-probabilities into
   per-token coefficients ``c = - dL / d log pi`` by autograd through its ratios;
3. the batch's gradient is ``g_b = sum_{i,t} c_{i,t} grad log pi(w_{i,t} | s_{i,t})`` (the analytic score of
   ``pi``, :func:`tpg.verify.score.batch_logit_gradients`, mapped to parameters by
   :class:`~tpg.verify.score.ParamMap`).

Then ``E_mu[g] = sum_b p_b g_b`` and ``Cov_mu[g] = sum_b p_b (g_b - E g)(g_b - E g)^T``, compared with
``grad J(pi)``.

**Dynamic sampling** (a loss's ``filter_degenerate_groups``, DAPO): a group of ``G >= 2`` responses is
*degenerate* when all its rewards ``RM`` are equal (exact equality; DAPO's ``std > 0`` test in floating
point keeps some such groups by rounding), and is dropped and resampled. Groups of one response are
never dropped (DAPO keeps them). With ``q_x = P_mu(group of x non-degenerate) = 1 - sum_r P_mu(RM = r | x)^G``
(a closed form over the distinct rewards of ``x``'s responses):

* ``new_prompts`` (DAPO's recipe: a dropped group's slot is refilled by a fresh prompt's group): each
  group slot is drawn from ``rho(x) mu^G(W | x) 1[kept] / Z`` with ``Z = sum_x rho(x) q_x``, so
  ``E[g] = E_mu[g 1[kept]] / Z``: one global factor ``1/Z``;
* ``same_prompt`` (the prompt is kept and its group redrawn until it is not degenerate): the prompt
  stays ``rho``-distributed and its group follows ``mu^G(W | x) 1[kept] / q_x``, so
  ``E[g] = sum_x rho(x) E_mu[g 1[kept] | x] / q_x``: each prompt's contribution rescaled by
  ``1 / P(non-degenerate | x)``; a prompt with ``q_x = 0`` contributes ``g = 0`` (refused for batches of
  several groups, where the batch would have no defined value).

A batch of several groups (``batch:PxN``) has independent group slots, so its conditional probability is
the product of the slots' (``Z^P`` of kept mass under ``new_prompts``).

Proof of both: the batch law is the conditional law above (a batch's groups are independent slots), and
``E[g] = sum_b p'_b g_b`` for any batch law ``p'``. For estimators that give a degenerate group zero
advantage (GRPO, RLOO, Dr. GRPO: ``A = R - mean``), ``E_mu[g 1[kept]] = E_mu[g]``, so ``new_prompts``
only rescales by ``1/Z`` (tested). The enumeration checks ``sum_b p_b 1[kept] = Z`` against the closed
form. ``tokens_per_batch`` then counts every response sampled to fill a batch: ``E[tokens per draw]/Z``
(``new_prompts``, Wald's identity) or ``sum_x rho(x) E[tokens per draw | x] / q_x`` (``same_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..exact.engine import solve
from ..verify.context import ExactContext
from ..verify.exact_moments import (_CHUNK_ENTRIES, DEFAULT_MAX_ROWS, ExactMoments, _calls_since, _MomentSums,
                                    _space_chunks, _take, batch_layout, checked_coef, checked_space_size, layout_shape,
                                    leaf_rollouts, make_batch, ref_log_probs, refuse_inexact, run_exact)
from ..verify.score import ParamMap, token_nt
from .behaviour import Behaviour, resolve_behaviour
from .losses import get_loss, output_coefficients

HOOKS = ("behaviour", "policy")


@dataclass
class OffPolicyMoments(ExactMoments):
    """Exact moments of one estimator + loss under a behaviour policy (the fields of
    :class:`~tpg.verify.exact_moments.ExactMoments`, then the off-policy ones).

    Attributes:
        mean: ``E_mu[g]`` in parameter space; cov: ``Cov_mu[g]`` (``None`` unless requested);
        variance_trace: ``tr Cov_mu[g]``.
        num_batches, num_rows: the batches (responses) of the enumerated support (kept batches only
            under dynamic sampling).
        tokens_per_batch: expected response tokens sampled per batch (rejected draws included).
        hook_calls: the context hooks the estimator called.
        total_prob: the kept batches' probability (1 up to rounding; ``sum_{q_x > 0} rho(x)`` under
            ``same_prompt``).
        kept_prob: ``P(a group is kept)``: ``Z`` (``new_prompts``), ``sum_x rho(x) q_x`` (``same_prompt``),
            1 without dynamic sampling.
        keep_prob_per_prompt: ``q_x`` per prompt under dynamic sampling (else ``None``).
        behaviour, loss: canonical specs; mismatch: the behaviour's mismatch report.
    """

    kept_prob: float = 1.0
    keep_prob_per_prompt: list | None = None
    behaviour: str = "pi"
    loss: str = "pg"
    mismatch: dict = field(default_factory=dict)


def keep_probabilities(mdp, response_prob_l: torch.Tensor, rm_l: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q_x = 1 - sum_r P(RM = r | x)^G`` per prompt ``[P]``: the probability that ``G`` i.i.d. responses to
    ``x`` do not all have the same reward (a closed form over the distinct rewards ``r`` of ``x``'s responses,
    exact equality), from the responses' joint probabilities ``rho(x) P(W|x)`` and rewards ``RM(W)`` in
    ``tree.leaf_ids`` order; ``q_x = 1`` for ``G = 1`` and 0 for a prompt of weight 0."""
    tree = mdp.tree
    rho = mdp.prompt_weights
    if group_size < 2:
        return torch.where(rho > 0, torch.ones_like(rho), torch.zeros_like(rho))
    leaf_prompt = tree.prompt_n[tree.leaf_ids]
    q = torch.zeros(tree.num_prompts, dtype=torch.float64)
    for x in range(tree.num_prompts):
        if float(rho[x]) <= 0:
            continue
        sel = leaf_prompt == x
        p = response_prob_l[sel] / rho[x]
        _, inv = torch.unique(rm_l[sel], return_inverse=True)
        mass = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, p)
        q[x] = (1.0 - (mass ** group_size).sum()).clamp(min=0.0)
    return q


def dynamic_sampling(mdp, beh: Behaviour, loss, layout: str, G: int) -> tuple[str, torch.Tensor | None, float]:
    """``(mode, q_x, Z)`` of ``loss``'s dynamic sampling for batches of ``layout``: ``mode`` is the loss's
    ``filter`` when the layout's groups have two rows or more, else ``"false"`` (``q_x = None``, ``Z = 1``);
    ``q_x`` per prompt under the behaviour (:func:`keep_probabilities`), ``Z = sum_x rho(x) q_x``.
    ``ValueError`` when no group can ever be kept, and under ``same_prompt`` when a prompt can never
    be kept but a batch holds several groups (the batch has no defined value without it)."""
    _, n_groups, per_group = layout_shape(layout, G)
    mode = loss.filter if per_group >= 2 else "false"
    if mode == "false":
        return mode, None, 1.0
    rho = mdp.prompt_weights
    q_x = keep_probabilities(mdp, beh.sol.response_prob, beh.sol.response_rm, per_group)
    Z = float((rho * q_x).sum())
    if Z <= 0.0:
        raise ValueError(f"dynamic sampling: every group of {per_group} responses has identical rewards under the "
                         f"behaviour {beh.spec!r} (P(non-degenerate) = 0), so no batch is ever filled")
    never = [x for x in range(mdp.num_prompts) if float(rho[x]) > 0 and float(q_x[x]) <= 0]
    if mode == "same_prompt" and never and n_groups > 1:
        raise ValueError(f"dynamic sampling same_prompt: prompt(s) {never} only ever give degenerate groups, and a "
                         f"{layout} batch has no defined value without them; use new_prompts")
    return mode, q_x, Z


def _group_factors(rm_b: torch.Tensor, batch_b: torch.Tensor, group_b: torch.Tensor, prompt_b: torch.Tensor,
                   n_batches: int, mode: str, q_x: torch.Tensor, Z: float) -> torch.Tensor:
    """Per batch, ``prod_groups 1[kept] / q`` (``q = Z`` or ``q_x``); groups of one are kept with ``q = 1``."""
    from ..estimators.functional import dense_ids

    gid, ng = dense_ids(batch_b, group_b)
    size = torch.bincount(gid, minlength=ng)
    hi = torch.full((ng,), -torch.inf, dtype=torch.float64).scatter_reduce(0, gid, rm_b, "amax")
    lo = torch.full((ng,), torch.inf, dtype=torch.float64).scatter_reduce(0, gid, rm_b, "amin")
    degenerate = (size >= 2) & (hi == lo)
    g_batch = torch.zeros(ng, dtype=torch.long).scatter_(0, gid, batch_b)
    g_prompt = torch.zeros(ng, dtype=torch.long).scatter_(0, gid, prompt_b)
    if mode == "new_prompts":
        q = torch.full((ng,), Z, dtype=torch.float64)
    else:
        q = q_x[g_prompt]
    q = torch.where(size >= 2, q, torch.ones_like(q))
    safe = torch.where(q > 0, q, torch.ones_like(q))
    factor = torch.where(degenerate | (q <= 0), torch.zeros_like(q), 1.0 / safe)
    return torch.ones(n_batches, dtype=torch.float64).scatter_reduce_(0, g_batch, factor, "prod")


def _renumber(batch_b: torch.Tensor, keep_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the kept batches and their batch ids renumbered ``0 .. kept - 1``."""
    new_id = torch.cumsum(keep_n.to(torch.long), 0) - 1
    rows = keep_n[batch_b]
    return rows, new_id[batch_b[rows]]


def hooks_context(mdp, policy, sol_pi, beh: Behaviour, hooks: str, seed: int = 0, ref_policy=None) -> ExactContext:
    """The exact context the estimator's hooks read: ``mu``'s (``behaviour``) or ``pi``'s (``policy``)."""
    if hooks not in HOOKS:
        raise ValueError(f"hooks must be one of {', '.join(HOOKS)}; got {hooks!r}")
    if hooks == "behaviour":
        return ExactContext(mdp, beh.policy, seed=seed, ref_policy=ref_policy, sol=beh.sol)
    return ExactContext(mdp, policy, seed=seed, ref_policy=ref_policy, sol=sol_pi)


def offpolicy_moments(mdp, policy, estimator, behaviour="pi", loss=None, group_size: int = 1, *,
                      dtype=torch.float64, with_cov: bool = False, max_rows: int = DEFAULT_MAX_ROWS,
                      ref_policy=None, hooks: str = "behaviour", seed: int = 0, sol=None,
                      param_map: ParamMap | None = None, context: ExactContext | None = None) -> OffPolicyMoments:
    """``E_mu[g]`` and ``Cov_mu[g]`` of ``estimator`` + ``loss`` on batches sampled from ``behaviour`` (see the
    module docstring), exactly.

    Args:
        behaviour: a behaviour spec, policy, table or resolved :class:`~tpg.offpolicy.behaviour.Behaviour`
            (default ``pi``: on-policy).
        loss: a loss spec or :class:`~tpg.offpolicy.losses.Loss` (default ``pg``).
        group_size: ``G`` for group and batch-coupled estimators.
        dtype: the dtype of the batch handed to the estimator.
        with_cov: also return the covariance matrix (its trace is always computed).
        max_rows: size guard on the (full) sample space's responses.
        ref_policy: the reference policy of KL options.
        hooks: ``behaviour`` or ``policy``: whose context answers the estimator's hooks.
        sol, param_map, context: ``pi``'s exact solution (with gradient), parameter map and hook context,
            when already computed (a study calling this per cell passes them).

    Raises ``ValueError`` for a sample space above ``max_rows``, an estimator that cannot be made exact,
    a behaviour under which every group is degenerate (dynamic sampling), or non-finite coefficients.
    """
    name = getattr(estimator, "name", type(estimator).__name__)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    refuse_inexact(estimator, name)
    loss = get_loss(loss)
    sol_pi = sol if sol is not None else solve(mdp, policy)
    beh = resolve_behaviour(behaviour, mdp, policy, sol_pi=sol_pi)
    layout, G = batch_layout(estimator, group_size)
    checked_space_size(mdp, name, layout, G, max_rows)
    tree = mdp.tree
    ctx = context if context is not None else hooks_context(mdp, policy, sol_pi, beh, hooks, seed, ref_policy)
    calls_before = dict(ctx.hook_calls)
    pmap = param_map if param_map is not None else ParamMap(policy, tree)
    pi = sol_pi.logp.exp()
    leaves_ro = leaf_rollouts(mdp, sol_pi)  # logp = log pi: what the trainer recomputes
    zero = torch.zeros((), dtype=torch.float64)
    nt_l = token_nt(tree, leaves_ro.nodes)
    logp_mu_l = torch.where(leaves_ro.mask, beh.logp[nt_l.clamp(min=0), leaves_ro.tokens], zero)
    ref_all = ref_log_probs(ref_policy, tree, leaves_ro) if ref_policy is not None else None

    rho = mdp.prompt_weights
    per_batch, n_groups, per_group = layout_shape(layout, G)
    mode, q_x, Z = dynamic_sampling(mdp, beh, loss, layout, G)
    # the expected mass of the kept batches: 1, or the weight of the prompts that can be kept (same_prompt)
    expected_total = 1.0 if mode != "same_prompt" else float(rho[q_x > 0].sum())

    chunk_batches = max(1, _CHUNK_ENTRIES // max(pmap.logit_dim * per_batch, 1))
    sums = _MomentSums(sol_pi.grad_logits.reshape(-1).to(torch.float64))
    kept_mass = 0.0
    kept_batches = kept_rows = 0
    for rows, batch_b, p_n in _space_chunks(mdp, beh.sol, layout, G, chunk_batches):
        if mode != "false":
            rm_rows = leaves_ro.rm[rows]
            group_rows = torch.arange(rows.numel()) // per_group
            factor = _group_factors(rm_rows, batch_b, group_rows, leaves_ro.prompt[rows], p_n.numel(), mode, q_x, Z)
            kept_mass += float((p_n * (factor > 0)).sum())
            p_n = p_n * factor
        live = p_n > 0
        if not bool(live.any()):
            continue
        if not bool(live.all()):
            keep_rows, batch_b = _renumber(batch_b, live)
            rows, p_n = rows[keep_rows], p_n[live]
        nb = p_n.numel()
        ro = _take(leaves_ro, rows)
        ro.group = torch.arange(rows.numel()) // per_group  # group, one per prompt draw, or one per row
        rb = make_batch(estimator, ro, batch_b, dtype, None if ref_all is None else ref_all[rows])
        out = run_exact(estimator, name, rb, ctx)
        coef = checked_coef(estimator, out, ro.tokens.shape)
        if not loss.is_pg:
            coef = output_coefficients(loss, estimator, out, ro.logp, logp_mu_l[rows], ro.mask, batch_b,
                                       rows.numel() // nb)
        sums.add(coef, token_nt(tree, ro.nodes), ro, pi, batch_b, p_n)
        kept_batches += nb
        kept_rows += rows.numel()
    if abs(sums.total_p - expected_total) > 1e-9:
        raise ValueError(f"the sample space's probabilities under the behaviour sum to {sums.total_p!r}, not "
                         f"{expected_total!r}")
    if mode == "new_prompts" and abs(kept_mass - Z ** n_groups) > 1e-9:
        raise ValueError(f"dynamic sampling: the enumerated kept mass {kept_mass!r} disagrees with the closed form "
                         f"Z^{n_groups} = {Z ** n_groups!r}")
    null = 1.0 - expected_total  # batches with g = 0 (same_prompt: prompts that are never kept)
    if null > 0:  # they sit at -shift in the centred coordinates
        sums.s1 -= null * sums.shift
        sums.s2 += null * torch.outer(sums.shift, sums.shift)
    mean, cov, trace = sums.moments(pmap, with_cov)
    tokens = n_groups * _sampled_tokens(mdp, beh, per_group, mode, q_x, Z) if mode != "false" else sums.tokens
    kept_prob = Z if mode != "false" else 1.0
    return OffPolicyMoments(mean=mean, cov=cov, variance_trace=trace, num_batches=kept_batches,
                            num_rows=kept_rows, tokens_per_batch=tokens,
                            hook_calls=_calls_since(calls_before, ctx.hook_calls), total_prob=sums.total_p,
                            kept_prob=kept_prob, keep_prob_per_prompt=None if q_x is None else q_x.tolist(),
                            behaviour=beh.spec, loss=loss.spec, mismatch=dict(beh.mismatch))


def _sampled_tokens(mdp, beh: Behaviour, G: int, mode: str, q_x: torch.Tensor, Z: float) -> float:
    """Expected response tokens drawn to fill one group slot under dynamic sampling (rejected groups included)."""
    tree = mdp.tree
    rho = mdp.prompt_weights
    lengths = tree.depth_n[tree.leaf_ids].to(torch.float64)
    per_prompt = torch.zeros(tree.num_prompts, dtype=torch.float64).index_add_(
        0, tree.prompt_n[tree.leaf_ids], beh.sol.response_prob * lengths)  # rho(x) E_mu[T | x]
    if mode == "new_prompts":
        return float(G * per_prompt.sum() / Z)
    live = q_x > 0
    return float((G * per_prompt[live] / q_x[live]).sum())


__all__ = ["OffPolicyMoments", "offpolicy_moments", "keep_probabilities", "dynamic_sampling", "hooks_context",
           "layout_shape", "HOOKS"]
