"""Figure offpolicy_variance: variance of every policy loss against the size of the mismatch (study
``offpolicy``, part ``sweep``).

Layout as ``offpolicy_bias``. The y axis is the variance inflation ``nsr / nsr(pg, mu = pi)``: the
noise-to-signal ratio per response, ``n tr Cov_mu[g] / |grad J(pi)|^2``, over the on-policy estimator's on the
same problem (1: the on-policy variance), median over the row's problems and estimators, band = min..max.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tpg.paper_repro import _offpolicy as op  # noqa: E402
from tpg.paper_repro import style  # noqa: E402
from tpg.experiments.runner import load_results  # noqa: E402

NAME = "offpolicy_variance"


def main(cache_dir: str = ".tpg-cache", out_dir: str = "figures") -> list[Path]:
    df = style.require(load_results(op.STUDY, cache_dir), op.STUDY)
    sw = style.require(df[df["part"] == "sweep"], op.STUDY)
    return op.sweep_figure(op.inflation(sw), "inflation", "variance inflation nsr / nsr(on-policy)",
                           "Off-policy variance of each loss against the mismatch: noise-to-signal per response "
                           "n tr Cov[g] / |∇J(π)|², relative to on-policy (exact; median, band min..max)", NAME,
                           out_dir, log=True)


if __name__ == "__main__":
    style.cli(main)
