"""Token-tree MDPs, reward families and the stored response tree."""

from .families import FAMILIES, compact_rewards, make_mdp, parse_mdp_spec, spec_help, tree_rewards
from .mdp import TokenMDP
from .rewards import CompactRewards, Rewards, TreeRewards, TwinRewards
from .tasks import (TASKS, RewardModelRewards, TargetRewards, TaskMDP, make_task, parse_task_spec, task_from_spec,
                    task_help)
from .tree import DEFAULT_MAX_NODES, TokenTree, count_nodes

__all__ = ["CompactRewards", "DEFAULT_MAX_NODES", "FAMILIES", "RewardModelRewards", "Rewards", "TASKS", "TargetRewards",
           "TaskMDP", "TokenMDP", "TokenTree", "TreeRewards", "TwinRewards", "compact_rewards", "count_nodes",
           "make_mdp", "make_task", "parse_mdp_spec", "parse_task_spec", "spec_help", "task_from_spec", "task_help",
           "tree_rewards"]
