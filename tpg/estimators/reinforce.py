"""REINFORCE and its single-sample relatives: plain, the token-level oracle, baselines, ReMax.

Notation: ``R_i = RM(W_i)`` the response-level reward, ``T_i`` the length, ``x_i`` the prompt,
``r_t`` the true token rewards (oracle only), ``gamma`` the MDP's discount.
"""

from __future__ import annotations

import torch

from .estimator import Estimator, tokens_between, tokens_counter
from .functional import discounted_returns
from .options import ESTIMATOR_OPTIONS


class Reinforce(Estimator):
    """REINFORCE with the response-level reward (Theorem 1, TPG).

    Advantage: ``A_{i,t} = R_i`` for every token of response ``i``.
    Expected gradient: ``grad J`` (unbiased for any token rewards and any ``gamma``, RM discounted
    with the same ``gamma``).
    """

    name = "reinforce"

    def compute(self, batch, ctx, penalty_bt):
        R = self.outcome_rewards(batch, penalty_bt)
        return R.unsqueeze(1).expand_as(batch.logp).clone(), 0, {}


class RewardToGo(Estimator):
    """Token-level oracle: reward-to-go of the true token rewards (Lemma 1).

    Advantage: ``A_{i,t} = gamma^(t-1) sum_{k >= t} gamma^(k-t) r_k = sum_{k >= t} gamma^(k-1) r_k``,
    the sampled ``Q(s_t, w_t)`` times the state discount ``gamma^(t-1)`` of Lemma 1
    (``grad J = E sum_t gamma^(t-1) Q(s_t, w_t) grad log pi``). With ``kl=k1_reward`` each token
    also carries ``- beta sum_{k >= t} Delta_k``.
    Expected gradient: ``grad J`` (the reference). Reads the true token rewards: it receives the
    full ``Rollouts`` (or a ``ResponseBatch`` with ``token_rewards``).
    """

    name = "reward_to_go"
    uses_token_rewards = True

    def compute(self, batch, ctx, penalty_bt):
        dt = batch.rm.dtype
        disc = batch.gamma ** torch.arange(batch.horizon, dtype=dt)
        adv = discounted_returns(batch.token_rewards.to(dt) * disc, batch.mask, 1.0)
        if penalty_bt is not None:
            adv = adv - discounted_returns(penalty_bt, batch.mask, 1.0)
        return adv, 0, {}


class ReinforceBaseline(Estimator):
    """REINFORCE with a per-prompt baseline.

    Advantage: ``A_{i,t} = R_i - b(x_i)``.
    ``baseline=exact``: ``b(x) = V'(s_1) = E[RM | x]`` from ``ctx.prompt_values`` (the best
    constant per prompt; an oracle). ``baseline=running``: ``b(x)`` = the mean of ``R`` over the
    earlier calls' responses to ``x`` (0 before the first), state kept in the estimator
    (:meth:`reset` clears it). All rows of one call, whatever their batch id, see the state from
    before the call (they are treated as parallel batches); the state is then updated with
    every row of the call, except in exact mode (``ctx.exact``), where the rows are alternatives
    of a sample space, not draws, and the state is left unchanged.
    Expected gradient: ``grad J`` (``b`` depends on the prompt only, Lemma 2).
    """

    name = "reinforce_baseline"
    OPTIONS = ESTIMATOR_OPTIONS["reinforce_baseline"]

    def __init__(self, **options):
        super().__init__(**options)
        self.reset()

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.options["baseline"] == "running"

    def reset(self) -> None:
        self._sum = torch.zeros(0, dtype=torch.float64)
        self._count = torch.zeros(0, dtype=torch.float64)

    def running_baseline(self, prompt_b: torch.Tensor) -> torch.Tensor:
        """The running mean reward of each prompt over earlier calls (0 if none), ``[B]``."""
        P = int(prompt_b.max()) + 1 if prompt_b.numel() else 0
        self._grow(P)
        s, c = self._sum[prompt_b], self._count[prompt_b]
        return torch.where(c > 0, s / c.clamp(min=1), torch.zeros_like(s))

    def _grow(self, P: int) -> None:
        if P > self._sum.numel():
            pad = P - self._sum.numel()
            self._sum = torch.cat([self._sum, torch.zeros(pad, dtype=torch.float64)])
            self._count = torch.cat([self._count, torch.zeros(pad, dtype=torch.float64)])

    def compute(self, batch, ctx, penalty_bt):
        R = self.outcome_rewards(batch, penalty_bt)
        if self.options["baseline"] == "exact":
            b = self._need_ctx(ctx, "prompt_values")(batch.prompt)
            b = _check_vector(b, batch.batch_size, self.name, "ctx.prompt_values").to(R.dtype)
        else:
            b = self.running_baseline(batch.prompt).to(R.dtype)
            if not bool(getattr(ctx, "exact", False)) and batch.batch_size:
                self._sum.index_add_(0, batch.prompt, R.detach().to(torch.float64))
                self._count.index_add_(0, batch.prompt, torch.ones(batch.batch_size, dtype=torch.float64))
        return (R - b).unsqueeze(1).expand_as(batch.logp).clone(), 0, {}


class ReMax(Estimator):
    """ReMax (Li et al. 2023): the greedy response's reward as the baseline.

    Advantage (verl's form): ``A_{i,t} = G_{i,t} - RM(greedy(x_i))`` with ``G_{i,t}`` the
    (undiscounted) reward-to-go of ``token_level_rewards``, which is ``R_i`` on every token unless
    ``kl=k1_reward`` puts per-token penalties in the rewards.
    Expected gradient: ``grad J`` (the greedy response depends on the prompt only).
    The greedy response's tokens count in ``tokens_spent`` (via ``ctx.tokens_sampled``).
    """

    name = "remax"

    def compute(self, batch, ctx, penalty_bt):
        greedy = self._need_ctx(ctx, "greedy_rm")
        before = tokens_counter(ctx)
        b = _check_vector(greedy(batch.prompt), batch.batch_size, self.name, "ctx.greedy_rm").to(batch.rm.dtype)
        info: dict = {}
        spent = tokens_between(ctx, before, info)
        returns = discounted_returns(self.token_rewards(batch, penalty_bt), batch.mask, 1.0)
        return returns - b.unsqueeze(1), spent, info


def _check_vector(v, B: int, owner: str, hook: str) -> torch.Tensor:
    v = torch.as_tensor(v)
    if v.shape != (B,):
        raise ValueError(f"{owner}: {hook} must return shape [B] = [{B}], got {list(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{owner}: {hook} returned non-finite values")
    return v


__all__ = ["Reinforce", "RewardToGo", "ReinforceBaseline", "ReMax"]
