"""The problem a run trains on: an MDP (dense rewards or its zero-reward twin) and the initial policy.

``--mdp SPEC`` and ``--case FILE`` give a tabular MDP with its seeded tabular (or shared) policy,
exactly as ``tpg exact`` builds them; ``--task SPEC`` gives a task of :mod:`tpg.mdp.tasks` with a
:class:`~tpg.policies.transformer.TinyTransformerPolicy` whose shape and initialisation come from
the spec's policy keys (``policy_seed`` default ``seed + 1000``, ``n_layer``, ``d_model``,
``n_head``, ``init_scale``). ``reward=terminal`` swaps in the zero-reward twin: the same ``RM`` for
every response, all of it on the last token, hence the same ``J``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cases import load_problem

_POLICY_KEYS = ("policy_seed", "n_layer", "d_model", "n_head", "init_scale")


@dataclass
class Problem:
    """``mdp`` (with the chosen reward mode), the initial ``policy``, its kind (``tabular`` for
    table-backed policies, ``transformer``) and the spec string it came from."""

    mdp: object
    policy: object
    kind: str
    spec: str


def load_task(spec: str, reward: str = "dense"):
    """``(mdp, policy)`` of a task spec ``TASK[:key=value,...]``; ``reward`` must agree with the spec's
    own ``reward`` key when both are given."""
    from ..mdp.tasks import make_task, parse_task_spec
    from ..policies.transformer import TinyTransformerPolicy

    kw = parse_task_spec(spec)
    if "reward" in kw and kw["reward"] != reward:
        raise ValueError(f"TrainConfig.reward: the task spec says reward={kw['reward']} but --reward is {reward}; "
                         f"give it once")
    kw["reward"] = reward
    pol_kw = {k: kw.pop(k) for k in _POLICY_KEYS if k in kw}
    mdp = make_task(**kw)
    seed = pol_kw.pop("policy_seed", int(kw.get("seed", 0)) + 1000)
    scale = pol_kw.pop("init_scale", 1.0)
    policy = TinyTransformerPolicy.from_mdp(mdp, seed=seed, init_scale=scale, **pol_kw)
    return mdp, policy


def load_train_problem(task: str | None = None, mdp: str | None = None, case: str | None = None,
                       reward: str = "dense") -> Problem:
    """The :class:`Problem` of exactly one of ``task``, ``mdp`` and ``case``."""
    if sum(x is not None for x in (task, mdp, case)) != 1:
        raise ValueError("TrainConfig.task: give exactly one of task, mdp and case")
    if reward not in ("dense", "terminal"):
        raise ValueError(f"TrainConfig.reward: must be dense or terminal, got {reward!r}")
    if task is not None:
        m, pol = load_task(task, reward)
        return Problem(m, pol, "transformer", f"task:{task}")
    if mdp is not None and "twin=" in mdp.replace(" ", "") and reward == "dense":
        from ..mdp.families import parse_mdp_spec
        if parse_mdp_spec(mdp).get("twin"):
            raise ValueError("TrainConfig.reward: the MDP spec has twin=true; use --reward terminal instead")
    m, pol = load_problem(case=case, mdp_spec=mdp)
    if reward == "terminal":
        m = m.zero_reward_twin()
    return Problem(m, pol, "tabular", f"mdp:{mdp}" if mdp is not None else f"case:{case}")


__all__ = ["Problem", "load_train_problem", "load_task"]
