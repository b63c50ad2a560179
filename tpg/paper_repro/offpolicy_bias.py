"""Figure offpolicy_bias: exact relative bias of every policy loss against the size of the mismatch (study
``offpolicy``, part ``sweep``).

One column per kind of mismatch (engine temperature, top-p, logit noise, staleness), one row per problem kind
(tabular MDPs; the tiny transformer on the copy task): ``|E_mu g - grad J(pi)| / |grad J(pi)|`` of each loss,
median over the problems and estimators (REINFORCE, RLOO with G = 2) of the row, band = min..max. At size 0
(T = 1) mu = pi and every loss is unbiased.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import _offpolicy as op  # noqa: E402
from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "offpolicy_bias"


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(op.STUDY, cache_dir), op.STUDY)
    sw = style.require(df[df["part"] == "sweep"], op.STUDY)
    return op.sweep_figure(sw, "rel_bias", "relative bias |E_μ g − ∇J(π)| / |∇J(π)|",
                           "Off-policy bias of each loss against the mismatch (exact; median over problems and "
                           "estimators, band min..max)", NAME, out_dir, log=False)


if __name__ == "__main__":
    style.cli(main)
