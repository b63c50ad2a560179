"""The studies: one module per question of docs/THEORY.md, each a grid of cells for the runner.

Every study module has ``NAME``, ``TITLE``, ``COLUMNS`` (documented output columns), a frozen
dataclass ``Cell``, ``cells(quick) -> list[Cell]``, ``run_cell(cell) -> DataFrame``,
``claim_rows(df) -> list[dict]`` and ``FIGURES`` (the ``tpg.paper_repro`` scripts that plot it).
Modules are found by name and imported only when asked for (:func:`load_study`).
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType

STUDIES: list[str] = ["bias", "variance", "gamma", "critic", "trepo", "aggregation_kl",
                      "zero_groups", "centering", "learning", "offpolicy"]
STUDIES.append("long_horizon")  # variance against length at H = 64 .. 1024 (the Markov engine)


#: an exact-mode relative bias at most this is rounding: the estimator is unbiased (the verifier's float64 tolerance)
EXACT_TOL = 1e-8
#: an exact-mode relative bias above this is a real bias, not rounding
BIAS_TOL = 1e-6
CLAIM_STATUSES = ("confirmed", "refuted", "qualified")
CLAIM_KEYS = ("id", "claim", "status", "number", "uncertainty", "unit", "figure", "rule")


def claim_row(id: str, claim: str, status: str, number: float, uncertainty: float | None, unit: str,
              figure: str, rule: str, detail: str = "") -> dict:
    """One row of the claims report (the contract's keys, plus ``detail``: secondary numbers in
    words), with ``status`` checked."""
    if status not in CLAIM_STATUSES:
        raise ValueError(f"status must be one of {', '.join(CLAIM_STATUSES)}, got {status!r}")
    return {"id": id, "claim": claim, "status": status, "number": float(number),
            "uncertainty": None if uncertainty is None else float(uncertainty), "unit": unit,
            "figure": figure, "rule": rule, "detail": detail}


@contextlib.contextmanager
def single_thread():
    """Run a cell on one torch thread (the runner parallelises over cells), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def solved_cell(cell):
    """``(mdp, policy, sol)``: the cell's MDP and seeded policy (from ``cell.mdp_spec()``) and
    their exact solution (:func:`tpg.exact.solve`), the start of most studies' ``run_cell``."""
    from tpg.cases import mdp_from_spec
    from tpg.exact import solve

    mdp, policy = mdp_from_spec(cell.mdp_spec())
    return mdp, policy, solve(mdp, policy)


def load_study(name: str) -> ModuleType:
    """The module ``tpg.experiments.studies.<name>``; ``ValueError`` for a name not in :data:`STUDIES`."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; the studies are {', '.join(STUDIES)}")
    return importlib.import_module(f"{__name__}.{name}")


def available_studies() -> list[str]:
    """The names of :data:`STUDIES` whose module exists in this installation."""
    import importlib.util

    return [n for n in STUDIES if importlib.util.find_spec(f"{__name__}.{n}") is not None]


__all__ = ["STUDIES", "load_study", "available_studies", "claim_row", "single_thread", "solved_cell", "EXACT_TOL", "BIAS_TOL", "CLAIM_STATUSES",
           "CLAIM_KEYS"]
