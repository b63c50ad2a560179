"""The offpolicy study: its grid, its cells (quick ones run and have the documented columns), the stationary
length problem, and every claim rule on synthetic tables, each shown able to come out refuted or qualified."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tpg.experiments.report import OFFPOLICY_CLAIMS, collect_rows
from tpg.experiments.runner import cache_key
from tpg.experiments.studies import STUDIES, offpolicy as op


# -- the grid ------------------------------------------------------------------------------------------
def test_registered_with_the_contract():
    assert "offpolicy" in STUDIES
    for name in ("NAME", "TITLE", "COLUMNS", "FIGURES", "Cell", "cells", "run_cell", "claim_rows"):
        assert hasattr(op, name)
    from tpg.experiments.cli import default_scripts_dir
    for fig in op.FIGURES:
        assert (default_scripts_dir() / f"{fig}.py").is_file()


@pytest.mark.parametrize("quick", [True, False])
def test_grid_covers_every_part_kind_and_problem_kind(quick):
    cells = op.cells(quick)
    assert len({cache_key(c) for c in cells}) == len(cells)
    parts = {c.part for c in cells}
    assert parts == set(op.PARTS)
    sweeps = [c for c in cells if c.part == "sweep"]
    for kind in op.KINDS:
        probs = {c.problem.split(":")[0] for c in sweeps if c.kind == kind}
        assert probs == {"mdp", "task"}, kind  # tabular and transformer
    for c in sweeps:
        assert c.sizes[0] == op.identity_size(c.kind) and list(c.sizes) == sorted(c.sizes)
    curves = [c for c in cells if c.part == "curve"]
    assert {c.behaviour for c in curves} >= {"pi", *op.CURVE_BEHAVIOURS[:1]}
    assert len({c.seed for c in curves}) >= 3
    lengths = [c for c in cells if c.part == "length"]
    assert len({c.problem for c in lengths}) >= 5


# -- cells -------------------------------------------------------------------------------------------
def test_a_sweep_cell_has_the_documented_columns_and_exact_numbers():
    cell = op.Cell("sweep", op.TAB_PROBLEMS[0], "rloo", 2, "top_p", (0.0, 0.2), ("pg", "is_seq", "gspo"))
    df = op.run_cell(cell)
    assert list(df.columns) == list(op.COLUMNS)
    assert len(df) == 6 and set(df["verdict"]) <= {"unbiased", "scaled", "biased"}
    on = df[df["on_policy"]]
    assert (on["rel_bias"] < 1e-12).all() and (on["kl_token"] == 0).all()
    off = df[~df["on_policy"]]
    assert (off["rel_bias"] > 1e-3).all() and (off["pi_mass_outside_seq"] > 0).all()
    # nsr is n tr Cov / |grad J|^2
    r = df.iloc[0]
    assert math.isclose(r["nsr"], 2 * r["variance_trace"] / r["grad_norm"] ** 2, rel_tol=1e-12)
    assert list(df["behaviour"].unique()) == ["top_p:1", "top_p:0.8"]


def test_a_length_cell_and_a_transformer_cell_run():
    cell = op.Cell("length", "stationary:vocab=3,horizon=2,seed=0", "reinforce", 1, "temperature", (1.0, 2.0),
                   ("pg", "is_seq"), series="s")
    df = op.run_cell(cell)
    assert list(df.columns) == list(op.COLUMNS) and (df["series"] == "s").all() and (df["horizon"] == 2).all()
    assert float(df[df["loss"] == "is_seq"]["rel_bias"].max()) < 1e-12
    t = op.run_cell(op.Cell("sweep", op.TRANSFORMER_PROBLEM, "reinforce", 1, "temperature", (1.0, 2.0), ("pg",)))
    assert (t["problem_kind"] == "transformer").all() and float(t["rel_bias"].iloc[1]) > 1e-3


def test_a_curve_cell_runs():
    df = op.run_cell(op.Cell("curve", op.CURVE_PROBLEMS[0], "rloo", 4, behaviour="stale:1", loss="tis:2", iters=2,
                             losses=()))
    assert list(df.columns) == list(op.COLUMNS) and list(df["iter"]) == [0, 1, 2]
    assert (df["behaviour"] == "stale:1").all() and (df["loss"] == "tis:2").all()
    assert df["j_norm"].between(0, 1).all()


def test_stationary_problem_has_iid_ratios():
    """E_mu[rho^2] = E_mu[r^2]^H under a temperature (one ratio per token, the same at every state)."""
    from tpg.offpolicy import resolve_behaviour

    mdp1, pol1 = op.stationary_problem(3, 1, 4)
    mdp4, pol4 = op.stationary_problem(3, 4, 4)
    m1 = resolve_behaviour("temperature:2", mdp1, pol1).mismatch["seq_ratio_second_moment"]
    m4 = resolve_behaviour("temperature:2", mdp4, pol4).mismatch["seq_ratio_second_moment"]
    assert math.isclose(m4, m1 ** 4, rel_tol=1e-12)
    pi = torch.softmax(pol1.logits.detach()[0], 0)
    mu = torch.softmax(pol1.logits.detach()[0] / 2, 0)
    assert math.isclose(float((pi ** 2 / mu).sum()), m1, rel_tol=1e-12)


def test_bad_cells_are_refused():
    with pytest.raises(ValueError, match="part"):
        op.run_cell(op.Cell("nope", op.TAB_PROBLEMS[0]))
    with pytest.raises(ValueError, match="problem"):
        op.load_problem("dense:vocab=3")


# -- a tiny grid through the runner, and the figures ---------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = [op.Cell("sweep", "mdp:dense:vocab=2,horizon=2,prompts=1,seed=0", "reinforce", 1, k,
                (op.identity_size(k), 2.0 if k == "temperature" else 0.3), ("pg", "is_seq", "tis:2", "gspo"))
        for k in op.KINDS]
TINY += [op.Cell("length", f"stationary:vocab=2,horizon={H},seed=0", "reinforce", 1, "temperature", (1.0, 2.0),
                 ("pg", "is_seq", "is_token"), series="s") for H in (1, 2, 3)]
TINY += [op.Cell("curve", "mdp:dense:vocab=2,horizon=2,prompts=1", "rloo", 2, behaviour=b, loss=l, seed=s, iters=2,
                 prompts=2, losses=()) for b, l in (("pi", "pg"), ("stale:1", "pg"), ("stale:1", "is_seq"))
         for s in (0, 1)]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    import types

    from tpg.experiments import run_study

    d = tmp_path_factory.mktemp("cache")
    study = types.SimpleNamespace(NAME=op.NAME, cells=lambda quick: list(TINY), run_cell=op.run_cell)
    return d, run_study(study, backend="sequential", cache_dir=d, progress=False)


def _figure(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fig_{name}", ROOT / "tpg" / "paper_repro" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_grid_through_the_runner_has_every_part_and_rule(tiny_cache):
    _, df = tiny_cache
    assert set(df["part"]) == set(op.PARTS) and df["cell_key"].nunique() == len(TINY)
    assert set(op.COLUMNS) <= set(df.columns)
    ids = {r["id"] for r in op.claim_rows(df)}
    assert ids == {i for i, _, _ in OFFPOLICY_CLAIMS}


@pytest.mark.parametrize("figure", op.FIGURES)
def test_every_figure_script_writes_a_non_empty_image(tiny_cache, tmp_path, figure):
    d, _ = tiny_cache
    paths = _figure(figure).main(cache_dir=str(d), out_dir=str(tmp_path))
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for p in paths:
        assert p.name.startswith(figure) and p.stat().st_size > 1000


def test_a_figure_without_results_says_so(tmp_path):
    from tpg.paper_repro.style import MissingResults

    with pytest.raises(MissingResults, match="tpg study offpolicy"):
        _figure("offpolicy_bias").main(cache_dir=str(tmp_path), out_dir=str(tmp_path))


# -- synthetic tables for the rules ----------------------------------------------------------------------
def sweep(kind, losses: dict, sizes=None, problem="p", estimator="rloo", part="sweep", series="", horizon=3,
          second=None):
    """Rows of one sweep: ``losses`` maps a loss spec to (rel_bias per size, nsr per size)."""
    sizes = sizes or ([1.0, 1.5, 2.0, 3.0] if kind == "temperature" else [0.0, 0.1, 0.2, 0.5])
    rows = []
    for i, s in enumerate(sizes):
        for loss, (biases, nsrs) in losses.items():
            rows.append({"part": part, "problem": problem, "estimator": estimator, "group_size": 2, "kind": kind,
                         "size": s, "on_policy": i == 0, "loss": loss, "loss_name": op._loss_name(loss),
                         "rel_bias": biases[i], "nsr": nsrs[i], "verdict": "biased" if biases[i] > 1e-8 else
                         "unbiased", "grad_norm": 1.0, "kl_token": 0.05 * i, "series": series, "horizon": horizon,
                         "seq_ratio_second_moment": (second or [1.0] * len(sizes))[i]})
    return pd.DataFrame(rows)


Z4 = [1e-16] * 4


def good_sweeps():
    out = []
    for kind in ("temperature", "logit_noise", "stale"):
        out.append(sweep(kind, {"is_seq": (Z4, [10, 20, 40, 80]), "tis:2": ([0, 0.1, 0.2, 0.4], [10, 11, 12, 13]),
                                "gspo": ([0, 0.5, 0.6, 0.7], [10, 5, 5, 5]), "pg": ([0, 0.2, 0.4, 0.8], [10] * 4)}))
    out.append(sweep("top_p", {"pg": ([0, 0.05, 0.1, 0.3], [10] * 4), "is_seq": ([0, 0.05, 0.1, 0.3], [10] * 4),
                               "gspo": ([0, 0.5, 0.6, 0.7], [10] * 4)}))
    return out


def length_series(v, series="s", second=None):
    """A length series with is_seq's inflation v(H) for H = 1..len(v) (on-policy pg nsr 1)."""
    out = []
    for H, vh in enumerate(v, start=1):
        out.append(sweep("temperature", {"pg": ([0, 0.1], [1.0, 1.0]), "is_seq": ([0, 0], [1.0, vh]),
                                         "is_token": ([0, 0.1], [1.0, 1.0])}, sizes=[1.0, 2.0], problem=f"H{H}",
                         estimator="reinforce", part="length", series=series, horizon=H,
                         second=[1.0, (second or 1.2) ** H]))
    return out


def curve_rows(finals: dict, problem="mdp:x", behaviour="stale:4", seeds=4, iters=8, noise=0.01):
    """Curves whose last iterations sit at ``finals[loss] + noise * seed-wise jitter``."""
    rng = np.random.default_rng(0)
    rows = []
    jitter = {s: rng.normal() for s in range(seeds)}
    for loss, final in finals.items():
        beh = "pi" if loss == "ref" else behaviour
        for s in range(seeds):
            for it in range(iters + 1):
                j = final * it / iters + noise * jitter[s] * (it == iters) + noise * rng.normal() * 0.1
                rows.append({"part": "curve", "problem": problem, "behaviour": beh,
                             "loss": "pg" if loss == "ref" else loss, "seed": s, "iter": it, "j_norm": j})
    return pd.DataFrame(rows)


def rows_of(frames):
    df = pd.concat(frames, ignore_index=True)
    return {r["id"]: r for r in op.claim_rows(df)}


# -- the rules: each can be confirmed, and each can fail -------------------------------------------------
def test_every_rule_confirmed_on_a_table_that_agrees():
    got = rows_of(good_sweeps() + length_series([1, 1.5, 2.2, 3.3, 5]) + [curve_rows({"pg": 0.5, "is_seq": 0.7})])
    assert set(got) == {i for i, _, _ in OFFPOLICY_CLAIMS}
    for id_, r in got.items():
        assert r["status"] == "confirmed", (id_, r["detail"])
    assert math.isclose(got["offpolicy_tis"]["number"], 80 / 13)
    assert got["offpolicy_is_seq"]["number"] > 1


def test_is_seq_rule_refuted_by_a_bias_or_a_flat_variance():
    biased = good_sweeps()
    biased[0].loc[(biased[0]["loss"] == "is_seq") & (biased[0]["size"] == 2.0), "rel_bias"] = 1e-4
    assert rows_of(biased + length_series([1, 1.5, 2.2, 3.3]))["offpolicy_is_seq"]["status"] == "refuted"
    flat = rows_of(good_sweeps() + length_series([3, 2, 1.5, 1.2, 1.0]))["offpolicy_is_seq"]
    assert flat["status"] == "refuted"
    mixed = rows_of(good_sweeps() + length_series([1, 2, 3, 4], "a") + length_series([4, 3, 2, 1], "b"))
    assert mixed["offpolicy_is_seq"]["status"] == "qualified"
    none = rows_of(good_sweeps())["offpolicy_is_seq"]
    assert none["status"] == "qualified" and "no length series" in none["detail"]


def test_tis_rule_refuted_when_it_is_no_cheaper_or_not_biased():
    def with_tis(biases, nsrs):
        out = good_sweeps()
        for d in out[:3]:
            sel = d["loss"] == "tis:2"
            d.loc[sel, "rel_bias"] = biases
            d.loc[sel, "nsr"] = nsrs
        return rows_of(out)["offpolicy_tis"]

    assert with_tis([0, 0.1, 0.2, 0.4], [10, 50, 90, 200])["status"] == "refuted"  # more variance than is_seq
    assert with_tis([0, 0.3, 0.2, 0.1], [10, 11, 12, 13])["status"] == "refuted"  # bias shrinks with the mismatch
    assert with_tis([0, 1e-12, 1e-12, 1e-12], [10, 11, 12, 13])["status"] == "refuted"  # unbiased
    part = good_sweeps()
    sel = part[0]["loss"] == "tis:2"
    part[0].loc[sel, "nsr"] = [10, 50, 90, 200]
    assert rows_of(part)["offpolicy_tis"]["status"] == "qualified"


def test_gspo_rule_refuted_or_qualified():
    out = good_sweeps()
    out[0].loc[(out[0]["loss"] == "gspo") & out[0]["on_policy"], "rel_bias"] = 1e-3  # biased at mu = pi
    assert rows_of(out)["offpolicy_gspo"]["status"] == "refuted"
    out = good_sweeps()
    for d in out:
        d.loc[(d["loss"] == "gspo"), "rel_bias"] = 1e-12  # unbiased everywhere
    assert rows_of(out)["offpolicy_gspo"]["status"] == "refuted"
    out = good_sweeps()
    out[1].loc[(out[1]["loss"] == "gspo") & (out[1]["size"] == 0.1), "rel_bias"] = 1e-9
    assert rows_of(out)["offpolicy_gspo"]["status"] == "qualified"


def test_top_p_rule_refuted_or_qualified():
    out = good_sweeps()
    tp = out[3]
    tp.loc[(tp["loss"] == "pg") & tp["on_policy"], "rel_bias"] = 1e-3  # biased at p = 1
    assert rows_of(out)["offpolicy_top_p"]["status"] == "refuted"
    out = good_sweeps()
    out[3].loc[out[3]["loss"] == "pg", "rel_bias"] = 0.0  # unbiased at every p
    assert rows_of(out)["offpolicy_top_p"]["status"] == "refuted"
    out = good_sweeps()
    out[3].loc[out[3]["loss"] == "pg", "rel_bias"] = [0, 0.3, 0.1, 0.05]  # not vanishing as p -> 1
    assert rows_of(out)["offpolicy_top_p"]["status"] == "qualified"


def test_curves_rule_refuted_when_the_corrections_end_within_their_spread():
    same = rows_of([curve_rows({"pg": 0.6, "is_seq": 0.6, "ref": 0.7}, noise=0.05)])["offpolicy_curves"]
    assert same["status"] == "refuted"
    apart = rows_of([curve_rows({"pg": 0.4, "is_seq": 0.7})])["offpolicy_curves"]
    assert apart["status"] == "confirmed" and apart["number"] > 0.2 and apart["uncertainty"] is not None
    two = rows_of([curve_rows({"pg": 0.4, "is_seq": 0.7}), curve_rows({"pg": 0.6, "is_seq": 0.6}, behaviour="top_p:0.8",
                                                                      noise=0.05)])
    assert two["offpolicy_curves"]["status"] == "qualified"


def test_final_j_is_the_mean_of_the_last_quarter():
    df = curve_rows({"pg": 0.8}, seeds=1, iters=8, noise=0.0)
    fin = op.final_j(df)
    want = df[df["iter"] > 6]["j_norm"].mean()
    assert math.isclose(float(fin["final"].iloc[0]), want)


def test_report_section_lists_every_offpolicy_row(tmp_path):
    rows, info, _ = collect_rows(tmp_path, proofs=False, studies=["offpolicy"])
    sec = [r for r in rows if r["section"] == "offpolicy"]
    assert [r["id"] for r in sec] == [i for i, _, _ in OFFPOLICY_CLAIMS]
    assert all(r["status"] == "not run" and "tpg study offpolicy" in r["rule"] for r in sec)
