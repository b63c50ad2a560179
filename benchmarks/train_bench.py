"""Training iterations per second of every method at a fixed small size (tpg.train).

Two problems: a tabular MDP (``--mdp``) and the copy task with the tiny transformer (``--task``),
each at the default batch (8 prompts x 4 responses, 2 epochs x 2 minibatches). For every method a
trainer runs ``--warmup`` iterations (first-call costs, Adam's state), then ``--iters`` timed
iterations. Reported per method:

* **it/s**: timed iterations per second of wall time, the exact evaluation included (a run's real pace);
* **step ms** / **eval ms**: the median training step (sampling, advantages, updates) and the
  median exact evaluation (J, KL, entropy) from the log's ``wall_s`` / ``eval_s``;
* **tokens/it**: policy forward tokens per iteration (sampled + continuations + greedy);
* **it/s (meter)**: the same with the per-step memory meter on (``--measure-memory``, the default
  of ``tpg train``), which intercepts every tensor operation.

It also writes the memory table of ``tpg train --report-memory`` for both problems (models held,
parameter counts, held and measured peak bytes of one step at the same batch).

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/train_bench.py            # 30 timed iterations per method
    .venv/bin/python benchmarks/train_bench.py --quick    # a few iterations

Writes ``benchmarks/results/train.json`` and ``benchmarks/results/train.md`` (merged by hand into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tpg.train import TRAIN_ALGOS, Trainer, TrainConfig
from tpg.train.report import memory_report

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported by path
from _common import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
PROBLEMS = {
    "tabular": dict(mdp="dense:vocab=4,horizon=4,eos=0,prompts=4"),
    "transformer": dict(task="copy:vocab=4,length=2,prompts=4,eos=true"),
}


def _timed(cfg: TrainConfig, warmup: int, iters: int) -> dict:
    tr = Trainer(cfg)
    tr.config.iters = warmup
    tr.run(progress=False)
    start = len(tr.rows)
    tr.config.iters = warmup + iters
    t0 = time.perf_counter()
    tr.run(progress=False)
    wall = time.perf_counter() - t0
    rows = tr.rows[start:]
    return dict(its=iters / wall, step_ms=1e3 * statistics.median(r["wall_s"] for r in rows),
                eval_ms=1e3 * statistics.median(r["eval_s"] for r in rows),
                tokens=statistics.mean(r["tokens"] for r in rows), params=sum(p.numel() for p in tr.policy.parameters()),
                J_first=tr.rows[0]["J"], J_last=tr.rows[-1]["J"])


def bench(problem: str, algos, warmup: int, iters: int, threads: int) -> list[dict]:
    out = []
    for algo in algos:
        base = dict(estimator=algo, progress=False, threads=threads, iters=warmup + iters, **PROBLEMS[problem])
        plain = _timed(TrainConfig(**base, measure_memory=False), warmup, iters)
        meter = _timed(TrainConfig(**base, measure_memory=True), warmup, iters)
        row = dict(problem=problem, spec=next(iter(PROBLEMS[problem].values())), method=algo, iters=iters,
                   its_per_s=plain["its"], step_ms=plain["step_ms"], eval_ms=plain["eval_ms"],
                   tokens_per_iter=plain["tokens"], its_per_s_meter=meter["its"], policy_params=plain["params"],
                   J_first=plain["J_first"], J_last=plain["J_last"])
        out.append(row)
        print(f"{problem:11s} {algo:13s} {row['its_per_s']:7.1f} it/s  step {row['step_ms']:6.2f} ms  "
              f"eval {row['eval_ms']:5.2f} ms  tokens/it {row['tokens_per_iter']:7.1f}  "
              f"with meter {row['its_per_s_meter']:6.1f} it/s", flush=True)
    return out


def _machine() -> str:
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, Python {platform.python_version()}"


def write_outputs(rows: list[dict], memory: dict, json_path: Path, md_path: Path, command: str, threads: int,
                  load: str) -> None:
    machine = _machine()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(dict(machine=machine, command=command, threads=threads, load=load,
                                         batch="8 prompts x 4 responses, 2 epochs x 2 minibatches", rows=rows,
                                         memory=memory), indent=2) + "\n")
    lines = [
        "## Training iterations per second (tpg train)",
        "",
        f"Machine: {machine}; {threads} torch thread(s). Command: `{command}`. Load average: {load}.",
        "",
        "Each method trains from the same initial policy at the default batch (8 prompts x 4 responses, "
        "2 epochs x 2 minibatches of PPO's clipped loss, Adam), float64 on the CPU. **it/s** counts whole "
        "iterations (sampling, advantages, updates and the exact evaluation of J, KL and entropy); **step** and "
        "**eval** split one iteration (medians); **tokens/it** are policy forward tokens (sampled, plus TRePO's "
        "continuations and ReMax's greedy responses); **meter** is it/s with the per-step memory meter on "
        "(`tpg train`'s default), whose Python hook on every tensor operation costs more than the tiny "
        "problems' arithmetic.",
        "",
    ]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == problem]
        lines += [f"**{problem}** (`{sub[0]['spec']}`, policy {sub[0]['policy_params']:,} parameters)", "",
                  "| method | it/s | step ms | eval ms | tokens/it | it/s (meter) |", "|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['method']} | {r['its_per_s']:.1f} | {r['step_ms']:.2f} | {r['eval_ms']:.2f} "
                         f"| {r['tokens_per_iter']:.0f} | {r['its_per_s_meter']:.1f} |")
        lines.append("")
    lines += ["Wall times on a machine shared with other jobs vary between runs (see the load average); the token "
              "counts are exact.", ""]
    if memory:
        lines += [
            "### Memory per method (`tpg train --report-memory`)", "",
            "Parameters of the models each method holds, tensor bytes held between steps (parameters and optimiser "
            "state) and the measured transient peak of one step, at the same sampled batch for every method (a "
            "`TorchDispatchMode` counts the storage of every tensor the step creates until it is freed; kernels' "
            "scratch buffers and allocator slack are not included). No KL term, so no reference model is held.", ""]
        for problem, mrows in memory.items():
            lines += [f"**{problem}** (`{mrows[0]['problem']}`)", "",
                      "| method | models | policy | critic | reward model | held KiB | step KiB | peak KiB | peak / GRPO |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in mrows:
                critic = f"{r['critic']:,} ({r['critic_kind']})" if r["critic"] else "0"
                ratio = "" if r["peak_vs_grpo"] is None else f"{r['peak_vs_grpo']:.2f}"
                lines.append(f"| {r['method']} | {'+'.join(r['models'])} | {r['policy']:,} | {critic} "
                             f"| {r['reward_model']:,} ({r['reward_model_kind']}) | {r['held_bytes'] / 1024:,.1f} "
                             f"| {r['step_bytes'] / 1024:,.1f} | {r['peak_bytes'] / 1024:,.1f} | {ratio} |")
            lines.append("")
        lines += [
            "Read: TRePO holds exactly GRPO's models (no critic), so its held memory equals GRPO's; PPO holds a "
            "critic (a table on the tabular MDP, a second transformer on the task) and its optimiser state. "
            "TRePO's transient peak is higher than GRPO's because its Monte Carlo continuations are sampled "
            "as one batch (K continuations of every prefix); that is activation memory, not a model, and "
            "sampling the continuations in chunks would trade it for time.", ""]
    md_path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 timed iterations after 1 warm-up, per method")
    ap.add_argument("--iters", type=int, default=30, help="timed iterations per method (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--problems", default="tabular,transformer", help="tabular, transformer or both")
    ap.add_argument("--algos", default=",".join(TRAIN_ALGOS), help="methods, comma-separated (default all)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "train.json")
    ap.add_argument("--md", type=Path, default=HERE / "results" / "train.md")
    args = ap.parse_args(argv)
    warmup, iters = (1, 2) if args.quick else (args.warmup, args.iters)
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"unknown problem {p!r}; choose from {', '.join(PROBLEMS)}")
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    load0 = os.getloadavg()[0]
    rows = [r for p in problems for r in bench(p, algos, warmup, iters, args.threads)]
    memory = {p: memory_report(TrainConfig(**PROBLEMS[p], threads=args.threads, progress=False), algos)
              for p in problems}
    command = "python benchmarks/train_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (1-minute averages)"
    write_outputs(rows, memory, args.json, args.md, command.strip(), args.threads, load)
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
