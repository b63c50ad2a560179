"""The benchmark scripts run end to end at a tiny size (so they cannot rot); no timing assertions."""

import json

import pytest

# the ``bench`` fixture (importlib.import_module with benchmarks/ on the path) is in conftest.py


def test_exact_bench_tiny(bench, tmp_path):
    out = tmp_path / "exact.json"
    assert bench("exact_bench").main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["problem"]["nodes"] == 121 and result["problem"]["responses"] == 81
    assert result["agreement_ok"] and all(r["max_abs_err_grad"] <= 1e-10 for r in result["agreement"])
    assert result["reference_extrapolated"] and result["solve_s"] > 0 and result["reference_s"] > 0
    assert {"tree_build_s", "rewards_s", "policy_s"} <= set(result["setup_excluded"])
    assert result["command"].startswith("python benchmarks/exact_bench.py")


def test_exact_bench_tiny_full_reference(bench, tmp_path):
    out = tmp_path / "exact.json"
    assert bench("exact_bench").main(["--tiny", "--full-reference", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert not result["reference_extrapolated"] and result["reference_trajectories"] == 81


def test_sampler_bench_tiny(bench, tmp_path):
    out = tmp_path / "sampler.json"
    assert bench("sampler_bench").main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1000]
    assert result["rows"][0]["tokens_per_s"] > 0 and result["reference_tokens_per_s"] > 0
    assert result["agreement"]["ok"]


def test_reference_sampler_follows_the_table(bench):
    """The reference's tokens, log-probabilities and rewards are those of its tables."""
    ref = bench("reference_sampler")
    from tpg.cases import mdp_from_spec

    mdp, policy = mdp_from_spec("dense:vocab=3,horizon=4,eos=0,compact=true,policy=shared,seed=1")
    tables = ref.shared_tables(mdp, policy)
    batch = ref.sample_reference(tables, 200, seed=0)
    assert batch == ref.sample_reference(tables, 200, seed=0)
    for prompt, tokens, logps, rewards, rm in batch:
        assert 1 <= len(tokens) <= 4 and (tokens[-1] == 0 or len(tokens) == 4) and 0 not in tokens[:-1]
        prev = 3 + prompt
        for t, w in enumerate(tokens):
            assert logps[t] == tables["logp"][t][prev][w] and rewards[t] == tables["reward"][t][prev][w]
            prev = w
        assert rm == pytest.approx(sum(r for r in rewards))
