"""Plug-ins (loading, signature detection, errors, equality with built-ins), the probe, the
registry and the public API."""

import math
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tpg.estimators as E
from tpg.estimators import (PluginError, describe, expand_spec, format_probe, get_estimator, load_plugin, probe,
                            probe_report, stack_batches)
from tpg.estimators.plugin import identical_tolerance

from test_estimators import make_batch, random_batch

ROOT = Path(__file__).resolve().parents[1]
GRPO_VERL = str(ROOT / "examples/plugins/grpo_verl.py") + ":compute_advantage"
RLOO_SIMPLE = str(ROOT / "examples/plugins/rloo_simple.py") + ":advantage"


def write(tmp_path, body, name="plug.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# -- the example plug-ins ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_verl_grpo_plugin_equals_builtin(seed):
    b = random_batch(seed, n_batches=3)  # several batch ids and a singleton group each
    plug = load_plugin(GRPO_VERL)
    assert plug.form == "verl"
    got, want = plug(b), get_estimator("grpo")(b)
    assert torch.allclose(got.advantages, want.advantages)
    assert torch.allclose(got.weights, want.weights)
    assert got.info["raw_padding_max_abs"] == 0


def test_simple_rloo_plugin_equals_builtin():
    b = random_batch(3, n_batches=2)
    plug = get_estimator(RLOO_SIMPLE)
    assert plug.form == "simple"
    assert torch.allclose(plug(b).advantages, get_estimator("rloo")(b).advantages)


def test_plugin_options_go_through_agg_and_kl():
    b = random_batch(4)
    for opts in ("agg=token-mean", "agg=seq-mean-token-mean,kl=k3,kl_beta=0.2", "kl=k1_reward,kl_beta=0.5"):
        plug = get_estimator(f"{GRPO_VERL}:{opts}")
        built = get_estimator(f"grpo:{opts}")
        p, q = plug(b), built(b)
        assert torch.allclose(p.advantages, q.advantages), opts
        assert torch.allclose(p.score_coef(), q.score_coef()), opts
    assert plug.spec.endswith("compute_advantage:kl=k1_reward,kl_beta=0.5")


def test_plugin_float32():
    b = random_batch(5)
    seen = {}

    plug64 = load_plugin(GRPO_VERL)
    plug32 = load_plugin(GRPO_VERL, dtype=torch.float32)
    inner = plug32.fn

    def spy(token_level_rewards, response_mask, index):
        seen["dtype"] = token_level_rewards.dtype
        return inner(token_level_rewards, response_mask, index)

    plug32.fn = spy
    out32 = plug32(b)
    assert seen["dtype"] == torch.float32
    assert out32.advantages.dtype == torch.float64
    assert torch.allclose(out32.advantages, plug64(b).advantages, atol=1e-5)
    with pytest.raises(ValueError, match="dtype"):
        load_plugin(GRPO_VERL, dtype=torch.int64)


def test_plugin_per_batch_calls(tmp_path):
    path = write(tmp_path, """
        import torch
        CALLS = []
        def adv(rewards, group_ids):
            CALLS.append((rewards.numel(), int(group_ids.max())))
            return rewards - rewards.mean()     # a batch statistic
    """)
    plug = load_plugin(path + ":adv")
    parts = [random_batch(10 + k, n_batches=1) for k in range(3)]
    stacked = plug(stack_batches(parts))
    separate = torch.cat([plug(p).advantages for p in parts])
    assert torch.allclose(stacked.advantages, separate)
    module = __import__("sys").modules[plug.fn.__module__]
    assert all(gmax == 2 for _, gmax in module.CALLS)  # group ids renumbered 0.. within a batch


# -- signature detection -------------------------------------------------------------------------

def test_signature_detection(tmp_path):
    path = write(tmp_path, """
        import torch
        def verl_kw(token_level_rewards, response_mask, config=None, **kwargs):
            assert 'index' in kwargs
            s = token_level_rewards.sum(-1, keepdim=True)
            return s * response_mask, s * response_mask
        def verl_pos(r, m, idx):
            return r.sum(-1, keepdim=True) * m
        def simple(rewards, group_ids, scale=1.0):
            return rewards * scale
        def one(rewards):
            return rewards
        def four(a, b, c, d):
            return a
    """)
    b = random_batch(6)
    ref = get_estimator("reinforce")(b).advantages
    for fn, form in (("verl_kw", "verl"), ("verl_pos", "verl"), ("simple", "simple")):
        plug = load_plugin(f"{path}:{fn}")
        assert plug.form == form
        assert torch.allclose(plug(b).advantages, ref)
    for fn in ("one", "four"):
        with pytest.raises(ValueError, match=rf"plug\.py:{fn}.*required positional"):
            load_plugin(f"{path}:{fn}")


# -- errors --------------------------------------------------------------------------------------

def test_plugin_errors(tmp_path):
    path = write(tmp_path, """
        import torch
        def wrong_shape(rewards, group_ids):
            return rewards[:-1]
        def nan(rewards, group_ids):
            out = rewards.clone(); out[1] = float('nan'); return out
        def inf_verl(token_level_rewards, response_mask, index):
            out = token_level_rewards.clone(); out[0, 0] = float('inf'); return out, out
        def boom(rewards, group_ids):
            raise RuntimeError('kaboom')
        def not_tensor(rewards, group_ids):
            return [1.0]
        value = 3
    """)
    b = random_batch(7, n_batches=1)  # one batch id: one call with all rows
    B = b.batch_size
    cases = {
        "wrong_shape": rf"wrong_shape returned advantages of shape \[{B - 1}\], expected \[{B}\]",
        "nan": r"nan returned a non-finite value nan at index \[1\]",
        "inf_verl": r"inf_verl returned a non-finite value inf at index \[0, 0\]",
        "boom": r"boom raised RuntimeError: kaboom",
        "not_tensor": r"not_tensor returned list",
    }
    for fn, pattern in cases.items():
        plug = load_plugin(f"{path}:{fn}")
        with pytest.raises(ValueError, match=pattern):
            plug(b)
    with pytest.raises(ValueError, match=r"plug\.py:missing: function 'missing' not found.*defines boom"):
        load_plugin(f"{path}:missing")
    with pytest.raises(ValueError, match="'value' not callable"):
        load_plugin(f"{path}:value")
    with pytest.raises(ValueError, match=r"nowhere\.py:f: file not found"):
        load_plugin(str(tmp_path / "nowhere.py") + ":f")
    bad = write(tmp_path, "import not_a_module_xyz\n", name="bad.py")
    with pytest.raises(ValueError, match=r"bad\.py:f: importing .* raised ModuleNotFoundError"):
        load_plugin(bad + ":f")
    with pytest.raises(ValueError, match="FILE.py:FUNCTION"):
        load_plugin("no_colon.py")
    with pytest.raises(ValueError, match="unknown option 'std_norm'"):
        load_plugin(GRPO_VERL + ":std_norm=false")


def test_padding_recorded_and_zeroed(tmp_path):
    path = write(tmp_path, """
        def leaky(token_level_rewards, response_mask, index):
            s = token_level_rewards.sum(-1, keepdim=True)
            return s.expand_as(token_level_rewards).clone(), None
    """)
    b = make_batch([1.0, 2.0], [1, 3], [0, 0])
    out = load_plugin(path + ":leaky")(b)
    assert out.info["raw_padding_max_abs"] == 1.0
    assert bool((out.advantages[~b.mask] == 0).all())
    rows = {r["case"]: r for r in probe(path + ":leaky")}
    assert rows["padding"]["padding_zero"] is False and "padded" in rows["padding"]["flag"]


# -- the probe -----------------------------------------------------------------------------------

def test_probe_rows_and_flags():
    rows = probe(GRPO_VERL)
    names = [r["case"] for r in rows]
    assert names == ["identical", "singleton", "all_zero", "padding", "scale_1e+06", "scale_1e-06",
                     "float32_vs_float64"]
    by = {r["case"]: r for r in rows}
    # float64: the group means of 0.1 / 0.7 are off by an ulp; GRPO's 1/(std + 1e-6) makes that ~1e-10
    assert by["identical"]["flag"] == "" and 0 < by["identical"]["max_abs"] < 1e-9
    assert by["singleton"]["advantages"] == pytest.approx([1 / (1 + 1e-6), 0.5 / (1 + 1e-6)], rel=1e-6)
    assert by["padding"]["padding_zero"] is True
    assert by["scale_1e+06"]["value"] == pytest.approx(1.0, rel=1e-5)
    assert "epsilon" in by["scale_1e-06"]["flag"]  # std ~ eps at that scale
    # float32: an identical-reward group of 8 (0.7 / -0.884) gets |A| = 0.056 instead of ~0
    f32 = by["float32_vs_float64"]
    assert 0.05 < f32["value"] < 0.06 and "identical-reward group of 8" in f32["flag"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "ok", "flagged", "flagged"]
    text = format_probe(rows)
    assert "identical" in text and "float32_vs_float64" in text and "0.7 x3" in text
    assert text.splitlines()[-1] == "2 of 7 cases flagged: scale_1e-06, float32_vs_float64"
    assert all(line == line.rstrip() for line in text.splitlines())


def test_probe_flags_grpo_float32_on_identical_rewards():
    """The identical-reward case uses 0.1, 0.7, -0.884 (not exact in binary) in groups of 3 and 8:
    verl's GRPO in float32 gives the groups of 8 advantages of +-0.056 (the groups of 3 happen to
    get exact means from torch), and the probe flags it; RLOO's ulp-sized output is not flagged."""
    by = {r["case"]: r for r in probe(GRPO_VERL, dtype=torch.float32)}
    row = by["identical"]
    assert row["status"] == "flagged" and row["flag"].startswith("non-zero advantage for identical rewards")
    assert row["value"] == pytest.approx(0.056, abs=0.002)
    adv = row["advantages"]
    assert max(adv[9:17]) > 0.05 and min(adv[17:]) < -0.05  # the 0.7 group up, the -0.884 group down
    rloo = {r["case"]: r for r in probe(RLOO_SIMPLE, dtype=torch.float32)}
    assert rloo["identical"]["status"] == "ok" and 0 < rloo["identical"]["max_abs"] < 1e-6
    assert identical_tolerance(torch.float32, [0.7]) == pytest.approx(64 * 2 ** -23)
    assert identical_tolerance(torch.float64, [-2.0]) == pytest.approx(2e-9)


def test_probe_report_shape():
    rows = probe(GRPO_VERL)
    rep = probe_report(GRPO_VERL, rows, torch.float64)
    assert rep["schema"] == "tpg-probe/1" and rep["dtype"] == "float64" and rep["ok"] is False
    assert [f["case"] for f in rep["flagged"]] == ["scale_1e-06", "float32_vs_float64"]
    assert rep["cases"] is rows and all(set(f) == {"case", "status", "flag"} for f in rep["flagged"])
    assert probe_report("rloo", probe("rloo"))["ok"] is True


def test_probe_builtins():
    flagged = {r["case"] for r in probe("reinforce") if r["flag"]}
    assert flagged == {"identical"}  # no baseline: identical rewards still push
    assert not any(r["flag"] for r in probe(RLOO_SIMPLE))
    assert not any(r["flag"] for r in probe("rloo"))
    rows = probe("trepo:anchors=random:2,fill=interpolate")
    assert len(rows) == 7


def test_probe_reports_errors(tmp_path):
    path = write(tmp_path, """
        def picky(rewards, group_ids):
            if rewards.numel() < 3:
                raise ValueError('need three')
            return rewards
    """)
    rows = {r["case"]: r for r in probe(path + ":picky")}
    assert rows["singleton"]["flag"].startswith("error:") and "need three" in rows["singleton"]["flag"]
    assert rows["singleton"]["status"] == "error"
    assert rows["identical"]["flag"].startswith("non-zero advantage for identical rewards")
    assert rows["identical"]["status"] == "flagged"


# -- registry and API ----------------------------------------------------------------------------

def test_catalog_order_and_specs():
    assert E.CATALOG == ("reinforce", "reward_to_go", "reinforce_baseline", "rloo", "remax", "grpo", "dr_grpo",
                         "opo", "reinforce_pp", "reinforce_pp_baseline", "ppo_gae", "trepo")
    est = get_estimator("trepo:anchors=random:2,fill=interpolate,K=4")
    assert est.options["anchors"] == ("random", 2) and est.options["K"] == 4
    est = get_estimator("ppo_gae:lambda=0.9,critic=noisy,sigma=0.1")
    assert est.options["lambda"] == 0.9 and est.options["critic"] == "noisy" and est.options["sigma"] == 0.1
    assert get_estimator("grpo:std_norm=false").options["std_norm"] is False
    assert get_estimator(get_estimator("grpo:eps=0.01").spec).options["eps"] == 0.01


@pytest.mark.parametrize("spec,pattern", [
    ("nope", "unknown estimator 'nope'.*reinforce, reward_to_go"),
    ("grpo:foo=1", "unknown option 'foo'; allowed options: std_norm, eps, agg, kl, kl_beta"),
    ("grpo:std_norm=maybe", "'std_norm' must be true \\| false; got 'maybe'"),
    ("grpo:eps=-1", "'eps' must be a number in \\[0, inf\\]"),
    ("ppo_gae:critic=oracle", "'critic' must be exact \\| tabular \\| zero \\| noisy"),
    ("ppo_gae:lambda=1.5", "'lambda' must be a number in \\[0, 1\\]"),
    ("trepo:anchors=random:0", "'anchors': must be all \\| every:K"),
    ("trepo:K=0", "'K' must be an integer"),
    ("trepo:K=2.5", "'K' must be an integer"),
    ("grpo:kl=k4", "'kl': must be one of none \\| k1_reward \\| k1 \\| k2 \\| k3"),
    ("grpo:agg=mean", "'agg' must be seq-mean-token-sum"),
    ("grpo:std_norm", "is not key=value"),
    ("grpo:eps=1,eps=2", "given twice"),
    ("reinforce_baseline:baseline=best", "'baseline' must be exact \\| running"),
])
def test_bad_specs(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_estimator(spec)


def test_expand_spec():
    assert expand_spec("all") == list(E.CATALOG)
    assert expand_spec("all:agg=token-mean") == [f"{n}:agg=token-mean" for n in E.CATALOG]
    assert expand_spec("grpo:std_norm=false; rloo") == ["grpo:std_norm=false", "rloo"]
    with pytest.raises(ValueError, match="unknown estimator"):
        expand_spec("grpo;bogus")


@pytest.mark.parametrize("name", E.CATALOG)
def test_describe_states_formula_and_expectation(name):
    text = describe(name)
    assert "Advantage" in text and "Expected gradient" in text
    assert "Options:" in text and "agg =" in text
    assert describe(name + ":agg=token-mean") == text


def test_describe_plugin():
    assert "verl form" in describe(GRPO_VERL) and "GRPO outcome advantage" in describe(GRPO_VERL)


def test_public_api():
    for name in E.__all__:
        assert getattr(E, name) is not None, name
    assert len(set(E.__all__)) == len(E.__all__)


def test_examples_run_from_repo_root():
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert get_estimator("examples/plugins/grpo_verl.py:compute_advantage").form == "verl"
    finally:
        os.chdir(cwd)


# -- robustness: any BaseException, time limits --------------------------------------------------

def test_plugin_import_exit_and_base_exceptions(tmp_path):
    exits = write(tmp_path, "import sys\nsys.exit(0)\n", name="exits.py")
    with pytest.raises(PluginError, match=r"exits\.py:f: importing .* raised SystemExit: 0 \(sys.exit was called\)"):
        load_plugin(exits + ":f")
    custom = write(tmp_path, "class Stop(BaseException):\n    pass\nraise Stop('at import')\n", name="custom.py")
    with pytest.raises(PluginError, match=r"importing .* raised Stop: at import"):
        load_plugin(custom + ":f")
    assert not any(k.startswith("tpg_plugin_") and getattr(m, "__file__", "") == custom
                   for k, m in list(__import__("sys").modules.items()))


def test_plugin_call_exit_and_base_exceptions(tmp_path):
    path = write(tmp_path, """
        import sys
        class Stop(BaseException):
            pass
        def exits(rewards, group_ids):
            sys.exit()
        def exits3(rewards, group_ids):
            raise SystemExit(3)
        def custom(rewards, group_ids):
            raise Stop('deep')
        def interrupt(rewards, group_ids):
            raise KeyboardInterrupt
    """)
    b = random_batch(8, n_batches=1)
    for fn, pattern in (("exits", r"exits raised SystemExit \(sys.exit was called\)"),
                        ("exits3", r"exits3 raised SystemExit: 3"), ("custom", r"custom raised Stop: deep")):
        with pytest.raises(PluginError, match=pattern):
            load_plugin(f"{path}:{fn}")(b)
    with pytest.raises(KeyboardInterrupt):  # the user's Ctrl-C is not the plug-in's failure
        load_plugin(f"{path}:interrupt")(b)


def test_plugin_time_limit(tmp_path):
    import signal
    import time

    path = write(tmp_path, """
        import time
        def spins(rewards, group_ids):
            while True:
                pass
        def sleeps(rewards, group_ids):
            time.sleep(30)
        def swallows(rewards, group_ids):
            try:
                while True:
                    pass
            except BaseException:
                return rewards
        def quick(rewards, group_ids):
            return rewards
    """)
    hang = write(tmp_path, "import time\ntime.sleep(30)\n", name="hang.py")
    b = random_batch(9, n_batches=1)
    t0 = time.monotonic()
    for fn in ("spins", "sleeps"):
        with pytest.raises(PluginError, match=rf"{fn} ran past the time limit of 0.2 s"):
            load_plugin(f"{path}:{fn}", timeout=0.2)(b)
    with pytest.raises(PluginError, match=r"swallows ran past the time limit of 0.2 s \(it caught the interrupt"):
        load_plugin(f"{path}:swallows", timeout=0.2)(b)
    with pytest.raises(PluginError, match=r"hang\.py:f: importing .* ran past the time limit of 0.2 s"):
        load_plugin(hang + ":f", timeout=0.2)
    assert time.monotonic() - t0 < 5
    # a handler and timer armed outside are restored, with their remaining time
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 20.0)
        load_plugin(f"{path}:quick", timeout=5.0)(b)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 15 < remaining <= 20 and signal.getsignal(signal.SIGALRM) is not None and not fired
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(0.1)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        load_plugin(f"{path}:quick", timeout=0)


def test_plugin_time_limit_off_the_main_thread(tmp_path):
    import threading

    path = write(tmp_path, """
        import time
        def slow(rewards, group_ids):
            time.sleep(0.3)
            return rewards
    """)
    plug = load_plugin(f"{path}:slow", timeout=0.05)
    b = random_batch(9, n_batches=1)
    caught = []
    worker = threading.Thread(target=lambda: caught.append(pytest.raises(PluginError, plug, b)))
    worker.start()
    worker.join()
    assert "took" in str(caught[0].value) and "no signal off the main thread" in str(caught[0].value)


def test_verify_records_plugin_failures_and_goes_on(tmp_path):
    from tpg.verify import verify

    path = write(tmp_path, """
        import sys
        def exits(rewards, group_ids):
            sys.exit(1)
    """)
    mdp, pol = _problem()
    recs = verify(mdp, pol, [f"{path}:exits", "rloo"], group_size=2, on_error="record_all")
    assert [r["verdict"] for r in recs] == ["error", "unbiased"]
    assert "SystemExit: 1" in recs[0]["error"]
    with pytest.raises(ValueError, match="SystemExit"):
        verify(mdp, pol, [f"{path}:exits", "rloo"], group_size=2)
    # a bad spec is still bad input
    with pytest.raises(ValueError, match="not found"):
        verify(mdp, pol, [f"{path}:nope", "rloo"], group_size=2, on_error="record_all")


# -- verl's conventions: whitening, layouts, context ---------------------------------------------

def verl_masked_whiten(values, mask):
    """verl's masked_mean / masked_var / masked_whiten, transcribed from their formulas in float64."""
    n = float(mask.sum())
    mean = float((values * mask).sum()) / (n + 1e-8)
    var = float(((values - mean) ** 2 * mask).sum()) / (n + 1e-8)
    var = var * n / (n - 1)
    return (values - mean) / math.sqrt(var + 1e-8)


def test_whiten_by_batch_is_verls_masked_whiten():
    from tpg.estimators.functional import whiten_by_batch

    b = random_batch(11, n_batches=3, G=2, groups=1, singleton=False)  # few tokens: 1e-8 / N is visible
    x = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = whiten_by_batch(x, b.mask, b.batch)
    m = b.mask.to(torch.float64)
    for k in range(3):
        rows = b.batch == k
        want = verl_masked_whiten(x[rows], m[rows]) * m[rows]
        assert torch.allclose(got[rows], want, rtol=1e-14, atol=1e-15), k
        # the plain mean / Bessel variance (the old formula) is off by ~1e-9 here: the test can tell
        xs = x[rows][b.mask[rows]]
        plain = (xs - xs.mean()) / torch.sqrt(xs.var() + 1e-8)
        assert (plain - got[rows][b.mask[rows]]).abs().max() > 1e-10
    one = whiten_by_batch(torch.tensor([[2.0, 5.0]]), torch.tensor([[True, False]]), torch.tensor([0]))
    assert one.tolist() == [[0.0, 0.0]]  # N = 1: verl raises, tpg gives 0 (documented)


def _problem(spec="dense:vocab=2,horizon=2,eos=0,prompts=2,seed=3"):
    from tpg.cases import load_problem

    return load_problem(mdp_spec=spec)


def _moments(mdp, pol, spec, G, with_cov=False):
    from tpg.verify.exact_moments import exact_moments

    return exact_moments(mdp, pol, get_estimator(spec), G, with_cov=with_cov)


def test_layout_option():
    plug = get_estimator(GRPO_VERL + ":layout=batch:2×3")
    assert plug.declared_layout == "batch:2x3" and plug.spec.endswith(":layout=batch:2x3")
    assert get_estimator(GRPO_VERL + ":layout=batch:4X1").declared_layout == "batch:4x1"
    assert get_estimator(GRPO_VERL).declared_layout == "group" and get_estimator(GRPO_VERL).spec == GRPO_VERL
    for bad in ("batch:0x2", "batch:2", "batch", "grouped", "batch:2x-1"):
        with pytest.raises(ValueError, match=r"option 'layout': .*group \| independent \| batch:PxN|P >= 1"):
            get_estimator(f"{GRPO_VERL}:layout={bad}")
    from tpg.verify.exact_moments import batch_layout

    assert batch_layout(get_estimator(GRPO_VERL + ":layout=batch:2x3"), 5) == ("batch:2x3", 3)
    assert batch_layout(get_estimator(GRPO_VERL + ":layout=independent"), 4) == ("independent", 4)
    assert batch_layout(get_estimator(GRPO_VERL + ":layout=independent"), 1) == ("single", 1)
    assert batch_layout(get_estimator(GRPO_VERL), 3) == ("group", 3)


RPP_VERL = str(ROOT / "examples/plugins/reinforce_pp_verl.py") + ":compute_advantage"
REMAX_VERL = str(ROOT / "examples/plugins/remax_verl.py") + ":compute_advantage"
GAE_VERL = str(ROOT / "examples/plugins/gae_verl.py") + ":compute_advantage"
GAE_RAW = str(ROOT / "examples/plugins/gae_verl.py") + ":compute_advantage_raw"


def test_verl_reinforce_pp_independent_equals_builtin():
    """verl's REINFORCE++ ignores index and whitens the batch: under layout=independent it sees
    what the built-in sees and gets its numbers on a multi-prompt case; its default group layout
    and verl's batch:PxN give other (its own) numbers."""
    mdp, pol = _problem()
    want = _moments(mdp, pol, "reinforce_pp", 3)
    got = _moments(mdp, pol, RPP_VERL + ":layout=independent", 3)
    assert got.num_batches == want.num_batches == 6 ** 3
    assert torch.allclose(got.mean, want.mean, rtol=1e-12, atol=1e-14)
    assert got.variance_trace == pytest.approx(want.variance_trace, rel=1e-12)
    for layout in ("group", "batch:2x2"):
        other = _moments(mdp, pol, f"{RPP_VERL}:layout={layout}", 3)
        assert float((other.mean - want.mean).norm()) > 0.05 * float(want.mean.norm()), layout


def brute_force_batch_mean(mdp, pol, fn, P, n, takes_index):
    """E[g] for batches of P prompt draws x n responses, by itertools enumeration and autograd of
    the surrogate sum_b p_b sum_{i,t} A_{b,i,t} / (P n) log pi(w_t | s_t) (seq-mean-token-sum)."""
    import itertools

    from tpg.exact.engine import solve
    from tpg.verify.exact_moments import leaf_rollouts

    sol = solve(mdp, pol, with_grad=False)
    ro = leaf_rollouts(mdp, sol)
    tree = mdp.tree
    logp_nv = pol.node_log_probs(tree)
    nt = torch.where(ro.mask, tree.nt_index_n[ro.nodes.clamp(min=0)], 0)
    logp_lt = torch.where(ro.mask, logp_nv[nt, ro.tokens.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    rho, prob, H = mdp.prompt_weights, sol.response_prob, tree.horizon
    draws = []
    for x in range(tree.num_prompts):
        leaves = [i for i in range(ro.prompt.numel()) if int(ro.prompt[i]) == x]
        for combo in itertools.product(leaves, repeat=n):
            p = float(rho[x]) * math.prod(float(prob[i]) / float(rho[x]) for i in combo)
            draws.append((combo, p))
    surrogate = torch.zeros((), dtype=torch.float64)
    total = 0.0
    for batch in itertools.product(draws, repeat=P):
        rows = [i for combo, _ in batch for i in combo]
        p_b = math.prod(p for _, p in batch)
        length = ro.length[rows]
        mask = (torch.arange(H).unsqueeze(0) < length.unsqueeze(1)).to(torch.float64)
        tlr = torch.zeros(len(rows), H, dtype=torch.float64)
        tlr[torch.arange(len(rows)), length - 1] = ro.rm[rows]
        kw = {"index": np.repeat(np.arange(P), n)} if takes_index else {}  # uid = the prompt draw
        adv = fn(token_level_rewards=tlr, response_mask=mask, **kw)[0]
        surrogate = surrogate + p_b * (adv * mask * logp_lt[rows]).sum() / (P * n)
        total += p_b
    assert total == pytest.approx(1.0, abs=1e-12)
    grads = torch.autograd.grad(surrogate, list(pol.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("spec,takes_index", [(RPP_VERL, False), (GRPO_VERL, True)])
def test_batch_layout_exact_moments_against_brute_force(spec, takes_index):
    """batch:2x2: the exact mean equals an independent enumeration (two draws of one prompt are two
    groups: GRPO's index is the draw), and differs from the independent layout's."""
    mdp, pol = _problem()
    plug = get_estimator(spec + ":layout=batch:2x2")
    got = _moments(mdp, pol, spec + ":layout=batch:2x2", 7)  # the layout's N replaces G
    assert got.num_batches == (2 * 3 ** 2) ** 2
    want = brute_force_batch_mean(mdp, pol, plug.fn, 2, 2, takes_index)
    assert torch.allclose(got.mean, want, rtol=1e-10, atol=1e-13)
    indep = _moments(mdp, pol, spec + ":layout=independent", 4)
    assert float((indep.mean - got.mean).norm()) > 0.01 * float(got.mean.norm())
    # degenerate layouts agree with the others: batch:1xG is a group, batch:Gx1 independent pairs
    assert torch.allclose(_moments(mdp, pol, spec + ":layout=batch:1x3", 2).mean, _moments(mdp, pol, spec, 3).mean,
                          rtol=1e-12, atol=1e-14)


def test_batch_layout_size_guard():
    from tpg.verify.exact_moments import exact_moments

    mdp, pol = _problem()
    with pytest.raises(ValueError, match=r"has 324 batches \(1,296 responses, all 2-tuples of prompt draws "
                                         r"with all 2-tuples of responses each\), above max_rows=1,000"):
        exact_moments(mdp, pol, get_estimator(GRPO_VERL + ":layout=batch:2x2"), 2, max_rows=1000)
    with pytest.raises(ValueError, match=r"more than 1e30 batches"):
        exact_moments(mdp, pol, get_estimator(GRPO_VERL + ":layout=batch:60x2"), 2)


def test_batch_layout_monte_carlo_agrees_with_exact():
    """Monte Carlo batches of layout batch:2x2: the sample mean is within 5 sigma/sqrt(N) of the exact
    mean in every coordinate (sigma from the exact covariance), and not of the independent layout's
    (the negative control: the sampler must draw the declared layout)."""
    from tpg.verify.montecarlo import sample_gradient_terms, sample_mean
    from tpg.verify.score import ParamMap
    from tpg.exact.engine import solve

    mdp, pol = _problem()
    spec = GRPO_VERL + ":layout=batch:2x2"
    exact = _moments(mdp, pol, spec, 2, with_cov=True)
    N = 2000
    gs = sample_gradient_terms(mdp, pol, get_estimator(spec), N, 2, seed=5)
    assert gs.num_batches == N and gs.coef_bt.shape[0] == 4 * N
    pi = solve(mdp, pol, with_grad=False).logp.exp()
    mean = sample_mean(gs, pi, ParamMap(pol, mdp.tree))
    se = (exact.cov.diagonal().clamp(min=0) / N).sqrt()
    live = se > 0
    z = ((mean - exact.mean)[live] / se[live]).abs()
    assert float(z.max()) < 5
    other = _moments(mdp, pol, GRPO_VERL + ":layout=independent", 4)
    assert float(((mean - other.mean)[live] / se[live]).abs().max()) > 5


def test_context_reward_baselines_remax():
    """verl's compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask):
    the plug-in gets the greedy response's RM and matches the built-in remax, tokens included."""
    from test_estimators import FakeContext

    b = random_batch(12, n_batches=2)
    plug = get_estimator(REMAX_VERL)
    assert plug.context == ("reward_baselines",)
    ctx_a, ctx_b = FakeContext(), FakeContext()
    got, want = plug(b, ctx_a), get_estimator("remax")(b, ctx_b)
    assert torch.allclose(got.advantages, want.advantages, rtol=0, atol=1e-15)
    assert got.tokens_spent == want.tokens_spent == 2 * b.batch_size
    mdp, pol = _problem()
    g = _moments(mdp, pol, REMAX_VERL + ":layout=independent", 1)
    r = _moments(mdp, pol, "remax", 1)
    assert torch.allclose(g.mean, r.mean, rtol=1e-12, atol=1e-14)
    assert g.variance_trace == pytest.approx(r.variance_trace, rel=1e-12)


@pytest.mark.parametrize("critic", ["exact", "tabular", "noisy,sigma=0.3", "zero"])
def test_context_values_gamma_lam_gae(critic):
    """verl's compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    the raw GAE plug-in with the critic's values matches the built-in ppo_gae exactly."""
    mdp, pol = _problem("dense:vocab=3,horizon=2,eos=0,prompts=2,seed=1")
    got = _moments(mdp, pol, f"{GAE_RAW}:layout=independent,gamma=0.9,lam=0.7,critic={critic}", 1)
    want = _moments(mdp, pol, f"ppo_gae:gamma=0.9,lambda=0.7,critic={critic}", 1)
    assert torch.allclose(got.mean, want.mean, rtol=1e-12, atol=1e-14)
    assert got.variance_trace == pytest.approx(want.variance_trace, rel=1e-12)


def test_context_gae_whitened_and_old_log_prob(tmp_path):
    from tpg.estimators.functional import gae_advantages, whiten_by_batch
    from test_estimators import FakeContext

    b = random_batch(13, n_batches=2)
    V = torch.randn(b.batch_size, b.horizon + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    V = torch.where(torch.arange(b.horizon + 1).unsqueeze(0) < b.length.unsqueeze(1), V, 0.0)
    ctx = FakeContext(critic=lambda batch: V)
    got = get_estimator(GAE_VERL + ":gamma=0.8,lam=0.5")(b, ctx)
    want = whiten_by_batch(gae_advantages(b.token_level_rewards, V, b.mask, 0.8, 0.5), b.mask, b.batch)
    assert torch.allclose(got.advantages, want, rtol=1e-12, atol=1e-14)
    plug = get_estimator(GAE_VERL)
    assert plug.options["gamma"] == 1.0 and plug.options["lam"] == 1.0 and plug.options["critic"] == "exact"
    path = write(tmp_path, """
        def echo(token_level_rewards, response_mask, old_log_prob, index=None):
            return old_log_prob * 1.0
    """)
    out = get_estimator(path + ":echo")(b)
    assert torch.equal(out.advantages, torch.where(b.mask, b.logp, 0.0))
    with pytest.raises(ValueError, match=r"unknown option 'gamma'; allowed options: layout, agg, kl, kl_beta"):
        get_estimator(GRPO_VERL + ":gamma=0.5")
    with pytest.raises(ValueError, match="exact mode refused.*noise=fresh"):
        mdp, pol = _problem()
        _moments(mdp, pol, GAE_RAW + ":critic=noisy,noise=fresh", 1)


def test_context_keywords_do_not_count_as_positional(tmp_path):
    path = write(tmp_path, """
        def simple_remax(rewards, group_ids, reward_baselines):
            return rewards - reward_baselines
    """)
    from test_estimators import FakeContext

    plug = get_estimator(path + ":simple_remax")
    assert plug.form == "simple" and plug.context == ("reward_baselines",)
    b = random_batch(14)
    assert torch.allclose(plug(b, FakeContext()).advantages, get_estimator("remax")(b, FakeContext()).advantages)
