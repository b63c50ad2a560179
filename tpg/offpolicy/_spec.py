"""Splitting the spec strings of behaviours and losses: ``NAME[:ARG,ARG,key=value,...]``.

Commas and ``+`` inside parentheses do not split, so a nested spec is written in parentheses:
``mix:0.5,(logit_noise:0.1,3),top_p:0.9``. A ``+`` splits a chain only where a name (a letter,
``_`` or ``(``) follows it, so numbers such as ``1e+3`` stay whole.
"""

from __future__ import annotations

import math
import re

from ..estimators.options import Option

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def split_top(text: str, sep: str, where: str) -> list[str]:
    """``text`` split at each ``sep`` outside parentheses (``+`` only before a name); ``ValueError`` on
    unbalanced parentheses."""
    parts, depth, cur = [], 0, []
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{where}: unbalanced ')' in {text!r}")
        if ch == sep and depth == 0:
            nxt = text[i + 1:i + 2]
            if sep != "+" or (nxt and (nxt.isalpha() or nxt in "_(")):
                parts.append("".join(cur))
                cur = []
                continue
        cur.append(ch)
    if depth != 0:
        raise ValueError(f"{where}: unbalanced '(' in {text!r}")
    parts.append("".join(cur))
    return parts


def unwrap(text: str) -> str:
    """``(x)`` -> ``x`` when the parentheses enclose the whole text (repeatedly), stripped."""
    text = text.strip()
    while text.startswith("(") and text.endswith(")"):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(text) - 1:
                return text
        text = text[1:-1].strip()
    return text


def split_head(text: str, kind: str) -> tuple[str, str]:
    """``NAME:REST`` -> ``(NAME, REST)`` (``REST`` may be empty); ``ValueError`` for a bad name."""
    text = unwrap(text)
    if not text:
        raise ValueError(f"an empty {kind} spec")
    name, _, rest = text.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        if "," in name and _NAME.match(name.split(",")[0].strip()):
            head, _, opts = name.partition(",")
            raise ValueError(f"{kind} spec {text!r}: arguments follow a colon, e.g. {head.strip()}:{opts.strip()}")
        raise ValueError(f"{kind} spec {text!r}: {name!r} is not a name")
    return name, rest.strip()


def bind_args(owner: str, args: list[str], positional: tuple[str, ...], options: dict[str, Option],
              fill: bool = True) -> dict:
    """Positional arguments then ``key=value`` pairs, bound to ``options`` and parsed (each with its
    allowed range in the error). Returns every option with the defaults filled in (``fill``), or only
    the given ones, unparsed (``fill=False``, for a constructor that parses them)."""
    given: dict[str, str] = {}
    seen_keyword = False
    pos = 0
    for raw in args:
        part = raw.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if eq and _NAME.match(key.strip()) and not part.startswith("("):
            key = key.strip()
            if key not in options:
                raise ValueError(f"{owner}: unknown option {key!r}; allowed: {', '.join(options) or 'none'}")
            if key in given:
                raise ValueError(f"{owner}: option {key!r} given twice")
            given[key] = value.strip()
            seen_keyword = True
            continue
        if seen_keyword:
            raise ValueError(f"{owner}: positional argument {part!r} after a key=value option")
        if pos >= len(positional):
            raise ValueError(f"{owner}: too many arguments ({part!r}); it takes "
                             f"{len(positional)} positional ({', '.join(positional) or 'none'})")
        key = positional[pos]
        pos += 1
        if key in given:
            raise ValueError(f"{owner}: option {key!r} given twice")
        given[key] = part
    if not fill:
        return given
    out = {}
    for key, opt in options.items():
        out[key] = opt.parse(owner, key, given[key]) if key in given else opt.default
    return out


def positive(default: float, help: str, high: float | None = None) -> Option:
    """A float option in ``(0, high]`` (an open lower bound, which :class:`Option` cannot say)."""
    allowed = f"a number in (0, {'inf)' if high is None else f'{high:g}]'}"

    def parse(v):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be {allowed}; got {v!r}") from None
        if not math.isfinite(x) or x <= 0 or (high is not None and x > high):
            raise ValueError(f"must be {allowed}; got {v!r}")
        return x

    return Option(default, "custom", help, parser=parse, allowed=allowed)


def fmt_value(v) -> str:
    """A value as it is written in a spec (floats shortest round-trip, bools lower-case)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return str(v)


def canonical(name: str, values: dict, positional: tuple[str, ...], options: dict[str, Option]) -> str:
    """``NAME:POS,...,key=value`` with the positional values always written and the keyword options
    only when they differ from their defaults."""
    parts = [fmt_value(values[k]) for k in positional]
    parts += [f"{k}={fmt_value(v)}" for k, v in values.items()
              if k not in positional and v != options[k].default]
    return name + (":" + ",".join(parts) if parts else "")
