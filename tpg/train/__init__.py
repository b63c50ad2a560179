"""Training runs of every estimator of the catalog, with the exact objective as the learning curve.

    from tpg.train import TrainConfig, train
    log = train(TrainConfig(algo="trepo", mdp="dense:vocab=3,horizon=3,eos=0,prompts=2", iters=30))

Modules: :mod:`.config` (the dataclass and its CLI flags), :mod:`.problem` (the MDP or task and
the initial policy), :mod:`.methods` (``algo`` to an estimator), :mod:`.critic` (PPO's learned
critic), :mod:`.memory` (measured peak tensor memory), :mod:`.trainer` (the loop, the log,
checkpoints), :mod:`.report` (the memory table), :mod:`.plots` (``compare-runs``), :mod:`.logio`
(Parquet/CSV logs), :mod:`.cli` (``tpg train``, ``tpg compare-runs``).
"""

from .config import TRAIN_ALGOS, TrainConfig
from .logio import read_log, write_log
from .trainer import LOG_COLUMNS, UNREPRODUCIBLE_COLUMNS, Trainer, TrainingInterrupted, train

__all__ = ["TrainConfig", "TRAIN_ALGOS", "train", "Trainer", "TrainingInterrupted", "LOG_COLUMNS",
           "UNREPRODUCIBLE_COLUMNS", "read_log", "write_log"]
