"""Training runs of every estimator of the catalog, with the exact objective as the learning curve.

    from tpg.train import TrainConfig, train
    log = train(TrainConfig(estimator="trepo", mdp="dense:vocab=3,horizon=3,eos=0,prompts=2", iters=30))

Modules: :mod:`.config` (the dataclass and its CLI flags), :mod:`.problem` (the MDP or task and
the initial policy), :mod:`.methods` (``algo`` to an estimator), :mod:`.critic` (PPO's learned
critic), :mod:`.memory` (measured peak tensor memory), :mod:`.trainer` (the loop, the log,
checkpoints), :mod:`.report` (the memory table), :mod:`.plots` (``compare-runs``), :mod:`.logio`
(Parquet/CSV logs), :mod:`.cli` (``tpg train``, ``tpg compare-runs``).

The names below are imported on first use (:mod:`tpg._lazy`).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "TRAIN_ALGOS": ".config", "TrainConfig": ".config",
    "read_log": ".logio", "write_log": ".logio",
    "LOG_COLUMNS": ".trainer", "UNREPRODUCIBLE_COLUMNS": ".trainer", "Trainer": ".trainer",
    "TrainingInterrupted": ".trainer", "train": ".trainer",
}

__all__ = ["TrainConfig", "TRAIN_ALGOS", "train", "Trainer", "TrainingInterrupted", "LOG_COLUMNS",
           "UNREPRODUCIBLE_COLUMNS", "read_log", "write_log"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
