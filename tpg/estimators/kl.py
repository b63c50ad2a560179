"""KL regularisation towards a reference policy, shared by every estimator (options ``kl`` and
``kl_beta``, the coefficient beta).

Per token, ``Delta_t = log pi(w_t|s_t) - log pi_ref(w_t|s_t)`` (``ResponseBatch.logp`` minus
``ResponseBatch.ref_logp``). The option ``kl`` takes one of:

* ``none`` — no regularisation (default).
* ``k1_reward`` — k1 in the reward (verl's ``use_kl_in_reward``, OpenRLHF's default): each
  token's reward loses ``beta * Delta_t`` before the advantage is formed. Estimators built on the
  response-level reward use ``RM' = RM - beta * sum_t Delta_t`` (GRPO, RLOO, OPO, REINFORCE,
  the baselines); token-level ones (reward-to-go, REINFORCE++, GAE, ReMax's returns, TRePO)
  subtract the per-token penalty, so token ``t`` carries ``- beta * sum_{k >= t} Delta_k``.
  On-policy both are unbiased for ``grad E[RM - beta * sum_t Delta_t] = grad J - beta grad KL_seq``.
* ``k1``, ``k2``, ``k3`` — a KL *loss* term ``beta * k(Delta_t)`` per token, aggregated with the
  same weights as the policy loss (verl's ``use_kl_loss`` with ``kl_loss_type``). Its gradient is
  pathwise, ``beta k'(Delta_t) grad log pi``, stored in ``EstimatorOutput.kl_coef``:

  ==========  ==============================  ==========================
  kind        ``k(Delta)``                    ``kl_coef = beta k'(Delta)``
  ==========  ==============================  ==========================
  ``k1``      ``Delta``                       ``beta``
  ``k2``      ``Delta^2 / 2``                 ``beta * Delta``
  ``k3``      ``e^(-Delta) + Delta - 1``      ``beta * (1 - e^(-Delta))``
  ==========  ==============================  ==========================

  ``k3`` is verl's ``low_var_kl`` (Schulman's estimator): verl writes it with
  ``kl = ref_logp - logp = -Delta`` as ``e^kl - kl - 1``, the same function. (verl also clamps
  ``kl`` to [-20, 20] and the value to [-10, 10]; tpg does not clamp: at the ratios tpg's
  problems reach the clamps are inactive, and a clamp would only zero the gradient.)
  ``low_var_kl`` is accepted as another name for ``k3``.

Expected on-policy gradients of the loss kinds (docs/THEORY.md section 5), with the states held fixed:
k1 has expectation 0 (``E[grad log pi] = 0``); k2 gives ``beta E[sum_t Delta_t grad log pi]``,
the gradient of the per-state *reverse* KL ``KL(pi || pi_ref)(s_t)`` summed along the sampled
states (the sequence KL's gradient also has the effect on later states, which k2 misses);
k3 gives ``beta E[sum_t (1 - pi_ref/pi) grad log pi]``, the gradient of the per-state *forward*
KL ``KL(pi_ref || pi)(s_t)``. The verifier compares each against the exact sequence KL gradient.
"""

from __future__ import annotations

import torch

from .options import KL_ALIASES, KL_KINDS, KL_LOSS_KINDS, canonical_kl_kind  # noqa: F401  (declared torch-free)


def log_ratio(logp_bt: torch.Tensor, ref_logp_bt: torch.Tensor | None, mask_bt: torch.Tensor) -> torch.Tensor:
    """``Delta = logp - ref_logp`` on the response's tokens, 0 on padding, ``[B, H]``."""
    if ref_logp_bt is None:
        raise ValueError("a KL option needs reference log-probabilities: the batch has ref_logp=None "
                         "(build it with ResponseBatch.from_rollouts(..., ref_logp=...))")
    if ref_logp_bt.shape != logp_bt.shape:
        raise ValueError(f"ref_logp has shape {list(ref_logp_bt.shape)}, logp has {list(logp_bt.shape)}")
    m = mask_bt.to(logp_bt.dtype)
    return torch.where(mask_bt, logp_bt - ref_logp_bt.to(logp_bt.dtype), torch.zeros((), dtype=logp_bt.dtype)) * m


def kl_value(delta_bt: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-token KL estimate ``k(Delta)`` of a loss kind (``k1``, ``k2``, ``k3``)."""
    kind = canonical_kl_kind(kind)
    if kind == "k1":
        return delta_bt
    if kind == "k2":
        return 0.5 * delta_bt ** 2
    if kind == "k3":
        return torch.exp(-delta_bt) + delta_bt - 1
    raise ValueError(f"kl_value needs a loss kind ({', '.join(KL_LOSS_KINDS)}); got {kind!r}")


def kl_loss_coef(delta_bt: torch.Tensor, mask_bt: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """``beta * d k(Delta) / d log pi`` per token (0 on padding), ``[B, H]``: the coefficient of
    ``grad log pi`` that the loss ``beta * k(Delta)`` contributes."""
    kind = canonical_kl_kind(kind)
    m = mask_bt.to(delta_bt.dtype)
    if kind == "k1":
        return beta * m
    if kind == "k2":
        return beta * delta_bt * m
    if kind == "k3":
        return beta * (1 - torch.exp(-delta_bt)) * m
    raise ValueError(f"kl_loss_coef needs a loss kind ({', '.join(KL_LOSS_KINDS)}); got {kind!r}")


def kl_reward_penalty(delta_bt: torch.Tensor, mask_bt: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-token reward penalty ``beta * Delta_t`` of ``kl=k1_reward`` (0 on padding), ``[B, H]``."""
    return beta * delta_bt * mask_bt.to(delta_bt.dtype)
