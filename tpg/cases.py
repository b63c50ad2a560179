"""Case files (``tpg-case/1`` JSON) and generated problems (``--mdp FAMILY:key=value,...``).

A case file fully specifies an MDP and a tabular policy, so any result can be reproduced
and shared::

    {"format": "tpg-case/1", "vocab_size": 3, "horizon": 3, "eos_token": 0, "gamma": 1.0,
     "prompt_weights": [0.5, 0.5],
     "token_rewards": [{"prompt": 0, "prefix": [1, 2], "token": 0, "reward": 0.7}],
     "policy": {"kind": "tabular",
                "logits": [{"prompt": 0, "prefix": [], "logits": [0.1, -0.3, 0.2]}]}}

Missing rewards are 0 and missing logit rows are zeros. A node is non-terminal when its
prefix is shorter than ``horizon`` and does not end with ``eos_token``; rewards and logit
rows may only be given at non-terminal prefixes. ``eos_token`` may be ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ._guards import check_seed
from .mdp.families import make_mdp, parse_mdp_spec
from .mdp.mdp import TokenMDP, validate_shape
from .mdp.tasks import make_task, parse_task_spec
from .mdp.rewards import TreeRewards
from .mdp.tree import DEFAULT_MAX_NODES, TokenTree, check_tree_size
from .policies import SharedSoftmax, TabularSoftmax, TinyTransformerPolicy

CASE_FORMAT = "tpg-case/1"
_TOP_KEYS = {"format", "vocab_size", "horizon", "eos_token", "gamma", "prompt_weights", "token_rewards", "policy"}
_REQUIRED = ("format", "vocab_size", "horizon", "prompt_weights")
_REWARD_KEYS = {"prompt", "prefix", "token", "reward"}
_LOGIT_KEYS = {"prompt", "prefix", "logits"}
_POLICY_KEYS = {"kind", "logits"}


def make_policy(mdp: TokenMDP, policy: str = "tabular", policy_seed: int | None = None, seed: int = 0,
                scale: float = 1.0):
    """A seeded random policy for ``mdp``: ``tabular`` (needs the tree) or ``shared``.

    The logits are ``N(0, scale^2)`` from ``policy_seed`` (default ``seed + 1000``); seeds are
    integers in ``[0, 2^32 - 1]``."""
    seed = check_seed(seed, "seed")
    pseed = seed + 1000 if policy_seed is None else check_seed(policy_seed, "policy_seed")
    if policy == "tabular":
        if not mdp.tree_fits():  # say what does work at this size, before the tree's size guard
            raise ValueError(f"policy=tabular needs the stored response tree, which is above max_nodes="
                             f"{mdp.max_nodes:,} at vocab={mdp.vocab_size}, horizon={mdp.horizon}; use "
                             f"policy=shared with compact=true (solved by the Markov engine at any horizon), "
                             f"or lower horizon or vocab, or raise max_nodes")
        return TabularSoftmax(mdp.tree, seed=pseed, scale=scale)
    if policy == "shared":
        return SharedSoftmax(mdp.vocab_size, mdp.horizon, mdp.num_prompts, seed=pseed, scale=scale)
    raise ValueError(f"policy must be 'tabular' or 'shared', got {policy!r}")


def mdp_from_spec(spec: str):
    """``(mdp, policy)`` from ``FAMILY:key=value,...`` (keys: :func:`tpg.mdp.families.spec_help`)."""
    kw = parse_mdp_spec(spec)
    if kw.get("compact") and kw.get("policy", "tabular") == "tabular":
        # compact rewards are built before any tree, but a tabular policy needs one: its O(1) guard speaks first
        V, H, eos, P = kw.get("vocab", 3), kw.get("horizon", 3), kw.get("eos"), kw.get("prompts", 1)
        validate_shape(V, H, eos, kw.get("gamma", 1.0), [1.0])
        if P < 1:
            raise ValueError(f"prompts must be an integer >= 1, got {P!r}")
        try:
            check_tree_size(P, V, H, eos, kw.get("max_nodes", DEFAULT_MAX_NODES))
        except ValueError as exc:  # say what does work at this size
            raise ValueError(f"{exc}. policy=tabular needs the stored response tree: use policy=shared with "
                             f"compact=true (solved by the Markov engine at any horizon)") from None
    mdp = make_mdp(**kw)
    pol = make_policy(mdp, kw.get("policy", "tabular"), kw.get("policy_seed"), kw.get("seed", 0),
                      kw.get("scale", 1.0))
    return mdp, pol


_TRANSFORMER_KEYS = ("n_layer", "d_model", "n_head", "init_scale")


def problem_from_task_spec(spec: str):
    """``(task MDP, seeded TinyTransformerPolicy)`` from ``TASK:key=value,...`` (see ``tpg task-help``).

    The policy is seeded with ``policy_seed`` (default ``seed + 1000``); ``n_layer``, ``d_model``,
    ``n_head`` and ``init_scale`` set its shape."""
    kw = parse_task_spec(spec)
    mdp = make_task(**kw)
    # every use of a task problem (exact J and gradients, verification, training) needs the stored tree;
    # the O(1) guard refuses a too-long horizon before the policy allocates its position table
    check_tree_size(mdp.num_prompts, mdp.vocab_size, mdp.horizon, mdp.eos_token, mdp.max_nodes)
    pol = TinyTransformerPolicy.from_mdp(mdp, seed=kw.get("policy_seed", kw.get("seed", 0) + 1000),
                                         **{k: kw[k] for k in _TRANSFORMER_KEYS if k in kw})
    return mdp, pol


# ---------------------------------------------------------------------------- reading
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer past the float range
        return False


def _prefix_node(tree: TokenTree, where: str, prompt, prefix, horizon: int, vocab: int, eos) -> int:
    if not _is_int(prompt) or not 0 <= prompt < tree.num_prompts:
        raise ValueError(f"{where}.prompt must be an integer in [0, {tree.num_prompts - 1}], got {prompt!r}")
    if not isinstance(prefix, list):
        raise ValueError(f"{where}.prefix must be a list of token ids, got {prefix!r}")
    if len(prefix) > horizon - 1:
        raise ValueError(f"{where}.prefix has {len(prefix)} tokens; a non-terminal prefix has at most "
                         f"horizon - 1 = {horizon - 1}")
    for i, tok in enumerate(prefix):
        if not _is_int(tok) or not 0 <= tok < vocab:
            raise ValueError(f"{where}.prefix[{i}] must be a token id in [0, {vocab - 1}], got {tok!r}")
        if eos is not None and tok == eos:
            raise ValueError(f"{where}.prefix[{i}] is the EOS token {eos}: a prefix containing EOS is terminal")
    return tree.node_id(prompt, prefix)


def case_from_dict(data: dict, max_nodes: int = DEFAULT_MAX_NODES):
    """``(mdp, policy)`` from a parsed case file; ``ValueError`` naming the field on bad input."""
    if not isinstance(data, dict):
        raise ValueError(f"a case file must hold a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown case file key(s) {unknown}; allowed keys: {sorted(_TOP_KEYS)}")
    for key in _REQUIRED:
        if key not in data:
            raise ValueError(f"case file is missing the required key {key!r}")
    if data["format"] != CASE_FORMAT:
        raise ValueError(f"format must be {CASE_FORMAT!r}, got {data['format']!r}")
    V, H = data["vocab_size"], data["horizon"]
    eos = data.get("eos_token")
    gamma = data.get("gamma", 1.0)
    weights = data["prompt_weights"]
    if not isinstance(weights, list) or not all(_is_number(w) for w in weights):
        raise ValueError(f"prompt_weights must be a list of finite numbers, got {weights!r}")
    rho = validate_shape(V, H, eos, gamma, weights)
    tree = TokenTree.build(len(weights), V, H, eos, max_nodes)
    values = torch.zeros(tree.num_nodes, dtype=torch.float64)
    rewards = data.get("token_rewards", [])
    if not isinstance(rewards, list):
        raise ValueError("token_rewards must be a list of {prompt, prefix, token, reward} objects")
    seen = set()
    for i, entry in enumerate(rewards):
        where = f"token_rewards[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with keys {sorted(_REWARD_KEYS)}")
        bad = sorted(set(entry) ^ _REWARD_KEYS)
        if bad:
            raise ValueError(f"{where} must have exactly the keys {sorted(_REWARD_KEYS)}; unknown or missing: {bad}")
        node = _prefix_node(tree, where, entry["prompt"], entry["prefix"], H, V, eos)
        tok = entry["token"]
        if not _is_int(tok) or not 0 <= tok < V:
            raise ValueError(f"{where}.token must be a token id in [0, {V - 1}], got {tok!r}")
        if not _is_number(entry["reward"]):
            raise ValueError(f"{where}.reward must be a finite number, got {entry['reward']!r}")
        child = int(tree.child(torch.tensor(node), tok))
        if child in seen:
            raise ValueError(f"{where} repeats the reward of prompt {entry['prompt']}, prefix {entry['prefix']}, "
                             f"token {tok}")
        seen.add(child)
        values[child] = float(entry["reward"])
    logits = torch.zeros(tree.num_nonterminal, V, dtype=torch.float64)
    policy = data.get("policy", {"kind": "tabular", "logits": []})
    if not isinstance(policy, dict):
        raise ValueError("policy must be an object {\"kind\": \"tabular\", \"logits\": [...]}")
    bad = sorted(set(policy) - _POLICY_KEYS)
    if bad:
        raise ValueError(f"unknown policy key(s) {bad}; allowed keys: {sorted(_POLICY_KEYS)}")
    if policy.get("kind", "tabular") != "tabular":
        raise ValueError(f"policy.kind must be 'tabular', got {policy.get('kind')!r}")
    rows = policy.get("logits", [])
    if not isinstance(rows, list):
        raise ValueError("policy.logits must be a list of {prompt, prefix, logits} objects")
    seen_rows = set()
    for i, entry in enumerate(rows):
        where = f"policy.logits[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with keys {sorted(_LOGIT_KEYS)}")
        bad = sorted(set(entry) ^ _LOGIT_KEYS)
        if bad:
            raise ValueError(f"{where} must have exactly the keys {sorted(_LOGIT_KEYS)}; unknown or missing: {bad}")
        node = _prefix_node(tree, where, entry["prompt"], entry["prefix"], H, V, eos)
        row = entry["logits"]
        if not isinstance(row, list) or len(row) != V:
            raise ValueError(f"{where}.logits must be a list of vocab_size = {V} numbers, got "
                             f"{len(row) if isinstance(row, list) else type(row).__name__}")
        if not all(_is_number(x) for x in row):
            raise ValueError(f"{where}.logits must be finite numbers, got {row!r}")
        k = int(tree.nt_index_n[node])
        if k in seen_rows:
            raise ValueError(f"{where} repeats the logits of prompt {entry['prompt']}, prefix {entry['prefix']}")
        seen_rows.add(k)
        logits[k] = torch.tensor(row, dtype=torch.float64)
    mdp = TokenMDP(V, H, rho, TreeRewards(values), eos, float(gamma), max_nodes, name="case", tree=tree)
    return mdp, TabularSoftmax(tree, logits=logits)


def load_case(path: str | Path, max_nodes: int = DEFAULT_MAX_NODES):
    """``(mdp, policy)`` from a ``tpg-case/1`` JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read case file {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"case file {str(path)!r} is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder recurses once per nested list or object
        raise ValueError(f"case file {str(path)!r} nests lists or objects too deeply to read (a case file is "
                         f"at most 4 levels deep)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"case file {str(path)!r} cannot be read: {exc}") from None
    mdp, pol = case_from_dict(data, max_nodes)
    mdp.name = path.stem
    return mdp, pol


# ---------------------------------------------------------------------------- writing
def case_to_dict(mdp: TokenMDP, policy) -> dict:
    """The case file of any MDP and policy below the size guard (compact rewards and shared
    policies are written out per prefix). Zero rewards and all-zero logit rows are omitted."""
    tree = mdp.tree
    edge = mdp.edge_rewards()
    with torch.no_grad():
        logits = policy.node_logits(tree).detach().to(torch.float64)
    rewards = []
    for child in torch.nonzero(edge).flatten().tolist():
        parent = int(tree.parent_n[child])
        prompt, prefix = tree.prefix(parent)
        rewards.append({"prompt": prompt, "prefix": prefix, "token": int(tree.token_n[child]),
                        "reward": float(edge[child])})
    rows = []
    for k in torch.nonzero((logits != 0).any(1)).flatten().tolist():
        prompt, prefix = tree.prefix(int(tree.nt_node_k[k]))
        rows.append({"prompt": prompt, "prefix": prefix, "logits": [float(x) for x in logits[k]]})
    return {"format": CASE_FORMAT, "vocab_size": mdp.vocab_size, "horizon": mdp.horizon,
            "eos_token": mdp.eos_token, "gamma": mdp.gamma,
            "prompt_weights": [float(w) for w in mdp.prompt_weights],
            "token_rewards": rewards, "policy": {"kind": "tabular", "logits": rows}}


def save_case(path: str | Path, mdp: TokenMDP, policy) -> None:
    """Write :func:`case_to_dict` as JSON (floats round-trip exactly), atomically (a temporary file
    beside it, then a rename); an ``OSError`` names ``path``."""
    from ._io import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(case_to_dict(mdp, policy), indent=1) + "\n").encode())


def load_problem(case: str | None = None, mdp_spec: str | None = None, max_nodes: int | None = None,
                 task_spec: str | None = None):
    """``(mdp, policy)`` from a case file, a generated-MDP spec or a transformer task spec
    (exactly one of them)."""
    if sum(x is not None for x in (case, mdp_spec, task_spec)) != 1:
        raise ValueError("give exactly one of --case FILE, --mdp SPEC and --task SPEC")
    if case is not None:
        return load_case(case, max_nodes or DEFAULT_MAX_NODES)
    if task_spec is not None:
        if max_nodes is not None:
            if "max_nodes" in parse_task_spec(task_spec):
                raise ValueError("max_nodes is given twice, by --max-nodes and by the --task spec: give it once")
            task_spec = f"{task_spec}{',' if ':' in task_spec else ':'}max_nodes={max_nodes}"
        return problem_from_task_spec(task_spec)
    if max_nodes is not None:
        if "max_nodes" in parse_mdp_spec(mdp_spec):
            raise ValueError("max_nodes is given twice, by --max-nodes and by the --mdp spec: give it once")
        mdp_spec = f"{mdp_spec}{',' if ':' in mdp_spec else ':'}max_nodes={max_nodes}"
    return mdp_from_spec(mdp_spec)
