"""A tiny study for the distributed-runner tests (tests/test_experiments_distributed.py).

pytest puts tests/ on ``sys.path`` and the workers of a local dask cluster or ray instance inherit
the driver's path, so they import this module by name, as they import a real study. A cell
records which process ran it (a marker file ``<a>.<pid>`` in ``marker_dir``), can take
``seconds``, and can kill its own worker process (``kill_worker``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

NAME = "dist_toy"
#: False: ``seconds`` is not waited (a process's own clean run; results never depend on it)
SLEEP = True


@dataclass(frozen=True)
class Cell:
    a: int
    seconds: float = 0.0
    marker_dir: str = ""
    kill_worker: bool = False


def cells(quick: bool) -> list[Cell]:
    return [Cell(a=i) for i in range(3 if quick else 6)]


def run_cell(cell: Cell) -> pd.DataFrame:
    if cell.marker_dir:
        Path(cell.marker_dir, f"{cell.a}.{os.getpid()}").touch()
    if cell.kill_worker:
        os.kill(os.getpid(), signal.SIGKILL)
    if SLEEP:
        time.sleep(cell.seconds)
    rng = np.random.default_rng(cell.a)
    return pd.DataFrame({"x": rng.standard_normal(3), "i": [0, 1, 2]})


def markers(marker_dir: str | Path) -> list[tuple[int, int, float]]:
    """``(a, pid, start time)`` of every cell run recorded in ``marker_dir``."""
    out = []
    for p in Path(marker_dir).iterdir():
        a, pid = p.name.split(".")
        out.append((int(a), int(pid), p.stat().st_mtime))
    return out


def study(cells_list: list[Cell]):
    """This module's study with another grid (``cells(quick)`` returns ``cells_list``)."""
    import types

    return types.SimpleNamespace(NAME=NAME, cells=lambda quick=False: list(cells_list), run_cell=run_cell)
