"""Experiments: studies as grids of cached cells, the runner that executes them, the claims report.

    from tpg.experiments import run_study, load_results
    df = run_study("bias", quick=True)          # computes what is not cached in .tpg-cache/bias/
    df = load_results("bias")                   # the cells of the latest run, from the cache

``tpg study NAME|all``, ``tpg figures`` and ``tpg report`` are the command-line faces
(:mod:`.cli`).
"""

from .runner import BACKENDS, ClusterError, cache_key, cluster_session, latest_run_info, load_results, run_study
from .studies import STUDIES, available_studies, load_study

__all__ = ["run_study", "load_results", "cache_key", "latest_run_info", "BACKENDS", "cluster_session", "ClusterError",
           "STUDIES", "load_study", "available_studies"]
