"""The one contract every estimator follows.

An estimator maps a :class:`ResponseBatch` (what a trainer such as verl, TRL or OpenRLHF
has: responses, their log-probabilities and the response-level reward on the last token)
to per-token advantages ``A[B, H]`` and per-token aggregation weights ``w[B, H]``. Its
surrogate loss is

    L(theta) = - sum_{b,t} w[b,t] * A[b,t] * log pi_theta(w_{b,t} | s_{b,t})  (+ KL loss terms),

so its single-batch gradient estimate is ``g = sum_{b,t} w A grad log pi`` (PPO's clipped-ratio
form has the same gradient at ratio 1). Estimators never see the true token rewards; the one
exception, the token-level oracle, declares ``uses_token_rewards = True`` and receives the
full :class:`~tpg.rollouts.Rollouts` (one batch) or a ``ResponseBatch`` built with
``from_rollouts(..., keep_token_rewards=True)`` (stacked batches, KL options).

Batches may stack independent mini-batches (``batch`` ids) and groups (``group`` ids):
group statistics (GRPO, RLOO) are taken within a group, batch statistics (REINFORCE++
whitening, ``token-mean`` aggregation) within a batch id. The verifier uses this to evaluate
every element of a sample space, or thousands of Monte Carlo batches, in one call.

What an estimator needs beyond the batch comes through an :class:`EstimatorContext`:
ReMax's greedy response, TRePO's Monte Carlo continuations, PPO's critic values, the exact
prompt value of the oracle baseline.

Group statistics are taken per ``(batch, group)`` pair, so group ids need only be unique
within a batch id; :func:`stack_batches` stacks independent batches with fresh ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from .options import AGG_MODES  # noqa: E402  (declared torch-free, with the options)


@dataclass
class ResponseBatch:
    """What an estimator may see: response-level rewards only.

    Attributes:
        prompt: prompt id ``[B]``.
        group: group id ``[B]`` (responses to one prompt draw; group statistics are per group).
        batch: mini-batch id ``[B]`` (batch statistics and aggregation are per batch id).
        tokens: ``[B, H]`` (0 after the end), mask: ``[B, H]`` bool.
        logp: ``log pi_old(w_t | s_t)`` of the sampling policy, ``[B, H]``.
        token_level_rewards: verl's form: ``RM(W)`` on the last token, 0 elsewhere, ``[B, H]``.
        rm: ``RM(W)``, ``[B]``. length: ``T``, ``[B]``.
        ref_logp: ``log pi_ref`` per token ``[B, H]`` when a reference policy is set, else None.
        gamma: the MDP's discount (``RM`` is already discounted with it).
        vocab_size, horizon: of the MDP.
        token_rewards: the true token rewards ``[B, H]``; None except for the token-level oracle
            (``reward_to_go``), which is the one estimator allowed to read them (added for it:
            a ``Rollouts`` carries no batch ids, so stacked batches reach the oracle this way).
    """

    prompt: torch.Tensor
    group: torch.Tensor
    batch: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    token_level_rewards: torch.Tensor
    rm: torch.Tensor
    length: torch.Tensor
    ref_logp: torch.Tensor | None
    gamma: float
    vocab_size: int
    horizon: int
    token_rewards: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.prompt.numel())

    @classmethod
    def from_rollouts(cls, ro, batch: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float64, keep_token_rewards: bool = False) -> "ResponseBatch":
        """Strip the true token rewards from :class:`~tpg.rollouts.Rollouts` (keep them with
        ``keep_token_rewards=True``, for the token-level oracle only)."""
        B, H = ro.tokens.shape
        tlr = torch.zeros(B, H, dtype=dtype)
        rows = torch.nonzero(ro.length > 0).flatten()
        tlr[rows, ro.length[rows] - 1] = ro.rm[rows].to(dtype)
        return cls(prompt=ro.prompt, group=ro.group, batch=torch.zeros(B, dtype=torch.long) if batch is None else batch,
                   tokens=ro.tokens, mask=ro.mask, logp=ro.logp.to(dtype), token_level_rewards=tlr,
                   rm=ro.rm.to(dtype), length=ro.length, ref_logp=None if ref_logp is None else ref_logp.to(dtype),
                   gamma=ro.gamma, vocab_size=ro.vocab_size, horizon=ro.horizon,
                   token_rewards=ro.token_rewards.to(dtype) if keep_token_rewards else None)

    def index(self, rows: torch.Tensor) -> "ResponseBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return ResponseBatch(**kw)


def stack_batches(batches: list[ResponseBatch]) -> ResponseBatch:
    """Stack independent batches into one: batch ids and group ids are offset so that no two
    input batches share an id (each input's own ids are kept relative to it)."""
    if not batches:
        raise ValueError("stack_batches needs at least one batch")
    first = batches[0]
    for b in batches[1:]:
        if (b.horizon, b.vocab_size, b.gamma) != (first.horizon, first.vocab_size, first.gamma):
            raise ValueError("stack_batches: batches differ in horizon, vocab_size or gamma")
        if any((getattr(b, k) is None) != (getattr(first, k) is None) for k in ("ref_logp", "token_rewards")):
            raise ValueError("stack_batches: either every batch carries ref_logp/token_rewards or none does")
    kw = {}
    batch_off = group_off = 0
    batch_ids, group_ids = [], []
    for b in batches:
        batch_ids.append(b.batch + batch_off)
        group_ids.append(b.group + group_off)
        if b.batch_size:
            batch_off += int(b.batch.max()) + 1
            group_off += int(b.group.max()) + 1
    for f in fields(first):
        v = getattr(first, f.name)
        if f.name == "batch":
            kw[f.name] = torch.cat(batch_ids)
        elif f.name == "group":
            kw[f.name] = torch.cat(group_ids)
        elif isinstance(v, torch.Tensor):
            kw[f.name] = torch.cat([getattr(b, f.name) for b in batches])
        else:
            kw[f.name] = v
    return ResponseBatch(**kw)


@dataclass
class EstimatorOutput:
    """Per-token advantages and aggregation weights, ``[B, H]`` each, zero on padding.

    ``kl_coef`` (optional, ``[B, H]``) is the coefficient of ``grad log pi`` contributed by a KL
    *loss* term (k1/k2/k3 as a loss), so that the full single-batch gradient estimate is
    ``sum w * (A - kl_coef) * grad log pi``; ``tokens_spent`` counts policy tokens sampled beyond
    the batch (continuations, greedy responses)."""

    advantages: torch.Tensor
    weights: torch.Tensor
    kl_coef: torch.Tensor | None = None
    tokens_spent: int = 0
    info: dict = field(default_factory=dict)

    def score_coef(self) -> torch.Tensor:
        """The coefficient of each token's ``grad log pi`` in the gradient estimate, ``[B, H]``."""
        coef = self.weights * self.advantages
        if self.kl_coef is not None:
            coef = coef - self.weights * self.kl_coef
        return coef


class EstimatorContext(Protocol):
    """The documented hooks an estimator may call. The verifier supplies an exact context
    (expectations: exact values where the advantage is linear in the hook's output) or a
    Monte Carlo context (samples).

    Optional attribute ``tokens_sampled: int``: a running count of the policy tokens the
    context has sampled for estimators (continuations beyond their given prefix, greedy
    responses). Estimators read it with ``getattr(ctx, "tokens_sampled", None)`` before and
    after their calls and report the difference as ``EstimatorOutput.tokens_spent``; a context
    without it makes them report 0 and say so in ``info``.
    """

    exact: bool
    """True when the hook returns expectations (the verifier's exact mode)."""

    def greedy_rm(self, prompt_b: torch.Tensor) -> torch.Tensor:
        """``RM`` of the greedy (argmax) response to each prompt, ``[B]`` (ReMax's baseline)."""

    def continuation_values(self, prompt_b: torch.Tensor, prefix_bt: torch.Tensor, prefix_len_b: torch.Tensor,
                            num_continuations: int) -> torch.Tensor:
        """Mean ``RM`` of ``K`` Monte Carlo continuations of each prefix, ``[B]`` (``E[RM | prefix]``
        exactly in exact mode); the tokens sampled are counted."""

    def critic_values(self, batch: ResponseBatch, kind: str, gamma: float, options: dict) -> torch.Tensor:
        """Critic estimates ``V_hat(s_t)`` of the discounted ZRA return ``E[gamma^(T-t) RM | s_t]`` for
        ``t = 1 .. H+1`` (the last column, after the end, is 0), ``[B, H + 1]``."""

    def random_generator(self) -> torch.Generator:
        """The generator for an estimator's own randomness (random anchors)."""

    def prompt_values(self, prompt_b: torch.Tensor) -> torch.Tensor:
        """The exact prompt value ``V'(s_1) = E[RM(W) | x]`` of each prompt, ``[B]``, in either mode
        (the oracle baseline of ``reinforce_baseline:baseline=exact``)."""


def aggregation_weights(mask_bt: torch.Tensor, batch_b: torch.Tensor, mode: str, horizon: int,
                        dtype=torch.float64) -> torch.Tensor:
    """Per-token weights ``[B, H]`` of verl's ``loss_agg_mode`` within each batch id.

    With ``n`` responses in a batch, ``|o_i|`` response lengths and ``H`` the horizon:

    * ``seq-mean-token-sum``: ``1 / n`` (sum over tokens, mean over responses) — unbiased;
    * ``seq-mean-token-sum-norm``: ``1 / (n H)`` — unbiased up to the constant ``1/H``;
    * ``seq-mean-token-mean``: ``1 / (n |o_i|)`` (original GRPO) — length-biased;
    * ``token-mean``: ``1 / sum_i |o_i|`` (DAPO) — random denominator, biased for small batches;
    * ``token-sum``: ``1`` (no normalisation).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}; got {mode!r}")
    m = mask_bt.to(dtype)
    nb = int(batch_b.max()) + 1 if batch_b.numel() else 0
    n_per_batch = torch.bincount(batch_b, minlength=nb).to(dtype)
    n_b = n_per_batch[batch_b].unsqueeze(1)
    if mode == "seq-mean-token-sum":
        return m / n_b
    if mode == "seq-mean-token-sum-norm":
        return m / (n_b * horizon)
    if mode == "seq-mean-token-mean":
        return m / (n_b * m.sum(1, keepdim=True).clamp(min=1))
    if mode == "token-mean":
        tokens_per_batch = torch.zeros(nb, dtype=dtype).index_add_(0, batch_b, m.sum(1))
        return m / tokens_per_batch[batch_b].unsqueeze(1).clamp(min=1)
    return m
