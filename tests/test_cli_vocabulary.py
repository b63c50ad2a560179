"""One flag vocabulary across the commands, the torch-free estimator catalog, and the renamed KL option.

* every long command has ``--progress/--no-progress`` (default auto), estimators are ``--estimator``,
  worker processes ``--jobs``, torch threads ``--threads``; the old spellings are hidden aliases;
* :mod:`tpg.estimators.names` (no torch) lists exactly the registry's names and options, and refuses what
  the real code refuses, with its words;
* the KL coefficient is ``kl_beta`` in specs as in ``tpg train --kl-beta``; ``beta`` still works, with a note.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import pytest

from tpg.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
LONG_COMMANDS = ("verify", "study", "train", "prove", "figures", "report")


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _visible_flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings if a.help is not argparse.SUPPRESS}


def test_every_long_command_has_one_progress_flag_defaulting_to_auto():
    cmds = _commands()
    for name in LONG_COMMANDS:
        flags = _visible_flags(cmds[name])
        act = flags.get("--progress")
        assert act is not None and "--no-progress" in flags, name
        assert isinstance(act, argparse.BooleanOptionalAction) and act.default is None, name
        assert "terminal" in act.help, name
    for name, p in cmds.items():  # no other spelling of it anywhere
        assert not {"--quiet", "--no-bar", "--verbose"} & set(_visible_flags(p)), name


def test_one_name_for_estimators_processes_threads_and_the_kl():
    cmds = _commands()
    for name, p in cmds.items():
        flags = _visible_flags(p)
        assert not {"--algo", "--algos", "--method", "--n-jobs", "--workers", "--num-threads",
                    "--beta"} & set(flags), name
        if "--jobs" in flags:
            assert "process" in flags["--jobs"].help, name
        if "--threads" in flags:
            assert "torch" in flags["--threads"].help and "thread" in flags["--threads"].help, name
    assert "--estimator" in _visible_flags(cmds["verify"]) and "--estimator" in _visible_flags(cmds["train"])
    # repeatable (append): --report-memory takes several
    assert isinstance(_visible_flags(cmds["train"])["--estimator"], argparse._AppendAction)
    assert {"--kl", "--kl-beta", "--threads"} <= set(_visible_flags(cmds["train"]))
    assert "--threads" in _visible_flags(cmds["verify"]) and "--jobs" in _visible_flags(cmds["study"])
    # the old spellings are still parsed, hidden
    train_all = {s for a in cmds["train"]._actions for s in a.option_strings}
    assert {"--algo", "--algos"} <= train_all


def test_progress_auto_means_a_terminal_on_stderr(monkeypatch):
    import io

    from tpg._progress import progress_bar, show_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert show_progress(None, io.StringIO()) is False and show_progress(None, Tty()) is True
    assert show_progress(True, io.StringIO()) is True and show_progress(False, Tty()) is False
    out = Tty()
    bar = progress_bar(None, total=3, file=out, desc="x")
    bar.update(3)
    bar.close()
    assert "3/3" in out.getvalue()
    quiet = io.StringIO()
    bar = progress_bar(None, total=3, file=quiet)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


def test_prove_draws_a_bar_only_when_asked_or_on_a_terminal(capsys):
    assert main(["prove", "--statement", "lemma1"]) == 0  # stderr is not a terminal under pytest
    assert "prove" not in capsys.readouterr().err
    assert main(["prove", "--statement", "lemma1", "--progress"]) == 0
    assert re.search(r"prove: +\d+%.*/12", capsys.readouterr().err)


# ---------------------------------------------------------------- the torch-free catalog
def test_the_light_catalog_is_the_registry():
    from tpg.estimators.names import CATALOG, COMMON_OPTION_NAMES, OPTION_NAMES, RENAMED_OPTIONS, TRAIN_ALIASES
    from tpg.estimators.estimator import COMMON_OPTIONS
    from tpg.estimators.estimator import RENAMED_OPTIONS as REAL_RENAMED
    from tpg.estimators.registry import CATALOG as REAL
    from tpg.estimators.registry import ESTIMATORS
    from tpg.train.methods import ALIASES

    assert CATALOG == REAL
    assert {n: tuple(cls.all_options()) for n, cls in ESTIMATORS.items()} == OPTION_NAMES
    assert COMMON_OPTION_NAMES == tuple(COMMON_OPTIONS) and RENAMED_OPTIONS == REAL_RENAMED
    assert TRAIN_ALIASES == {alias: base for alias, (base, _) in ALIASES.items()}
    # the classes' option declarations are the torch-free ones, objects and all
    from tpg.estimators.options import ESTIMATOR_OPTIONS

    assert {n: cls.OPTIONS for n, cls in ESTIMATORS.items()} == ESTIMATOR_OPTIONS


BAD_VERIFY_SPECS = ["grpx", "grpo:std=1", "grpo:std_norm", "grpo:eps=1,eps=2", "ppo_gae:lamda=0.9", "trepo:k=4",
                    "rloo;grpx", "missing_plugin.py:fn",
                    # values out of their range: the same Option objects parse them
                    "grpo:eps=-1", "grpo:std_norm=maybe", "grpo:kl=k9", "grpo:kl_beta=-0.1", "rloo:agg=mean",
                    "ppo_gae:lambda=1.5", "ppo_gae:critic=oracle", "ppo_gae:steps=2.5", "trepo:anchors=every:0",
                    "trepo:fill=linear", "trepo:K=0", "reinforce_pp:gamma=nan", "reinforce_baseline:baseline=min",
                    "all:agg=mean", "rloo;grpo:eps=inf"]


@pytest.mark.parametrize("spec", BAD_VERIFY_SPECS)
def test_the_light_check_refuses_what_verify_refuses_with_its_words(spec):
    from tpg.estimators.names import check_estimator_spec
    from tpg.verify.harness import resolve_specs, _load

    with pytest.raises(ValueError) as light:
        check_estimator_spec(spec)
    with pytest.raises(ValueError) as real:
        for s, _ in resolve_specs(spec):  # what tpg verify does: expand, then load each (prefixed by its text)
            try:
                _load(s, None, None)
            except ValueError as exc:
                raise ValueError(f"{s}: {exc}") from None
    assert str(real.value) in str(light.value)


@pytest.mark.parametrize("spec", ["grpx", "grpo:std=1", "grpo:kl=k3", "rloo:kl_beta=0.1", "ppo:lamda=1",
                                  "missing_plugin.py:fn", "ppo:lambda=2", "grpo:eps=-1", "trepo:K=0"])
def test_the_light_check_refuses_what_train_refuses_with_its_words(spec):
    from tpg.estimators.names import check_estimator_spec
    from tpg.train.methods import build_estimator

    with pytest.raises(ValueError) as light:
        check_estimator_spec(spec, training=True)
    with pytest.raises(ValueError) as real:
        build_estimator(spec)
    assert str(light.value) == str(real.value) or str(light.value).endswith(str(real.value).split(": ", 1)[1])


@pytest.mark.parametrize("spec", ["rloo", "grpo:std_norm=false,eps=0.1", "all", "all:agg=token-mean", "rloo;grpo",
                                  "ppo_gae:lambda=0.9,critic=noisy,sigma=0.1", "trepo:anchors=random:2,K=4",
                                  "grpo:kl=k3,beta=0.2",
                                  "examples/plugins/grpo_verl.py:compute_advantage:agg=token-mean"])
def test_the_light_check_accepts_good_specs(spec, monkeypatch):
    from tpg.estimators.names import check_estimator_spec

    monkeypatch.chdir(ROOT)
    check_estimator_spec(spec)


# ---------------------------------------------------------------- the KL option
def test_kl_beta_is_the_option_and_beta_still_works_with_a_note():
    from tpg.estimators import get_estimator

    new = get_estimator("grpo:kl=k3,kl_beta=0.2")
    assert new.options["kl_beta"] == 0.2 and new.spec == "grpo:kl=k3,kl_beta=0.2"
    with pytest.warns(FutureWarning, match="option 'beta' is deprecated .* use 'kl_beta'"):
        old = get_estimator("grpo:kl=k3,beta=0.2")
    assert old.options == new.options
    with pytest.raises(ValueError, match="'beta' is the old name of 'kl_beta'; give one of them"):
        get_estimator("grpo:kl=k3,beta=0.2,kl_beta=0.3")


def test_the_command_line_prints_the_kl_rename_as_one_note(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["verify", "--mdp", "dense:vocab=2,horizon=2,eos=0", "--estimator", "rloo:kl=k1_reward,beta=0.1",
                     "--group-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "tpg: note: rloo: option 'beta' is deprecated and will be removed in the next release; use 'kl_beta'" in err
    assert "FutureWarning" not in err


def test_no_code_reads_the_kl_coefficient_by_its_old_name():
    """Estimator options reach the contexts as a dict: a read of options["beta"] would silently see no KL."""
    old_read = re.compile(r"""(options|opts)\s*(\.get\(|\[)\s*["']beta["']"""
                          r"""|["']kl["']\s*:\s*["'][^"']*["']\s*,\s*["']beta["']""")
    old_spec = re.compile(r"""kl=[a-z0-9_{}.]+,beta=""")
    bad = []
    for path in sorted((ROOT / "tpg").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if old_read.search(line) or (path.parts[-2] != "tests" and old_spec.search(line)):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- spec ranges before torch
BAD_MDPS = ["dense:vocab=1", "dense:horizon=0", "dense:eos=3", "dense:prompts=0", "dense:gamma=0", "dense:gamma=1.5",
            "sparse:p=1.5", "dense:horizon=40", "dense:max_nodes=10,horizon=3", "first_token:compact=true",
            "dense:compact=true,horizon=40", "dense:compact=true,policy=shared,horizon=100000000000"]
BAD_TASKS = ["copy:vocab=1", "copy:vocab=17", "copy:length=5", "copy:eos=true,vocab=2", "copy:prompts=100",
             "copy:horizon=1", "target:target=0-9", "target:answer_length=0", "count:token=9", "count:vocab=3,length=3",
             "sum:base=9", "table:horizon=0", "rm:hidden=0", "copy:gamma=0", "copy:n_head=3", "copy:n_layer=0",
             "copy:horizon=30", "sum:prompts=17", "copy:prompts=0", "reverse:eos=true,vocab=3,length=2,horizon=2"]


def _unchecked(monkeypatch, name: str) -> None:
    """Turn off a torch-free range check, so that the real builder speaks."""
    import tpg.mdp.specs as specs

    monkeypatch.setattr(specs, name, lambda kw: None)


@pytest.mark.parametrize("spec", BAD_MDPS)
def test_mdp_ranges_are_refused_before_building_with_the_builders_words(spec, monkeypatch):
    from tpg.cases import mdp_from_spec
    from tpg.mdp.specs import parse_mdp_spec

    with pytest.raises(ValueError) as light:
        parse_mdp_spec(spec)
    _unchecked(monkeypatch, "check_mdp_ranges")
    with pytest.raises(ValueError) as real:
        mdp_from_spec(spec)
    # the builder's words, the light one naming the spec's key first (and eos as the spec writes it)
    words = str(real.value).replace("null/None", "none")
    assert str(light.value) == words or str(light.value).endswith(": " + words) or words in str(light.value)


@pytest.mark.parametrize("spec", BAD_TASKS)
def test_task_ranges_are_refused_before_building_with_the_builders_words(spec, monkeypatch):
    from tpg.cases import problem_from_task_spec
    from tpg.mdp.specs import parse_task_spec

    with pytest.raises(ValueError) as light:
        parse_task_spec(spec)
    _unchecked(monkeypatch, "check_task_ranges")
    with pytest.raises(ValueError) as real:
        problem_from_task_spec(spec)
    assert str(light.value) == str(real.value)


@pytest.mark.parametrize("spec", ["copy", "reverse:eos=true", "target:target=1-0", "count", "sum", "sum:base=3",
                                  "table", "rm", "copy:horizon=5", "sum:prompts=all",
                                  "count:vocab=6,length=4,prompts=3",
                                  "copy:vocab=16,length=1,prompts=all"])
def test_good_task_specs_pass_the_range_check(spec):
    from tpg.mdp.specs import parse_task_spec

    parse_task_spec(spec)


def test_threads_sets_torch_threads_for_the_run_and_is_checked(capsys, monkeypatch):
    import torch

    import tpg._threads as threads

    seen = []
    real = threads.intra_op_threads

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(threads, "intra_op_threads", spy)
    before = torch.get_num_threads()
    assert main(["verify", "--mdp", "dense:vocab=2,horizon=2,eos=0", "--estimator", "rloo", "--threads", "1"]) == 0
    assert seen and seen[0] == 1 and torch.get_num_threads() == before
    assert main(["verify", "--mdp", "dense:vocab=2,horizon=2,eos=0", "--estimator", "rloo", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_figures_and_report_take_the_progress_flag(tmp_path, capsys):
    assert main(["figures", "gamma_bias", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "f"),
                 "--progress"]) == 0
    assert "figures" in capsys.readouterr().err  # the bar, asked for off a terminal
    assert main(["figures", "gamma_bias", "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "f"),
                 "--no-progress"]) == 0
    assert "figures:" not in capsys.readouterr().err
