"""Study long_horizon: the module contract, a tiny grid through the runner (documented columns, cache
hits, the figure), a cell against `tpg verify`, its variance terms against the verifier's, the EOS
calibration, and every status of its claim rules on synthetic tables."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from tpg.experiments.runner import cache_key, run_study
from tpg.experiments.studies import CLAIM_KEYS, CLAIM_STATUSES, STUDIES, load_study
from tpg.experiments.studies import long_horizon as lh

ROOT = Path(__file__).resolve().parents[1]

TINY = [lh.Cell(family=f, eos_rate=r, horizon=H, method=m, spec=lh.method_spec(m, H)[0],
                group_size=lh.method_spec(m, H)[1], samples=200)
        for f, r, hs in (("dense", 2.0, (16, 32)), ("terminal", 0.0, (16,))) for H in hs for m, _ in lh.METHODS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    study = types.SimpleNamespace(NAME=lh.NAME, cells=lambda quick=False: list(TINY), run_cell=lh.run_cell)
    return d, run_study(study, backend="sequential", cache_dir=d, progress=False)


def test_module_contract():
    assert lh.NAME == "long_horizon" and lh.NAME in STUDIES and load_study(lh.NAME) is lh
    assert lh.TITLE and lh.COLUMNS and all(isinstance(v, str) and v for v in lh.COLUMNS.values())
    assert all((ROOT / "tpg" / "paper_repro" / f"{f}.py").is_file() for f in lh.FIGURES)
    quick, full = lh.cells(True), lh.cells(False)
    assert 0 < len(quick) < len(full) and len({cache_key(c) for c in full}) == len(full)
    assert {c.horizon for c in full} == {64, 128, 256, 512, 1024} and {c.eos_rate for c in full} == {0.0, 2.0}
    assert "Measured run time" in lh.__doc__
    with pytest.raises(ValueError, match="method must be one of"):
        lh.method_spec("ppo", 64)


def test_tiny_grid_has_the_documented_columns_and_hits_the_cache(tiny):
    d, df = tiny
    assert len(df) == len(TINY) and set(lh.COLUMNS) <= set(df.columns)
    assert set(df["verdict"]) <= {"consistent", "consistent-scaled", "biased"}
    assert (df["variance_trace"] > 0).all() and (df["variance_trace_se"] > 0).all()
    assert ((df["nsr"] - df["variance_per_response"] / df["grad_norm_sq"]).abs() <= 1e-12 * df["nsr"]).all()
    g = df[df["method"] == "rloo"]
    assert (g["responses_per_batch"] == 4).all() and (g["tokens_per_batch"] > 4).all()
    t = df[df["method"] == "trepo"]
    assert (t["hook_tokens_per_batch"] > 0).all()
    assert (df[df["method"] == "ppo_learned"]["critic_fit_tokens"] > 0).all()
    no_eos = df[df["eos_rate"] == 0.0]
    assert (no_eos["expected_length"] == no_eos["horizon"]).all()

    def must_not_run(cell):
        raise AssertionError(f"cell {cell} was recomputed")

    again = run_study(types.SimpleNamespace(NAME=lh.NAME, cells=lambda quick=False: list(TINY), run_cell=must_not_run),
                      backend="sequential", cache_dir=d, progress=False)
    pd.testing.assert_frame_equal(again, df)
    for r in lh.claim_rows(df):
        assert set(CLAIM_KEYS) <= set(r) and r["status"] in CLAIM_STATUSES
        assert r["figure"] == "figures/variance_length.png"


def test_figure_writes_images(tiny, tmp_path):
    d, _ = tiny
    spec = importlib.util.spec_from_file_location("fig_variance_length", ROOT / "tpg" / "paper_repro" / "variance_length.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    paths = mod.main(cache_dir=str(d), out_dir=str(tmp_path))
    assert {p.suffix for p in paths} == {".png", ".pdf"} and all(p.stat().st_size > 1000 for p in paths)
    from tpg.paper_repro.style import MissingResults

    with pytest.raises(MissingResults, match="tpg study long_horizon"):
        mod.main(cache_dir=str(tmp_path / "empty"), out_dir=str(tmp_path))


def test_a_cell_is_tpg_verify_for_that_estimator():
    """The cell's verdict, p-values, scale and trace are those of verify(..., mode="mc") on the same
    problem, seed and N; its variance terms average to the verifier's tr Cov."""
    from tpg.verify import verify

    cell = lh.Cell("dense", 2.0, 48, "rloo", "rloo", 4, samples=300, seed=3)
    row = lh.run_cell(cell).iloc[0]
    mdp, pol = lh.long_problem("dense", 48, eos_rate=2.0, seed=3)
    rec = verify(mdp, pol, "rloo", group_size=4, mode="mc", samples=300, seed=3, engine="markov")[0]
    assert row["verdict"] == rec["verdict"]
    for a, b in (("p_value", "p_value"), ("p_value_direction", "p_value_direction"), ("scale", "scale"),
                 ("mde_rel_bias", "mde_rel_bias"), ("tokens_per_batch", "tokens_per_batch")):
        assert row[a] == pytest.approx(rec[b], rel=1e-12, abs=1e-15), a
    assert row["variance_trace"] == pytest.approx(rec["variance_trace"], rel=1e-9)


def test_eos_probability_and_expected_length():
    from tpg.exact import solve_markov

    mdp, pol = lh.long_problem("terminal", 64, eos_rate=2.0)
    pi = torch.softmax(pol.logits.detach(), -1)
    assert float((pi[..., 0] - 2.0 / 64).abs().max()) < 1e-12
    p = 2.0 / 64  # a response ends at EOS (probability p per token) or at H: E[T] = (1 - (1 - p)^H) / p
    assert solve_markov(mdp, pol).expected_length == pytest.approx((1 - (1 - p) ** 64) / p, rel=1e-10)
    with pytest.raises(ValueError, match="eos_rate"):
        lh.long_problem("dense", 8, eos_rate=9.0)
    with pytest.raises(ValueError, match="EOS probability"):
        lh.set_eos_probability(pol, 0, 1.0)


# ------------------------------------------------------------------------------ claim rules
def table(ratios: dict, trepo: dict | None = None, verdicts: dict | None = None) -> pd.DataFrame:
    """Synthetic results: per problem ``(family, eos_rate)`` and horizon, nsr(RLOO) / nsr(PPO exact) =
    ``ratios[problem][H]`` (log se 0.05), nsr_x_tokens(TRePO) / nsr_x_tokens(RLOO) = ``trepo[problem]``
    at every H, every verdict ``consistent`` except ``verdicts[(method, problem, H)]``."""
    rows = []
    for prob, by_h in ratios.items():
        for H, r in by_h.items():
            base = {"family": prob[0], "eos_rate": prob[1], "horizon": H}
            tr = (trepo or {}).get(prob, 1.0)
            for method, nsr, xt in (("rloo", 100.0 * r, 1000.0), ("ppo_exact", 100.0, 10.0),
                                    ("trepo", 50.0, 1000.0 * tr), ("reinforce", 150.0, 1500.0),
                                    ("grpo_std", 10.0, 100.0)):
                v = (verdicts or {}).get((method, prob, H), "biased" if method == "grpo_std" else "consistent")
                rows.append({**base, "method": method, "nsr": nsr, "nsr_se": 0.05 * nsr, "nsr_x_tokens": xt,
                             "nsr_x_tokens_se": 0.05 * xt, "verdict": v})
    return pd.DataFrame(rows)


A, B = ("dense", 2.0), ("terminal", 0.0)


@pytest.mark.parametrize("ratios,status", [
    ({A: {64: 10, 1024: 100}, B: {64: 5, 1024: 40}}, "confirmed"),
    ({A: {64: 10, 1024: 100}, B: {64: 5, 1024: 5.1}}, "qualified"),
    ({A: {64: 10, 1024: 100}, B: {64: 50, 1024: 5}}, "refuted"),
])
def test_critic_gain_rule(ratios, status):
    row = lh.critic_gain_row(table(ratios))
    assert row["status"] == status and row["id"] == "long_critic_gain"
    assert row["uncertainty"] > 0 and "H=1024" in row["detail"]


@pytest.mark.parametrize("trepo,status", [({A: 0.5, B: 0.4}, "confirmed"), ({A: 0.5, B: 4.0}, "qualified"),
                                          ({A: 1.02, B: 0.98}, "qualified"), ({A: 5.0, B: 7.0}, "refuted")])
def test_trepo_tokens_rule(trepo, status):
    row = lh.trepo_tokens_row(table({A: {64: 10, 1024: 10}, B: {64: 10, 1024: 10}}, trepo=trepo))
    assert row["status"] == status and row["number"] == pytest.approx(max(trepo.values()))


def test_verdicts_rule():
    grid = {A: {H: 1 for H in (64, 128, 256, 512, 1024)}, B: {H: 1 for H in (64, 128, 256, 512, 1024)}}
    assert lh.verdicts_row(table(grid))["status"] == "confirmed"
    one = {("rloo", A, 256): "consistent-scaled"}
    assert lh.verdicts_row(table(grid, verdicts=one))["status"] == "qualified"
    missed = {("grpo_std", B, 64): "consistent"}
    row = lh.verdicts_row(table(grid, verdicts=missed))
    assert row["status"] == "qualified" and "1 of 10" in row["detail"]
    n = 4 * 10  # unbiased cells in the grid; past the 99% binomial bound of alpha n
    bound = lh.binomial_upper(n, lh.ALPHA)
    many = {(m, A, H): "biased" for m in ("rloo", "trepo") for H in (64, 128, 256, 512, 1024)}
    assert len(many) > bound
    assert lh.verdicts_row(table(grid, verdicts=many))["status"] == "refuted"


def test_claim_rows_of_empty_results_are_empty():
    assert lh.claim_rows(pd.DataFrame()) == []
    assert lh.critic_gain_row(table({A: {64: 10}})) is None  # one length: no growth to measure
    assert math.isfinite(lh.binomial_upper(100, 0.01))
