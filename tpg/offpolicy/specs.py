"""The behaviour and loss spec grammar, declared and checked free of torch.

``tpg verify --behaviour temperature:-1`` and ``--loss ppo_clip:eps=-1`` must be refused at once, but
the behaviour stages and the losses live in modules that import torch (about two seconds). Their
declarations -- positional arguments, options with their ranges, help lines, which stages replace the
policy -- are here, and so is the parse: :func:`parse_behaviour` turns a spec into a tree of
:class:`StageNode` (checked: names, arguments, ranges, where ``stale``/``file`` may stand), which
:func:`tpg.offpolicy.behaviour.parse_chain` builds into stages; :func:`parse_loss` checks a catalog
loss's options, which :func:`tpg.offpolicy.losses.get_loss` then builds. One parse, so the command
line's message is the engine's, word for word. Plug-in losses are checked up to their file (their
options are the function's, known only once it is imported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..estimators.names import PLUGIN_SPEC, parse_options
from ..estimators.options import Option
from ._spec import bind_args, canonical, fmt_value, positive, split_head, split_top, unwrap


@dataclass(frozen=True)
class Decl:
    """One behaviour stage or loss: positional argument names (in order), options, a help line, and for a
    stage whether it replaces the policy (``source``: ``stale``, ``file``; it may only start a chain)."""

    positional: tuple[str, ...]
    options: dict[str, Option]
    help: str
    source: bool = False


# ------------------------------------------------------------------------------ behaviours
#: the dtypes ``precision`` rounds the logits to
PRECISION_NAMES = ("bf16", "fp16", "fp32")

#: every behaviour stage, in the order ``tpg offpolicy-help`` lists them
STAGE_DECLS: dict[str, Decl] = {
    "pi": Decl((), {}, "the training policy itself (mu = pi)"),
    "temperature": Decl(("T",), {"T": positive(1.0, "temperature")}, "softmax(z / T)"),
    "top_k": Decl(("k",), {"k": Option(1, "int", "tokens kept per state (ties at the boundary all kept)", low=1)},
                  "the k most likely tokens per state (ties kept), renormalised"),
    "top_p": Decl(("p",), {"p": positive(1.0, "nucleus mass", high=1.0)},
                  "nucleus: the most likely tokens up to mass p (ties kept together), renormalised"),
    "min_p": Decl(("m",), {"m": Option(0.0, "float", "fraction of the most likely token's probability",
                                       low=0.0, high=1.0)},
                  "tokens with p >= m * max p, renormalised"),
    "logit_noise": Decl(("sigma", "seed"), {"sigma": Option(0.1, "float", "noise standard deviation", low=0.0),
                                            "seed": Option(0, "int", "seed of the fixed noise draw", low=0)},
                        "z + sigma * N(0, 1), one fixed seeded draw per (state, token)"),
    "precision": Decl(("dtype",), {"dtype": Option("bf16", "choice", "the dtype the logits are rounded to",
                                                   choices=PRECISION_NAMES)},
                      "the logits rounded to bf16 | fp16 | fp32"),
    "stale": Decl(("k",), {"k": Option(1, "int", "gradient-ascent steps behind pi", low=0),
                           "lr": positive(0.5, "step size eta of theta <- theta + eta grad J")},
                  "the policy k exact gradient-ascent steps (size lr) before pi", source=True),
    "file": Decl(("path",), {"path": Option("", "custom", "a tpg-case/1 JSON file or a tpg train checkpoint",
                                            parser=lambda v: str(v), allowed="a file path")},
                 "a recorded policy: a case file (.json) or a tpg train checkpoint (.ckpt/.pt)", source=True),
    "mix": Decl(("w",), {"w": Option(0.5, "float", "weight of the first component", low=0.0, high=1.0)},
                "the per-state mixture w mu_1 + (1 - w) mu_2 of two chains"),
}
STAGE_ALIASES = {"on_policy": "pi", "identity": "pi", "temp": "temperature"}


def stage_spec(name: str, values: dict) -> str:
    """The canonical spec of one (non-mix) stage."""
    d = STAGE_DECLS[name]
    return canonical(name, values, d.positional, d.options)


def mix_spec(w: float, first: str, second: str) -> str:
    """The canonical spec of ``mix`` from its weight and its components' specs."""
    def sub(text):
        return f"({text})" if ("," in text or "+" in text) else text
    return f"mix:{fmt_value(w)},{sub(first)},{sub(second)}"


@dataclass(frozen=True)
class StageNode:
    """A parsed behaviour spec: a stage (``name`` of :data:`STAGE_DECLS`, parsed ``values``), a ``chain``
    of ``parts`` applied left to right, or a ``mix`` of its two ``parts``."""

    name: str
    values: dict
    parts: tuple = ()

    @property
    def source(self) -> bool:
        if self.name == "chain":
            return self.parts[0].source
        if self.name == "mix":
            return any(p.source for p in self.parts)
        return STAGE_DECLS[self.name].source

    @property
    def spec(self) -> str:
        if self.name == "chain":
            return "+".join(p.spec for p in self.parts)
        if self.name == "mix":
            return mix_spec(self.values["w"], self.parts[0].spec, self.parts[1].spec)
        return stage_spec(self.name, self.values)


def _parse_stage(name: str, rest: str, where: str) -> StageNode:
    d = STAGE_DECLS[name]
    if name == "file":
        if not rest:
            raise ValueError("behaviour file: give a path, file:PATH")
        return StageNode(name, {"path": unwrap(rest)})
    args = split_top(rest, ",", where) if rest else []
    if name == "mix":
        if len(args) != 3:
            raise ValueError(f"behaviour mix: give mix:w,SPEC1,SPEC2 (a nested spec with commas in parentheses), "
                             f"got {len(args)} argument(s) in {rest!r}")
        values = bind_args("behaviour mix", args[:1], d.positional, d.options)
        return StageNode(name, values, (parse_behaviour(args[1], where), parse_behaviour(args[2], where)))
    if not d.positional and rest:
        raise ValueError(f"behaviour {name} takes no arguments, got {rest!r}")
    return StageNode(name, bind_args(f"behaviour {name}", args, d.positional, d.options))


def parse_behaviour(text: str, where: str | None = None) -> StageNode:
    """The stage (or chain of stages) a behaviour spec names; ``ValueError`` naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a behaviour spec must be a non-empty string, got {text!r}")
    where = where or f"behaviour {text.strip()!r}"
    parts = [p for p in split_top(unwrap(text), "+", where)]
    if any(not p.strip() for p in parts):
        raise ValueError(f"{where}: an empty stage in the chain {text!r}")
    nodes: list[StageNode] = []
    for i, part in enumerate(parts):
        if len(split_top(unwrap(part), "+", where)) > 1:
            node = parse_behaviour(part, where)
        else:
            name, rest = split_head(part, "behaviour")
            name = STAGE_ALIASES.get(name, name)
            if name not in STAGE_DECLS:
                raise ValueError(f"unknown behaviour {name!r}; the behaviours are {', '.join(STAGE_DECLS)} "
                                 f"(chain them with '+', e.g. temperature:0.7+top_p:0.9)")
            node = _parse_stage(name, rest, where)
        if i > 0 and node.source:
            raise ValueError(f"behaviour {node.spec!r} replaces the policy (stale, file), so it must start the chain, "
                             f"not follow {'+'.join(n.spec for n in nodes)!r}")
        nodes.append(node)
    return nodes[0] if len(nodes) == 1 else StageNode("chain", {}, tuple(nodes))


# ------------------------------------------------------------------------------ losses
FILTER_MODES = ("false", "new_prompts", "same_prompt")


def _parse_filter(value) -> str:
    v = str(value).strip().lower()
    if v in ("false", "0", "no", "off", "none"):
        return "false"
    if v in ("true", "1", "yes", "on", "new_prompts", "dapo"):
        return "new_prompts"
    if v == "same_prompt":
        return "same_prompt"
    raise ValueError(f"must be false | true (= new_prompts) | new_prompts | same_prompt; got {value!r}")


def _parse_old(value) -> str:
    v = str(value).strip().lower()
    if v not in ("mu", "pi"):
        raise ValueError(f"must be mu (the behaviour's log-probs) or pi (the trainer's recomputed log pi); "
                         f"got {value!r}")
    return v


#: the options every loss has, after its own
LOSS_COMMON_OPTIONS: dict[str, Option] = {
    "filter_degenerate_groups": Option("false", "custom", "DAPO dynamic sampling: drop groups whose rewards are all "
                                       "equal (new_prompts: refill with new prompts; same_prompt: resample the group)",
                                       parser=_parse_filter, allowed="false | true | new_prompts | same_prompt"),
}
#: which log-prob is pi_old (the clipped losses and plug-ins)
OLD_OPTION = Option("mu", "custom", "which log-prob is pi_old: mu (as sampled) or pi (recomputed by the trainer)",
                    parser=_parse_old, allowed="mu | pi")
_LEVEL = Option("token", "choice", "ratio of the correction: per token, per sequence, or the geometric mean",
                choices=("token", "seq", "geo"))


def _clip_opts(eps_default: float) -> dict:
    return {"eps": Option(eps_default, "float", "clip range (both sides unless clip_low/clip_high)", low=0.0),
            "clip_low": Option(-1.0, "float", "lower clip 1 - clip_low (-1: eps)", low=-1.0),
            "clip_high": Option(-1.0, "float", "upper clip 1 + clip_high (-1: eps)", low=-1.0),
            "old": OLD_OPTION}


#: every catalog loss's own options (``LOSS_COMMON_OPTIONS`` follow them), in the catalog's order
LOSS_DECLS: dict[str, Decl] = {
    "pg": Decl((), {}, "no correction: -A log pi"),
    "is_token": Decl((), {}, "per-token importance ratio: -(pi/mu) A"),
    "is_seq": Decl((), {}, "sequence importance weight: -sg(prod_t pi/mu) A log pi"),
    "tis": Decl(("C",), {"C": Option(2.0, "float", "cap of the importance weight", low=0.0), "level": _LEVEL},
                "truncated IS: -sg(min(pi/mu, C)) A log pi"),
    "mis": Decl(("lo", "hi"), {"lo": Option(0.5, "float", "lowest ratio kept", low=0.0),
                               "hi": Option(2.0, "float", "highest ratio kept", low=0.0),
                               "level": _LEVEL,
                               "reweight": Option(True, "bool", "weight kept tokens by their ratio (IcePop) or by 1")},
                "masked IS: tokens with pi/mu outside [lo, hi] dropped"),
    "ppo_clip": Decl(("eps",), {**_clip_opts(0.2), "dual_clip": Option(0.0, "float", "dual-clip constant c > 1 for "
                                                                       "A < 0 (0: off)", low=0.0)},
                     "PPO clipped surrogate (clip-higher, dual clip), ratio pi/pi_old"),
    "gspo": Decl(("eps",), _clip_opts(4e-4), "GSPO: geometric-mean sequence ratio on every token, clipped"),
    "cispo": Decl(("eps",), {"eps": Option(0.2, "float", "upper clip 1 + eps of the IS weight", low=0.0),
                             "clip_low": Option(-1.0, "float", "lower clip 1 - clip_low of the IS weight (-1: none)",
                                                low=-1.0),
                             "old": OLD_OPTION},
                  "CISPO: -sg(clip(pi/pi_old)) A log pi"),
}


def loss_options(name: str) -> dict[str, Option]:
    """A catalog loss's options, its own then the common ones."""
    return {**LOSS_DECLS[name].options, **LOSS_COMMON_OPTIONS}


def check_loss_values(name: str, values: dict) -> None:
    """The checks across a catalog loss's parsed options (``ValueError``)."""
    if name == "mis" and values["lo"] > values["hi"]:
        raise ValueError(f"loss mis: lo must be <= hi; got lo={values['lo']:g}, hi={values['hi']:g}")
    if name == "ppo_clip":
        c = values["dual_clip"]
        if c != 0.0 and c <= 1.0:
            raise ValueError(f"loss ppo_clip: dual_clip must be > 1 (or 0 for off); got {c:g}")


def parse_loss(text: str) -> tuple[str, dict[str, str]]:
    """``(name, the given options unparsed)`` of a catalog loss spec ``NAME[:ARGS]``, every value and the
    cross-option rules checked; ``ValueError`` naming the bad part."""
    name, rest = split_head(text, "loss")
    if name not in LOSS_DECLS:
        raise ValueError(f"unknown loss {name!r}; the losses are {', '.join(LOSS_DECLS)} "
                         f"(or a plug-in FILE.py:FUNCTION)")
    where = f"loss {name}"
    d, options = LOSS_DECLS[name], loss_options(name)
    given = bind_args(where, split_top(rest, ",", where) if rest else [], d.positional, options, fill=False)
    values = {k: (opt.parse(where, k, given[k]) if k in given else opt.default) for k, opt in options.items()}
    check_loss_values(name, values)
    return name, given


def check_loss_spec(spec: str) -> None:
    """Refuse, without importing torch, what :func:`tpg.offpolicy.losses.get_loss` would refuse in a spec
    string: an unknown loss, option or value, a malformed option list, a plug-in file that does not exist."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a loss spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    m = PLUGIN_SPEC.match(text)
    if m:
        label = f"{m['path']}:{m['fn']}"
        parse_options(m["opts"] or "", label)
        if not os.path.isfile(m["path"]):
            raise ValueError(f"loss plug-in {label}: file not found: {m['path']!r} (relative to {os.getcwd()})")
        return
    parse_loss(text)


__all__ = ["Decl", "STAGE_DECLS", "STAGE_ALIASES", "PRECISION_NAMES", "StageNode", "parse_behaviour", "stage_spec",
           "mix_spec", "LOSS_DECLS", "LOSS_COMMON_OPTIONS", "OLD_OPTION", "FILTER_MODES", "loss_options",
           "check_loss_values", "parse_loss", "check_loss_spec"]
