"""The training configuration: one dataclass, one help line per field, parsed for the CLI.

``TrainConfig`` is the single source of the ``tpg train`` options: :func:`add_config_args`
turns every field into a ``--kebab-case`` flag carrying the field's help line, and
:func:`config_from_args` reads them back. Derived fields (``lr`` when left unset) are filled at
run time by :meth:`TrainConfig.resolved`. Bad values raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .._guards import check_seed

#: the training methods of the catalog, in the order tables and plots list them
TRAIN_ALGOS = ("reinforce", "rloo", "remax", "grpo", "dr_grpo", "reinforce_pp", "ppo", "trepo")
REWARD_MODES = ("dense", "terminal")
KL_CHOICES = ("none", "k1_reward", "k1", "k2", "k3", "low_var_kl")
CRITIC_MODELS = ("auto", "table", "transformer")
LOG_SUFFIXES = (".parquet", ".pq", ".csv")

#: default Adam step sizes when ``lr`` is unset: free logits take large steps, a network small ones
DEFAULT_LR = {"tabular": 0.1, "transformer": 3e-3}


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """A training run. Every field has a help line; ``tpg train --help`` prints them."""

    estimator: str = _f("grpo", "the estimator to train with: a method " + " | ".join(TRAIN_ALGOS) + ", any "
                        "estimator spec NAME[:key=value,...] of the catalog (e.g. trepo:K=8,anchors=every:2; the "
                        "specs of tpg verify --estimator) or a plug-in FILE.py:FUNCTION; agg defaults to the "
                        "method's customary mode; the KL is set by --kl and --kl-beta (kl=, kl_beta= in the spec)",
                        metavar="SPEC", action="append")
    task: str | None = _f(None, "a transformer task TASK[:key=value,...] (see tpg.mdp.tasks; the policy is a "
                          "TinyTransformerPolicy)", group="problem", metavar="SPEC")
    mdp: str | None = _f(None, "a tabular MDP FAMILY:key=value,... with its seeded policy (the specs of tpg exact)",
                         group="problem", metavar="SPEC")
    case: str | None = _f(None, "a tpg-case/1 JSON file (MDP and tabular policy)", group="problem",
                          metavar="FILE")
    reward: str = _f("dense", "dense: the task's token rewards; terminal: the zero-reward twin (same RM, "
                     "all on the last token, so the same J)", choices=REWARD_MODES)
    iters: int = _f(50, "training iterations (one sampled batch each)")
    prompts: int = _f(8, "prompts drawn per iteration")
    group_size: int = _f(4, "responses sampled per prompt (a group)")
    epochs: int = _f(2, "passes over each sampled batch")
    minibatches: int = _f(2, "minibatches per pass (one optimiser step each)")
    clip_eps: float = _f(0.2, "PPO ratio clip epsilon (ratio clipped to [1 - eps, 1 + eps])")
    lr: float | None = _f(None, "Adam step size (default: 0.1 for tabular policies, 3e-3 for transformers)")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    max_grad_norm: float = _f(1.0, "clip the policy gradient's global norm to this (0 = no clipping)")
    kl: str = _f("none", "KL to the frozen reference (a copy of the initial policy): none, k1_reward "
                 "(in the reward) or k1 | k2 | k3 (low_var_kl) as a loss term; an estimator spec's kl= option",
                 choices=KL_CHOICES)
    kl_beta: float = _f(0.05, "KL coefficient beta; an estimator spec's kl_beta= option", metavar="BETA")
    critic_model: str = _f("auto", "ppo's learned critic: table (one value per tree state), transformer (the "
                           "policy's architecture with a value head), auto (transformer for --task, else table)",
                           choices=CRITIC_MODELS)
    critic_lr: float | None = _f(None, "critic step size (default: 0.5 for a table, whose update is "
                                 "V += lr * mean error; 3e-3 Adam for a transformer critic)")
    behaviour: str | None = _f(None, "sample each iteration's responses from this behaviour policy mu of the current "
                               "policy instead of the policy itself: a spec of tpg offpolicy-help (temperature:T, "
                               "top_p:p, logit_noise:sigma,seed, precision:bf16, mix:..., file:PATH, chained with +); "
                               "stale:k is the policy of k iterations earlier (a checkpointed snapshot queue); "
                               "default: the policy (on-policy)", metavar="SPEC")
    loss: str | None = _f(None, "form each minibatch's loss with this policy loss of the catalog instead of the "
                          "built-in PPO clip (which is ppo_clip:CLIP_EPS with pi_old = the sampler): pg, is_token, "
                          "is_seq, tis:C, mis:lo,hi, ppo_clip:eps[,...], gspo[:eps], cispo:eps, or a plug-in "
                          "FILE.py:FUNCTION (tpg offpolicy-help); --clip-eps then does not apply; with "
                          "filter_degenerate_groups=true|same_prompt, DAPO's dynamic sampling", metavar="SPEC")
    resample_rounds: int = _f(10, "dynamic sampling (a --loss with filter_degenerate_groups): sampling rounds after "
                              "the first to replace dropped all-equal-reward groups (0: none; like verl's "
                              "max_num_gen_batches - 1, but where verl stops with an error the update uses the "
                              "groups kept, logged as groups_kept; none kept: no update)", metavar="N")
    threads: int = _f(1, "torch intra-op CPU threads of this process during the run (tiny models run fastest, "
                      "and reproducibly, on one; results may differ bitwise between thread counts)", metavar="N")
    seed: int = _f(0, "training seed in [0, 2^32 - 1]: sampling, continuations, minibatch order (the problem's "
                   "own seeds are in its spec)", metavar="S")
    out: str | None = _f(None, "write the log here: .parquet (.pq) or .csv (rewritten atomically at every "
                         "checkpoint, so it always matches the checkpoint)", metavar="FILE")
    checkpoint: str | None = _f(None, "checkpoint file (default OUT.ckpt when --out is given; none without either)",
                                  metavar="FILE")
    checkpoint_every: int = _f(10, "checkpoint every N iterations (0: not by count); also at the start, at the "
                                   "end and on SIGINT/SIGTERM", metavar="N")
    checkpoint_seconds: float = _f(30.0, "also checkpoint when this many seconds have passed since the last "
                                         "checkpoint (0: not by time)", metavar="SECONDS")
    resume: bool = _f(False, "continue from the checkpoint (its log, policy, optimiser, critic and RNG states)")
    force: bool = _f(False, "start afresh even when the log or the checkpoint exists, overwriting them "
                            "(without --resume or --force an existing one stops the run)")
    progress: bool | None = _f(None, "a progress bar on stderr (--no-progress: none; default: only when stderr "
                               "is a terminal)")
    measure_memory: bool = _f(True, "measure each step's peak tensor memory (a dispatch-mode allocation count)")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """``ValueError`` naming the first bad field."""
        def bad(name, msg):
            raise ValueError(f"TrainConfig.{name}: {msg}")

        for name in ("iters", "prompts", "group_size", "epochs", "minibatches", "checkpoint_every", "seed",
                     "threads", "resample_rounds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(name, f"must be an integer, got {v!r}")
        for name, low in (("prompts", 1), ("group_size", 1), ("epochs", 1), ("minibatches", 1), ("threads", 1)):
            if getattr(self, name) < low:
                bad(name, f"must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.resample_rounds <= 1000:
            bad("resample_rounds", f"must be in [0, 1000], got {self.resample_rounds}")
        for name in ("iters", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        check_seed(self.seed, "TrainConfig.seed")
        from ..rollouts import check_batches_fit  # here, not at the top: `tpg train --help` needs no torch

        # O(1) before anything is built: even one position per response must fit (the run checks the
        # problem's horizon once it is loaded)
        check_batches_fit(None, self.group_size, self.prompts, group_flag="TrainConfig.group_size",
                          groups_flag="TrainConfig.prompts")
        if self.minibatches > self.prompts * self.group_size:
            bad("minibatches", f"{self.minibatches} exceeds the batch of prompts * group_size = "
                               f"{self.prompts * self.group_size} responses")
        v = self.checkpoint_seconds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            bad("checkpoint_seconds", f"must be a finite number >= 0, got {v!r}")
        if self.resume and self.force:
            bad("force", "--resume continues the checkpointed run and --force starts afresh over it: give one")
        for name in ("clip_eps", "lr", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "kl_beta",
                     "critic_lr"):
            v = getattr(self, name)
            if v is None and name in ("lr", "critic_lr"):
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                bad(name, f"must be a finite number >= 0, got {v!r}")
            if name.startswith("adam_beta") and v >= 1:
                bad(name, f"must be in [0, 1), got {v!r}")
        for name in ("lr", "critic_lr"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                bad(name, f"must be > 0, got {v!r}")
        for name, choices in (("reward", REWARD_MODES), ("kl", KL_CHOICES), ("critic_model", CRITIC_MODELS)):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not isinstance(self.estimator, str) or not self.estimator.strip():
            bad("estimator", f"must be a method name or estimator spec, got {self.estimator!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            bad("progress", f"must be true, false or None (auto: when stderr is a terminal), got {self.progress!r}")
        self._validate_offpolicy(bad)
        given = [n for n in ("task", "mdp", "case") if getattr(self, n) is not None]
        if len(given) != 1:
            bad("task", "give exactly one of task (--task), mdp (--mdp) and case (--case)"
                + (f"; got {', '.join(given)}" if given else ""))
        if self.out is not None and Path(self.out).suffix.lower() not in LOG_SUFFIXES:
            bad("out", f"must end in {', '.join(LOG_SUFFIXES)}, got {self.out!r}")
        if self.resume and self.checkpoint_path is None:
            bad("resume", "needs a checkpoint: give --checkpoint FILE or --out FILE (checkpoint OUT.ckpt)")
        if self.kl != "none" and self.kl_beta == 0:
            bad("kl_beta", f"is 0 with kl={self.kl}: use kl=none for no regularisation")

    def _validate_offpolicy(self, bad) -> None:
        """The behaviour and loss specs parse, and the loss is one the trainer can run."""
        for name in ("behaviour", "loss"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                bad(name, f"must be a spec string, got {v!r}")
        if self.behaviour is not None:
            from .offpolicy import parse_train_behaviour

            parse_train_behaviour(self.behaviour)  # ValueError naming TrainConfig.behaviour
        if self.loss is not None:
            from ..offpolicy.losses import get_loss

            try:
                get_loss(self.loss)
            except ValueError as exc:
                bad("loss", str(exc))

    # ------------------------------------------------------------------ derived values
    @property
    def checkpoint_path(self) -> str | None:
        if self.checkpoint is not None:
            return self.checkpoint
        return None if self.out is None else self.out + ".ckpt"

    @property
    def problem(self) -> str:
        """The problem as one string: ``task:SPEC``, ``mdp:SPEC`` or ``case:FILE``."""
        for name in ("task", "mdp", "case"):
            if getattr(self, name) is not None:
                return f"{name}:{getattr(self, name)}"
        raise AssertionError

    def resolved(self, policy_kind: str) -> "TrainConfig":
        """A copy with the derived defaults filled for a ``tabular`` or ``transformer`` policy."""
        critic_model = self.critic_model
        if critic_model == "auto":
            critic_model = "transformer" if policy_kind == "transformer" else "table"
        lr = DEFAULT_LR[policy_kind] if self.lr is None else self.lr
        critic_lr = self.critic_lr
        if critic_lr is None:
            critic_lr = 0.5 if critic_model == "table" else 3e-3
        if critic_model == "table" and critic_lr > 1:
            raise ValueError(f"TrainConfig.critic_lr: a table critic's step size must be in (0, 1], got {critic_lr}")
        return replace(self, lr=lr, critic_lr=critic_lr, critic_model=critic_model)

    def to_dict(self) -> dict:
        return asdict(self)


#: fields that may differ between a checkpointed run and its resumption
RESUME_FREE_FIELDS = ("iters", "out", "checkpoint", "checkpoint_every", "checkpoint_seconds", "resume", "force",
                      "progress", "measure_memory")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per :class:`TrainConfig` field, with its help line (``--task``/``--mdp``/``--case``
    as a mutually exclusive group; booleans as ``--x/--no-x``)."""
    problem = p.add_argument_group("problem (exactly one)").add_mutually_exclusive_group()
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        target = problem if meta.get("group") == "problem" else p
        help_ = meta["help"]
        if f.type in (bool, "bool", "bool | None"):
            shown = "" if default is None else f" (default {str(default).lower()})"
            target.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_ + shown)
            continue
        kind = {"int": int, "float": float, "float | None": float, "int | None": int}.get(str(f.type), str)
        kw = dict(dest=f.name, type=kind, default=None, metavar=meta.get("metavar", f.name.upper()))
        if "action" in meta:  # a repeatable flag (--estimator: several only where a command takes several)
            kw["action"] = meta["action"]
        if "choices" in meta:
            kw["choices"] = meta["choices"]
            kw.pop("metavar")
        target.add_argument(_flag(f.name), help=help_ if default is None else f"{help_} (default {default})", **kw)


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (unset flags keep the dataclass defaults); a repeatable
    flag given more than once is refused with a ``ValueError`` naming it (a run trains one estimator)."""
    kw = {}
    for f in fields(TrainConfig):
        if f.name in overrides:
            continue
        value = getattr(args, f.name, None)
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"{_flag(f.name)}: a training run takes one, got {len(value)} ({', '.join(value)}); "
                                 f"several only with --report-memory")
            value = value[0]
        if value is not None:
            kw[f.name] = value
    kw.update(overrides)
    return TrainConfig(**kw)


#: TrainConfig fields renamed since earlier releases: old name -> new name (checkpoints and dicts keep working)
RENAMED_FIELDS = {"algo": "estimator"}


def config_from_dict(values: dict) -> TrainConfig:
    """A :class:`TrainConfig` from a dict (a checkpoint's saved ``config``), with the fields of
    :data:`RENAMED_FIELDS` under their new names."""
    return TrainConfig(**renamed_fields(values))


def renamed_fields(values: dict) -> dict:
    """``values`` with every old field name of :data:`RENAMED_FIELDS` replaced by its new name."""
    out = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


__all__ = ["TrainConfig", "TRAIN_ALGOS", "REWARD_MODES", "KL_CHOICES", "CRITIC_MODELS", "add_config_args",
           "config_from_dict", "renamed_fields", "RENAMED_FIELDS",
           "config_from_args", "RESUME_FREE_FIELDS"]
