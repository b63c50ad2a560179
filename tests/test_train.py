"""Training (tpg.train): every method improves the exact J, reproducibility and resume, the log,
the memory report, compare-runs, the configuration's checks and the command line."""

import json
import os
import signal
from dataclasses import fields, replace

import pandas as pd
import pytest
import torch

import tpg.cli
from tpg.exact import path_log_probs
from tpg.train import LOG_COLUMNS, TRAIN_ALGOS, UNREPRODUCIBLE_COLUMNS, Trainer, TrainConfig, read_log, train, write_log
from tpg.train.config import add_config_args
from tpg.train.critic import TableCritic, TransformerCritic
from tpg.train.memory import TensorMemoryMeter
from tpg.train.plots import compare_runs, curve_table
from tpg.train.problem import load_train_problem
from tpg.train.report import format_memory_table, memory_report

TAB = "dense:vocab=3,horizon=3,eos=0,prompts=2"  # J(initial) = -0.5885, J* = 2.0722
COPY = "copy:vocab=4,length=2,prompts=4,eos=true"  # RM = correct tokens of 3; J(initial) = 0.8786, J* = 3


def quick(**kw) -> TrainConfig:
    base = dict(mdp=TAB, iters=4, progress=False, measure_memory=False)
    if "task" in kw or "case" in kw:
        base.pop("mdp")
    return TrainConfig(**{**base, **kw})


def same_log(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c not in UNREPRODUCIBLE_COLUMNS]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True), check_exact=True)


# -- every method improves J ----------------------------------------------------------------------

# Improvement J(final) - J(initial) measured over training seeds 0..9 (tabular, 10 iterations, the
# default batch of 8 prompts x 4 responses, 2 epochs x 2 minibatches, Adam lr 0.1):
#   method        seed 0   min    mean   sd
#   reinforce     1.98     1.44   2.05   0.29
#   rloo          2.09     1.58   1.99   0.34
#   remax         2.12     1.66   2.06   0.27
#   grpo          2.05     1.63   2.02   0.31
#   dr_grpo       2.09     1.58   1.99   0.34
#   reinforce_pp  1.90     1.41   2.05   0.28
#   ppo           2.21     1.58   2.12   0.27
#   trepo         1.64     1.64   2.10   0.27
# The worst of 80 runs gained 1.41; the margin 0.5 sits more than 4 sd below every method's mean,
# so a platform whose rounding changes the sampled trajectory still passes.
TAB_MARGIN = 0.5

# The copy task with the tiny transformer (15 iterations, Adam lr 3e-3), seeds 0..7:
#   method        seed 0   min    mean   sd
#   reinforce     1.12     1.12   1.35   0.33
#   rloo          2.07     1.57   1.96   0.19
#   remax         2.02     1.81   1.98   0.11
#   grpo          2.09     1.84   2.04   0.08
#   dr_grpo       2.08     1.83   2.02   0.11
#   reinforce_pp  2.07     1.85   2.05   0.08
#   ppo           1.76     1.76   1.89   0.12
#   trepo         2.10     1.84   2.03   0.12
# Worst of 64 runs: 1.12 (reinforce, whose rewards are never centred); the margin 0.5 is more than
# 2.5 sd below the lowest mean.
COPY_MARGIN = 0.5


@pytest.mark.parametrize("algo", TRAIN_ALGOS)
def test_every_method_improves_J_on_a_tabular_mdp(algo):
    log = train(quick(estimator=algo, iters=10))
    assert log["J"].iloc[-1] - log["J"].iloc[0] > TAB_MARGIN


@pytest.mark.parametrize("algo", TRAIN_ALGOS)
def test_every_method_improves_J_on_the_copy_task_with_a_transformer(algo):
    log = train(quick(estimator=algo, task=COPY, iters=15))
    assert log["J"].iloc[-1] - log["J"].iloc[0] > COPY_MARGIN


# -- the log --------------------------------------------------------------------------------------

def test_log_columns_tokens_and_exact_quantities():
    tr = Trainer(quick(estimator="trepo", iters=3, kl="k3"))
    log = tr.run()
    assert list(log.columns) == list(LOG_COLUMNS) and list(log["iter"]) == [0, 1, 2, 3]
    first = log.iloc[0]
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-12) and first["tokens"] == 0
    assert (log["tokens"] == log["tokens_sampled"] + log["tokens_extra"]).all()
    assert (log["tokens_extra"].iloc[1:] > 0).all()  # TRePO's continuations
    assert list(log["tokens_total"]) == list(log["tokens"].cumsum())
    assert (log["kl_ref"].iloc[1:] > 0).all() and log["grad_norm"].iloc[1:].notna().all()
    # the entropy column is the exact per-response entropy E_x H(W|x), by enumeration
    tree = tr.mdp.tree
    lp = path_log_probs(tree, tr.policy.node_log_probs(tree).detach())
    rho = tr.mdp.prompt_weights[tree.prompt_n[tree.leaf_ids]]
    assert log["entropy"].iloc[-1] == pytest.approx(float(-(rho * lp.exp() * lp).sum()), rel=1e-10)
    assert log["entropy_token"].iloc[-1] == pytest.approx(log["entropy"].iloc[-1] / log["length"].iloc[-1])


def test_tokens_of_grpo_and_remax():
    grpo = train(quick(estimator="grpo", iters=2))
    assert (grpo["tokens_extra"] == 0).all()
    remax = train(quick(estimator="remax", iters=2))
    # one greedy response per distinct prompt of the batch (2 prompts, each greedy response <= 3 tokens)
    assert ((remax["tokens_extra"].iloc[1:] >= 2) & (remax["tokens_extra"].iloc[1:] <= 6)).all()


def test_memory_is_logged_and_does_not_change_the_run():
    on, off = train(quick(estimator="ppo", measure_memory=True)), train(quick(estimator="ppo"))
    same_log(on, off)
    assert (on["peak_mem_bytes"].iloc[1:] > on["held_bytes"].iloc[1:]).all()
    assert off["peak_mem_bytes"].iloc[1:].isna().all()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_log_file_round_trip(tmp_path, suffix):
    out = tmp_path / f"run{suffix}"
    log = train(quick(estimator="rloo", out=str(out)))
    back = read_log(str(out))
    pd.testing.assert_frame_equal(back, log, check_dtype=False)
    assert (tmp_path / f"run{suffix}.ckpt").is_file()


# -- reproducibility and resume ---------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(estimator="ppo", kl="k3"), dict(estimator="trepo:anchors=random:1"),
                                dict(estimator="reinforce_baseline:baseline=running"),
                                dict(estimator="ppo", task=COPY, kl="k1_reward")],
                         ids=["ppo-k3", "trepo-random", "running-baseline", "ppo-transformer"])
def test_same_seed_same_log_and_resume_equals_uninterrupted(tmp_path, kw):
    cfg = quick(iters=6, **kw)
    full = train(cfg)
    same_log(full, train(cfg))
    assert not train(replace(cfg, seed=1))["J"].equals(full["J"])
    ck = str(tmp_path / "run.ckpt")
    train(replace(cfg, iters=3, checkpoint=ck))
    resumed = train(replace(cfg, checkpoint=ck, resume=True))
    same_log(full, resumed)


def test_resume_after_an_interruption(tmp_path, monkeypatch):
    cfg = quick(estimator="ppo", iters=6, checkpoint=str(tmp_path / "c.ckpt"), checkpoint_every=2)
    full = train(replace(cfg, checkpoint=str(tmp_path / "full.ckpt")))
    real_step = Trainer.step

    def crashing_step(self):
        if self.iteration == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(Trainer, "step", real_step)
    from tpg.train.trainer import read_checkpoint

    state = read_checkpoint(cfg.checkpoint)
    assert state["iteration"] == 2  # the last periodic checkpoint before the crash
    same_log(full, train(replace(cfg, resume=True)))


def test_resume_checks(tmp_path):
    ck = str(tmp_path / "r.ckpt")
    train(quick(estimator="grpo", iters=2, checkpoint=ck))
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        Trainer.load(quick(estimator="grpo", iters=4, checkpoint=ck, resume=True, lr=0.01))
    with pytest.raises(ValueError, match="TrainConfig.iters"):
        Trainer.load(quick(estimator="grpo", iters=1, checkpoint=ck, resume=True))
    with pytest.raises(ValueError, match="TrainConfig.checkpoint: no checkpoint"):
        train(quick(estimator="grpo", checkpoint=str(tmp_path / "missing.ckpt"), resume=True))


# -- dense versus terminal reward -------------------------------------------------------------------

def test_dense_and_terminal_rewards_have_the_same_J():
    dense, term = load_train_problem(mdp=TAB), load_train_problem(mdp=TAB, reward="terminal")
    from tpg.exact import solve
    assert solve(term.mdp, term.policy).J == pytest.approx(solve(dense.mdp, dense.policy).J, abs=1e-12)
    # a method that sees only RM cannot tell the two apart: the runs are identical (J is summed over
    # the twin's rewards, so it agrees to rounding)
    a, b = train(quick(estimator="grpo", reward="dense")), train(quick(estimator="grpo", reward="terminal"))
    same_log(a.drop(columns=["reward", "J"]), b.drop(columns=["reward", "J"]))
    assert (a["J"] - b["J"]).abs().max() < 1e-12
    # the token-level oracle reads the token rewards: on the twin it is REINFORCE
    rtg_t = train(quick(estimator="reward_to_go", reward="terminal"))
    same_log(rtg_t.drop(columns=["method", "spec"]), train(quick(estimator="reinforce", reward="terminal"))
             .drop(columns=["method", "spec"]))
    assert not train(quick(estimator="reward_to_go", reward="dense"))["J"].equals(rtg_t["J"])


# -- critics and memory -----------------------------------------------------------------------------

def test_table_critic_step_one_sets_the_mean_return():
    p = load_train_problem(mdp=TAB)
    critic = TableCritic(p.mdp, lr=1.0)
    prompt = torch.tensor([0, 0])
    tokens = torch.tensor([[1, 2, 0], [1, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    returns = torch.tensor([[3.0, 3.0, 3.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    critic.update(prompt, tokens, mask, returns, torch.ones(2, 3))
    v = critic.values(prompt, tokens, mask)
    assert v[0, 0] == 2.0 and v[1, 0] == 2.0  # the prompt state: mean of 3 and 1
    assert v[0, 1] == 2.0 and v[0, 2] == 3.0 and v[0, 3] == 0.0 and v[1, 2] == 0.0  # s_{T+1} is terminal


def test_transformer_critic_starts_at_zero_and_fits():
    p = load_train_problem(task=COPY)
    critic = TransformerCritic(p.mdp, p.policy, lr=1e-2, seed=0)
    prompt = torch.tensor([0, 1, 2])
    tokens = torch.tensor([[0, 1, 3], [2, 3, 0], [1, 1, 3]])
    mask = torch.tensor([[True] * 3, [True, True, False], [True] * 3])
    assert critic.values(prompt, tokens, mask).abs().max() == 0
    target = torch.where(mask, torch.full((3, 3), 2.0, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    losses = [critic.update(prompt, tokens, mask, target, torch.full((3, 3), 1 / 8)) for _ in range(30)]
    assert losses[-1] < 0.1 * losses[0]


def test_memory_meter_counts_live_storage_and_saved_tensors():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)  # 8000 bytes, made outside: not counted
    with TensorMemoryMeter() as m:
        y = x.exp()  # saved for backward
        z = (y * 2).sum()
        del y
        assert m.current >= 8000  # still held by the graph
        z.backward()
    assert 16000 <= m.peak <= 8000 * 4
    with TensorMemoryMeter() as m2:
        for _ in range(10):
            torch.ones(1000, dtype=torch.float64)  # freed at once: the peak stays one tensor
    assert m2.peak == 8000 and m2.current == 0


def test_memory_report_structure_and_ordering():
    rows = memory_report(quick(kl="k3"))
    assert [r["method"] for r in rows] == list(TRAIN_ALGOS)
    by = {r["method"]: r for r in rows}
    keys = {"method", "spec", "models", "policy", "critic", "critic_kind", "reference", "reward_model",
            "reward_model_kind", "params", "held_bytes", "step_bytes", "peak_bytes", "held_vs_grpo", "peak_vs_grpo",
            "tokens", "problem", "batch"}
    assert all(keys <= set(r) for r in rows)
    assert by["ppo"]["critic"] > 0 and "critic" in by["ppo"]["models"] and by["ppo"]["critic_kind"] == "table"
    for m in ("grpo", "trepo", "rloo", "remax"):
        assert by[m]["critic"] == 0 and "critic" not in by[m]["models"]
        assert by[m]["held_bytes"] == by["grpo"]["held_bytes"]  # the same models: policy, reference, table RM
    assert all(r["reference"] == r["policy"] and r["reward_model_kind"] == "table" for r in rows)
    assert by["ppo"]["held_bytes"] > by["grpo"]["held_bytes"] and by["ppo"]["peak_bytes"] > by["grpo"]["peak_bytes"]
    assert by["trepo"]["tokens"] > by["grpo"]["tokens"]  # its continuations
    assert all(r["step_bytes"] > 0 and r["peak_bytes"] == r["held_bytes"] + r["step_bytes"] for r in rows)
    assert by["grpo"]["peak_vs_grpo"] == 1.0
    text = format_memory_table(rows)
    assert text.splitlines()[0].split()[:2] == ["method", "models"] and "ppo" in text


def test_memory_report_on_the_transformer_counts_a_critic_network():
    rows = memory_report(quick(task=COPY), estimators=["grpo", "ppo", "trepo"])
    by = {r["method"]: r for r in rows}
    assert by["ppo"]["critic_kind"] == "transformer" and by["ppo"]["critic"] > 0.9 * by["ppo"]["policy"]
    assert by["grpo"]["reward_model_kind"] == "rule" and by["grpo"]["reward_model"] == 0
    assert by["ppo"]["held_bytes"] > 1.8 * by["grpo"]["held_bytes"]
    assert by["trepo"]["held_bytes"] == by["grpo"]["held_bytes"]
    assert by["ppo"]["peak_bytes"] > by["grpo"]["peak_bytes"]


# -- compare-runs -----------------------------------------------------------------------------------

def test_compare_runs_writes_a_png(tmp_path):
    paths = []
    for reward in ("dense", "terminal"):
        for seed in (0, 1):
            out = tmp_path / f"{reward}_{seed}.csv"
            train(quick(estimator="reward_to_go", reward=reward, seed=seed, iters=3, out=str(out)))
            paths.append(str(out))
    png = tmp_path / "cmp.png"
    summary = compare_runs(paths, str(png), x="tokens")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [s["label"] for s in summary] == ["reward_to_go / dense", "reward_to_go / terminal"]
    assert all(s["runs"] == 2 and s["lo"] <= s["mean"] <= s["hi"] for s in summary)
    with pytest.raises(ValueError, match="column 'nope'"):
        compare_runs(paths, str(png), label_by=["nope"])


def test_curve_table_bands():
    rows = [dict(iter=i, J=float(v), tokens_total=10 * i, method="a", reward="dense", run=r)
            for r, vals in enumerate([(0, 1), (0, 3)]) for i, v in enumerate(vals)]
    df = pd.DataFrame(rows)
    mm = curve_table(df, band="minmax").set_index("iter")
    assert (mm.loc[1, "mean"], mm.loc[1, "lo"], mm.loc[1, "hi"], mm.loc[1, "runs"]) == (2.0, 1.0, 3.0, 2)
    sd = curve_table(df, band="std", x="tokens").set_index("iter")
    assert (sd.loc[1, "lo"], sd.loc[1, "hi"], sd.loc[1, "x"]) == (1.0, 3.0, 10.0)


# -- configuration checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("iters", -1), ("prompts", 0), ("group_size", 0), ("epochs", 0), ("minibatches", 0), ("minibatches", 99),
    ("clip_eps", -0.1), ("lr", 0.0), ("adam_beta1", 1.0), ("adam_beta2", -0.5), ("adam_eps", float("nan")),
    ("max_grad_norm", -1.0), ("kl", "k9"), ("kl_beta", -1.0), ("reward", "sparse"), ("critic_model", "mlp"),
    ("critic_lr", 0.0), ("threads", 0), ("seed", -1), ("out", "log.txt"), ("iters", 2.5), ("estimator", ""),
    ("seed", 2**32), ("seed", 10**23), ("group_size", 10**12), ("prompts", 10**12), ("checkpoint_seconds", -1.0),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        quick(**{field: value})


@pytest.mark.parametrize("kw,field", [
    (dict(estimator="bogus"), "estimator"), (dict(estimator="grpo:kl=k3"), "estimator"),
    (dict(estimator="trepo:K=0"), "estimator"), (dict(estimator="ppo", critic_lr=2.0), "critic_lr"),
    (dict(estimator="ppo", critic_model="transformer"), "critic_model"),
    (dict(task="copy:reward=terminal", reward="dense"), "reward"), (dict(mdp=TAB + ",twin=true"), "reward"),
])
def test_bad_values_found_when_the_run_is_built(kw, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        Trainer(quick(**kw))


def test_problem_and_resume_fields():
    with pytest.raises(ValueError, match="TrainConfig.task"):
        TrainConfig(iters=1)
    with pytest.raises(ValueError, match="TrainConfig.task"):
        TrainConfig(mdp=TAB, task=COPY)
    with pytest.raises(ValueError, match="TrainConfig.resume"):
        TrainConfig(mdp=TAB, resume=True)


# -- the command line -------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    if "tpg.train.cli" not in tpg.cli._COMMAND_MODULES:  # until the lead wires the commands in
        monkeypatch.setattr(tpg.cli, "_COMMAND_MODULES", tpg.cli._COMMAND_MODULES + ("tpg.train.cli",))
    return tpg.cli.main


def test_every_config_field_is_a_flag_with_help():
    import argparse

    p = argparse.ArgumentParser()
    add_config_args(p)
    dests = {a.dest: a for a in p._actions}
    for f in fields(TrainConfig):
        assert f.metadata["help"] and f.name in dests and dests[f.name].help


def test_cli_train_compare_and_report(cli, tmp_path, capsys):
    logs = []
    for reward in ("dense", "terminal"):
        out = tmp_path / f"{reward}.parquet"
        assert cli(["train", "--estimator", "grpo", "--mdp", TAB, "--reward", reward, "--iters", "3", "--seed", "1",
                    "--out", str(out), "--no-progress", "--lr", "0.2"]) == 0
        logs.append(str(out))
    assert (read_log(logs[0])["J"] - read_log(logs[1])["J"]).abs().max() < 1e-12
    assert cli(["train", "--estimator", "grpo", "--mdp", TAB, "--reward", "dense", "--iters", "5", "--seed", "1",
                "--out", logs[0], "--no-progress", "--lr", "0.2", "--resume"]) == 0
    assert list(read_log(logs[0])["iter"]) == [0, 1, 2, 3, 4, 5]
    png = tmp_path / "c.png"
    assert cli(["compare-runs", *logs, "--out", str(png), "--x", "tokens", "--band", "std"]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert cli(["train", "--report-memory", "--mdp", TAB, "--estimator", "grpo", "--estimator", "ppo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "tpg-train-memory/1"
    assert [r["method"] for r in doc["rows"]] == ["grpo", "ppo"]


def test_the_old_estimator_flags_still_work_with_a_note(cli, tmp_path, capsys):
    """--algo and --algos (the earlier names) run as --estimator does, hidden from --help, with a one-line note."""
    out = tmp_path / "old.csv"
    assert cli(["train", "--algo", "rloo", "--mdp", TAB, "--iters", "2", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "tpg: note: --algo is deprecated and will be removed in the next release; use --estimator" in err
    assert set(read_log(str(out))["method"]) == {"rloo"}
    assert cli(["train", "--report-memory", "--mdp", TAB, "--algos", "grpo,rloo", "--json"]) == 0
    captured = capsys.readouterr()
    assert "--algos is deprecated" in captured.err
    assert [r["method"] for r in json.loads(captured.out)["rows"]] == ["grpo", "rloo"]
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    assert "--algo" not in capsys.readouterr().out
    assert cli(["train", "--estimator", "grpo", "--estimator", "rloo", "--mdp", TAB]) == 2
    assert "--estimator: a training run takes one, got 2" in capsys.readouterr().err


def test_a_checkpoint_and_a_log_of_the_old_field_names_still_resume(tmp_path):
    """Earlier checkpoints carry config["algo"] and rows["algo"], logs an algo column: --resume maps them."""
    from tpg.train.trainer import checkpoint_bytes, read_checkpoint

    ck, out = tmp_path / "old.ckpt", tmp_path / "old.csv"
    train(quick(estimator="grpo", iters=2, checkpoint=str(ck), out=str(out)))
    state = read_checkpoint(ck)
    state["config"]["algo"] = state["config"].pop("estimator")
    state["rows"] = [{("algo" if k == "method" else k): v for k, v in r.items()} for r in state["rows"]]
    ck.write_bytes(checkpoint_bytes(state))
    read_log(str(out)).rename(columns={"method": "algo"}).to_csv(out, index=False)
    assert "method" in read_log(str(out)).columns and "algo" not in read_log(str(out)).columns
    resumed = train(quick(estimator="grpo", iters=4, checkpoint=str(ck), out=str(out), resume=True))
    same_log(resumed, train(quick(estimator="grpo", iters=4)))
    assert read_checkpoint(ck)["config"]["estimator"] == "grpo"


def test_a_checkpoint_from_before_a_config_field_existed_resumes(tmp_path):
    """A checkpoint written before resample_rounds existed (its config lacks the field) ran with the field's
    default behaviour: it resumes under the default and is refused under another value."""
    from tpg.train.trainer import checkpoint_bytes, read_checkpoint

    ck = tmp_path / "old.ckpt"
    train(quick(estimator="grpo", iters=2, checkpoint=str(ck)))
    state = read_checkpoint(ck)
    del state["config"]["resample_rounds"]
    ck.write_bytes(checkpoint_bytes(state))
    with pytest.raises(ValueError, match="TrainConfig.resample_rounds: the checkpoint was made with resample_rounds=10"):
        train(quick(estimator="grpo", iters=4, checkpoint=str(ck), resume=True, resample_rounds=3))
    resumed = train(quick(estimator="grpo", iters=4, checkpoint=str(ck), resume=True))
    same_log(resumed, train(quick(estimator="grpo", iters=4)))


def test_cli_bad_input_exits_2(cli, capsys):
    assert cli(["train", "--estimator", "grpo", "--mdp", TAB, "--iters", "-2"]) == 2
    assert "tpg: error: TrainConfig.iters" in capsys.readouterr().err
    assert cli(["train", "--estimator", "nope", "--mdp", TAB, "--iters", "1", "--no-progress"]) == 2
    assert "TrainConfig.estimator" in capsys.readouterr().err


# -- nothing is lost -----------------------------------------------------------------------------------

def read_checkpoint(path):
    from tpg.train.trainer import read_checkpoint as read

    return read(path)


def test_an_existing_log_or_checkpoint_stops_a_fresh_run(tmp_path, cli, capsys):
    out = tmp_path / "run.csv"
    cfg = quick(estimator="grpo", iters=2, out=str(out))
    first = train(cfg)
    assert out.exists() and (tmp_path / "run.csv.ckpt").exists()
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"TrainConfig\.out: '.*run\.csv' exists .*--resume.*--force"):
        train(cfg)
    (tmp_path / "other.ckpt").write_bytes(b"an earlier checkpoint")
    with pytest.raises(ValueError, match=r"TrainConfig\.checkpoint: '.*other\.ckpt' exists .*--resume.*--force"):
        train(quick(estimator="grpo", iters=2, checkpoint=str(tmp_path / "other.ckpt")))
    assert out.read_bytes() == before
    same_log(first, train(replace(cfg, force=True)))
    assert list(train(replace(cfg, iters=3, resume=True))["iter"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"TrainConfig\.force"):
        quick(out=str(out), resume=True, force=True)
    argv = ["train", "--estimator", "grpo", "--mdp", TAB, "--iters", "3", "--no-progress", "--out", str(out)]
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--resume" in err and "--force" in err
    assert cli(argv + ["--force"]) == 0


def test_checkpoints_by_default_every_10_iterations_and_30_seconds(tmp_path, monkeypatch):
    assert (TrainConfig.checkpoint_every, TrainConfig.checkpoint_seconds) == (10, 30.0)
    out = tmp_path / "run.parquet"
    cfg = quick(estimator="rloo", iters=12, out=str(out))
    real_step = Trainer.step

    def crash_at(n):
        def step(self):
            if self.iteration == n:
                raise KeyboardInterrupt
            return real_step(self)
        return step

    monkeypatch.setattr(Trainer, "step", crash_at(11))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert read_checkpoint(cfg.checkpoint_path)["iteration"] == 10
    assert list(read_log(str(out))["iter"]) == list(range(11))  # the log matches the checkpoint
    # by time: a tiny checkpoint_seconds saves after every iteration
    timed = quick(estimator="rloo", iters=12, checkpoint=str(tmp_path / "t.ckpt"), checkpoint_every=0,
                  checkpoint_seconds=1e-9)
    monkeypatch.setattr(Trainer, "step", crash_at(5))
    with pytest.raises(KeyboardInterrupt):
        train(timed)
    assert read_checkpoint(timed.checkpoint)["iteration"] == 5
    monkeypatch.setattr(Trainer, "step", real_step)
    same_log(train(quick(estimator="rloo", iters=12)), train(replace(cfg, resume=True)))


def test_the_log_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "run.csv"
    out.write_text("the previous log\n")
    import tpg._io

    renames = []
    real_replace = tpg._io.os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(tpg._io.os, "replace", spy)
    train(quick(estimator="grpo", iters=2, out=str(out), force=True))
    logs = [(s, d) for s, d in renames if d == str(out)]
    assert logs and all(os.path.dirname(s) == str(tmp_path) and os.path.basename(s).startswith(".run.csv.")
                        for s, _ in logs)

    def no_rename(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(tpg._io.os, "replace", no_rename)
    df = pd.DataFrame({"iter": [0], "J": [1.0]})
    before = out.read_bytes()
    with pytest.raises(PermissionError) as err:
        write_log(df, str(out))
    assert err.value.filename == str(out) and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.csv.ckpt"]  # no temporary left


def test_sigint_checkpoints_and_resumes_to_the_uninterrupted_log(tmp_path, monkeypatch):
    cfg = quick(estimator="ppo", iters=6, out=str(tmp_path / "run.csv"), checkpoint_every=0, checkpoint_seconds=0)
    full = train(quick(estimator="ppo", iters=6))
    real_step = Trainer.step

    def step(self):
        row = real_step(self)
        if self.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during iteration 3
        return row

    monkeypatch.setattr(Trainer, "step", step)
    from tpg.train import TrainingInterrupted

    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, handle_signals=True)
    assert stop.value.exit_status == 130 and stop.value.iteration == 3
    assert "SIGINT" in stop.value.message() and "--resume" in stop.value.message()
    assert read_checkpoint(cfg.checkpoint_path)["iteration"] == 3
    assert list(read_log(cfg.out)["iter"]) == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    monkeypatch.setattr(Trainer, "step", real_step)
    same_log(full, train(replace(cfg, resume=True)))


_SLOW_TRAIN = """
import sys, time
import tpg.train.trainer as trainer
real_step = trainer.Trainer.step
def slow_step(self):
    time.sleep(0.1)
    return real_step(self)
trainer.Trainer.step = slow_step
import tpg.cli
sys.exit(tpg.cli.main(sys.argv[1:]))
"""


def test_sigterm_to_tpg_train_checkpoints_and_resume_gives_the_uninterrupted_log(tmp_path):
    import subprocess
    import sys
    import time

    script = tmp_path / "slow_train.py"
    script.write_text(_SLOW_TRAIN)
    out = tmp_path / "run.csv"
    argv = ["train", "--estimator", "ppo", "--mdp", TAB, "--iters", "20", "--no-progress", "--no-measure-memory",
            "--out", str(out), "--checkpoint-every", "0", "--checkpoint-seconds", "0"]
    proc = subprocess.Popen([sys.executable, str(script), *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and proc.poll() is None and time.time() < deadline:  # written at the start
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    done = read_checkpoint(str(out) + ".ckpt")["iteration"]
    assert 1 <= done < 20 and len(read_log(str(out))) == done + 1
    cfg = quick(estimator="ppo", iters=20, out=str(out), checkpoint_every=0, checkpoint_seconds=0)
    same_log(train(quick(estimator="ppo", iters=20)), train(replace(cfg, resume=True)))


def _damaged(path, how):
    data = path.read_bytes()
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "garbage":
        return bytes(range(256)) * 8
    mid = len(data) // 2  # one byte in the middle: inside the state's tensors
    return data[:mid] + bytes([data[mid] ^ 0x40]) + data[mid + 1:]


@pytest.mark.parametrize("how", ["truncated", "garbage", "one byte in the middle", "a tensor", "wrong shapes",
                                 "missing optimizer", "wrong rows"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, cli, capsys, how):
    good = tmp_path / "good.ckpt"
    train(quick(estimator="grpo", iters=2, checkpoint=str(good)))
    bad = tmp_path / "bad.ckpt"
    state = read_checkpoint(good)
    if how in ("truncated", "garbage", "one byte in the middle"):
        bad.write_bytes(_damaged(good, how))
    elif how == "a tensor":
        torch.save(torch.zeros(3), bad)
    else:
        if how == "wrong shapes":
            state["policy"] = {k: torch.zeros(2, 2, dtype=torch.float64) for k in state["policy"]}
        elif how == "missing optimizer":
            del state["optimizer"]
        else:
            state["rows"] = [{"iter": 0}] * len(state["rows"])
        torch.save(state, bad)  # a valid torch file (the pre-checksum layout) with the wrong content
    with pytest.raises(ValueError, match=r"TrainConfig\.checkpoint: '.*bad\.ckpt'"):
        train(quick(estimator="grpo", iters=4, checkpoint=str(bad), resume=True))
    capsys.readouterr()
    assert cli(["train", "--estimator", "grpo", "--mdp", TAB, "--iters", "4", "--no-progress", "--no-measure-memory",
                "--checkpoint", str(bad), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpg: error: TrainConfig.checkpoint: ") and "bad.ckpt" in err and err.count("\n") == 1


def test_a_batch_that_cannot_fit_is_refused_once_the_horizon_is_known(monkeypatch):
    import tpg._guards

    # 16 prompts x 4 responses x 24 bytes: 1536 bytes at one position each, 4608 at the horizon 3 (the
    # tree of 44 nodes takes 2816)
    monkeypatch.setattr(tpg._guards, "memory_budget_bytes", lambda: 3000)
    cfg = quick(prompts=16, group_size=4)
    with pytest.raises(ValueError, match=r"^TrainConfig\.prompts 16: 16 groups of 4 responses x 3 positions needs at "
                                         r"least 4.61 kB, more than this machine's 3 kB of memory"):
        Trainer(cfg)


def test_a_directory_as_log_or_checkpoint_is_an_os_error_naming_it(tmp_path):
    d = tmp_path / "run.csv"
    d.mkdir()
    for kw in (dict(out=str(d)), dict(checkpoint=str(d)), dict(out=str(d), force=True)):
        with pytest.raises(IsADirectoryError) as err:
            train(quick(iters=1, **kw))
        assert err.value.filename == str(d)
