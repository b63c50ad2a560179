"""The grammar of ``--mdp FAMILY:key=value,...``, ``--task NAME:key=value,...`` and ``--target-reward
SPEC``, free of torch.

A mistyped spec is refused before torch is imported (``tpg verify --mdp dense:foo=1`` answers at
once): the parsers, the key tables and the help text live here; :mod:`.families`, :mod:`.tasks` and
:mod:`.objectives` build the MDPs and re-export every name. The families, tasks and target rewards
themselves are described there.
"""

from __future__ import annotations

import math
import re

from .._guards import check_seed

#: Default upper bound on the number of stored tree nodes (about 40 MB per float64 array).
DEFAULT_MAX_NODES = 5_000_000
#: Reward families of ``--mdp`` (:mod:`.families`).
FAMILIES = ("dense", "terminal", "sparse", "first_token", "length")
#: Transformer tasks of ``--task`` (:mod:`.tasks`).
TASKS = ("table", "rm", "copy", "reverse", "target", "count", "sum")
RULE_TASKS = ("copy", "reverse", "target", "count", "sum")
MAX_VOCAB = 16
MAX_PROMPT_LEN = 4
#: Token rewards of a real-LM problem (``tpg verify --lm ... --reward``, :mod:`.lm_tasks`).
LM_REWARDS = ("table", "rule", "lm")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"reward family must be one of {', '.join(FAMILIES)}; got {family!r}")


# ------------------------------------------------------------------------- MDP specs
_SPEC_KEYS = {
    "vocab": "vocabulary size V >= 2 (default 3)",
    "horizon": "max response length H >= 1 (default 3)",
    "eos": "EOS token id in [0, V-1], or 'none' (default none)",
    "prompts": "number of prompts >= 1 (default 1)",
    "weights": "'uniform' or 'random' prompt weights (default uniform)",
    "gamma": "discount in (0, 1] (default 1)",
    "seed": "seed of the rewards, in [0, 2^32 - 1] (default 0); the policy uses seed + 1000 unless policy_seed "
            "is set",
    "policy": "'tabular' or 'shared' (default tabular)",
    "policy_seed": "seed of the random policy logits, in [0, 2^32 - 1]",
    "scale": "standard deviation of the random logits (default 1)",
    "compact": "true to store rewards as a (position, previous token, token) table (default false)",
    "p": "probability of a rewarded token for the sparse family (default 0.2)",
    "cost": "per-token cost of the length family (default 0.1)",
    "twin": "true for the zero-reward twin (same RM, all on the last token) (default false)",
    "max_nodes": f"size guard of the stored tree (default {DEFAULT_MAX_NODES})",
}


def spec_help() -> str:
    """One line per key accepted by :func:`parse_mdp_spec`."""
    return "\n".join(f"  {k}: {v}" for k, v in _SPEC_KEYS.items())


def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--mdp key {key!r} must be true or false, got {text!r}")


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--mdp key {key!r} must be an integer, got {text!r}") from None


def _parse_float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--mdp key {key!r} must be a number, got {text!r}") from None


def spec_items(rest: str, flag: str):
    """The ``key=value`` entries of a spec's option part (after ``NAME:``) as ``(key, value)`` pairs,
    the key stripped, one at a time; ``ValueError`` naming ``flag`` for an entry without ``=``."""
    if not rest.strip():
        return
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{flag} entries must look like key=value, got {item!r}")
        yield key.strip(), value


def parse_mdp_spec(spec: str) -> dict:
    """Parse ``FAMILY:key=value,...`` into the keyword arguments of :func:`make_mdp`."""
    family, _, rest = spec.partition(":")
    family = family.strip()
    _check_family(family)
    out: dict = {"family": family}
    for key, value in spec_items(rest, "--mdp"):
        if key not in _SPEC_KEYS:
            raise ValueError(f"unknown --mdp key {key!r}; allowed keys: {', '.join(_SPEC_KEYS)}")
        if key in out:
            raise ValueError(f"--mdp key {key!r} given twice")
        if key in ("vocab", "horizon", "prompts", "seed", "policy_seed", "max_nodes"):
            out[key] = _parse_int(key, value)
            if key in ("seed", "policy_seed"):
                check_seed(out[key], f"--mdp key {key!r}")
        elif key == "eos":
            out[key] = None if value.strip().lower() in ("none", "null", "") else _parse_int(key, value)
        elif key in ("gamma", "scale", "p", "cost"):
            out[key] = _parse_float(key, value)
        elif key in ("compact", "twin"):
            out[key] = _parse_bool(key, value)
        elif key == "policy":
            if value not in ("tabular", "shared"):
                raise ValueError(f"--mdp key 'policy' must be 'tabular' or 'shared', got {value!r}")
            out[key] = value
        elif key == "weights":
            if value not in ("uniform", "random"):
                raise ValueError(f"--mdp key 'weights' must be 'uniform' or 'random', got {value!r}")
            out[key] = value
    check_mdp_ranges(out)
    return out


def check_mdp_ranges(kw: dict) -> None:
    """The ranges of a parsed ``--mdp`` spec (:func:`parse_mdp_spec`'s dict), checked before anything is
    built or torch imported: the MDP's shape (as :func:`tpg.mdp.mdp.validate_shape` words it), ``p``,
    the compact form of ``first_token``, and the size guards of the tree a tabular policy or tree rewards
    need (:func:`tpg.mdp.sizes.check_tree_size`) and of the compact reward table. ``ValueError`` naming
    the key and the allowed range."""
    from .._guards import check_fits
    from .sizes import check_tree_size

    V, H, eos, P = kw.get("vocab", 3), kw.get("horizon", 3), kw.get("eos"), kw.get("prompts", 1)
    gamma, compact, policy = kw.get("gamma", 1.0), kw.get("compact", False), kw.get("policy", "tabular")
    if V < 2:
        raise ValueError(f"--mdp key 'vocab': vocab_size must be an integer >= 2, got {V}")
    if H < 1:
        raise ValueError(f"--mdp key 'horizon': horizon must be an integer >= 1, got {H}")
    if eos is not None and not 0 <= eos < V:
        raise ValueError(f"--mdp key 'eos': eos_token must be none or an integer in [0, {V - 1}], got {eos}")
    if P < 1:
        raise ValueError(f"--mdp key 'prompts': prompts must be an integer >= 1, got {P}")
    if not (math.isfinite(gamma) and 0.0 < gamma <= 1.0):
        raise ValueError(f"--mdp key 'gamma': gamma must be a number in (0, 1], got {gamma!r}")
    p = kw.get("p", 0.2)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"--mdp key 'p': p (sparse reward probability) must be in [0, 1], got {p!r}")
    for key in ("scale", "cost"):
        if key in kw and not math.isfinite(kw[key]):
            raise ValueError(f"--mdp key {key!r} must be a finite number, got {kw[key]!r}")
    max_nodes = kw.get("max_nodes", DEFAULT_MAX_NODES)
    if max_nodes < 1:
        raise ValueError(f"--mdp key 'max_nodes' must be an integer >= 1, got {max_nodes}")
    if compact and kw["family"] == "first_token":
        raise ValueError("reward family 'first_token' has no compact form (its reward depends on the "
                         "first token, not on (position, previous token, token)); use compact=false")
    if not compact or policy == "tabular":  # tree rewards, or a tabular policy: the stored tree
        try:
            check_tree_size(P, V, H, eos, max_nodes)
        except ValueError as exc:
            if not compact:
                raise
            raise ValueError(f"{exc}. policy=tabular needs the stored response tree: use policy=shared with "
                             f"compact=true (solved by the Markov engine at any horizon)") from None
    if compact:  # ~17 bytes per entry of the table (as tpg.mdp.families.compact_rewards counts them)
        check_fits(17.0 * H * (V + P) * V, f"horizon={H}",
                   f"the compact reward table of horizon x (vocab_size + prompts) x vocab_size = {H} x {V + P} x {V} "
                   f"entries", "lower horizon")


# ---------------------------------------------------------------------------- options
_COMMON = {
    "vocab": "vocabulary size V in [2, 16], EOS included when eos=true",
    "length": "prompt length Lp in [1, 4]",
    "prompts": "number of distinct prompts (drawn from the seed), or 'all'",
    "eos": "true to end answers with EOS (token V-1) (default false)",
    "horizon": "max response length H (default: the answer's length)",
    "gamma": "discount in (0, 1] (default 1)",
    "reward": "'dense' (rewards where they fall) or 'terminal' (the zero-reward twin) (default dense)",
    "seed": "seed of the prompts and of random rewards, in [0, 2^32 - 1] (default 0)",
    "max_nodes": f"size guard of the stored tree (default {DEFAULT_MAX_NODES})",
}
_POLICY = {
    "policy_seed": "seed of the transformer policy's initialisation, in [0, 2^32 - 1] (default seed + 1000)",
    "n_layer": "transformer layers (default 2)",
    "d_model": "transformer width (default 32)",
    "n_head": "attention heads (default 2)",
    "init_scale": "scale of the policy's initial weights (default 1)",
}
_RULE = {"score": "'token' (1 per correct token) or 'whole' (1 for the whole answer) (default token)"}
_TASK_KEYS = {
    "table": {**_COMMON, "horizon": "max response length H (default 3)"},
    "rm": {**_COMMON, "horizon": "max response length H (default 3)", "hidden": "reward model width (default 16)",
           "scale": "reward model output scale (default 1)"},
    "copy": {**_COMMON, **_RULE},
    "reverse": {**_COMMON, **_RULE},
    "target": {**_COMMON, **_RULE,
               "target": "the answer as token ids joined by '-', e.g. 1-2-0 (default: random, answer_length tokens)",
               "answer_length": "length of the random answer when target is not given (default 3)"},
    "count": {**_COMMON, **_RULE, "token": "the token to count (default 0)"},
    "sum": {**_COMMON, **_RULE, "base": "digit base b, 2 <= b <= content vocabulary (default: all content tokens)"},
}
_DEFAULTS = {
    "table": dict(vocab=4, length=2, prompts=2, horizon=3),
    "rm": dict(vocab=4, length=2, prompts=2, horizon=3),
    "copy": dict(vocab=4, length=2, prompts=4),
    "reverse": dict(vocab=4, length=2, prompts=4),
    "target": dict(vocab=4, length=1, prompts=1),
    "count": dict(vocab=4, length=3, prompts=8),
    "sum": dict(vocab=4, length=2, prompts="all"),
}
_INT_KEYS = {"vocab", "length", "horizon", "seed", "max_nodes", "policy_seed", "n_layer", "d_model", "n_head",
             "hidden", "answer_length", "token", "base"}
_FLOAT_KEYS = {"gamma", "init_scale", "scale"}
_BOOL_KEYS = {"eos"}
_CHOICES = {"reward": ("dense", "terminal"), "score": ("token", "whole")}


def task_keys(name: str) -> dict:
    """The keys :func:`make_task` accepts for task ``name`` (with one help line each), policy keys included."""
    _check_task(name)
    return {**_TASK_KEYS[name], **_POLICY}


def task_help() -> str:
    """One block per task listing its keys."""
    lines = []
    for name in TASKS:
        lines.append(f"{name}:")
        lines += [f"  {k}: {v}" for k, v in _TASK_KEYS[name].items()]
    lines.append("policy keys (every task):")
    lines += [f"  {k}: {v}" for k, v in _POLICY.items()]
    return "\n".join(lines)


def _check_task(name) -> None:
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {name!r}")


def _parse_value(key: str, text: str):
    text = text.strip()
    if key in _INT_KEYS:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--task key {key!r} must be an integer, got {text!r}") from None
    if key in _FLOAT_KEYS:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--task key {key!r} must be a number, got {text!r}") from None
    if key in _BOOL_KEYS:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--task key {key!r} must be true or false, got {text!r}")
    if key == "prompts":
        if text.lower() == "all":
            return "all"
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--task key 'prompts' must be an integer or 'all', got {text!r}") from None
    if key == "target":
        try:
            return [int(t) for t in text.split("-")]
        except ValueError:
            raise ValueError(f"--task key 'target' must be token ids joined by '-', e.g. 1-2-0; got {text!r}") from None
    if key in _CHOICES and text not in _CHOICES[key]:
        raise ValueError(f"--task key {key!r} must be one of {', '.join(_CHOICES[key])}, got {text!r}")
    return text


def parse_task_spec(spec: str) -> dict:
    """Parse ``NAME:key=value,...`` into the keyword arguments of :func:`make_task` (``name`` included).

    Raises ``ValueError`` naming an unknown task, an unknown key (with the task's allowed keys)
    or a malformed value."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    _check_task(name)
    allowed = task_keys(name)
    out: dict = {"name": name}
    for key, value in spec_items(rest, "--task"):
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} for task {name!r}; allowed keys: {', '.join(allowed)}")
        if key in out:
            raise ValueError(f"--task key {key!r} given twice")
        out[key] = _parse_value(key, value)
        if key in ("seed", "policy_seed"):
            check_seed(out[key], f"--task key {key!r}")
    check_task_ranges(out)
    return out


def _task_int(key: str, value, low: int, high: int | None = None) -> int:
    """:func:`tpg.mdp.tasks.make_task`'s range check of an integer option, with its words."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"task option {key} must be an integer {rng}, got {value!r}")
    return value


def _base_digits(value: int, base: int) -> int:
    """How many base-``base`` digits ``value`` has (at least one)."""
    n = 1
    while value >= base:
        value //= base
        n += 1
    return n


def check_task_ranges(kw: dict) -> None:
    """The ranges of a parsed ``--task`` spec (:func:`parse_task_spec`'s dict), checked before anything is
    built or torch imported, in the words of :func:`tpg.mdp.tasks.make_task` and the transformer policy:
    the vocabulary and prompt length, the number of prompts against the distinct ones, the answer's
    length against the horizon, ``token``, ``base``, ``target``, ``answer_length``, ``hidden``, ``gamma``,
    the transformer's shape, and the size guard of the stored tree every task problem needs."""
    from .sizes import check_tree_size

    name = kw["name"]
    opts = {**_DEFAULTS[name], **{k: kw[k] for k in ("vocab", "length", "prompts", "horizon") if k in kw}}
    V = _task_int("vocab", opts["vocab"], 2, MAX_VOCAB)
    Lp = _task_int("length", opts["length"], 1, MAX_PROMPT_LEN)
    eos = kw.get("eos", False)
    C = V - 1 if eos else V  # content tokens 0 .. C-1
    if C < 2:
        raise ValueError(f"vocab={V} leaves {C} content token(s) besides EOS; need at least 2")
    alphabet, answer = C, None  # the prompts' alphabet; the answer's length (rule tasks)
    if name in ("copy", "reverse"):
        answer = Lp
    elif name == "target":
        target = kw.get("target")
        if target is None:
            answer = _task_int("answer_length", kw.get("answer_length", 3), 1)
        else:
            if not target or any(not 0 <= t < C for t in target):
                raise ValueError(f"task option target must be non-empty token ids in [0, {C - 1}] (EOS "
                                 f"excluded), got {list(target)}")
            answer = len(target)
    elif name == "count":
        _task_int("token", kw.get("token", 0), 0, C - 1)
        if C < Lp + 1:
            raise ValueError(f"count task: answers 0..{Lp} need {Lp + 1} digit tokens, vocab={V} "
                             f"(eos={eos}) has {C}; raise vocab or lower length")
        answer = 1
    elif name == "sum":
        alphabet = C if kw.get("base") is None else _task_int("base", kw["base"], 2, C)
        answer = _base_digits(Lp * (alphabet - 1), alphabet)
    total = alphabet ** Lp
    prompts = opts["prompts"]
    if prompts != "all":
        n = _task_int("prompts", prompts, 1)
        if n > total:
            raise ValueError(f"task option prompts={n} exceeds the {total} distinct prompts of length {Lp} over "
                             f"{alphabet} tokens (use prompts=all)")
    if answer is None:  # table, rm
        H = _task_int("horizon", opts["horizon"], 1)
    else:
        Lt = answer + (1 if eos else 0)
        H = _task_int("horizon", opts.get("horizon", Lt), Lt)
    if name == "rm":
        _task_int("hidden", kw.get("hidden", 16), 1)
    gamma = kw.get("gamma", 1.0)
    if not (math.isfinite(gamma) and 0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    for key in ("scale", "init_scale"):
        if key in kw and not math.isfinite(kw[key]):
            raise ValueError(f"--task key {key!r} must be a finite number, got {kw[key]!r}")
    for key, default in (("n_layer", 2), ("d_model", 32), ("n_head", 2)):
        if kw.get(key, default) < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {kw[key]!r}")
    if kw.get("d_model", 32) % kw.get("n_head", 2):
        raise ValueError(f"d_model ({kw.get('d_model', 32)}) must be a multiple of n_head ({kw.get('n_head', 2)})")
    num_prompts = total if prompts == "all" else prompts
    check_tree_size(num_prompts, V, H, V - 1 if eos else None, kw.get("max_nodes", DEFAULT_MAX_NODES))


# ---------------------------------------------------------------------------- target rewards
#: The built-in target rewards of ``--target-reward`` (:mod:`.objectives`): name -> (arguments, formula).
TARGET_REWARDS = {
    "rm": ("", "R = RM(W), the MDP's own response reward (the default: no change of objective)"),
    "length_penalty": ("alpha", "R = RM(W) - alpha * T (T = the response's tokens, EOS included)"),
    "scaled": ("c", "R = c * RM(W), c != 0"),
    "clip": ("lo,hi", "R = min(max(RM(W), lo), hi), lo < hi"),
    "overlong": ("L,cache", "DAPO's soft overlong punishment: R = RM(W) + p(T), p = 0 for T <= L - cache, "
                            "(L - cache - T) / cache for L - cache < T <= L, -1 for T > L (integers 1 <= cache <= L)"),
}
_TARGET_FILE = re.compile(r"^(?P<path>.+?\.py):(?P<fn>[A-Za-z_]\w*)$")


def target_reward_help() -> str:
    """One line per form of ``--target-reward``."""
    lines = [f"  {name + (':' + args if args else ''):<22} {formula}"
             for name, (args, formula) in TARGET_REWARDS.items()]
    lines.append(f"  {'FILE.py:FUNCTION':<22} R = FUNCTION(rm=[B], length=[B], tokens=[B, H], mask=[B, H], "
                 f"prompt=[B]) -> [B], called with the keywords it names")
    return "\n".join(lines)


def _target_number(name: str, text: str, what: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"--target-reward {name}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"--target-reward {name}: {what} must be finite, got {text!r}")
    return x


def _target_int(name: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--target-reward {name}: {what} must be an integer, got {text!r}") from None


def parse_target_reward(spec: str) -> tuple[str, tuple]:
    """``(kind, arguments)`` of a ``--target-reward`` spec: ``("rm", ())``, ``("length_penalty", (alpha,))``,
    ``("scaled", (c,))``, ``("clip", (lo, hi))``, ``("overlong", (L, cache))`` or ``("file", (path, function))``
    for ``FILE.py:FUNCTION``. ``ValueError`` naming the form and the allowed ones otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a target reward spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    m = _TARGET_FILE.match(text)
    if m:
        return "file", (m["path"], m["fn"])
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in TARGET_REWARDS:
        raise ValueError(f"unknown target reward {name!r}; the forms are "
                         f"{', '.join(n + (':' + a if a else '') for n, (a, _) in TARGET_REWARDS.items())}, "
                         f"or FILE.py:FUNCTION")
    args = [a.strip() for a in rest.split(",")] if rest.strip() else []
    want = [a for a in TARGET_REWARDS[name][0].split(",") if a]
    if len(args) != len(want):
        form = name + (":" + ",".join(want) if want else "")
        raise ValueError(f"--target-reward {name} takes {len(want)} argument{'s' if len(want) != 1 else ''} "
                         f"({form}), got {len(args)} in {spec!r}")
    if name == "rm":
        return "rm", ()
    if name == "length_penalty":
        return name, (_target_number(name, args[0], "alpha"),)
    if name == "scaled":
        c = _target_number(name, args[0], "c")
        if c == 0:
            raise ValueError("--target-reward scaled: c must be non-zero (c = 0 has no gradient to check)")
        return name, (c,)
    if name == "clip":
        lo, hi = _target_number(name, args[0], "lo"), _target_number(name, args[1], "hi")
        if not lo < hi:
            raise ValueError(f"--target-reward clip: needs lo < hi, got lo={lo:g}, hi={hi:g}")
        return name, (lo, hi)
    L, cache = _target_int(name, args[0], "L"), _target_int(name, args[1], "cache")
    if not 1 <= cache <= L:
        raise ValueError(f"--target-reward overlong: needs integers 1 <= cache <= L, got L={L}, cache={cache}")
    return name, (L, cache)


__all__ = ["DEFAULT_MAX_NODES", "FAMILIES", "TASKS", "RULE_TASKS", "MAX_VOCAB", "MAX_PROMPT_LEN", "LM_REWARDS",
           "parse_mdp_spec", "check_mdp_ranges", "spec_help", "spec_items", "parse_task_spec", "check_task_ranges",
           "task_keys", "task_help",
           "TARGET_REWARDS", "parse_target_reward", "target_reward_help"]
