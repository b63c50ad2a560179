"""The verifier's off-policy records: what :func:`tpg.verify.verify` adds with ``behaviour=`` / ``loss=``.

An off-policy record has every field of an on-policy one (verdict, scale, cosine, rel_bias, ...; the
target stays ``grad J(pi)``, the expectation is over batches sampled from ``mu``) plus

    behaviour, loss, hooks, mismatch, behaviour_info, kept_prob

``mismatch`` is the behaviour's exact mismatch report (:func:`tpg.offpolicy.behaviour.mismatch_report`;
``null`` where a quantity is infinite, e.g. ``kl_pi_mu_seq`` under top-p), ``behaviour_info`` what the
behaviour's stages report (``stale``: fixed-point iterations and the forward residual), ``kept_prob``
the probability that a group survives dynamic sampling (1 without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..verify.exact_moments import batch_layout
from ..verify.montecarlo import TARGET_COSINE
from ..verify.record_fields import exact_record_fields, mc_record_fields, probe_hook_tokens
from .behaviour import Behaviour, resolve_behaviour
from .exact import HOOKS, dynamic_sampling, offpolicy_moments
from .losses import Loss, get_loss
from .montecarlo import sample_offpolicy_terms


@dataclass
class OffPolicySetup:
    """A behaviour resolved on one problem and a loss, shared by the estimators of one verify call."""

    behaviour: Behaviour
    loss: Loss
    hooks: str = "behaviour"


def prepare_offpolicy(mdp, policy, sol, behaviour=None, loss=None, hooks: str = "behaviour") -> OffPolicySetup:
    """The :class:`OffPolicySetup` of ``behaviour`` (default ``pi``) and ``loss`` (default ``pg``)."""
    if hooks not in HOOKS:
        raise ValueError(f"hooks must be one of {', '.join(HOOKS)}; got {hooks!r}")
    beh = resolve_behaviour("pi" if behaviour is None else behaviour, mdp, policy, sol_pi=sol)
    return OffPolicySetup(behaviour=beh, loss=get_loss(loss), hooks=hooks)


def _json_num(x):
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (list, tuple)):
        return [_json_num(v) for v in x]
    return x


def offpolicy_fields(setup: OffPolicySetup) -> dict:
    """The record fields that name the setting (also on error records)."""
    return {"behaviour": setup.behaviour.spec, "loss": setup.loss.spec, "hooks": setup.hooks,
            "mismatch": {k: _json_num(v) for k, v in setup.behaviour.mismatch.items()},
            "behaviour_info": {k: _json_num(v) for k, v in setup.behaviour.info.items()}}


def offpolicy_result(prob, est, setup: OffPolicySetup, mode: str, group_size: int, samples: int, seed: int, dtype,
                     alpha: float, max_rows: int, ref_policy, target: torch.Tensor,
                     target_cosine: float | None = None) -> dict:
    """The verdict part of an off-policy record (exact or Monte Carlo), for the harness's ``_verify_one``.
    In Monte Carlo mode the test's result rides along under ``"_mc"``, so that the harness decides the
    verdicts of the whole run as one Holm family.

    ``prob`` is the harness's problem (``mdp``, ``policy``, ``sol``, ``pmap``, ``pi``, ``mc_context``)."""
    mdp, policy = prob.mdp, prob.policy
    beh, loss, hooks = setup.behaviour, setup.loss, setup.hooks
    out = offpolicy_fields(setup)
    if mode == "exact":
        mom = offpolicy_moments(mdp, policy, est, beh, loss, group_size, dtype=torch.float64, with_cov=False,
                                max_rows=max_rows, ref_policy=ref_policy, hooks=hooks, seed=seed, sol=prob.sol,
                                param_map=prob.pmap)

        def probe(gen, batches):
            return sample_offpolicy_terms(mdp, policy, est, beh, loss, batches, group_size, generator=gen, seed=seed,
                                          ref_policy=ref_policy, hooks=hooks, sol=prob.sol)
        out.update(exact_record_fields(mom, target, dtype, *probe_hook_tokens(mom.hook_calls, est, seed, probe)))
        out["kept_prob"] = mom.kept_prob
        return out
    gen = torch.Generator().manual_seed(int(seed))
    gs = sample_offpolicy_terms(mdp, policy, est, beh, loss, samples, group_size, generator=gen, seed=seed,
                                ref_policy=ref_policy, hooks=hooks, sol=prob.sol)
    out.update(mc_record_fields(gs, target, prob, alpha, seed,
                                TARGET_COSINE if target_cosine is None else target_cosine))
    out["kept_prob"] = dynamic_sampling(mdp, beh, loss, *batch_layout(est, group_size))[2]
    return out


def format_offpolicy_header(records: list[dict]) -> str:
    """Lines naming the behaviour, loss and the mismatch of off-policy records (for the text table)."""
    recs = [r for r in records if r.get("behaviour") is not None]
    if not recs:
        return ""
    lines = []
    for beh, loss, hooks in sorted({(r["behaviour"], r["loss"], r.get("hooks")) for r in recs}):
        lines.append(f"behaviour mu = {beh}; loss = {loss}; hooks from {'mu' if hooks == 'behaviour' else 'pi'}; "
                     f"target grad J(pi)")
        m = next(r["mismatch"] for r in recs if r["behaviour"] == beh) or {}

        def f(key, spec=".4g"):
            v = m.get(key)
            return "inf" if v is None else format(v, spec)

        lines.append(f"mismatch: KL(mu||pi) {f('kl_token')}/token {f('kl_seq')}/seq, "
                     f"KL(pi||mu) {f('kl_pi_mu_seq')}/seq, "
                     f"|log pi/mu| mean {f('mean_abs_log_ratio')} max {f('max_abs_log_ratio')}, "
                     f"pi/mu in [{f('min_token_ratio')}, {f('max_token_ratio')}] per token, "
                     f"max {f('max_seq_ratio')} per seq, pi mass outside supp mu {f('pi_mass_outside_seq')}/seq, "
                     f"E_mu[rho_seq^2] {f('seq_ratio_second_moment')}")
    kept = sorted({r.get("kept_prob") for r in recs if r.get("kept_prob") not in (None, 1.0)})
    if kept:
        lines.append("dynamic sampling: P(group kept) = " + ", ".join(f"{k:.4g}" for k in kept))
    return "\n".join(lines)


__all__ = ["OffPolicySetup", "prepare_offpolicy", "offpolicy_fields", "offpolicy_result", "format_offpolicy_header"]
