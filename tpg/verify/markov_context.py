"""Estimator contexts without a tree: the hooks of :class:`~tpg.estimators.base.EstimatorContext` for a
:class:`~tpg.policies.SharedSoftmax` policy on :class:`~tpg.mdp.rewards.CompactRewards`, at any horizon.

:class:`~tpg.verify.context.ExactContext` and :class:`~tpg.verify.context.MonteCarloContext` read every
hook off the stored tree. When the policy and the rewards depend on the state only through
``(t, prev)`` (position, previous token), the Markov engine (:mod:`tpg.exact.markov`) gives the same
hooks from ``[H, V + P]`` tables, and the sampler needs no tree either, so estimators with hooks run
at long horizons (``H = 1024``). :class:`MarkovExactContext` (``exact = True``) and
:class:`MarkovMonteCarloContext` (``exact = False``) mirror the two tree contexts' semantics; they
are not subclasses of them (their state-indexed methods read the tree), but share with them what does not
depend on how states are indexed: the bookkeeping, the tabular critic's fit and each mode's own hooks
(:mod:`tpg.verify.context`).

What is exact, and why (``c(s) = sum_{k<t} gamma^k r_k`` is the reward already earned, a function
of the whole prefix, not of ``(t, prev)``):

* ``prompt_values``: ``V'(s_1) = V(0, V + p)``, exact.
* ``greedy_rm``: the argmax path from each prompt, exact (the argmax depends only on ``(t, prev)``).
* ``continuation_values`` in exact mode: ``V'(prefix) = c(prefix) + gamma^L V(L, prev_L)``, exact for
  every given prefix (``c`` is summed along it with the true rewards, which the context knows and
  the estimator does not). Monte Carlo mode samples ``K`` continuations
  (:func:`tpg.rollouts.sample_continuations`, which needs no tree for these problems).
* ``critic_values(kind="exact")``: the discounted ZRA return ``E[g^(T-t) RM | s_t]`` (the critic's
  ``g``, 1-based ``t``) is not Markov in ``(t, prev)`` unless ``g = gamma = 1`` *and* the past reward
  is tracked, but it factors as ``c(s_t) D(t, prev) + gamma^(t-1) F(t, prev)`` with ``D``, ``F`` Markov
  (:func:`tpg.exact.markov.zra_value_tables`). The context evaluates that along each response of the
  batch with the true ``c``, so the exact critic is exact at every state, for every ``g`` and
  ``gamma``. With ``kl=k1_reward`` the penalty's value ``- beta E[sum_{k>=t} g^(k-t) Delta_k | s_t]``
  is Markov (the reference policy must then be a shared policy of the same shape).
* ``critic_values(kind="noisy", noise="fresh")``: exact plus fresh noise (exact mode: the exact
  critic), as in the tree contexts.
* ``critic_values(kind="noisy", noise="fixed")``: exact plus a fixed seeded ``N(0, sigma^2)`` draw per
  state **(t, prev)** (the tree contexts draw one per tree node): a wrong but fixed critic.
* ``critic_values(kind="tabular")``: a table over the states **(t, prev)** (the tree contexts fit one
  per tree node) fitted to sampled returns ``g^(T-t) RM`` with the tree contexts' update rule. A
  ``(t, prev)`` table cannot represent ``c(s)``, so even fully fitted it is the aliased critic
  ``E[target | t, prev] = E[c | t, prev] D + gamma^(t-1) F``, which is exact only where the past
  reward does not vary within a state (e.g. terminal-only rewards): an inexact critic by design.

Token counts follow the tree contexts: ``tokens_sampled`` (expected counts in exact mode:
``K E[T - L | prefix]`` per continuation, from the Markov remaining length) and ``critic_tokens``.
"""

from __future__ import annotations

import torch

from ..exact.markov import (backward_values, check_markov, markov_unsupported_reason, path_token_rewards,
                            prefix_response_values, prefix_states, shared_log_probs, solve_markov, zra_value_tables)
from .context import CRITIC_KINDS, _ContextBase, _ExactMode, _MonteCarloMode


def batch_states(mdp, prompt_b: torch.Tensor, tokens_bt: torch.Tensor) -> torch.Tensor:
    """Flat state index ``t (V + P) + prev`` of the state before each token ``t = 0 .. H - 1``,
    ``[B, H]`` (``prev = V + prompt`` at ``t = 0``; entries after a response's end are meaningless
    and must be masked by the caller)."""
    B, H = tokens_bt.shape
    V, R = mdp.vocab_size, mdp.vocab_size + mdp.num_prompts
    prev = torch.empty(B, H, dtype=torch.long)
    prev[:, 0] = V + prompt_b
    prev[:, 1:] = tokens_bt[:, :-1]
    return prev + torch.arange(H) * R


def token_rows(mdp, ro) -> torch.Tensor:
    """The logit row of the state before each token of the rollouts ``ro``, ``t (V + P) + prev``
    (:func:`batch_states`), -1 on padding, ``[B, H]``: the per-token row index of row-space Monte Carlo
    verification (:func:`tpg.verify.montecarlo.sample_gradient_terms` with ``engine="markov"``)."""
    H = mdp.horizon
    mask = ro.mask[:, :H]
    return torch.where(mask, batch_states(mdp, ro.prompt, ro.tokens[:, :H]), torch.full_like(mask, -1,
                                                                                               dtype=torch.long))


def ref_row_log_probs(ref_policy, mdp, ro) -> torch.Tensor:
    """``log pi_ref(w_t | t, prev)`` of every token of ``ro`` under a shared reference policy, 0 on
    padding, ``[B, H]`` (what :func:`tpg.verify.exact_moments.ref_log_probs` reads off the tree)."""
    reason = markov_unsupported_reason(mdp, ref_policy)
    if reason is not None:
        raise ValueError(f"reference policy: {reason}")
    H, V = mdp.horizon, mdp.vocab_size
    lp = shared_log_probs(ref_policy, H).reshape(-1, V)
    rows = token_rows(mdp, ro)
    tok = ro.tokens[:, :H].clamp(0, V - 1)
    return torch.where(rows >= 0, lp[rows.clamp(min=0), tok], torch.zeros((), dtype=torch.float64))


class _MarkovContext(_ContextBase):
    """Hooks shared by both Markov contexts; everything comes from the Markov solution's tables."""

    def __init__(self, mdp, policy, seed: int = 0, ref_policy=None, sol=None):
        check_markov(mdp, policy)
        super().__init__(mdp, policy, seed, ref_policy,
                         sol if sol is not None else solve_markov(mdp, policy, with_grad=False))

    # -------------------------------------------------------------- states
    def _num_states(self) -> int:
        return self.mdp.horizon * (self.mdp.vocab_size + self.mdp.num_prompts)

    def _rollout_states(self, ro) -> torch.Tensor:
        """The flat state ``t (V + P) + prev`` before each token of ``ro``, ``[B, H]`` (:func:`batch_states`)."""
        return batch_states(self.mdp, ro.prompt, ro.tokens)

    def _pi(self) -> torch.Tensor:
        return self.sol.logp.exp()

    def remaining_length(self) -> torch.Tensor:
        """``E[T - t | t, prev]``, the expected number of tokens still to come, ``[H, R]``."""
        if self._remaining_len is None:
            pi = self._pi()
            self._remaining_len, _ = backward_values(pi, None, 1.0, self.mdp.eos_token,
                                                     expected_r=torch.ones(pi.shape[:2], dtype=torch.float64))
        return self._remaining_len

    # -------------------------------------------------------------- hooks
    def _greedy_responses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(RM, length)`` of the argmax-decoded response to each prompt, ``[P]`` each."""
        mdp = self.mdp
        H, V, P, eos = mdp.horizon, mdp.vocab_size, mdp.num_prompts, mdp.eos_token
        best = self.sol.logp.argmax(2).tolist()  # [H][R]
        tokens = torch.zeros(P, H, dtype=torch.long)
        length = torch.full((P,), H, dtype=torch.long)
        for p in range(P):
            prev = V + p
            for t in range(H):
                w = best[t][prev]
                tokens[p, t] = w
                if w == eos:
                    length[p] = t + 1
                    break
                prev = w
        mask = torch.arange(H) < length.unsqueeze(1)
        r = path_token_rewards(mdp, torch.arange(P), tokens, mask)
        return r @ (mdp.gamma ** torch.arange(H, dtype=torch.float64)), length

    def prompt_values(self, prompt_b: torch.Tensor) -> torch.Tensor:
        """Exact ``V'(s_1) = E[RM(W) | x]`` of each prompt, ``[B]``."""
        self._called("prompt_values")
        return self.sol.prompt_values()[torch.as_tensor(prompt_b, dtype=torch.long)].clone()

    # -------------------------------------------------------------- critics
    def _markov_tables(self, gamma: float, options: dict):
        """``(D, F, penalty)`` flattened to ``[H R]`` (``penalty`` ``None`` without ``kl=k1_reward``):
        the exact critic at a state is ``c D + gamma_mdp^t F - beta penalty`` (module docstring)."""
        kl = str(options.get("kl", "none"))
        beta = float(options.get("kl_beta", 0.0)) if kl == "k1_reward" else 0.0
        key = ("markov", float(gamma), beta != 0.0)
        if key not in self._critic_cache:
            mdp = self.mdp
            pi = self._pi()
            D, F = zra_value_tables(pi, mdp.rewards.table, mdp.eos_token, mdp.gamma, float(gamma))
            penalty = None
            if beta != 0.0:
                if self.ref_policy is None:
                    raise ValueError("critic with kl=k1_reward needs a reference policy in the context")
                reason = markov_unsupported_reason(mdp, self.ref_policy)
                if reason is not None:
                    raise ValueError(f"reference policy: {reason}")
                # E[sum_{k>=t} g^(k-t) Delta_k | t, prev]: the token-level value of the reward Delta
                delta = self.sol.logp - shared_log_probs(self.ref_policy, mdp.horizon)
                penalty, _ = backward_values(pi, delta, float(gamma), mdp.eos_token)
                penalty = penalty.reshape(-1)
            self._critic_cache[key] = (D.reshape(-1), F.reshape(-1), penalty)
        return self._critic_cache[key]

    def exact_critic(self, batch, gamma: float, options: dict | None = None) -> torch.Tensor:
        """The exact critic ``E[g^(T-t) RM | s_t]`` (minus the KL penalty's value with
        ``kl=k1_reward``) at every state of the batch, ``[B, H]`` (0 from each response's end)."""
        options = options or {}
        D, F, penalty = self._markov_tables(gamma, options)
        mdp = self.mdp
        states = batch_states(mdp, batch.prompt, batch.tokens)
        live = batch.mask
        r = path_token_rewards(mdp, batch.prompt, batch.tokens, live)
        H = r.shape[1]
        disc = mdp.gamma ** torch.arange(H, dtype=torch.float64)
        earned = torch.zeros_like(r)
        if H > 1:
            earned[:, 1:] = torch.cumsum(r * disc, 1)[:, :-1]  # c(s_t) = sum_{k<t} gamma^k r_k
        value = earned * D[states] + disc * F[states]
        if penalty is not None:
            value -= float(options.get("kl_beta", 0.0)) * penalty[states]
        return torch.where(live, value, torch.zeros((), dtype=torch.float64))

    def _state_noise(self, gamma: float, options: dict) -> torch.Tensor:
        sigma = float(options.get("sigma", 0.1))
        seed = int(options.get("critic_seed", self.seed))
        key = ("noisy", float(gamma), sigma, seed)
        if key not in self._critic_cache:
            gen = torch.Generator().manual_seed(seed)
            R = self.mdp.vocab_size + self.mdp.num_prompts
            self._critic_cache[key] = torch.randn(self.mdp.horizon * R, generator=gen, dtype=torch.float64) * sigma
        return self._critic_cache[key]

    def critic_values(self, batch, kind: str, gamma: float, options: dict) -> torch.Tensor:
        """``V_hat(s_t)`` for ``t = 1 .. H + 1``, ``[B, H + 1]`` (0 from the complete response on);
        see the module docstring for what each kind is here."""
        self._called("critic_values")
        if kind not in CRITIC_KINDS:
            raise ValueError(f"critic kind must be one of {', '.join(CRITIC_KINDS)}; got {kind!r}")
        options = dict(options or {})
        B, H = batch.mask.shape
        out = torch.zeros(B, H + 1, dtype=torch.float64)
        live = batch.mask
        if kind == "zero":
            return out
        if kind == "tabular":
            table = self._tabular_critic(gamma, options)
            states = batch_states(self.mdp, batch.prompt, batch.tokens)
            out[:, :H] = torch.where(live, table[states], torch.zeros((), dtype=torch.float64))
            return out
        value = self.exact_critic(batch, gamma, options)
        if kind == "noisy":
            noise = str(options.get("noise", "fixed"))
            if noise not in ("fixed", "fresh"):
                raise ValueError(f"critic noise must be 'fixed' or 'fresh', got {noise!r}")
            if noise == "fixed":
                eps = self._state_noise(gamma, options)[batch_states(self.mdp, batch.prompt, batch.tokens)]
                value = torch.where(live, value + eps, value)
            elif not self.exact:
                sigma = float(options.get("sigma", 0.1))
                # [B, H + 1], as the tree context draws them: the same generator gives the same critic
                eps = sigma * torch.randn(B, H + 1, generator=self.generator, dtype=torch.float64)[:, :H]
                value = torch.where(live, value + eps, value)
        out[:, :H] = value
        return out


class MarkovExactContext(_ExactMode, _MarkovContext):
    """Expectations instead of samples (``exact = True``), for shared policies on compact rewards at
    any horizon; see the module docstring.

    Args:
        mdp, policy: the problem (checked by :func:`tpg.exact.markov.check_markov`).
        seed: default seed of the fixed critics (``noise=fixed``, ``tabular``).
        ref_policy: the reference policy of KL options (a shared policy of the same shape).
        sol: the :class:`~tpg.exact.markov.MarkovSolution` of ``(mdp, policy)`` when already computed.
    """

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, num_continuations: int) -> torch.Tensor:
        """``E[RM(W) | prefix] = V'(prefix)`` exactly, ``[B]``; counts ``K E[remaining tokens]``."""
        self._check_continuations(num_continuations)
        t_b, prev_b, done_b = prefix_states(self.mdp, prompt_b, prefix_bt, prefix_len_b)
        rem = self.remaining_length()[t_b.clamp(max=self.mdp.horizon - 1), prev_b]
        self.tokens_sampled += float(num_continuations) * float(torch.where(done_b, 0.0, rem).sum())
        return prefix_response_values(self.mdp, self.sol, prompt_b, prefix_bt, prefix_len_b)


class MarkovMonteCarloContext(_MonteCarloMode, _MarkovContext):
    """Samples (``exact = False``), for shared policies on compact rewards at any horizon; see the
    module docstring.

    Args:
        mdp, policy: the problem.
        generator: drives continuations, fresh critic noise and the estimator's own draws.
        seed: default seed of the fixed critics (``noise=fixed``, ``tabular``).
        ref_policy, sol: as for :class:`MarkovExactContext`.
    """


__all__ = ["MarkovExactContext", "MarkovMonteCarloContext", "batch_states", "ref_row_log_probs", "token_rows"]
