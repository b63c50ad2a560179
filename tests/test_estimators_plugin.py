"""Plug-ins (loading, signature detection, errors, equality with built-ins), the probe, the
registry and the public API."""

import os
import textwrap
from pathlib import Path

import pytest
import torch

import tpg.estimators as E
from tpg.estimators import describe, expand_spec, format_probe, get_estimator, load_plugin, probe, stack_batches

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
    for opts in ("agg=token-mean", "agg=seq-mean-token-mean,kl=k3,beta=0.2", "kl=k1_reward,beta=0.5"):
        plug = get_estimator(f"{GRPO_VERL}:{opts}")
        built = get_estimator(f"grpo:{opts}")
        p, q = plug(b), built(b)
        assert torch.allclose(p.advantages, q.advantages), opts
        assert torch.allclose(p.score_coef(), q.score_coef()), opts
    assert plug.spec.endswith("compute_advantage:kl=k1_reward,beta=0.5")


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
    assert by["identical"]["flag"] == "" and by["identical"]["max_abs"] == 0
    assert by["singleton"]["advantages"] == pytest.approx([1 / (1 + 1e-6), 0.5 / (1 + 1e-6)], rel=1e-6)
    assert by["padding"]["padding_zero"] is True
    assert by["scale_1e+06"]["value"] == pytest.approx(1.0, rel=1e-5)
    assert "epsilon" in by["scale_1e-06"]["flag"]  # std ~ eps at that scale
    assert 0 < by["float32_vs_float64"]["value"] < 1e-5
    text = format_probe(rows)
    assert "identical" in text and "float32_vs_float64" in text
    assert all(line == line.rstrip() for line in text.splitlines())


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
    assert rows["identical"]["flag"] == "non-zero advantage for identical rewards"


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
    ("grpo:foo=1", "unknown option 'foo'; allowed options: std_norm, eps, agg, kl, beta"),
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
