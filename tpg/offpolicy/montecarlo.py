"""Monte Carlo mode under a behaviour policy: batches sampled from ``mu``, gradients through the loss.

``N`` batches are drawn from ``mu`` (:class:`~tpg.offpolicy.behaviour.BehaviourPolicy` with the seeded
vectorised sampler, in the estimator's layout), the trainer's log-probabilities ``log pi`` are looked up
on the sampled tokens, the estimator runs on the batch exactly as in :mod:`tpg.offpolicy.exact`, and the
loss's coefficients ``c = - dL/d log pi`` (autograd) become a
:class:`~tpg.verify.montecarlo.GradientSamples`, which :func:`tpg.verify.montecarlo.mc_test` tests against
``grad J(pi)`` like any on-policy estimator. Dynamic sampling is rejection sampling: ``new_prompts`` keeps
drawing fresh groups until ``N`` non-degenerate ones are in, ``same_prompt`` redraws the group of each
drawn prompt until it is non-degenerate (a prompt whose groups are all degenerate, ``q_x = 0``, gives an
empty batch, ``g = 0``). ``tokens_per_batch`` counts every response token drawn, rejected ones included.
"""

from __future__ import annotations

import math

import torch

from ..exact.engine import solve
from ..rollouts import Rollouts, sample
from ..verify.context import MonteCarloContext
from ..verify.exact_moments import batch_layout, checked_coef, layout_shape, make_batch, ref_log_probs
from ..verify.montecarlo import CHUNK_ROWS, GradientSamples
from ..verify.score import token_nt
from .behaviour import Behaviour, resolve_behaviour
from .exact import HOOKS, dynamic_sampling
from .losses import get_loss, output_coefficients

#: Rounds of rejection sampling before dynamic sampling gives up.
MAX_ROUNDS = 10_000


def _cat(parts: list[Rollouts]) -> Rollouts:
    first = parts[0]
    kw = {}
    for name in first.__dataclass_fields__:
        v = getattr(first, name)
        kw[name] = torch.cat([getattr(p, name) for p in parts]) if isinstance(v, torch.Tensor) else v
    return Rollouts(**kw)


def _degenerate_groups(ro: Rollouts, G: int) -> torch.Tensor:
    """Per group of ``G`` consecutive rows: all rewards equal (``G >= 2``)."""
    rm = ro.rm.view(-1, G)
    return (rm.max(1).values == rm.min(1).values) if G >= 2 else torch.zeros(rm.shape[0], dtype=torch.bool)


def _rows_of_groups(groups: torch.Tensor, G: int) -> torch.Tensor:
    return (groups.unsqueeze(1) * G + torch.arange(G)).reshape(-1)


def draw_groups(mdp, beh: Behaviour, n: int, G: int, gen: torch.Generator, mode: str = "false",
                q_x: torch.Tensor | None = None) -> tuple[Rollouts, torch.Tensor, int]:
    """``n`` groups of ``G`` responses sampled from ``mu`` under dynamic-sampling ``mode``:
    ``(rollouts of the kept groups in slot order, slot id of each row, response tokens drawn in all)``."""
    if mode == "false":
        ro = sample(mdp, beh.policy, num_prompts=n, group_size=G, generator=gen)
        return ro, ro.group.clone(), ro.num_tokens
    if mode == "new_prompts":
        Z = float((mdp.prompt_weights * q_x).sum())
        parts, have, drawn = [], 0, 0
        for _ in range(MAX_ROUNDS):
            m = max(16, math.ceil((n - have) / max(Z, 1e-6) * 1.1))
            ro = sample(mdp, beh.policy, num_prompts=m, group_size=G, generator=gen)
            kept = ~_degenerate_groups(ro, G)
            count = torch.cumsum(kept.to(torch.long), 0)
            need = n - have
            if int(count[-1]) >= need:  # stop at the group that completes the batch set
                last = int(torch.nonzero(count == need)[0, 0])
                kept[last + 1:] = False
                drawn += int(ro.mask[: (last + 1) * G].sum())
            else:
                drawn += ro.num_tokens
            idx = torch.nonzero(kept).flatten()
            parts.append(ro.index(_rows_of_groups(idx, G)))
            have += idx.numel()
            if have >= n:
                out = _cat(parts)
                out.group = torch.arange(n).repeat_interleave(G)
                return out, out.group.clone(), drawn
        raise ValueError(f"dynamic sampling: fewer than {n} non-degenerate groups after {MAX_ROUNDS} rounds "
                         f"(P(non-degenerate) = {Z:.3g})")
    # same_prompt: each slot keeps its prompt and redraws its group until it is not degenerate
    prompts = torch.multinomial(mdp.prompt_weights, n, replacement=True, generator=gen)
    pending = torch.nonzero(q_x[prompts] > 0).flatten()
    parts, slot_parts = [], []
    drawn = 0
    for _ in range(MAX_ROUNDS):
        if pending.numel() == 0:
            break
        ro = sample(mdp, beh.policy, prompts=prompts[pending], group_size=G, generator=gen)
        drawn += ro.num_tokens
        kept = ~_degenerate_groups(ro, G)
        idx = torch.nonzero(kept).flatten()
        parts.append(ro.index(_rows_of_groups(idx, G)))
        slot_parts.append(pending[idx].repeat_interleave(G))
        pending = pending[~kept]
    else:
        raise ValueError(f"dynamic sampling: {pending.numel()} prompt(s) still degenerate after {MAX_ROUNDS} redraws")
    slots = torch.cat(slot_parts) if slot_parts else torch.zeros(0, dtype=torch.long)
    if slots.numel() == 0:
        raise ValueError("dynamic sampling: every drawn prompt has only degenerate groups (q_x = 0)")
    order = torch.sort(slots, stable=True).indices  # rows in slot order, each group's rows kept together
    out = _cat(parts).index(order)
    out.group = slots[order].clone()
    return out, out.group.clone(), drawn


def sample_offpolicy_terms(mdp, policy, estimator, behaviour="pi", loss=None, num_batches: int = 1000,
                           group_size: int = 1, *, generator: torch.Generator | None = None, seed: int = 0,
                           dtype=torch.float64, ref_policy=None, hooks: str = "behaviour", sol=None,
                           context: MonteCarloContext | None = None) -> GradientSamples:
    """``num_batches`` batches sampled from ``behaviour``, each reduced to its loss coefficients (see the
    module docstring); the result goes to :func:`tpg.verify.montecarlo.mc_test` with ``pi``'s probabilities."""
    if not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"Monte Carlo mode needs at least 2 samples (batches), got {num_batches!r}")
    if hooks not in HOOKS:
        raise ValueError(f"hooks must be one of {', '.join(HOOKS)}; got {hooks!r}")
    loss = get_loss(loss)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    sol_pi = sol if sol is not None else solve(mdp, policy, with_grad=False)
    beh = resolve_behaviour(behaviour, mdp, policy, sol_pi=sol_pi)
    if context is None:
        hp, hs = (beh.policy, beh.sol) if hooks == "behaviour" else (policy, sol_pi)
        context = MonteCarloContext(mdp, hp, generator=gen, seed=seed, ref_policy=ref_policy, sol=hs)
    ctx = context
    layout, G = batch_layout(estimator, group_size)
    tree = mdp.tree
    per_batch, n_groups, per_group = layout_shape(layout, G)
    mode, q_x, _ = dynamic_sampling(mdp, beh, loss, layout, G)
    per_chunk = max(1, CHUNK_ROWS // per_batch)
    zero = torch.zeros((), dtype=torch.float64)
    lpi = sol_pi.logp
    coefs, nts, toks, bids = [], [], [], []
    tokens = 0
    hook_before = ctx.tokens_sampled
    done = 0
    while done < num_batches:
        n = min(per_chunk, num_batches - done)
        if per_group >= 2:  # group slots (one per batch, or P per batch:PxN batch), each its own group
            ro, slot_b, drawn = draw_groups(mdp, beh, n * n_groups, per_group, gen, mode, q_x)
            batch_b = slot_b // n_groups
        else:
            ro = sample(mdp, beh.policy, num_prompts=n * per_batch, group_size=1, generator=gen)
            batch_b, drawn = torch.arange(n).repeat_interleave(per_batch), ro.num_tokens
        tokens += drawn
        if ro.batch_size:
            nt = token_nt(tree, ro.nodes)
            ntc = nt.clamp(min=0)
            logp_mu = ro.logp.clone()  # what the engine reported while sampling
            ro.logp = torch.where(ro.mask, lpi[ntc, ro.tokens], zero)  # the trainer recomputes log pi
            ref = ref_log_probs(ref_policy, tree, ro) if ref_policy is not None else None
            _, nb = torch.unique_consecutive(batch_b, return_inverse=True)
            rb = make_batch(estimator, ro, nb, dtype, ref)
            out = estimator(rb, ctx)
            coef = checked_coef(estimator, out, ro.tokens.shape)
            if not loss.is_pg:
                coef = output_coefficients(loss, estimator, out, ro.logp, torch.where(ro.mask, logp_mu, zero),
                                           ro.mask, nb, per_batch)
            coefs.append(coef)
            nts.append(nt)
            toks.append(ro.tokens)
            bids.append(batch_b + done)
        done += n
    return GradientSamples.from_chunks(coefs, nts, toks, bids, num_batches, mdp.horizon, tokens,
                                       float(ctx.tokens_sampled - hook_before))


__all__ = ["sample_offpolicy_terms", "draw_groups", "MAX_ROUNDS"]
