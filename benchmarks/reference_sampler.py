"""A straightforward per-trajectory sampler in pure Python: the sampler benchmark's reference.

One response at a time, one token at a time: the policy's probabilities are a table indexed by
(position ``t``, previous token ``prev``), where ``prev = V + prompt`` before the first token
(the layout of :class:`tpg.policies.SharedSoftmax` and :class:`tpg.mdp.rewards.CompactRewards`).
Each token is drawn by inverse CDF, ``w = min{w : u * C[t][prev][V-1] < C[t][prev][w]}`` with
``C`` the cumulative sums of the row and ``u`` from :class:`random.Random`; the response ends at
``eos_token`` or after ``horizon`` tokens. No torch, no numpy: plain lists and ``bisect``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random


def shared_tables(mdp, policy) -> dict:
    """Plain-list tables of a shared-parameter policy and a compact-reward MDP.

    Returns ``cum[t][prev]`` (cumulative probabilities), ``logp[t][prev]``, ``reward[t][prev]`` (each a
    list of ``V`` floats), the prompts' cumulative weights and the MDP's shape.
    """
    import torch  # only to read the tables out of tpg's objects

    logp = torch.log_softmax(policy.logits.detach().to(torch.float64), dim=-1)
    return dict(
        cum=torch.cumsum(logp.exp(), dim=-1).tolist(),
        logp=logp.tolist(),
        reward=mdp.rewards.table.tolist(),
        prompt_cum=list(itertools.accumulate(mdp.prompt_weights.tolist())),
        vocab_size=mdp.vocab_size, horizon=mdp.horizon, eos_token=mdp.eos_token, gamma=mdp.gamma,
    )


def sample_reference(tables: dict, num_responses: int, seed: int = 0) -> list[tuple]:
    """``num_responses`` responses, each ``(prompt, tokens, logps, rewards, rm)`` (lists and floats)."""
    rng = random.Random(seed)
    cum, logp, reward = tables["cum"], tables["logp"], tables["reward"]
    prompt_cum = tables["prompt_cum"]
    V, H, eos, gamma = tables["vocab_size"], tables["horizon"], tables["eos_token"], tables["gamma"]
    out = []
    for _ in range(num_responses):
        prompt = min(bisect.bisect_right(prompt_cum, rng.random() * prompt_cum[-1]), len(prompt_cum) - 1)
        prev = V + prompt
        tokens, logps, rewards = [], [], []
        rm = 0.0
        for t in range(H):
            row = cum[t][prev]
            w = min(bisect.bisect_right(row, rng.random() * row[-1]), V - 1)
            tokens.append(w)
            logps.append(logp[t][prev][w])
            r = reward[t][prev][w]
            rewards.append(r)
            rm += gamma ** t * r
            if w == eos:
                break
            prev = w
        out.append((prompt, tokens, logps, rewards, rm))
    return out


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Sample mean and its standard error."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)
