"""Users' own advantage functions as estimators, and a probe of any estimator on edge cases.

``load_plugin("path/to/file.py:function")`` wraps a function in one of two forms, told apart by
its signature:

* **verl form** — ``fn(token_level_rewards[B, L], response_mask[B, L], index) -> (advantages[B, L],
  returns[B, L])``, the signature of verl's ``compute_*_outcome_advantage``: torch tensors in
  (rewards with ``RM`` on the last token, the mask as 0/1 of the same dtype), ``index`` a numpy
  array of group ids; the first element of a returned tuple (or a bare tensor/array) is used.
  Chosen when the function has parameters named ``token_level_rewards`` and ``response_mask``
  (then called by keyword, ``index=`` passed if it accepts it; verl's extra parameters keep
  their defaults), or else exactly three required positional parameters.
* **simple form** — ``fn(rewards[B], group_ids[B]) -> advantages[B]`` (torch tensors, group ids
  long), broadcast over each response's tokens. Chosen for exactly two required positional
  parameters.

A plug-in is called once per batch id (its statistics stay within a batch, as a trainer's
would), with group ids numbered ``0 .. n-1`` within that batch. Its output goes through the
same options as a built-in (``agg``, ``kl``, ``beta``: with ``kl=k1_reward`` the rewards it
receives carry the penalty) and padded positions are zeroed afterwards (``info`` records
whether the raw output had non-zero padding). ``dtype`` (float64 by default) is the dtype of
the tensors it receives; results are cast back to float64. Being opaque, a plug-in is assumed
to couple its group and its batch (``needs_groups`` and ``batch_coupled`` are True).

Errors — file or function not found, an import error, an unrecognised signature, an exception
inside the function, a wrong shape, a NaN or infinity — raise ``ValueError`` naming the plug-in
(``file:function``) and the offending shape or value.

:func:`probe` runs a plug-in or any estimator spec on edge cases (identical rewards, a singleton
group, all-zero rewards, ragged lengths, reward scales 1e6 and 1e-6, float32 against float64)
and :func:`format_probe` prints what it found.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import re
import sys

import numpy as np
import torch

from .base import ResponseBatch
from .estimator import Estimator
from .functional import dense_ids

_SPEC = re.compile(r"^(?P<path>.+?\.py):(?P<fn>[A-Za-z_]\w*)(?::(?P<opts>.*))?$")
FORMS = ("verl", "simple")


class PluginEstimator(Estimator):
    """A user's advantage function (see :mod:`tpg.estimators.plugin`)."""

    needs_groups = True
    batch_coupled = True

    def __init__(self, fn, label: str, form: str, dtype: torch.dtype = torch.float64, keywords: bool = False,
                 accepts_index: bool = True, **options):
        if form not in FORMS:
            raise ValueError(f"plug-in form must be one of {', '.join(FORMS)}, got {form!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"plug-in {label}: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.name = label
        self.fn = fn
        self.form = form
        self.dtype = dtype
        self._keywords = keywords
        self._accepts_index = accepts_index
        super().__init__(**options)

    def describe_plugin(self) -> str:
        doc = inspect.getdoc(self.fn) or "(no docstring)"
        return f"plug-in {self.name} ({self.form} form, {str(self.dtype).replace('torch.', '')})\n\n{doc}"

    def compute(self, batch, ctx, penalty_bt):
        B, H = batch.mask.shape
        out_dt = batch.rm.dtype
        adv = torch.zeros(B, H, dtype=out_dt)
        ids, nb = dense_ids(batch.batch)
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=nb).tolist()
        raw_pad = 0.0
        start = 0
        for n in counts:
            rows = order[start:start + n]
            start += n
            sub = batch.index(rows)
            pen = None if penalty_bt is None else penalty_bt[rows]
            gids, _ = dense_ids(sub.group)
            m = sub.mask.to(self.dtype)
            if self.form == "verl":
                tlr = self.token_rewards(sub, pen).to(self.dtype)
                a = self._call_verl(tlr, m, gids.numpy().astype(np.int64), (n, H))
            else:
                rewards = self.outcome_rewards(sub, pen).to(self.dtype)
                a = self._check(self._invoke(rewards, gids.clone()), (n,))
                a = a.unsqueeze(1) * m
            if n:
                raw_pad = max(raw_pad, float(a.abs().masked_fill(sub.mask, 0).max()))
            adv[rows] = a.to(out_dt)
        return adv, 0, {"raw_padding_max_abs": raw_pad, "form": self.form}

    def _call_verl(self, tlr, m, index, shape):
        if self._keywords:
            kw = {"token_level_rewards": tlr, "response_mask": m}
            if self._accepts_index:
                kw["index"] = index
            out = self._invoke(**kw)
        else:
            out = self._invoke(tlr, m, index)
        if isinstance(out, (tuple, list)):
            if not out:
                raise ValueError(f"plug-in {self.name} returned an empty {type(out).__name__}")
            out = out[0]
        return self._check(out, shape)

    def _invoke(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # the user's code: report any failure as the plug-in's
            raise ValueError(f"plug-in {self.name} raised {type(e).__name__}: {e}") from e

    def _check(self, out, shape) -> torch.Tensor:
        if not isinstance(out, (torch.Tensor, np.ndarray)):
            raise ValueError(f"plug-in {self.name} returned {type(out).__name__}, expected a tensor of shape "
                             f"{list(shape)}")
        a = torch.as_tensor(out)
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"plug-in {self.name} returned advantages of shape {list(a.shape)}, expected "
                             f"{list(shape)}")
        if not (a.is_floating_point() or a.dtype in (torch.int32, torch.int64, torch.bool)):
            raise ValueError(f"plug-in {self.name} returned dtype {a.dtype}, expected floating point")
        a = a.to(torch.float64)
        bad = ~torch.isfinite(a)
        if bool(bad.any()):
            where = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"plug-in {self.name} returned a non-finite value {float(a[where])} at index "
                             f"{list(where)} (of {int(bad.sum())} non-finite)")
        return a


def _signature_form(fn, label: str) -> tuple[str, bool, bool]:
    """``(form, call by keyword, accepts index)`` from the function's signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ValueError(f"plug-in {label}: cannot read its signature ({e})") from None
    params = sig.parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "token_level_rewards" in params and "response_mask" in params:
        return "verl", True, "index" in params or has_var_kw
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params.values() if p.kind in positional and p.default is inspect.Parameter.empty]
    if len(required) == 3:
        return "verl", False, True
    if len(required) == 2:
        return "simple", False, False
    raise ValueError(f"plug-in {label}: cannot tell its form from its signature {sig}: it needs 3 required "
                     f"positional parameters (verl form: token_level_rewards, response_mask, index) or 2 "
                     f"(simple form: rewards, group_ids); it has {len(required)} ({', '.join(required) or 'none'})")


def load_plugin(spec: str, dtype: torch.dtype = torch.float64) -> PluginEstimator:
    """The estimator of a plug-in ``FILE.py:FUNCTION`` (optionally ``:key=value,...`` with the common
    options ``agg``, ``kl``, ``beta``). See the module docstring for the two forms."""
    from .registry import parse_options

    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"a plug-in spec is FILE.py:FUNCTION[:key=value,...], got {spec!r}")
    path, fn_name = match["path"], match["fn"]
    label = f"{path}:{fn_name}"
    options = parse_options(match["opts"] or "", label)
    if not os.path.isfile(path):
        raise ValueError(f"plug-in {label}: file not found: {path!r} (relative to {os.getcwd()})")
    module_name = "tpg_plugin_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ValueError(f"plug-in {label}: cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's module: report any failure as the plug-in's
        sys.modules.pop(module_name, None)
        raise ValueError(f"plug-in {label}: importing {path!r} raised {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        found = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module_name)
        what = "not found" if fn is None else "not callable"
        raise ValueError(f"plug-in {label}: function {fn_name!r} {what} in {path!r}; it defines "
                         f"{', '.join(found) or 'no public functions'}")
    form, keywords, accepts_index = _signature_form(fn, label)
    return PluginEstimator(fn, label, form, dtype=dtype, keywords=keywords, accepts_index=accepts_index, **options)


# -- the probe ----------------------------------------------------------------------------------

class _ProbeContext:
    """A deterministic context: every value hook returns the case's mean reward."""

    exact = False

    def __init__(self, value: float, dtype: torch.dtype):
        self.value = value
        self.dtype = dtype
        self.tokens_sampled = 0
        self._gen = torch.Generator().manual_seed(0)

    def greedy_rm(self, prompt_b):
        return torch.full((prompt_b.numel(),), self.value, dtype=self.dtype)

    def prompt_values(self, prompt_b):
        return torch.full((prompt_b.numel(),), self.value, dtype=self.dtype)

    def continuation_values(self, prompt_b, prefix_bt, prefix_len_b, num_continuations):
        return torch.full((prompt_b.numel(),), self.value, dtype=self.dtype)

    def critic_values(self, batch, kind, gamma, options):
        return torch.full((batch.batch_size, batch.horizon + 1), self.value, dtype=self.dtype)

    def random_generator(self):
        return self._gen


def _case_batch(rewards, groups, lengths, horizon: int = 4, dtype=torch.float64) -> ResponseBatch:
    B = len(rewards)
    length = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(horizon).unsqueeze(0) < length.unsqueeze(1)
    rm = torch.tensor(rewards, dtype=dtype)
    tokens = torch.where(mask, torch.ones(B, horizon, dtype=torch.long), torch.zeros(B, horizon, dtype=torch.long))
    logp = torch.where(mask, torch.full((B, horizon), math.log(0.5), dtype=dtype), torch.zeros((), dtype=dtype))
    ref = torch.where(mask, logp - 0.05 * torch.arange(1, horizon + 1, dtype=dtype), torch.zeros((), dtype=dtype))
    tlr = torch.zeros(B, horizon, dtype=dtype)
    tlr[torch.arange(B), length - 1] = rm
    group = torch.tensor(groups, dtype=torch.long)
    return ResponseBatch(prompt=group.clone(), group=group, batch=torch.zeros(B, dtype=torch.long), tokens=tokens,
                         mask=mask, logp=logp, token_level_rewards=tlr, rm=rm, length=length, ref_logp=ref,
                         gamma=1.0, vocab_size=3, horizon=horizon,
                         token_rewards=tlr.clone())


_BASE = dict(rewards=[1.0, 0.0, 0.5, 2.0], groups=[0, 0, 0, 0], lengths=[4, 3, 4, 2])
_CASES = [
    ("identical", "a group of 4 with identical rewards (1.0)",
     dict(rewards=[1.0, 1.0, 1.0, 1.0], groups=[0, 0, 0, 0], lengths=[4, 3, 4, 2])),
    ("singleton", "two groups of one response each",
     dict(rewards=[1.0, 0.5], groups=[0, 1], lengths=[3, 4])),
    ("all_zero", "a group of 4 with all rewards 0",
     dict(rewards=[0.0, 0.0, 0.0, 0.0], groups=[0, 0, 0, 0], lengths=[4, 3, 4, 2])),
    ("padding", "very different lengths (1..4) in one group: are padded positions zero?",
     dict(rewards=[1.0, 0.0, 0.5, 2.0], groups=[0, 0, 0, 0], lengths=[1, 4, 2, 3])),
]


def _run(est: Estimator, case: dict, scale: float = 1.0, dtype=torch.float64):
    rewards = [r * scale for r in case["rewards"]]
    batch = _case_batch(rewards, case["groups"], case["lengths"], dtype=dtype)
    value = sum(rewards) / len(rewards)
    out = est(batch, _ProbeContext(value, dtype))
    pad = out.info.get("raw_padding_max_abs", float(out.advantages.abs().masked_fill(batch.mask, 0).max()))
    return out.advantages.to(torch.float64), pad, batch


def _row(case: str, description: str, spec_case: dict) -> dict:
    return {"case": case, "description": description, "rewards": list(spec_case["rewards"]),
            "groups": list(spec_case["groups"]), "lengths": list(spec_case["lengths"]), "advantages": None,
            "max_abs": None, "padding_zero": None, "value": None, "flag": ""}


def probe(spec, dtype: torch.dtype = torch.float64) -> list[dict]:
    """Run an estimator (a spec string, a plug-in ``FILE.py:FUNCTION``, or an Estimator) on edge
    cases and record what it returns; one dict per case with ``case``, ``description``,
    ``rewards``, ``groups``, ``lengths``, ``advantages`` (each response's first-token advantage),
    ``max_abs``, ``padding_zero``, ``value`` (the case's measurement) and ``flag`` (empty when
    nothing looks wrong). Float32 plug-ins are loaded again in float32 for the comparison."""
    from .registry import get_estimator, is_plugin_spec

    def make(dt):
        if isinstance(spec, Estimator):
            return spec
        return get_estimator(spec, dtype=dt) if is_plugin_spec(spec) else get_estimator(spec)

    est = make(dtype)
    rows = []

    def attempt(row, fn):
        try:
            fn(row)
        except ValueError as e:
            row["flag"] = f"error: {e}"
        rows.append(row)

    for name, description, case in _CASES:
        def run_case(row, case=case, name=name):
            adv, pad, _ = _run(est, case, dtype=dtype)
            row["advantages"] = [round(float(a), 6) for a in adv[:, 0]]
            row["max_abs"] = float(adv.abs().max())
            row["padding_zero"] = pad == 0
            top = max(1.0, max(abs(r) for r in case["rewards"]))
            if name == "identical" and row["max_abs"] > 1e-9 * top:
                row["flag"] = "non-zero advantage for identical rewards"
            elif name == "all_zero" and row["max_abs"] > 1e-12:
                row["flag"] = "non-zero advantage for all-zero rewards"
            elif pad != 0:
                row["flag"] = f"non-zero values on padded positions (max {pad:.3g})"

        attempt(_row(name, description, case), run_case)

    for scale in (1e6, 1e-6):
        def run_scale(row, scale=scale):
            base, _, _ = _run(est, _BASE, dtype=dtype)
            adv, pad, _ = _run(est, _BASE, scale=scale, dtype=dtype)
            row["advantages"] = [float(f"{float(a):.6g}") for a in adv[:, 0]]
            row["max_abs"] = float(adv.abs().max())
            row["padding_zero"] = pad == 0
            b = float(base.abs().max())
            ratio = row["max_abs"] / b if b > 0 else float("nan")
            row["value"] = ratio
            if b > 0 and not (math.isclose(ratio, 1.0, rel_tol=1e-3) or math.isclose(ratio, scale, rel_tol=1e-3)):
                row["flag"] = (f"max|A| scales by {ratio:.4g} for rewards x{scale:g}: neither scale-invariant "
                               f"nor linear (an epsilon floor?)")

        attempt(_row(f"scale_{scale:g}", f"the base group with rewards x{scale:g} (value: max|A| ratio to x1)",
                     {**_BASE, "rewards": [r * scale for r in _BASE["rewards"]]}), run_scale)

    def run_dtype(row):
        est64 = make(torch.float64)
        est32 = make(torch.float32)
        a64, _, _ = _run(est64, _BASE, dtype=torch.float64)
        a32, _, _ = _run(est32, _BASE, dtype=torch.float32)
        diff = float((a64 - a32).abs().max())
        row["advantages"] = [round(float(a), 6) for a in a32[:, 0]]
        row["max_abs"] = float(a32.abs().max())
        row["value"] = diff
        if diff > 1e-4 * max(1.0, float(a64.abs().max())):
            row["flag"] = f"float32 differs from float64 by {diff:.3g}"

    attempt(_row("float32_vs_float64", "the base group in float32 and float64 (value: max abs difference)", _BASE),
            run_dtype)
    return rows


def format_probe(rows: list[dict]) -> str:
    """A plain-text table of :func:`probe`'s rows."""
    header = ("case", "rewards", "lengths", "advantages (first token)", "value", "flag")
    table = []
    for r in rows:
        adv = "-" if r["advantages"] is None else ", ".join(f"{a:.4g}" for a in r["advantages"])
        val = "" if r["value"] is None else f"{r['value']:.4g}"
        table.append((r["case"], ", ".join(f"{x:g}" for x in r["rewards"]), ", ".join(str(x) for x in r["lengths"]),
                      adv, val, r["flag"] or "ok"))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    lines = [header, tuple("-" * w for w in widths)] + table
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


__all__ = ["PluginEstimator", "load_plugin", "probe", "format_probe"]
