"""Case files (tpg-case/1): the documented example, save/load round trip, agreement with the
independent reference on hand-written cases, and one ValueError per schema violation."""

import copy
import json
import math
import random
import textwrap

import pytest
import torch

import tpg.cases
from tpg.cases import case_from_dict, case_to_dict, load_case, load_problem, make_policy, mdp_from_spec, save_case
from tpg.exact import solve
from tpg.mdp import make_mdp
from tpg.reference import enumerate_nonterminal_prefixes, reference_from_case

from _helpers import assert_matches_reference_grad

TOL = 1e-10


def schema_example() -> dict:
    """The example case printed in the tpg.cases docstring (so the docstring stays true)."""
    doc = tpg.cases.__doc__
    block = doc.split("::", 1)[1].split("\n\n")[1]
    return json.loads(textwrap.dedent(block))


def assert_matches_reference(case: dict):
    mdp, pol = case_from_dict(json.loads(json.dumps(case)))
    sol = solve(mdp, pol)
    J_ref, grad_ref = reference_from_case(case)
    assert_matches_reference_grad(mdp, sol, J_ref, grad_ref, TOL)
    assert float((sol.flat_grad() - sol.grad_logits.reshape(-1)).abs().max()) == 0  # tabular: identity map
    return sol


def test_schema_example_loads():
    case = schema_example()
    mdp, pol = case_from_dict(case)
    assert (mdp.vocab_size, mdp.horizon, mdp.eos_token, mdp.num_prompts) == (3, 3, 0, 2)
    tree = mdp.tree
    child = tree.child(tree.node_id(0, [1, 2]), 0)
    assert float(mdp.edge_rewards()[child]) == 0.7
    assert float(mdp.edge_rewards().abs().sum()) == 0.7
    assert pol.logits[tree.nt_index_n[0]].tolist() == [0.1, -0.3, 0.2]
    sol = assert_matches_reference(case)
    assert sol.J > 0


@pytest.mark.parametrize("spec", [
    dict(family="dense", vocab=3, horizon=3, eos=0, prompts=2, gamma=0.9, seed=1, compact=True, policy="shared"),
    dict(family="sparse", vocab=2, horizon=4, eos=None, prompts=1, gamma=1.0, seed=2, policy="tabular"),
    dict(family="length", vocab=4, horizon=2, eos=3, prompts=3, gamma=0.7, seed=3, compact=True, policy="tabular"),
])
def test_save_load_round_trip_is_exact(spec, tmp_path):
    policy = spec.pop("policy")
    mdp = make_mdp(weights="random", **spec)
    pol = make_policy(mdp, policy, seed=spec["seed"], scale=2.0)
    path = tmp_path / "case.json"
    save_case(path, mdp, pol)
    mdp2, pol2 = load_case(path)
    assert mdp2.name == "case" and mdp2.gamma == mdp.gamma and torch.equal(mdp2.prompt_weights, mdp.prompt_weights)
    assert torch.equal(mdp2.edge_rewards(), mdp.edge_rewards())
    a, b = solve(mdp, pol), solve(mdp2, pol2)
    assert a.J == b.J
    assert torch.equal(a.grad_logits, b.grad_logits)
    assert case_to_dict(mdp2, pol2) == case_to_dict(mdp, pol)
    via_problem, _ = load_problem(case=str(path))
    assert torch.equal(via_problem.edge_rewards(), mdp.edge_rewards())


def random_case(rng: random.Random) -> dict:
    """A case dict written by hand (no tpg code): random shape, sparse rewards and logit rows."""
    V = rng.choice([2, 3])
    H = rng.choice([1, 2, 3]) if V == 3 else rng.choice([1, 2, 3, 4])
    eos = rng.choice([None, rng.randrange(V)])
    P = rng.choice([1, 2])
    raw = [rng.uniform(0.1, 1.0) for _ in range(P)]
    weights = [w / sum(raw) for w in raw]
    rewards, rows = [], []
    for prompt in range(P):
        for prefix in enumerate_nonterminal_prefixes(V, H, eos):
            for token in range(V):
                if rng.random() < 0.6:
                    rewards.append({"prompt": prompt, "prefix": list(prefix), "token": token,
                                    "reward": rng.gauss(0.0, 1.0)})
            if rng.random() < 0.8:
                rows.append({"prompt": prompt, "prefix": list(prefix),
                             "logits": [rng.gauss(0.0, 1.5) for _ in range(V)]})
    rng.shuffle(rewards)
    rng.shuffle(rows)
    return {"format": "tpg-case/1", "vocab_size": V, "horizon": H, "eos_token": eos,
            "gamma": rng.choice([1.0, 0.8]), "prompt_weights": weights, "token_rewards": rewards,
            "policy": {"kind": "tabular", "logits": rows}}


@pytest.mark.parametrize("seed", range(20))
def test_hand_written_cases_match_reference(seed):
    assert_matches_reference(random_case(random.Random(seed)))


def test_hand_written_prefixes_are_the_tree_nonterminals():
    rng = random.Random(0)
    case = random_case(rng)
    mdp, _ = case_from_dict(case)
    tree = mdp.tree
    from_tree = {(p, tuple(pre)) for p, pre in map(tree.prefix, tree.nt_node_k.tolist())}
    hand = {(p, pre) for p in range(mdp.num_prompts)
            for pre in enumerate_nonterminal_prefixes(case["vocab_size"], case["horizon"], case["eos_token"])}
    assert from_tree == hand


# ---------------------------------------------------------------------------- schema violations
def _set(path, value):
    def mutate(d):
        *head, last = path
        for key in head:
            d = d[key]
        d[last] = value
    return mutate


def _delete(key):
    def mutate(d):
        del d[key]
    return mutate


def _append(path, value):
    def mutate(d):
        for key in path:
            d = d[key]
        d.append(value)
    return mutate


REWARD0 = ["token_rewards", 0]
LOGITS0 = ["policy", "logits", 0]
VIOLATIONS = {
    "unknown top-level key": (_set(["colour"], 1), r"colour"),
    "unknown reward key": (_set(REWARD0 + ["weight"], 1.0), r"token_rewards\[0\].*weight"),
    "missing reward key": (lambda d: d["token_rewards"][0].pop("reward"), r"token_rewards\[0\].*reward"),
    "unknown logits key": (_set(LOGITS0 + ["bias"], 0.0), r"policy\.logits\[0\].*bias"),
    "unknown policy key": (_set(["policy", "temperature"], 1.0), r"policy.*temperature"),
    "policy kind": (_set(["policy", "kind"], "shared"), r"policy\.kind"),
    "wrong logits length": (_set(LOGITS0 + ["logits"], [0.1, 0.2]), r"policy\.logits\[0\]\.logits"),
    "non-finite logits": (_set(LOGITS0 + ["logits"], [0.1, math.inf, 0.2]), r"policy\.logits\[0\]\.logits"),
    "prefix too long": (_set(REWARD0 + ["prefix"], [1, 2, 1]), r"token_rewards\[0\]\.prefix"),
    "logits prefix too long": (_set(LOGITS0 + ["prefix"], [1, 1, 1]), r"policy\.logits\[0\]\.prefix"),
    "token out of range": (_set(REWARD0 + ["token"], 3), r"token_rewards\[0\]\.token"),
    "negative token": (_set(REWARD0 + ["token"], -1), r"token_rewards\[0\]\.token"),
    "bool token": (_set(REWARD0 + ["token"], True), r"token_rewards\[0\]\.token"),
    "prefix token out of range": (_set(REWARD0 + ["prefix"], [1, 5]), r"token_rewards\[0\]\.prefix\[1\]"),
    "prompt out of range": (_set(REWARD0 + ["prompt"], 2), r"token_rewards\[0\]\.prompt"),
    "logits prompt out of range": (_set(LOGITS0 + ["prompt"], -1), r"policy\.logits\[0\]\.prompt"),
    "prefix containing EOS": (_set(REWARD0 + ["prefix"], [0, 1]), r"token_rewards\[0\]\.prefix\[0\].*EOS"),
    "prefix ending with EOS": (_set(REWARD0 + ["prefix"], [1, 0]), r"token_rewards\[0\]\.prefix\[1\].*EOS"),
    "bad format": (_set(["format"], "tpg-case/2"), r"format"),
    "missing format": (_delete("format"), r"format"),
    "missing vocab_size": (_delete("vocab_size"), r"vocab_size"),
    "missing horizon": (_delete("horizon"), r"horizon"),
    "missing prompt_weights": (_delete("prompt_weights"), r"prompt_weights"),
    "nan reward": (_set(REWARD0 + ["reward"], math.nan), r"token_rewards\[0\]\.reward"),
    "inf reward": (_set(REWARD0 + ["reward"], -math.inf), r"token_rewards\[0\]\.reward"),
    "string reward": (_set(REWARD0 + ["reward"], "0.7"), r"token_rewards\[0\]\.reward"),
    "duplicated reward": (_append(["token_rewards"], {"prompt": 0, "prefix": [1, 2], "token": 0, "reward": 0.1}),
                          r"token_rewards\[1\]"),
    "duplicated logits": (_append(["policy", "logits"], {"prompt": 0, "prefix": [], "logits": [0, 0, 0]}),
                          r"policy\.logits\[1\]"),
    "bad vocab_size": (_set(["vocab_size"], 1), r"vocab_size"),
    "bad horizon": (_set(["horizon"], 0), r"horizon"),
    "bad eos_token": (_set(["eos_token"], 3), r"eos_token"),
    "bad gamma": (_set(["gamma"], 0), r"gamma"),
    "nan gamma": (_set(["gamma"], math.nan), r"gamma"),
    "weights not summing to 1": (_set(["prompt_weights"], [0.5, 0.6]), r"prompt_weights"),
    "negative weight": (_set(["prompt_weights"], [-0.5, 1.5]), r"prompt_weights"),
    "nan weight": (_set(["prompt_weights"], [math.nan, 1.0]), r"prompt_weights"),
    "rewards not a list": (_set(["token_rewards"], {}), r"token_rewards"),
    "reward entry not an object": (_set(["token_rewards"], [[0, [], 1, 0.5]]), r"token_rewards\[0\]"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_schema_violation_names_the_field(name):
    mutate, field = VIOLATIONS[name]
    case = copy.deepcopy(schema_example())
    mutate(case)
    with pytest.raises(ValueError, match=field):
        case_from_dict(case)


def test_case_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read case file"):
        load_case(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_case(bad)
    with pytest.raises(ValueError, match="JSON object"):
        case_from_dict([1, 2])
    with pytest.raises(ValueError, match="exactly one"):
        load_problem()


# ---------------------------------------------------------------------------- hostile files and sizes
def test_deeply_nested_json_names_the_file(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"case file '.*deep\.json' nests lists or objects too deeply"):
        load_case(deep)
    huge = tmp_path / "huge.json"
    huge.write_text('{"format": "tpg-case/1", "vocab_size": ' + "9" * 5000 + "}")
    with pytest.raises(ValueError, match=r"case file '.*huge\.json' cannot be read"):
        load_case(huge)


def test_numbers_past_the_float_range_are_field_errors():
    case = copy.deepcopy(schema_example())
    case["token_rewards"][0]["reward"] = 10**400
    with pytest.raises(ValueError, match=r"token_rewards\[0\]\.reward must be a finite number"):
        case_from_dict(case)
    case = copy.deepcopy(schema_example())
    case["prompt_weights"] = [10**400, 0.5]
    with pytest.raises(ValueError, match="prompt_weights must be a list of finite numbers"):
        case_from_dict(case)


@pytest.mark.parametrize("spec", ["copy:horizon=1000000000000", "rm:horizon=1000000", "table:horizon=1000000000000",
                                  "dense:horizon=1000000000000,compact=true", "dense:horizon=1000000"])
def test_huge_horizons_are_refused_naming_the_field(monkeypatch, spec):
    import tpg.mdp.tree as tree_mod

    monkeypatch.setattr(tree_mod, "count_nodes", lambda *a: (_ for _ in ()).throw(AssertionError("O(H) count")))
    kind = "mdp_spec" if spec.startswith("dense") else "task_spec"
    with pytest.raises(ValueError, match=r"^horizon=1000000(000000)?: "):
        load_problem(**{kind: spec})


def test_max_nodes_given_twice_is_refused():
    with pytest.raises(ValueError, match="max_nodes is given twice"):
        load_problem(mdp_spec="dense:max_nodes=100", max_nodes=200)
    with pytest.raises(ValueError, match="max_nodes is given twice"):
        load_problem(task_spec="copy:max_nodes=100", max_nodes=200)
    assert load_problem(mdp_spec="dense:vocab=2,horizon=2", max_nodes=7)[0].max_nodes == 7


def test_save_case_is_atomic_and_names_the_file(tmp_path, monkeypatch):
    mdp, pol = mdp_from_spec("dense:vocab=3,horizon=2,seed=1")
    with pytest.raises(IsADirectoryError) as err:
        save_case(tmp_path, mdp, pol)
    assert err.value.filename == str(tmp_path)
    out = tmp_path / "case.json"
    out.write_text("old")
    import tpg._io

    def failing_replace(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(tpg._io.os, "replace", failing_replace)
    with pytest.raises(PermissionError) as err:
        save_case(out, mdp, pol)
    assert err.value.filename == str(out) and out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json"]  # no temporary left behind
    monkeypatch.undo()
    save_case(out, mdp, pol)
    assert load_case(out)[0].vocab_size == 3
