"""The memory table (``tpg train --report-memory``): the models each method holds and the measured
peak memory of one training step at the same batch.

For every method the trainer is built from the same configuration, runs one warm-up step (so
Adam's moments and the critic's optimiser state exist, as in any later step), and is then put
back to the initial policy and the initial generator state, so the measured step samples the
very same batch for every method. Columns:

* ``policy``, ``critic``, ``reference``, ``reward_model``: parameter counts of the models the
  method holds (the reference only when a KL term is configured: a run without one does not need
  it; the exact-KL log column's copy is an evaluation artefact and is not counted). A rule task's
  reward is a rule (0 parameters); a tabular MDP's is a table; the ``rm`` task's is a network.
* ``held_bytes``: tensor bytes held between steps (parameters, optimiser states, tables).
* ``step_bytes``: the transient peak of the step, measured by :class:`~tpg.train.memory.TensorMemoryMeter`
  (new tensor storage: rollouts, continuations, activations, gradients).
* ``peak_bytes = held_bytes + step_bytes``, and both relative to GRPO's.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from .._tables import legend_lines
from .config import TRAIN_ALGOS, TrainConfig
from .trainer import Trainer, torch_threads


def memory_report(config: TrainConfig, estimators=TRAIN_ALGOS) -> list[dict]:
    """One row per method or estimator spec (see the module docstring), in the order of ``estimators``."""
    estimators = list(estimators)
    if not estimators:
        raise ValueError("report-memory needs at least one estimator")
    rows = []
    with torch_threads(config.threads):
        for spec in estimators:
            cfg = replace(config, estimator=spec, out=None, checkpoint=None, checkpoint_every=0, resume=False,
                          progress=False, measure_memory=True, iters=2)
            tr = Trainer(cfg)
            gen_state = tr.gen.get_state()
            init = copy.deepcopy(tr.policy.state_dict())
            tr.step()  # warm-up
            tr.policy.load_state_dict(init)
            tr.gen.set_state(gen_state)
            tr.evaluate()  # the context's exact solution for the restored policy (outside the measured step)
            row = tr.step()
            m = tr.models()
            held = int(row["held_bytes"])
            peak = int(row["peak_mem_bytes"])
            models = [k for k in ("policy", "critic", "reference", "reward_model") if m[k] > 0]
            rows.append({"method": tr.method, "spec": tr.estimator.spec, "models": models,
                         "policy": m["policy"], "critic": m["critic"], "critic_kind": m["critic_kind"],
                         "reference": m["reference"], "reward_model": m["reward_model"],
                         "reward_model_kind": m["reward_model_kind"],
                         "params": m["policy"] + m["critic"] + m["reference"] + m["reward_model"],
                         "held_bytes": held, "step_bytes": peak - held, "peak_bytes": peak,
                         "tokens": int(row["tokens"]), "problem": tr.problem_spec, "batch": cfg.prompts * cfg.group_size})
    base = next((r for r in rows if r["method"] == "grpo"), None)
    for r in rows:
        r["held_vs_grpo"] = r["held_bytes"] / base["held_bytes"] if base else None
        r["peak_vs_grpo"] = r["peak_bytes"] / base["peak_bytes"] if base else None
    return rows


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_memory_table(rows: list[dict]) -> str:
    """The report as a fixed-width text table (bytes in KiB)."""
    head = ("method", "models held", "policy", "critic", "ref", "RM", "held KiB", "step KiB", "peak KiB",
            "peak/GRPO", "tokens")
    lines = []
    for r in rows:
        critic = f"{r['critic']:,}" + (f" ({r['critic_kind']})" if r["critic"] else "")
        rm = f"{r['reward_model']:,} ({r['reward_model_kind']})"
        ratio = "" if r["peak_vs_grpo"] is None else f"{r['peak_vs_grpo']:.2f}"
        lines.append((r["method"], "+".join(r["models"]), f"{r['policy']:,}", critic, f"{r['reference']:,}", rm,
                      _kib(r["held_bytes"]), _kib(r["step_bytes"]), _kib(r["peak_bytes"]), ratio, f"{r['tokens']:,}"))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(l) for l in lines]
    out += legend_lines({
        "method": "the method (or estimator spec) trained",
        "models held": "the models a step of the method needs",
        "policy": "parameters of the policy",
        "critic": "parameters of its learned critic (table: one value per tree state; transformer: a value network)",
        "ref": "parameters of the frozen reference policy (held only with a KL term)",
        "RM": "parameters of the reward model (rule: a rule, 0; table: the MDP's reward table)",
        "held KiB": "tensor bytes held between steps: parameters, optimiser states, tables",
        "step KiB": "the measured transient peak of new tensor storage in one step (a TorchDispatchMode "
                    "allocation count)",
        "peak KiB": "held + step",
        "peak/GRPO": "peak relative to GRPO's at the same batch (empty without a grpo row)",
        "tokens": "policy tokens the step sampled (continuations included)",
    })
    if rows:
        r = rows[0]
        out.append(f"problem {r['problem']}, batch {r['batch']} responses")
    return "\n".join(out)


__all__ = ["memory_report", "format_memory_table"]
