"""An independent, per-trajectory reference for ``J`` and ``dJ / dlogits`` (slow by design).

This module shares no code with tpg's engine: no tree, no torch, no numpy, only ``math`` and
plain callables. It enumerates every complete response ``W = w_1 .. w_T`` of every prompt
``x`` recursively (a response ends at ``eos_token`` or after ``horizon`` tokens) and sums

    J = sum_x rho(x) sum_W P(W|x) RM(W),          RM(W) = sum_t gamma^(t-1) r(s_t, w_t),

    dJ / dlogit_s = sum_x rho(x) sum_W P(W|x) RM(W) sum_{t: s_t = s} (e_{w_t} - pi(.|s_t)),

the REINFORCE form of the policy gradient with the softmax score
``d log pi(w|s) / dlogit_s = e_w - pi(.|s)``. Summed over *all* responses with their exact
probabilities it is the exact gradient (an expectation, not an estimate), so it is an
independent check of the dynamic programme in :mod:`tpg.exact.engine`.

Its cost is ``O(P * V^H * H * V)`` Python operations: use it on tiny problems only (a few
thousand responses). It exists to be obviously right, not fast.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

RewardFn = Callable[[int, tuple, int], float]
LogitsFn = Callable[[int, tuple], list]

CASE_FORMAT = "tpg-case/1"


def enumerate_responses(vocab_size: int, horizon: int, eos_token: int | None) -> Iterator[tuple[int, ...]]:
    """Every complete response as a tuple of tokens, depth first in lexicographic order.

    A response is complete when it has ``horizon`` tokens or its last token is ``eos_token``.
    Without EOS there are ``V^H`` of them; with EOS, ``sum_{T<H} (V-1)^(T-1) + (V-1)^(H-1) V``.
    """

    def extend(prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        for token in range(vocab_size):
            response = prefix + (token,)
            if len(response) == horizon or token == eos_token:
                yield response
            else:
                yield from extend(response)

    yield from extend(())


def enumerate_nonterminal_prefixes(vocab_size: int, horizon: int,
                                   eos_token: int | None) -> Iterator[tuple[int, ...]]:
    """Every prefix at which the policy still acts: shorter than ``horizon``, not ending in EOS."""

    def extend(prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        yield prefix
        if len(prefix) + 1 == horizon:
            return
        for token in range(vocab_size):
            if token != eos_token:
                yield from extend(prefix + (token,))

    yield from extend(())


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    return [e / total for e in exps]


def reference_exact(vocab_size: int, horizon: int, eos_token: int | None, gamma: float,
                    prompt_weights: list[float], reward_fn: RewardFn,
                    logits_fn: LogitsFn) -> tuple[float, dict[tuple[int, tuple[int, ...]], list[float]]]:
    """``(J, grad)`` by summing over every response of every prompt (see the module docstring).

    Args:
        reward_fn: ``reward_fn(prompt, prefix, token)``, the true reward ``r(s, w)`` of emitting
            ``token`` after ``prefix`` (a tuple of tokens).
        logits_fn: ``logits_fn(prompt, prefix)``, the ``vocab_size`` logits of ``pi(.|s)``.

    Returns:
        ``J`` and ``grad``, a dict ``{(prompt, prefix): [dJ/dlogit_s[w] for w in range(V)]}``
        with one entry for every non-terminal prefix of every prompt.
    """
    prefixes = list(enumerate_nonterminal_prefixes(vocab_size, horizon, eos_token))
    responses = list(enumerate_responses(vocab_size, horizon, eos_token))
    pi: dict[tuple[int, tuple[int, ...]], list[float]] = {}
    grad: dict[tuple[int, tuple[int, ...]], list[float]] = {}
    for prompt in range(len(prompt_weights)):
        for prefix in prefixes:
            logits = [float(z) for z in logits_fn(prompt, prefix)]
            if len(logits) != vocab_size:
                raise ValueError(f"logits_fn({prompt}, {prefix}) returned {len(logits)} logits, "
                                 f"expected vocab_size = {vocab_size}")
            pi[(prompt, prefix)] = _softmax(logits)
            grad[(prompt, prefix)] = [0.0] * vocab_size
    J = 0.0
    for prompt, rho in enumerate(prompt_weights):
        for response in responses:
            prob = rho
            rm = 0.0
            for t, token in enumerate(response):
                prefix = response[:t]
                prob *= pi[(prompt, prefix)][token]
                rm += gamma ** t * float(reward_fn(prompt, prefix, token))
            weight = prob * rm
            J += weight
            for t, token in enumerate(response):
                key = (prompt, response[:t])
                row, probs = grad[key], pi[key]
                for w in range(vocab_size):
                    row[w] += weight * ((1.0 if w == token else 0.0) - probs[w])
    return J, grad


def reference_from_case(case: dict) -> tuple[float, dict[tuple[int, tuple[int, ...]], list[float]]]:
    """:func:`reference_exact` of a ``tpg-case/1`` dict (schema: :mod:`tpg.cases`).

    Missing rewards are 0 and missing logit rows are zeros. Only the checks this reader needs
    are made; :func:`tpg.cases.case_from_dict` is the validating reader.
    """
    if case.get("format") != CASE_FORMAT:
        raise ValueError(f"format must be {CASE_FORMAT!r}, got {case.get('format')!r}")
    vocab_size = case["vocab_size"]
    rewards = {}
    for entry in case.get("token_rewards", []):
        key = (entry["prompt"], tuple(entry["prefix"]), entry["token"])
        if key in rewards:
            raise ValueError(f"token_rewards repeats {key}")
        rewards[key] = float(entry["reward"])
    logit_rows = {}
    for entry in case.get("policy", {}).get("logits", []):
        key = (entry["prompt"], tuple(entry["prefix"]))
        if key in logit_rows:
            raise ValueError(f"policy.logits repeats {key}")
        logit_rows[key] = [float(z) for z in entry["logits"]]
    zeros = [0.0] * vocab_size
    return reference_exact(
        vocab_size, case["horizon"], case.get("eos_token"), float(case.get("gamma", 1.0)),
        [float(w) for w in case["prompt_weights"]],
        reward_fn=lambda prompt, prefix, token: rewards.get((prompt, prefix, token), 0.0),
        logits_fn=lambda prompt, prefix: logit_rows.get((prompt, prefix), zeros))
