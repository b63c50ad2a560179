"""Token-tree MDPs, reward families and the stored response tree.

The names below are imported on first use (:mod:`tpg._lazy`).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "FAMILIES": ".families", "compact_rewards": ".families", "make_mdp": ".families",
    "parse_mdp_spec": ".families", "spec_help": ".families", "tree_rewards": ".families",
    "TokenMDP": ".mdp",
    "TargetReward": ".objectives", "target_reward": ".objectives", "with_target_reward": ".objectives",
    "CompactRewards": ".rewards", "Rewards": ".rewards", "TreeRewards": ".rewards", "TwinRewards": ".rewards",
    "TASKS": ".tasks", "RewardModelRewards": ".tasks", "TargetRewards": ".tasks", "TaskMDP": ".tasks",
    "make_task": ".tasks", "parse_task_spec": ".tasks", "task_from_spec": ".tasks", "task_help": ".tasks",
    "DEFAULT_MAX_NODES": ".tree", "TokenTree": ".tree", "count_nodes": ".tree",
}

__all__ = ["CompactRewards", "DEFAULT_MAX_NODES", "FAMILIES", "RewardModelRewards", "Rewards", "TASKS", "TargetRewards",
           "TaskMDP", "TokenMDP", "TokenTree", "TreeRewards", "TwinRewards", "compact_rewards", "count_nodes",
           "make_mdp", "make_task", "parse_mdp_spec", "parse_task_spec", "spec_help", "task_from_spec", "task_help",
           "tree_rewards", "TargetReward", "target_reward", "with_target_reward"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
