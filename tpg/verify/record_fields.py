"""The verdict fields of a verification record, shared by on-policy verification (:mod:`tpg.verify.harness`)
and off-policy verification (:mod:`tpg.offpolicy.record`): the exact-mode fields from the moments, the
tokens the hooks spend (measured on sampled batches, exact mode does not count them), and the Monte Carlo
fields from the test. The records' other fields are described in :mod:`tpg.verify.harness`.
"""

from __future__ import annotations

import torch

from .montecarlo import TARGET_COSINE, mc_test
from .verdict import exact_verdict

#: Batches sampled to measure the tokens that hooks spend, in exact mode.
TOKEN_PROBE_BATCHES = 256
#: The context hooks that sample (their tokens are not in exact mode's count).
SAMPLING_HOOKS = ("continuation_values", "greedy_rm")


def probe_hook_tokens(hook_calls: dict, est, seed: int, sample_terms) -> tuple[float, bool]:
    """``(hook_tokens_per_batch, tokens_exact)`` of an exact-mode record: ``(0, True)`` unless the estimator
    called a hook that samples (continuations, greedy responses), whose tokens exact mode does not count;
    then measured on :data:`TOKEN_PROBE_BATCHES` batches, ``sample_terms(generator, batches)`` (a
    :class:`~tpg.verify.montecarlo.GradientSamples`) with a generator seeded ``seed + 1``."""
    if not any(h in hook_calls for h in SAMPLING_HOOKS):
        return 0.0, True
    if hasattr(est, "reset"):
        est.reset()
    gen = torch.Generator().manual_seed(int(seed) + 1)
    return sample_terms(gen, TOKEN_PROBE_BATCHES).hook_tokens_per_batch, False


def exact_record_fields(mom, target: torch.Tensor, dtype, hook_tokens: float, tokens_exact: bool) -> dict:
    """The verdict and the counts of an exact-mode record, from the moments ``mom`` (``mean``,
    ``num_batches``, ``variance_trace``, ``tokens_per_batch``) and :func:`probe_hook_tokens`."""
    out = exact_verdict(mom.mean, target, dtype=dtype).as_dict()
    out.update({"alpha": None, "n_samples": mom.num_batches, "variance_trace": mom.variance_trace,
                "tokens_per_batch": mom.tokens_per_batch + hook_tokens, "hook_tokens_per_batch": hook_tokens,
                "tokens_exact": tokens_exact})
    return out


def mc_record_fields(gs, target: torch.Tensor, prob, alpha: float, seed: int,
                     target_cosine: float = TARGET_COSINE) -> dict:
    """The verdict and the counts of a Monte Carlo record: :func:`~tpg.verify.montecarlo.mc_test` of the
    samples ``gs`` against ``target`` (``prob``'s ``pi`` and parameter map), whose result rides along under
    ``"_mc"`` until the harness decides the run's verdicts together (:func:`tpg.verify.montecarlo.family_verdicts`)."""
    res = mc_test(gs, target, prob.pi, prob.pmap, alpha=alpha, seed=seed, target_cosine=target_cosine)
    out = res.verdict.as_dict()
    out["_mc"] = res
    out.update({"alpha": alpha, "n_samples": gs.num_batches, "variance_trace": res.variance_trace,
                "tokens_per_batch": gs.tokens_per_batch, "hook_tokens_per_batch": gs.hook_tokens_per_batch,
                "tokens_exact": False})
    return out


__all__ = ["TOKEN_PROBE_BATCHES", "SAMPLING_HOOKS", "probe_hook_tokens", "exact_record_fields", "mc_record_fields"]
