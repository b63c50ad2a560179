"""The standard suite: the whole catalog, in exact mode, on a fixed set of small MDPs.

Settings (columns) cover dense and terminal (ZRA) rewards, with and without EOS, one and three
prompts, ``gamma`` 1 and 0.9, group sizes 2 and 4 (and 3), tabular policies and one shared-parameter
policy. Entries (rows) are catalog specs, with the
verdict docs/THEORY.md (sections 3-5) predicts for each setting:

* unbiased: ``reinforce``, ``reward_to_go``, ``reinforce_baseline``, ``rloo``, ``remax``,
  ``ppo_gae`` with an exact critic (any ``lambda``) or ``lambda = 1`` (any critic), ``trepo`` with
  ``fill=segment`` (any anchors) or ``fill=ipw``, and each of them with ``kl=k1_reward`` (against
  ``grad J - beta grad KL``);
* scaled: ``grpo:std_norm=false`` and ``dr_grpo`` by ``1 - 1/G``; ``opo`` too when every response
  has the same length (no EOS); the length normalisations by ``1/H`` without EOS;
* biased: ``grpo`` (std), ``reinforce_pp``, ``reinforce_pp_baseline``, ``ppo_gae`` with an inexact
  critic and ``lambda < 1``, ``ppo_gae`` with ``gamma < 1`` on ZRA rewards, ``trepo`` with
  ``fill=interpolate`` (when ``H >= 3``, so that some token is interpolated), the length
  normalisations with EOS (variable lengths), ``opo`` with EOS, the KL loss terms ``k1``/``k2``/``k3``.

An off-policy section (docs/THEORY.md section 8) verifies estimators on batches sampled from a behaviour
``mu`` and formed by a policy loss, against ``grad J(pi)``; what theory predicts depends on the
behaviour's exact mismatch on the setting (:attr:`Facts.mismatch`):

* unbiased: ``is_seq`` (sequence-level IS) of REINFORCE or RLOO under logit noise, a temperature or
  staleness (full support); ``tis:C,level=seq`` with ``C`` above every sequence ratio (it is ``is_seq``
  there); ``is_token`` and ``ppo_clip`` at ``mu = pi``;
* scaled: ``is_seq`` of Dr. GRPO by ``1 - 1/G`` (its mean contains ``R_i / G``, as on-policy);
* biased: ``pg`` (no correction) under logit noise; ``pg`` and ``is_seq`` under top-p where top-p cuts
  ``pi`` mass on the states it visits (else unbiased: ``mu = pi`` there); ``tis:1,level=seq`` where some
  sequence ratio exceeds 1; GSPO under logit noise.

:func:`run_suite` returns the records (each with its ``setting``, ``expected`` and ``expected_scale``)
and the disagreements; :func:`format_suite` prints the verdict matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from .._progress import progress_bar, show_progress
from .._tables import legend_lines
from .harness import verify

from .defaults import SUITES  # noqa: E402  (torch-free home: tpg verify --help)


@dataclass(frozen=True)
class Setting:
    """One column of the suite: an MDP spec (``--mdp`` form, seeded random tabular policy) and ``G``."""

    name: str
    mdp: str
    group_size: int


SETTINGS: tuple[Setting, ...] = (
    Setting("dense/noeos/P1/g1/G2", "dense:vocab=3,horizon=3,prompts=1,gamma=1,seed=11", 2),
    Setting("term/eos/P1/g1/G2", "terminal:vocab=3,horizon=3,eos=0,prompts=1,gamma=1,seed=12", 2),
    Setting("dense/eos/P3/g.9/G2", "dense:vocab=3,horizon=3,eos=0,prompts=3,weights=random,gamma=0.9,seed=13", 2),
    Setting("term/noeos/P3/g.9/G2", "terminal:vocab=2,horizon=3,prompts=3,weights=random,gamma=0.9,seed=14", 2),
    Setting("dense/eos/P1/g.9/G4", "dense:vocab=3,horizon=2,eos=0,prompts=1,gamma=0.9,seed=15", 4),
    Setting("term/noeos/P1/g1/G4", "terminal:vocab=2,horizon=3,prompts=1,gamma=1,seed=16", 4),
    # a shared-parameter policy: verdicts are taken in parameter space, through the logit Jacobian
    Setting("shared/eos/P2/g1/G3", "dense:vocab=3,horizon=3,eos=0,prompts=2,gamma=1,seed=19,policy=shared", 3),
)


@dataclass(frozen=True)
class Facts:
    """What an expectation may depend on: EOS (variable lengths), the horizon, ``G``, ``gamma``, and
    for an off-policy entry its behaviour's exact mismatch report on the setting
    (:func:`tpg.offpolicy.mismatch_report`; empty on-policy)."""

    eos: bool
    horizon: int
    group_size: int
    gamma: float
    mismatch: dict = field(default_factory=dict, hash=False, compare=False)


Expect = Callable[[Facts], tuple[str, float | None]]


def _unbiased(f: Facts):
    return "unbiased", 1.0


def _biased(f: Facts):
    return "biased", None


def _mean_only(f: Facts):
    return "scaled", 1.0 - 1.0 / f.group_size


def _length_norm(factor: Callable[[Facts], float]) -> Expect:
    """Biased with variable lengths (EOS), else a constant scale."""
    return lambda f: ("biased", None) if f.eos else ("scaled", factor(f))


def _interpolated(f: Facts):
    return ("biased", None) if f.horizon >= 3 else ("unbiased", 1.0)


@dataclass(frozen=True)
class Entry:
    """One row of the suite: a spec and its expected verdict as a function of the setting; off-policy
    rows also name the behaviour ``mu`` their batches are sampled from and the policy loss."""

    spec: str
    expect: Expect
    why: str
    behaviour: str | None = None
    loss: str | None = None

    @property
    def label(self) -> str:
        """The row's name in the matrix: the spec, with ``| mu | loss`` for an off-policy row."""
        if self.behaviour is None and self.loss is None:
            return self.spec
        return f"{self.spec} | {self.behaviour or 'pi'} | {self.loss or 'pg'}"


def _cuts_pi(f: Facts):
    """Biased where the behaviour leaves out ``pi`` mass on the states it visits, else ``mu = pi`` there."""
    return ("biased", None) if f.mismatch.get("pi_mass_outside_seq", 0.0) > 0 else ("unbiased", 1.0)


def _cap_above(cap: float) -> Expect:
    """Sequence-level truncation at ``cap``: ``is_seq`` (unbiased) when no sequence ratio exceeds it."""
    return lambda f: ("unbiased", 1.0) if f.mismatch.get("max_seq_ratio", 0.0) <= cap else ("biased", None)


ENTRIES: tuple[Entry, ...] = (
    Entry("reinforce", _unbiased, "Theorem 1"),
    Entry("reward_to_go", _unbiased, "Lemma 1 (token oracle)"),
    Entry("reinforce_baseline", _unbiased, "Lemma 2, exact prompt value"),
    Entry("reinforce_baseline:baseline=running", _unbiased, "Lemma 2 (no state in exact mode)"),
    Entry("rloo", _unbiased, "leave-one-out baseline"),
    Entry("remax", _unbiased, "greedy baseline depends on x only"),
    Entry("grpo:std_norm=false", _mean_only, "mean contains R_i / G"),
    Entry("dr_grpo", _mean_only, "mean contains R_i / G"),
    Entry("grpo", _biased, "std depends on R_i"),
    Entry("opo", _length_norm(lambda f: 1.0 - 1.0 / f.group_size), "length-weighted mean contains R_i"),
    Entry("reinforce_pp", _biased, "batch whitening"),
    Entry("reinforce_pp_baseline", _biased, "batch whitening"),
    Entry("ppo_gae", _unbiased, "exact critic, lambda = 1"),
    Entry("ppo_gae:lambda=0.9", _unbiased, "exact critic, any lambda"),
    Entry("ppo_gae:lambda=0.5", _unbiased, "exact critic, any lambda"),
    Entry("ppo_gae:critic=zero", _unbiased, "lambda = 1, any critic"),
    Entry("ppo_gae:critic=noisy,sigma=0.5", _unbiased, "lambda = 1, any critic"),
    Entry("ppo_gae:critic=noisy,sigma=0.5,noise=fresh,lambda=0.9", _unbiased, "zero-mean noise, linear"),
    Entry("ppo_gae:critic=noisy,sigma=0.5,lambda=0.9", _biased, "inexact critic, lambda < 1"),
    Entry("ppo_gae:critic=zero,lambda=0.9", _biased, "inexact critic, lambda < 1"),
    Entry("ppo_gae:critic=tabular,lambda=0.9", _biased, "fitted critic, lambda < 1"),
    Entry("ppo_gae:gamma=0.9", _biased, "gamma < 1 on ZRA rewards (Eq. 26)"),
    Entry("trepo", _unbiased, "Theorem 2, every step"),
    Entry("trepo:anchors=every:2", _unbiased, "segments: martingale"),
    Entry("trepo:anchors=random:1", _unbiased, "segments: martingale"),
    Entry("trepo:anchors=segments:1", _unbiased, "segments at a delimiter: stopping time"),
    Entry("trepo:anchors=random:1,fill=ipw", _unbiased, "inverse-probability weighting"),
    Entry("trepo:anchors=every:2,fill=interpolate", _interpolated, "interpolated tokens lose their credit"),
    Entry("trepo:anchors=random:1,fill=interpolate", _interpolated, "interpolated tokens lose their credit"),
    Entry("reinforce:agg=seq-mean-token-mean", _length_norm(lambda f: 1.0 / f.horizon), "1/|o_i| length bias"),
    Entry("reinforce:agg=seq-mean-token-sum-norm", lambda f: ("scaled", 1.0 / f.horizon), "constant 1/H"),
    Entry("reinforce:agg=token-mean", _length_norm(lambda f: 1.0 / f.horizon), "random denominator"),
    Entry("grpo:std_norm=false,agg=seq-mean-token-mean",
          _length_norm(lambda f: (1.0 - 1.0 / f.group_size) / f.horizon), "1/|o_i| length bias"),
    Entry("reinforce:kl=k1_reward", _unbiased, "k1 in the reward: grad (J - beta KL)"),
    Entry("reward_to_go:kl=k1_reward", _unbiased, "k1 in the reward: grad (J - beta KL)"),
    Entry("rloo:kl=k1_reward", _unbiased, "k1 in the reward: grad (J - beta KL)"),
    Entry("ppo_gae:lambda=0.9,kl=k1_reward", _unbiased, "critic of the penalised return"),
    Entry("trepo:kl=k1_reward", _unbiased, "k1 in the reward: grad (J - beta KL)"),
    Entry("reinforce:kl=k1", _biased, "k1 loss: zero expected gradient"),
    Entry("reinforce:kl=k2", _biased, "k2 loss: per-state KL only"),
    Entry("reinforce:kl=k3", _biased, "k3 loss: per-state forward KL"),
    # off-policy (docs/THEORY.md section 8): batches from mu, the gradient through the loss, target grad J(pi)
    Entry("reinforce", _unbiased, "sequence IS, full support", "logit_noise:0.5,1", "is_seq"),
    Entry("rloo", _unbiased, "sequence IS, full support", "temperature:1.5", "is_seq"),
    Entry("reinforce", _unbiased, "sequence IS, full support", "stale:2,lr=0.5", "is_seq"),
    Entry("dr_grpo", _mean_only, "sequence IS of a mean containing R_i / G", "logit_noise:0.5,1", "is_seq"),
    Entry("reinforce", _cap_above(1e3), "truncation above every ratio is sequence IS", "logit_noise:0.5,1",
          "tis:1000,level=seq"),
    Entry("reinforce", _cap_above(1.0), "truncation at 1 binds where a ratio exceeds 1", "logit_noise:0.5,1",
          "tis:1,level=seq"),
    Entry("reinforce", _biased, "no correction off-policy", "logit_noise:0.5,1", "pg"),
    Entry("reinforce", _cuts_pi, "top-p never samples the cut mass", "top_p:0.8", "pg"),
    Entry("reinforce", _cuts_pi, "no weight restores the cut mass", "top_p:0.8", "is_seq"),
    Entry("reinforce", _biased, "geometric-mean ratio, clipped", "logit_noise:0.5,1", "gspo"),
    Entry("reinforce", _unbiased, "ratio 1 at mu = pi", "pi", "is_token"),
    Entry("grpo:std_norm=false", _mean_only, "ratio 1 at mu = pi: the on-policy scale", "pi", "ppo_clip:0.2"),
)

#: Scales must match the expectation to this relative tolerance.
SCALE_TOL = 1e-8


def _facts(mdp, group_size: int) -> Facts:
    return Facts(eos=mdp.eos_token is not None, horizon=mdp.horizon, group_size=group_size, gamma=mdp.gamma)


def agrees(rec: dict) -> bool:
    """Whether a suite record's verdict (and scale, when scaled) matches its expectation."""
    if rec["verdict"] != rec["expected"]:
        return False
    if rec["expected"] == "scaled":
        return abs(rec["scale"] - rec["expected_scale"]) <= SCALE_TOL * abs(rec["expected_scale"])
    return True


def run_suite(name: str = "standard", settings: tuple[Setting, ...] | None = None,
              entries: tuple[Entry, ...] | None = None, progress: bool | None = False) -> dict:
    """Run a suite in exact mode; ``{"suite", "settings", "records", "disagreements", "wall_s"}``.

    Every record carries ``setting``, ``expected``, ``expected_scale``, ``why`` and ``agrees``.
    ``settings`` and ``entries`` default to :data:`SETTINGS` and :data:`ENTRIES`. ``progress``: a bar on
    stderr (True, False, or None: only when stderr is a terminal)."""
    from ..cases import mdp_from_spec

    settings = SETTINGS if settings is None else settings
    entries = ENTRIES if entries is None else entries
    if name not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {name!r}")
    t0 = time.perf_counter()
    records: list[dict] = []
    bar = None
    if show_progress(progress):
        bar = progress_bar(True, total=len(settings) * len(entries), desc=f"suite {name}", unit="check",
                           leave=False)
    try:
        for setting in settings:
            mdp, policy = mdp_from_spec(setting.mdp)
            facts = _facts(mdp, setting.group_size)
            behaviours: dict = {}  # spec -> the behaviour resolved on this setting, shared by its entries
            for entry in entries:
                off, f = {}, facts
                if entry.behaviour is not None or entry.loss is not None:
                    spec = entry.behaviour or "pi"
                    if spec not in behaviours:
                        from ..offpolicy import resolve_behaviour

                        behaviours[spec] = resolve_behaviour(spec, mdp, policy)
                    off = {"behaviour": behaviours[spec], "loss": entry.loss}
                    # the prediction reads the behaviour's exact mismatch on this setting
                    f = replace(facts, mismatch=behaviours[spec].mismatch)
                rec = verify(mdp, policy, entry.spec, group_size=setting.group_size, mode="exact",
                             on_error="record", **off)[0]
                verdict, scale = entry.expect(f)
                rec.update({"setting": setting.name, "entry": entry.label, "expected": verdict,
                            "expected_scale": scale, "why": entry.why})
                rec["agrees"] = rec["verdict"] != "error" and agrees(rec)
                records.append(rec)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    return {"suite": name, "settings": [s.__dict__ for s in settings], "records": records,
            "disagreements": [r for r in records if not r["agrees"]], "wall_s": wall}


def _cell(rec: dict) -> str:
    v = rec["verdict"]
    if v == "unbiased":
        text = "unbiased"
    elif v == "scaled":
        text = f"scaled {rec['scale']:.4g}"
    elif v == "biased":
        cos = rec.get("cosine")
        if cos is None:
            text = "biased"
        elif 1.0 - cos < 5e-5:  # a direction error too small for 4 decimals
            text = f"biased 1-{1.0 - cos:.0e}"
        else:
            text = f"biased {cos:.4f}"
    else:
        text = v
    return text + ("" if rec.get("agrees", True) else " !")


def format_suite(result: dict) -> str:
    """The verdict matrix (estimators by settings), a legend, the disagreements and the wall time."""
    settings = [s["name"] for s in result["settings"]]
    def row_key(r):
        return r.get("entry") or (r["spec"] if r["verdict"] != "error" else r["estimator"])

    by_key = {(row_key(r), r["setting"]): r for r in result["records"]}
    specs: list[str] = []
    for r in result["records"]:
        key = row_key(r)
        if key not in specs:
            specs.append(key)
    header = ["estimator"] + settings
    rows = [[spec] + [_cell(by_key[(spec, s)]) if (spec, s) in by_key else "-" for s in settings] for spec in specs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    columns = {"estimator": "the estimator spec; an off-policy row reads SPEC | BEHAVIOUR | LOSS (tpg verify "
                            "--behaviour --loss)"}
    columns.update((s["name"], f"the setting --mdp {s['mdp']} with --group-size {s['group_size']}")
                   for s in result["settings"])
    lines += legend_lines(columns)
    lines.append("cells: the verdict in exact mode (proofs by enumeration); 'unbiased': E[g] = target; 'scaled c': "
                 "E[g] = c target, c given; 'biased x': x is cos(E[g], target); '!' marks a disagreement with "
                 "docs/THEORY.md's expectation; the target is grad J, or grad J - beta grad KL with a KL option")
    bad = result["disagreements"]
    n = len(result["records"])
    lines.append(f"{n - len(bad)} of {n} verdicts as expected; wall time {result['wall_s']:.1f} s")
    for r in bad:
        got = r["verdict"] if r["verdict"] != "scaled" else f"scaled {r['scale']:.6g}"
        exp = r["expected"] if r["expected"] != "scaled" else f"scaled {r['expected_scale']:.6g}"
        lines.append(f"  ! {r.get('entry') or r['spec']} on {r['setting']}: got {got}, expected {exp} ({r['why']})"
                     + (f": {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)
