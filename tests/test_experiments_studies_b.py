"""Studies variance, zero_groups, centering and learning: tiny grids through the runner (documented
columns, cache hits, resume after a kill), their figure scripts, consistency checks of the numbers,
and every branch of their claim rules on synthetic results."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import pandas as pd
import pytest

from tpg.experiments import load_results, run_study
from tpg.experiments.studies import CLAIM_KEYS, CLAIM_STATUSES, centering, learning, variance, zero_groups

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "variance": [variance.Cell("dense:vocab=2,horizon=3,prompts=1,seed=0", s, G, samples=300)
                 for s, G in (("reinforce", 1), ("reward_to_go", 1), ("remax", 1),
                              ("ppo_gae:critic=exact,lambda=0", 1), ("rloo", 2), ("grpo", 2),
                              ("trepo:K=1,anchors=random:1", 1))],
    "zero_groups": [zero_groups.Cell("first_token:vocab=3,horizon=2,prompts=2,seed=0", G, K=1, samples=300)
                    for G in (2, 3)],
    "centering": [centering.Cell("terminal:vocab=2,horizon=2,prompts=2,seed=1", 2),
                  centering.Cell("dense:vocab=2,horizon=2,prompts=2,seed=0", 3),
                  centering.Cell("terminal:vocab=2,horizon=2,prompts=2,seed=1", 4, mode="mc", samples=400)],
    "learning": [learning.Cell("mdp:dense:vocab=2,horizon=2,prompts=1", "update"),
                 learning.Cell("mdp:dense:vocab=2,horizon=2,prompts=1", "memory", prompts=2, group_size=2)]
                + [learning.Cell("mdp:dense:vocab=2,horizon=2,prompts=1", "curve", a, r, s, iters=3, prompts=2,
                                 group_size=2)
                   for a, r in (("reinforce", "dense"), ("reward_to_go", "dense"), ("reward_to_go", "terminal"),
                                ("grpo", "dense")) for s in (0, 1)]
                + [learning.Cell("task:copy:vocab=3,length=1,prompts=2", "curve", "trepo", "dense", 0, iters=2,
                                 prompts=2, group_size=2)],
}
MODULES = {"variance": variance, "zero_groups": zero_groups, "centering": centering, "learning": learning}


def tiny_study(name: str, run_cell=None):
    """The study module with its grid swapped for the tiny one (same NAME, so figures find it)."""
    mod = MODULES[name]
    return types.SimpleNamespace(NAME=mod.NAME, cells=lambda quick: list(TINY[name]),
                                 run_cell=run_cell or mod.run_cell)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Every tiny study run once into one cache (shared by the tests below)."""
    d = tmp_path_factory.mktemp("cache")
    frames = {n: run_study(tiny_study(n), backend="sequential", cache_dir=d, progress=False) for n in MODULES}
    return d, frames


# -- the contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODULES))
def test_study_module_has_the_contract(name):
    mod = MODULES[name]
    assert mod.NAME == name and isinstance(mod.TITLE, str) and mod.TITLE
    assert mod.COLUMNS and all(isinstance(v, str) and v for v in mod.COLUMNS.values())
    assert mod.FIGURES and all((ROOT / "tpg" / "paper_repro" / f"{f}.py").is_file() for f in mod.FIGURES)
    for quick in (True, False):
        grid = mod.cells(quick)
        assert grid and all(isinstance(c, mod.Cell) for c in grid)
    assert len(mod.cells(True)) <= len(mod.cells(False))
    assert "Measured run time" in mod.__doc__


@pytest.mark.parametrize("name", list(MODULES))
def test_tiny_results_have_the_documented_columns(cache, name):
    _, frames = cache
    df = frames[name]
    assert len(df) > 0
    assert set(MODULES[name].COLUMNS) <= set(df.columns)
    assert {"study", "cell_key"} <= set(df.columns)
    assert df["cell_key"].nunique() == len(TINY[name])


@pytest.mark.parametrize("name", list(MODULES))
def test_a_second_run_computes_nothing(cache, name):
    d, frames = cache

    def must_not_run(cell):
        raise AssertionError(f"cell {cell} was recomputed")

    again = run_study(tiny_study(name, must_not_run), backend="sequential", cache_dir=d, progress=False)
    pd.testing.assert_frame_equal(again, frames[name])


def test_a_killed_run_resumes_to_the_same_results(tmp_path):
    name = "centering"
    calls = {"n": 0}

    def dies_on_the_second_cell(cell):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return centering.run_cell(cell)

    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_study(name, dies_on_the_second_cell), backend="sequential", cache_dir=tmp_path / "a",
                  progress=False)
    assert len(list((tmp_path / "a" / name).glob("*.parquet"))) == 1
    resumed = run_study(tiny_study(name), backend="sequential", cache_dir=tmp_path / "a", progress=False)
    whole = run_study(tiny_study(name), backend="sequential", cache_dir=tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(resumed, whole)


def _figure(name: str):
    spec = importlib.util.spec_from_file_location(f"paper_repro_{name}", ROOT / "tpg" / "paper_repro" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("figure", sorted({f for m in MODULES.values() for f in m.FIGURES}))
def test_every_figure_script_writes_a_non_empty_image(cache, tmp_path, figure):
    d, _ = cache
    paths = _figure(figure).main(cache_dir=str(d), out_dir=str(tmp_path))
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for p in paths:
        assert p.name.startswith(figure) and p.stat().st_size > 1000


def test_a_figure_without_results_says_so(tmp_path):
    from tpg.paper_repro.style import MissingResults

    with pytest.raises(MissingResults):
        _figure("zero_groups").main(cache_dir=str(tmp_path), out_dir=str(tmp_path))


# -- the numbers ----------------------------------------------------------------------------------

def test_variance_rows_follow_the_mse_decomposition(cache):
    df = cache[1]["variance"]
    assert ((df["mse"] - (df["variance_trace"] / df["batches"] + df["bias_sq"])).abs() < 1e-12).all()
    assert (df["tokens"] == df["batches"] * df["tokens_per_batch"]).all()
    first = df[df["batches"] == 1].set_index("estimator")
    assert first.loc["trepo:K=1,anchors=random:1", "variance_source"] == "mc"  # continuation noise
    assert first.loc["trepo:K=1,anchors=random:1", "hook_tokens_per_batch"] > 0
    assert first.loc["remax", "hook_tokens_per_batch"] > 0  # the greedy response
    assert (first.loc[["reinforce", "rloo", "grpo"], "variance_source"] == "exact").all()
    for s in ("reinforce", "reward_to_go", "rloo", "ppo_gae:critic=exact,lambda=0", "trepo:K=1,anchors=random:1"):
        assert first.loc[s, "bias_sq"] < 1e-20  # unbiased, exactly
    assert first.loc["grpo", "bias_sq"] > 1e-4


def test_sampled_trace_matches_the_exact_one_within_its_standard_error():
    prob = variance.load_problem("dense:vocab=2,horizon=3,prompts=2,seed=3")
    from tpg.estimators import get_estimator
    from tpg.verify import exact_moments

    est = get_estimator("rloo")
    exact = exact_moments(prob.mdp, prob.policy, est, 2, with_cov=False).variance_trace
    ro, batch_b = variance.sample_groups(prob, 4000, 2, seed=5)
    g, _ = variance.batch_gradients(prob, est, ro, batch_b, 4000, variance.mc_context(prob, 6))
    trace, se = variance.trace_with_se(g)
    assert abs(trace - exact) < 4 * se


def test_grpo_zero_probability_is_the_all_equal_probability(cache):
    df = cache[1]["zero_groups"]
    ex = df[(df["source"] == "exact") & (df["method"] == "grpo")]
    assert len(ex) == 2
    assert ((ex["frac_zero_grad"] - ex["p_all_equal"]).abs() < 1e-12).all()
    mc = df[(df["source"] == "mc") & (df["method"] == "grpo")]
    assert ((mc["frac_zero_grad"] - mc["p_all_equal"]).abs() < 4 * mc["frac_zero_grad_se"] + 1e-9).all()
    ppo = df[df["method"] == "ppo_gae"]
    assert (ppo["frac_zero_grad"] == 0).all()  # the exact critic's per-step advantage never vanishes here


def test_centering_equal_scale_rloo_is_mean_only_grpo(cache):
    df = cache[1]["centering"]
    for _, c in df[df["source"] == "exact"].groupby("cell_key"):
        r = c.set_index("method")
        assert r.loc["rloo", "var_ratio"] == pytest.approx(r.loc["dr_grpo", "var_ratio"], rel=1e-9)
        assert r.loc["dr_grpo", "scale"] == pytest.approx(1 - 1 / c["group_size"].iloc[0], rel=1e-9)
        assert r.loc["reinforce", "var_ratio"] == 1.0


def test_the_oracle_on_the_terminal_twin_is_reinforce(cache):
    df = cache[1]["learning"]
    cur = df[df["kind"] == "curve"]
    twin = cur[(cur["method"] == "reward_to_go") & (cur["reward"] == "terminal")].sort_values(["seed", "iter"])
    rf = cur[(cur["method"] == "reinforce") & (cur["reward"] == "dense")].sort_values(["seed", "iter"])
    # the same advantages up to rounding (reward-to-go of the twin's one reward vs RM itself)
    assert twin["J"].to_numpy() == pytest.approx(rf["J"].to_numpy(), rel=1e-12, abs=1e-12)
    upd = df[df["kind"] == "update"]
    assert (upd["update_rel_diff"] < 1e-10).all()
    mem = df[df["kind"] == "memory"].set_index("method")
    assert mem.loc["trepo", "models"] == mem.loc["grpo", "models"]
    assert mem.loc["ppo", "critic_params"] > 0


# -- claim rules on synthetic results -------------------------------------------------------------

def _check(row: dict, cid: str, status: str) -> None:
    assert set(CLAIM_KEYS) <= set(row)
    assert row["id"] == cid and row["status"] == status and row["status"] in CLAIM_STATUSES
    assert isinstance(row["number"], float) and row["rule"]


def test_variance_feeds_figures_only():
    assert variance.claim_rows(pd.DataFrame()) == []


def _zg(cells):
    """Synthetic zero_groups rows: ``cells = [(p_all_equal, grpo_exact_zero, {method: (source, v, se[, up, up_se])})]``
    (``v``: P(non-zero | GRPO zero); ``up``: E[<g, grad J> | GRPO zero] / |grad J|^2, 0.5 +/- 0.01 unless given)."""
    rows = []
    for i, (p, gz, per) in enumerate(cells):
        base = {"cell_key": str(i), "p_all_equal": p}
        rows.append({**base, "method": "grpo", "source": "exact", "frac_zero_grad": gz,
                     "frac_nonzero_given_grpo_zero": 0.0, "frac_nonzero_given_grpo_zero_se": 0.0,
                     "uphill_given_grpo_zero": 0.0, "uphill_given_grpo_zero_se": 0.0, "uphill_share_grpo_zero": 0.0})
        for m, (src, v, se, *up) in per.items():
            u, use = up if up else ((0.5, 0.01) if v > 0 else (0.0, 0.0))
            rows.append({**base, "method": m, "source": src, "frac_zero_grad": 0.0,
                         "frac_nonzero_given_grpo_zero": v, "frac_nonzero_given_grpo_zero_se": se,
                         "uphill_given_grpo_zero": u, "uphill_given_grpo_zero_se": use if src == "mc" else 0.0,
                         "uphill_share_grpo_zero": u * p})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("cells, status", [
    ([(0.5, 0.5, {"ppo_gae": ("exact", 1.0, 0.0), "trepo": ("mc", 0.6, 0.02)})], "confirmed"),
    ([(0.5, 0.5, {"ppo_gae": ("exact", 1.0, 0.0), "trepo": ("mc", 0.6, 0.02)}),
      (0.3, 0.3, {"ppo_gae": ("exact", 0.8, 0.0), "trepo": ("mc", 0.01, 0.01)})], "qualified"),
    ([(0.5, 0.5, {"ppo_gae": ("exact", 0.0, 0.0), "trepo": ("mc", 0.0, 0.0)})], "refuted"),
    ([(0.5, 0.2, {"ppo_gae": ("exact", 1.0, 0.0), "trepo": ("mc", 0.6, 0.02)})], "refuted"),  # GRPO not zero
    # a signal that points downhill: a non-zero gradient is not a useful one
    ([(0.5, 0.5, {"ppo_gae": ("exact", 1.0, 0.0, -0.2, 0.0), "trepo": ("mc", 0.6, 0.02, -0.3, 0.01)})], "refuted"),
    ([(0.5, 0.5, {"ppo_gae": ("exact", 1.0, 0.0), "trepo": ("mc", 0.6, 0.02)}),
      (0.3, 0.3, {"ppo_gae": ("exact", 1.0, 0.0, -0.1, 0.0), "trepo": ("mc", 0.6, 0.02, 0.01, 0.02)})], "qualified"),
])
def test_claim5_rule(cells, status):
    rows = zero_groups.claim_rows(_zg(cells))
    _check(rows[0], "claim5", status)


def test_claim5_reports_the_smallest_ascent_of_the_signal():
    df = _zg([(0.5, 0.5, {"ppo_gae": ("exact", 1.0, 0.0, 0.7, 0.0), "trepo": ("mc", 0.4, 0.02, 0.3, 0.05)})])
    df = pd.concat([df, _zg([(0.5, 0.5, {"trepo": ("exact", 1.0, 0.0, 0.01, 0.0)})]).iloc[1:]], ignore_index=True)
    row = zero_groups.claim_rows(df)[0]  # TRePO's exact (K -> infinity) row is not the algorithm's: left out
    assert row["number"] == 0.3 and row["uncertainty"] == 0.05
    assert "grad J" in row["unit"] and "uphill" in row["rule"]
    assert "ppo_gae: P(non-zero | GRPO zero) >= 1" in row["detail"]
    # cached before the ascent was measured: no row (the report lists claim 5 as not run)
    assert zero_groups.claim_rows(df.drop(columns="uphill_given_grpo_zero")) == []


def test_the_per_step_signal_on_grpo_zero_groups_points_uphill(cache):
    """Exact rows: the share of |grad J|^2 from GRPO-zero groups is P(all equal) times the conditional
    ascent, and PPO's (exact critic) is positive; the sampled ascent agrees with it within 4 SE."""
    df = cache[1]["zero_groups"]
    ppo = df[df["method"] == "ppo_gae"].set_index(["group_size", "source"])
    for G in (2, 3):
        ex, mc = ppo.loc[(G, "exact")], ppo.loc[(G, "mc")]
        assert ex["uphill_given_grpo_zero"] > 0.01
        assert ex["uphill_share_grpo_zero"] == pytest.approx(ex["uphill_given_grpo_zero"] * ex["p_all_equal"],
                                                             rel=1e-12)
        assert abs(mc["uphill_given_grpo_zero"] - ex["uphill_given_grpo_zero"]) < 4 * mc["uphill_given_grpo_zero_se"]
        assert 0 < ex["frac_uphill_given_grpo_zero"] <= ex["frac_nonzero_given_grpo_zero"] + 1e-12


def _ctr(settings):
    """Synthetic centering rows: ``settings = [(rloo var_ratio, se, source, grpo cosine)]``."""
    rows = []
    for i, (ratio, se, src, cos) in enumerate(settings):
        base = {"cell_key": str(i), "source": src, "grad_j_norm": 1.0}
        rows += [{**base, "method": "reinforce", "var_ratio": 1.0, "var_ratio_se": 0.0, "cosine": 1.0,
                  "lr_multiplier": 1.0},
                 {**base, "method": "rloo", "var_ratio": ratio, "var_ratio_se": se, "cosine": 1.0,
                  "lr_multiplier": 1.0},
                 {**base, "method": "grpo", "var_ratio": ratio, "var_ratio_se": se, "cosine": cos,
                  "lr_multiplier": 0.8}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("settings, status", [
    ([(1.2, 0.0, "exact", 1.0), (1.0, 0.0, "exact", 1.0), (0.98, 0.01, "mc", 1.0)], "confirmed"),
    ([(0.5, 0.0, "exact", 1.0), (0.7, 0.0, "exact", 1.0), (1.3, 0.0, "exact", 1.0)], "refuted"),
    ([(0.5, 0.0, "exact", 1.0), (1.7, 0.0, "exact", 1.0)], "qualified"),
])
def test_claim3_rule(settings, status):
    _check(centering.claim3_row(_ctr(settings)), "claim3", status)


@pytest.mark.parametrize("cosines, status", [
    ((1.0, 1 - 1e-9), "confirmed"),
    ((0.97, 1.0, 0.95), "qualified"),
    ((0.5, 0.8, 1.0), "refuted"),
])
def test_claim4_rule(cosines, status):
    row = centering.claim4_row(_ctr([(1.0, 0.0, "exact", c) for c in cosines]))
    _check(row, "claim4", status)
    assert row["number"] == min(cosines)


def test_centering_claims_skip_settings_without_a_gradient():
    df = _ctr([(0.5, 0.0, "exact", -0.9), (1.2, 0.0, "exact", 1.0)])
    df.loc[df["cell_key"] == "0", "grad_j_norm"] = 1e-17
    _check(centering.claim3_row(df), "claim3", "confirmed")
    _check(centering.claim4_row(df), "claim4", "confirmed")


def _mem(trepo_models="policy", trepo_peak=110, ppo_params=200):
    rows = [("grpo", "policy", 100, 100), ("trepo", trepo_models, 100, trepo_peak),
            ("ppo", "policy+critic", ppo_params, 150)]
    return pd.DataFrame([{"kind": "memory", "problem": "p", "problem_kind": "transformer", "method": m, "models": mo,
                          "params": pa, "peak_bytes": pk} for m, mo, pa, pk in rows])


@pytest.mark.parametrize("kw, status", [
    ({}, "confirmed"), ({"trepo_peak": 150}, "qualified"), ({"trepo_models": "policy+critic"}, "refuted"),
    ({"ppo_params": 100}, "refuted"),
])
def test_claim6_rule(kw, status):
    _check(learning.claim6_row(_mem(**kw)), "claim6", status)


def test_claim6_number_names_its_problem():
    """The ratio differs by problem (7.9x tabular, 2.4x transformer in the full run): the row says which."""
    two = pd.concat([_mem(trepo_peak=240).assign(problem="t", problem_kind="transformer"),
                     _mem(trepo_peak=790).assign(problem="m", problem_kind="tabular")], ignore_index=True)
    row = learning.claim6_row(two)
    assert row["number"] == pytest.approx(7.9)
    assert "tabular problem" in row["unit"] and "largest of 2" in row["unit"]
    assert "transformer:" in row["detail"] and "peak TRePO/GRPO 2.40" in row["detail"]
    assert "transformer problem" in learning.claim6_row(_mem())["unit"]


def _curves(gaps, update_diff=1e-16):
    rows = [{"kind": "update", "problem": "p", "method": m, "reward": "dense", "update_rel_diff": update_diff,
             "variance_trace": v, "iter": math.nan} for m, v in (("reward_to_go", 1.0), ("reinforce", 2.0))]
    for seed, gap in enumerate(gaps):
        for it in range(3):
            for m, j in (("reinforce", 0.5), ("reward_to_go", 0.5 + gap)):
                rows.append({"kind": "curve", "problem": "p", "method": m, "reward": "dense", "seed": seed,
                             "iter": it, "j_norm": j if it else 0.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gaps, diff, status", [
    ((0.01, -0.01, 0.02, -0.015), 1e-16, "confirmed"),
    ((0.10, 0.11, 0.09, 0.10), 1e-16, "qualified"),
    ((0.0, 0.0), 1e-3, "refuted"),
])
def test_claim7_rule(gaps, diff, status):
    _check(learning.claim7_row(_curves(gaps, diff)), "claim7", status)


def test_claim_rows_of_empty_results_are_empty():
    for mod in MODULES.values():
        assert mod.claim_rows(pd.DataFrame()) == []


def test_bad_cells_are_refused():
    with pytest.raises(ValueError, match="kind"):
        learning.run_cell(learning.Cell("mdp:dense:vocab=2,horizon=2,prompts=1", "nope"))
    with pytest.raises(ValueError, match="algo"):
        learning.run_cell(learning.Cell("mdp:dense:vocab=2,horizon=2,prompts=1", "curve", "nope"))
    with pytest.raises(ValueError, match="problem"):
        learning.run_cell(learning.Cell("dense:vocab=2", "update"))
    with pytest.raises(ValueError, match="mode"):
        centering.run_cell(centering.Cell("dense:vocab=2,horizon=2,prompts=1", 2, mode="nope"))


def test_load_results_reads_the_latest_tiny_run(cache):
    d, frames = cache
    pd.testing.assert_frame_equal(load_results("zero_groups", d), frames["zero_groups"])
