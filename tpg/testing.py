"""Assertions for your own test suite: "my advantage function is unbiased on these cases".

    import tpg.testing

    def my_rloo(rewards, group_ids):               # the simple form; verl's form works too
        ...

    def test_my_rloo_is_unbiased():
        tpg.testing.assert_unbiased(my_rloo, group_size=3)                      # the default cases
        tpg.testing.assert_unbiased(my_rloo, cases=["dense:vocab=3,horizon=4,eos=0", "case.json"])
        tpg.testing.assert_scaled(my_grpo_without_std, scale=2 / 3)             # E[g] = (2/3) grad J
        tpg.testing.assert_biased(my_mean_including_self_with_std)              # a negative control

With pytest, the ``tpg_verifier`` fixture (:mod:`tpg.pytest_plugin`) does the same and writes its case
files under the test's ``tmp_path``.

**What is checked.** Each case is a problem ``(MDP, policy)``; the estimator (a Python callable in verl
form or simple form, an :class:`~tpg.estimators.Estimator`, a catalog spec such as
``"grpo:std_norm=false"`` or a plug-in ``FILE.py:FUNCTION``) is verified on it by :func:`tpg.verify`:

* ``mode="exact"`` (the default): ``E[g]`` over every batch of the sample space, against ``grad J``
  (or ``grad J[target]`` with a target reward), in float64. Verdicts are proofs by enumeration:
  :func:`assert_unbiased` passes when every case is ``unbiased`` (``E[g] = grad J`` to relative 1e-8),
  :func:`assert_scaled` when every case is ``unbiased`` or ``scaled`` (``E[g] = c grad J``, ``c > 0``;
  with ``scale=c`` also ``|scale - c| <= rel |c|``), :func:`assert_biased` when every case is ``biased``.
* ``mode="mc"``: ``samples`` sampled batches and the calibrated test of :mod:`tpg.verify.montecarlo`,
  for problems too large to enumerate. Passing :func:`assert_unbiased` then means ``consistent`` on
  every case: the test did not reject ``E[g] = grad J``, **which is not a proof** (a failure message
  and the returned records carry the power: the smallest bias the test would have detected). The
  significance level ``alpha`` is split over the cases (``alpha / cases`` each, Bonferroni), so that
  P(a correct estimator fails the assertion) ``<= alpha``; the seeds are fixed, so a result repeats.

**Cases** (``cases=``): an ``--mdp`` spec (``"dense:vocab=3,horizon=3"``, a seeded random tabular
policy), a ``--task`` spec (``"copy:vocab=4,length=2"``, a tiny transformer policy), the path of a
``tpg-case/1`` file, an ``(mdp, policy)`` pair, or a list of them; ``None`` gives
:data:`DEFAULT_CASES`.

**On failure** an ``AssertionError`` names, for every failing case, the verdict and the wanted one,
the cosine, scale, relative bias and residual (and in Monte Carlo mode the p-values and power), the
case, the ``tpg-case/1`` file written to reproduce it (in ``case_dir``: the test's ``tmp_path`` under
the fixture, else a new temporary directory), and the ``tpg verify`` command that reproduces the
verdict.
"""

from __future__ import annotations

import math
import os
import shlex
import tempfile
from pathlib import Path

from .estimators.defaults import DEFAULT_TIMEOUT
from .verify.defaults import DEFAULT_ALPHA, DEFAULT_SAMPLES

#: Problems checked when no ``cases`` are given: dense token rewards with EOS (the Zero-Reward
#: Assumption false), terminal rewards at a fixed length with two prompts, and a per-token cost (a
#: reward that depends on the length). At ``G = 3`` their sample spaces hold 3375, 1024 and 125
#: batches: exact mode calls a Python advantage function about 4500 times (about a second).
DEFAULT_CASES = (
    "dense:vocab=3,horizon=3,eos=0,seed=0",
    "terminal:vocab=2,horizon=3,prompts=2,seed=1",
    "length:vocab=2,horizon=4,eos=1,seed=2",
)
#: What each assertion accepts, per mode.
WANTED = {
    "unbiased": {"exact": ("unbiased",), "mc": ("consistent",)},
    "scaled": {"exact": ("unbiased", "scaled"), "mc": ("consistent", "consistent-scaled")},
    "biased": {"exact": ("biased",), "mc": ("biased",)},
}


class Verifier:
    """The assertions with shared settings (the pytest fixture's object; see the module docstring).

    Args:
        case_dir: where the case files of failing cases go (created on the first failure); ``None``: a
            new temporary directory.
        mode, samples, seed, alpha, group_size: the defaults of every assertion (see :func:`assert_unbiased`).
    """

    def __init__(self, case_dir: str | os.PathLike | None = None, mode: str = "exact", samples: int = DEFAULT_SAMPLES,
                 seed: int = 0, alpha: float = DEFAULT_ALPHA, group_size: int = 3):
        self.case_dir = None if case_dir is None else Path(case_dir)
        self.defaults = dict(mode=mode, samples=samples, seed=seed, alpha=alpha, group_size=group_size)

    def assert_unbiased(self, estimator, cases=None, **kwargs) -> list[dict]:
        """:func:`assert_unbiased` with this verifier's defaults and case directory."""
        __tracebackhide__ = True  # pytest shows the caller's line and the message
        return _assert("unbiased", estimator, cases, self._kwargs(kwargs))

    def assert_scaled(self, estimator, cases=None, scale: float | None = None, rel: float = 1e-6,
                      **kwargs) -> list[dict]:
        """:func:`assert_scaled` with this verifier's defaults and case directory."""
        __tracebackhide__ = True  # pytest shows the caller's line and the message
        return _assert("scaled", estimator, cases, self._kwargs(kwargs), scale=scale, rel=rel)

    def assert_biased(self, estimator, cases=None, **kwargs) -> list[dict]:
        """:func:`assert_biased` with this verifier's defaults and case directory."""
        __tracebackhide__ = True  # pytest shows the caller's line and the message
        return _assert("biased", estimator, cases, self._kwargs(kwargs))

    def _kwargs(self, kwargs: dict) -> dict:
        out = {**self.defaults, **kwargs}
        out.setdefault("case_dir", self.case_dir)
        return out


def assert_unbiased(estimator, cases=None, *, group_size: int = 3, mode: str = "exact", samples: int = DEFAULT_SAMPLES,
                    seed: int = 0, alpha: float = DEFAULT_ALPHA, target_reward=None, dtype="float64",
                    case_dir: str | os.PathLike | None = None, plugin_timeout: float | None = DEFAULT_TIMEOUT,
                    **options) -> list[dict]:
    """Assert that ``E[g] = grad J`` on every case; returns the records of :func:`tpg.verify` (one or two
    per case, with a ``case`` field).

    Args:
        estimator: a Python callable (verl form ``fn(token_level_rewards, response_mask, index)`` or simple
            form ``fn(rewards, group_ids)``), an Estimator, a catalog spec or ``FILE.py:FUNCTION``.
        cases: see the module docstring (default :data:`DEFAULT_CASES`).
        group_size: ``G``, the responses per prompt (a plug-in's group; see ``layout``).
        mode: ``exact`` (proofs by enumeration) or ``mc`` (a test: ``consistent`` is not a proof).
        samples, seed, alpha: the Monte Carlo batches, seed and family-wise level (split over the cases).
        target_reward: the objective, if not the MDP's own reward: ``length_penalty:alpha``, a callable,
            ... (:mod:`tpg.mdp.objectives`); the batches then carry it as their ``RM``.
        dtype: ``float64`` or ``float32`` (the tensors a callable or plug-in receives).
        case_dir: where failing cases' files go (default: a new temporary directory).
        plugin_timeout: seconds per call of a callable or plug-in (``None``: no limit).
        options: a callable's options (``layout="batch:2x3"``, ``agg=...``, ``critic=...``), as for
            :func:`tpg.estimators.plugin_from_callable`.

    Raises ``AssertionError`` with the readable report described in the module docstring, and
    ``ValueError`` for bad arguments (an unknown spec, a case that cannot be built)."""
    __tracebackhide__ = True
    return _assert("unbiased", estimator, cases, dict(group_size=group_size, mode=mode, samples=samples, seed=seed,
                                                      alpha=alpha, target_reward=target_reward, dtype=dtype,
                                                      case_dir=case_dir, plugin_timeout=plugin_timeout, **options))


def assert_scaled(estimator, cases=None, *, scale: float | None = None, rel: float = 1e-6, group_size: int = 3,
                  mode: str = "exact", samples: int = DEFAULT_SAMPLES, seed: int = 0, alpha: float = DEFAULT_ALPHA,
                  target_reward=None, dtype="float64", case_dir: str | os.PathLike | None = None,
                  plugin_timeout: float | None = DEFAULT_TIMEOUT, **options) -> list[dict]:
    """Assert that ``E[g] = c grad J`` with ``c > 0`` on every case (``c`` may differ between cases unless
    ``scale`` is given); ``unbiased`` (``c = 1``) passes too.

    ``scale=c``: also ``|scale - c| <= rel |c|`` on every case in exact mode, and ``c`` inside the
    record's scale interval (at its Holm level) in Monte Carlo mode. Other arguments as for
    :func:`assert_unbiased`."""
    __tracebackhide__ = True
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if not isinstance(rel, (int, float)) or not rel >= 0:
        raise ValueError(f"rel must be a number >= 0, got {rel!r}")
    return _assert("scaled", estimator, cases, dict(group_size=group_size, mode=mode, samples=samples, seed=seed,
                                                    alpha=alpha, target_reward=target_reward, dtype=dtype,
                                                    case_dir=case_dir, plugin_timeout=plugin_timeout, **options),
                   scale=scale, rel=rel)


def assert_biased(estimator, cases=None, *, group_size: int = 3, mode: str = "exact", samples: int = DEFAULT_SAMPLES,
                  seed: int = 0, alpha: float = DEFAULT_ALPHA, target_reward=None, dtype="float64",
                  case_dir: str | os.PathLike | None = None, plugin_timeout: float | None = DEFAULT_TIMEOUT,
                  **options) -> list[dict]:
    """Assert that the estimator is ``biased`` on every case: a negative control, showing that the cases
    and settings can catch the bias you care about (in Monte Carlo mode, that the test rejects at this
    ``samples``). Arguments as for :func:`assert_unbiased`."""
    __tracebackhide__ = True
    return _assert("biased", estimator, cases, dict(group_size=group_size, mode=mode, samples=samples, seed=seed,
                                                    alpha=alpha, target_reward=target_reward, dtype=dtype,
                                                    case_dir=case_dir, plugin_timeout=plugin_timeout, **options))


# ------------------------------------------------------------------------------ the work
def _assert(kind: str, estimator, cases, kw: dict, scale: float | None = None, rel: float = 1e-6) -> list[dict]:
    __tracebackhide__ = True
    from .verify.defaults import MODES

    mode = kw.pop("mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    setting = _Setting(estimator, kw, mode)
    problems = resolve_cases(cases)
    alpha_case = setting.alpha / len(problems)  # Bonferroni over the cases: P(any false alarm) <= alpha
    records, failures = [], []
    for index, (label, spec, mdp, policy) in enumerate(problems, 1):
        recs = setting.run(mdp, policy, alpha_case)
        for r in recs:
            r["case"] = label
            why = _failure(kind, mode, r, scale, rel)
            if why is not None:
                failures.append((index, label, spec, mdp, policy, r, why))
        records += recs
    if failures:
        raise AssertionError(_report(kind, setting, problems, failures, scale, rel))
    return records


class _Setting:
    """One assertion's estimator and settings, and the ``tpg verify`` flags that reproduce them."""

    def __init__(self, estimator, kw: dict, mode: str):
        import torch

        from .estimators.plugin import DEFAULT_TIMEOUT, plugin_from_callable
        from .verify.harness import _is_function

        self.mode = mode
        self.group_size = kw.pop("group_size")
        self.samples = kw.pop("samples")
        self.seed = kw.pop("seed")
        self.alpha = kw.pop("alpha")
        self.target_reward = kw.pop("target_reward", None)
        dtype = kw.pop("dtype", "float64")
        dtypes = {"float64": torch.float64, "float32": torch.float32, torch.float64: torch.float64,
                  torch.float32: torch.float32}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
        self.dtype = dtypes[dtype]
        case_dir = kw.pop("case_dir", None)
        self.case_dir = None if case_dir is None else Path(case_dir)
        self.plugin_timeout = kw.pop("plugin_timeout", DEFAULT_TIMEOUT)
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        options = kw
        if options and not _is_function(estimator):
            raise ValueError(f"options {sorted(options)} are for a Python callable; give a spec's options in the "
                             f"spec (e.g. 'grpo:std_norm=false') or build the estimator with them")
        self.estimator = estimator
        if _is_function(estimator):
            # built here once with its options, so that a bad option is a ValueError before any case runs
            self.estimator = plugin_from_callable(estimator, dtype=torch.float64, timeout=self.plugin_timeout,
                                                  **options)
            self.function, self.options = estimator, options
        else:
            self.function, self.options = None, {}
        self.name = self._name()

    def _name(self) -> str:
        from .estimators.plugin import callable_label

        if self.function is not None:
            return getattr(self.estimator, "spec", callable_label(self.function))
        if isinstance(self.estimator, str):
            return self.estimator
        return getattr(self.estimator, "spec", repr(self.estimator))

    def run(self, mdp, policy, alpha: float) -> list[dict]:
        from .verify.harness import verify

        est = self.estimator
        if self.function is not None and self.dtype != self.estimator.dtype:
            from .estimators.plugin import plugin_from_callable
            est = plugin_from_callable(self.function, dtype=self.dtype, timeout=self.plugin_timeout, **self.options)
        return verify(mdp, policy, [est], group_size=self.group_size, mode=self.mode, samples=self.samples,
                      seed=self.seed, dtype=self.dtype, alpha=alpha, on_error="record_all",
                      plugin_timeout=self.plugin_timeout, target_reward=self.target_reward)

    def estimator_flag(self) -> str | None:
        """``--estimator SPEC`` that loads the same estimator, or ``None`` (a lambda, a nested function)."""
        from .estimators.registry import is_plugin_spec

        est = self.estimator
        if isinstance(est, str):
            if is_plugin_spec(est):
                path, sep, rest = est.partition(".py:")
                return os.path.abspath(path + ".py") + ":" + rest
            return est
        source = getattr(est, "source", None)
        if source is not None or getattr(est, "fn", None) is not None:  # a plug-in or a callable
            if source is None:
                return None
            label, spec = est.name, est.spec
            opts = spec[len(label) + 1:] if spec.startswith(label + ":") else ""
            path, _, fn = source.rpartition(":")
            return f"{os.path.abspath(path)}:{fn}" + (f":{opts}" if opts else "")
        return getattr(est, "spec", None)

    def target_flag(self) -> str | None:
        """``--target-reward SPEC``, ``""`` when there is none, ``None`` when it cannot be written."""
        t = self.target_reward
        if t is None or t == "rm":
            return ""
        if isinstance(t, str):
            return t
        from .verify.harness import resolve_target_reward

        return resolve_target_reward(t).spec

    def command(self, case_flag: str, alpha: float | None = None) -> str | None:
        est = self.estimator_flag()
        target = self.target_flag()
        if est is None or target is None:
            return None
        parts = ["tpg", "verify", *shlex.split(case_flag), "--estimator", est, "--group-size", str(self.group_size)]
        if self.mode == "mc":
            parts += ["--mode", "mc", "--samples", str(self.samples), "--seed", str(self.seed)]
            if alpha is not None:
                parts += ["--alpha", format(alpha, ".6g")]
        elif self.seed != 0:
            parts += ["--seed", str(self.seed)]
        if str(self.dtype) == "torch.float32":
            parts += ["--dtype", "float32"]
        if target:
            parts += ["--target-reward", target]
        return " ".join(shlex.quote(p) for p in parts)


def resolve_cases(cases) -> list[tuple[str, str | None, object, object]]:
    """``[(label, spec or None, mdp, policy)]`` of ``cases`` (see the module docstring): a spec's label is
    the spec, a file's its path, a pair's its MDP's name."""
    from .mdp.mdp import TokenMDP

    if cases is None:
        cases = DEFAULT_CASES
    if isinstance(cases, (str, os.PathLike)) or (isinstance(cases, tuple) and len(cases) == 2
                                                 and isinstance(cases[0], TokenMDP)):
        cases = [cases]
    out = []
    for case in cases:
        out.append(_resolve_case(case))
    if not out:
        raise ValueError("no cases given")
    return out


def _resolve_case(case):
    from .cases import load_case, mdp_from_spec, problem_from_task_spec
    from .mdp.mdp import TokenMDP
    from .mdp.specs import FAMILIES, TASKS

    if isinstance(case, tuple) and len(case) == 2 and isinstance(case[0], TokenMDP):
        mdp, policy = case
        return mdp.name, None, mdp, policy
    if isinstance(case, os.PathLike) or (isinstance(case, str) and (case.endswith(".json") or os.path.isfile(case))):
        mdp, policy = load_case(case)
        return str(case), f"--case {os.path.abspath(case)}", mdp, policy
    if isinstance(case, str):
        head = case.partition(":")[0].strip()
        if head in FAMILIES:
            mdp, policy = mdp_from_spec(case)
            return case, f"--mdp {case}", mdp, policy
        if head in TASKS:
            mdp, policy = problem_from_task_spec(case)
            return case, f"--task {case}", mdp, policy
        raise ValueError(f"case {case!r}: not an --mdp spec ({', '.join(FAMILIES)}), a --task spec "
                         f"({', '.join(TASKS)}) or a case file (.json)")
    raise ValueError(f"a case is an --mdp or --task spec, a case file or an (mdp, policy) pair; got {case!r}")


def _failure(kind: str, mode: str, r: dict, scale: float | None, rel: float) -> str | None:
    """Why record ``r`` fails the assertion ``kind``, or ``None``."""
    wanted = WANTED[kind][mode]
    if r["verdict"] not in wanted:
        return f"{r['verdict']} (wanted {' or '.join(wanted)})"
    if kind == "scaled" and scale is not None:
        if mode == "exact" and not abs(r["scale"] - scale) <= rel * abs(scale):
            return f"{r['verdict']} with scale {r['scale']:.10g} (wanted {scale:.10g} within relative {rel:g})"
        ci = r.get("scale_ci")
        if mode == "mc" and ci is not None and not ci[0] <= scale <= ci[1]:
            return (f"{r['verdict']} with scale {r['scale']:.6g}, interval [{ci[0]:.6g}, {ci[1]:.6g}] at "
                    f"{100 * r['scale_ci_level']:.3g}% (wanted {scale:.6g} inside)")
    return None


def _fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _case_file(setting: _Setting, index: int, label: str, mdp, policy) -> tuple[str | None, str]:
    """The case file written for a failing case: ``(path or None, note)``."""
    from .cases import save_case

    if setting.case_dir is None:
        setting.case_dir = Path(tempfile.mkdtemp(prefix="tpg-cases-"))
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in label.split(":")[0].split("/")[-1])[:40]
    path = setting.case_dir / f"case-{index}-{stem or 'problem'}.json"
    try:
        setting.case_dir.mkdir(parents=True, exist_ok=True)
        save_case(path, mdp, policy)
    except (ValueError, OSError) as exc:
        return None, f"(no case file: {exc})"
    tabular = type(policy).__name__ == "TabularSoftmax"
    note = "" if tabular else (f" (the policy as a table of logits: the same distributions, but verdicts in logit "
                               f"space rather than {type(policy).__name__}'s parameters)")
    return str(path), note


def _report(kind: str, setting: _Setting, problems, failures, scale, rel) -> str:
    from .verify.harness import _power_line

    mode = setting.mode
    n = len(problems)
    what = {"unbiased": "unbiased", "scaled": "a positive multiple of the target" + (f" (scale {scale:g})" if scale
                                                                                      else ""),
            "biased": "biased"}[kind]
    failed_cases = len({f[0] for f in failures})
    how = ("exact mode: verdicts by enumerating every batch" if mode == "exact" else
           f"Monte Carlo mode: N = {setting.samples:,} batches, seed {setting.seed}, family-wise level "
           f"{setting.alpha:g} split over {n} case{'s' if n != 1 else ''}; consistent means not rejected, not proven")
    lines = [f"tpg: {setting.name} is not {what} on {failed_cases} of {n} case{'s' if n != 1 else ''} "
             f"(G = {setting.group_size}; {how})"]
    for index, label, spec, mdp, policy, r, why in failures:
        lines.append(f"  case {index} of {n}: {label}")
        lines.append(f"    verdict   {why}" + (f"  [dtype {r['dtype']}]" if r.get("dtype") != "float64" else ""))
        if r["verdict"] == "error":
            lines.append(f"    error     {r.get('error')}")
        else:
            cos = r.get("cosine")
            lines.append(f"    cosine    {_fmt(cos, '.10f')}   scale {_fmt(r.get('scale'), '.6g')}   rel_bias "
                         f"{_fmt(r.get('rel_bias'), '.3g')}   resid {_fmt(r.get('rel_residual'), '.3g')}")
            lines.append(f"    target    {r.get('target')}")
        if mode == "mc" and r["verdict"] != "error":
            ci = r.get("scale_ci")
            lines.append(f"    test      p(c=1) {_fmt(r.get('p_value_adjusted'), '.3g')} "
                         f"(raw {_fmt(r.get('p_value'), '.3g')})"
                         f"   p(dir) {_fmt(r.get('p_value_direction_adjusted'), '.3g')} (raw "
                         f"{_fmt(r.get('p_value_direction'), '.3g')})"
                         + (f"   scale interval [{ci[0]:.6g}, {ci[1]:.6g}] at {100 * r['scale_ci_level']:.3g}%"
                            if ci else ""))
            power = _power_line(r)
            if power and "could have missed" in power:
                lines.append(f"    power     {power[power.index('could have missed'):]}")
            elif r.get("mde_rel_bias") is not None:
                lines.append(f"    power     detects |b|/|target| >= {r['mde_rel_bias']:.3g} with "
                             f"{100 * r['power']:.0f}% power at this N")
        path, note = _case_file(setting, index, label, mdp, policy)
        lines.append(f"    case file {path}{note}" if path else f"    case file {note}")
        flags = []
        if path:
            flags.append(f"--case {path}")
        if spec is not None and not spec.startswith("--case"):
            flags.append(spec)
        commands = [c for c in (setting.command(f, r.get("alpha")) for f in flags) if c]
        if commands:
            lines.append(f"    reproduce {commands[0]}")
            lines += [f"           or {c}" for c in commands[1:]]
        else:
            lines.append("    reproduce (no command line: the estimator or target reward is not a top-level function "
                         "of a .py file; call tpg.verify(mdp, policy, fn) on the case file's problem, "
                         "tpg.load_case(PATH))")
    return "\n".join(lines)


__all__ = ["assert_unbiased", "assert_scaled", "assert_biased", "Verifier", "resolve_cases", "DEFAULT_CASES"]
