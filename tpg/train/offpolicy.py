"""Off-policy training: each iteration's responses sampled from a behaviour policy ``mu``, the gradient
formed by a policy loss of the catalog.

``TrainConfig.behaviour`` is a behaviour spec of :mod:`tpg.offpolicy.behaviour` (``tpg offpolicy-help``),
applied at every iteration to the *current* policy ``pi_theta``: ``temperature:T``, ``top_p:p``,
``logit_noise:sigma,seed``, ``precision:bf16``, ``mix:...``, ``file:PATH`` (a fixed recorded policy),
chains with ``+``. One stage changes meaning in training:

* ``stale:k`` is the real staleness of asynchronous RL: the responses of iteration ``i`` are sampled
  with the parameters the policy had at the start of iteration ``max(i - k, 0)``, i.e. ``k``
  iterations (``k * epochs * minibatches`` optimiser steps) behind; the first ``k`` iterations sample
  with the initial policy, as an asynchronous trainer's first rollouts do. The trainer keeps a queue of
  the last ``k + 1`` parameter snapshots, and the queue goes into the checkpoint, so a resumed run
  samples from the same stale policies. (The verifier's ``stale:k,lr=eta`` — ``k`` exact ascent steps
  before ``pi`` — has no training counterpart: ``lr=`` is refused here.) Stages after it act on the
  stale policy's logits (``stale:2+top_p:0.9``: an engine two iterations behind, sampling with top-p).
  ``stale`` may only start the chain (not sit inside ``mix``).

``pi`` (or ``stale:0``) samples with the policy itself, exactly as a run without ``--behaviour``.

On a batch sampled from ``mu`` the trainer has, per token, ``log mu`` (what the engine reported while
sampling: the catalog's ``rollout_log_probs``) and recomputes ``log pi_old`` with its own parameters
before the iteration's updates (verl's ``old_log_prob``). The estimator sees the batch as the verifier's
off-policy mode gives it (:mod:`tpg.offpolicy.exact`): tokens and rewards as sampled, ``logp = log pi_old``,
its hooks (TRePO's continuations, ReMax's greedy response, the exact-critic oracle) answered by ``mu``
(the engine samples them); PPO's learned critic is the trainer's own, fitted on ``mu``'s batches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..offpolicy.behaviour import Chain, Identity, Mix, Stage, Stale, behaviour_logits, parse_chain


@dataclass(frozen=True)
class TrainBehaviour:
    """A behaviour spec read for training.

    Attributes:
        spec: the canonical spec.
        stale: iterations behind (0: the current policy is the source).
        rest: the stages applied to the source policy's logits (``None``: none).
        on_policy: ``mu = pi`` exactly (``pi``, ``stale:0``): sample with the policy itself.
    """

    spec: str
    stale: int
    rest: Stage | None
    on_policy: bool


def _stages(stage: Stage) -> list[Stage]:
    return list(stage.stages) if isinstance(stage, Chain) else [stage]


def _contains_stale(stage: Stage) -> bool:
    if isinstance(stage, Stale):
        return True
    if isinstance(stage, Chain):
        return any(_contains_stale(s) for s in stage.stages)
    if isinstance(stage, Mix):
        return _contains_stale(stage.first) or _contains_stale(stage.second)
    return False


def parse_train_behaviour(spec: str | None) -> TrainBehaviour | None:
    """The :class:`TrainBehaviour` of a ``TrainConfig.behaviour`` spec (``None`` for ``None``);
    ``ValueError`` naming the field for a spec the trainer cannot sample from."""
    if spec is None:
        return None
    where = "TrainConfig.behaviour"
    try:
        stage = parse_chain(spec)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    stages = _stages(stage)
    stale = 0
    if isinstance(stages[0], Stale):
        if re.search(r"(^|[,:])\s*lr\s*=", spec.split("+")[0]):
            raise ValueError(f"{where}: in training stale:k is the policy of k iterations earlier (a snapshot "
                             f"queue); lr= is the verifier's exact-ascent step and does not apply: give stale:k")
        stale = int(stages[0].values["k"])
        stages = stages[1:]
    if any(_contains_stale(s) for s in stages):
        raise ValueError(f"{where}: stale:k may only start the chain in training (the policy k iterations "
                         f"earlier, then the other stages), not follow a stage or sit inside mix; got {spec!r}")
    rest = None if not stages else (stages[0] if len(stages) == 1 else Chain(stages))
    on_policy = all(isinstance(s, Identity) for s in stages) and stale == 0
    head = f"stale:{stale}" if isinstance(_stages(stage)[0], Stale) else None
    canon = "+".join([head] * (head is not None) + [s.spec for s in stages]) or "pi"
    return TrainBehaviour(spec=canon, stale=stale, rest=rest, on_policy=on_policy)


def behaviour_table(tb: TrainBehaviour, mdp, source) -> torch.Tensor:
    """The behaviour's logits ``[N_nt, V]`` (``-inf`` outside its support), float64: ``tb.rest`` applied
    to the logits of ``source`` (the current policy, or its stale snapshot)."""
    if tb.rest is None:
        with torch.no_grad():
            return source.node_logits(mdp.tree).detach().to(torch.float64)
    z, _, _ = behaviour_logits(tb.rest, mdp, source)
    return z


__all__ = ["TrainBehaviour", "parse_train_behaviour", "behaviour_table"]
