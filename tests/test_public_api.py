"""Every public name of tpg and its sub-packages imports and is what __all__ says."""

import importlib

import pytest

PACKAGES = ["tpg", "tpg.mdp", "tpg.policies", "tpg.exact", "tpg.estimators", "tpg.verify", "tpg.train",
            "tpg.experiments"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_import(name):
    mod = importlib.import_module(name)
    assert mod.__all__, f"{name} has an empty __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert len(set(mod.__all__)) == len(mod.__all__), f"{name}.__all__ has duplicates"


def test_cli_entry_point_builds_every_command():
    from tpg.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd in ("exact", "prove", "verify", "probe", "train", "compare-runs", "mdp-help", "task-help",
                "study", "figures", "report"):
        assert cmd in sub.choices, f"tpg {cmd} is not registered"


def test_top_level_names_do_not_shadow_subpackages():
    import types

    import tpg
    for sub in ("mdp", "policies", "exact", "estimators", "verify", "train", "cases", "rollouts"):
        importlib.import_module(f"tpg.{sub}")
        assert isinstance(getattr(tpg, sub), types.ModuleType), f"tpg.{sub} is shadowed by a re-exported name"


def test_verify_is_a_callable_package():
    import types

    import tpg
    import tpg.verify.harness
    from tpg.cases import mdp_from_spec
    from tpg.verify import verify

    assert isinstance(tpg.verify, types.ModuleType) and callable(tpg.verify)
    assert verify is tpg.verify.harness.verify is tpg.verify.verify
    mdp, policy = mdp_from_spec("terminal:vocab=2,horizon=2,seed=0")
    (rec,) = tpg.verify(mdp, policy, "rloo")
    assert [rec] == verify(mdp, policy, "rloo") and rec["verdict"] == "unbiased"


def test_lazy_names_unknown_attributes_and_dir():
    import tpg
    import tpg.estimators

    assert "solve" in dir(tpg) and "verify" in dir(tpg) and "plugin_from_callable" in dir(tpg.estimators)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tpg.nope  # noqa: B018
    assert tpg.cases.load_case is tpg.load_case  # sub-modules are attributes, as with eager imports


# ---------------------------------------------------------------- the command line answers without torch
_NO_HEAVY = """
import sys
from tpg.cli import main
codes = []
for argv in ARGVS:
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
print(codes, sorted(m for m in ("torch", "numpy", "pandas", "scipy") if m in sys.modules))
"""


@pytest.mark.parametrize("argvs, codes", [
    ([["--help"]], [0]),
    ([["verify", "--help"], ["train", "--help"], ["study", "--help"], ["mdp-help"], ["task-help"]], [0, 0, 0, 0, 0]),
    ([["verify", "--mdp", "dense:foo=1", "--estimator", "rloo"], ["verify", "--task", "copy:vocab=x",
      "--estimator", "rloo"], ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--target-reward", "bogus"],
      ["exact", "--mdp", "dense:foo=1"]],
     [2, 2, 2, 2]),
    # ranges, estimator names and options, plug-in files, tpg train's specs: refused before torch loads too
    ([["verify", "--mdp", "dense:vocab=1", "--estimator", "rloo"], ["exact", "--mdp", "dense:horizon=40"],
      ["exact", "--mdp", "first_token:compact=true"], ["exact", "--task", "copy:horizon=30"],
      ["verify", "--task", "count:vocab=3,length=3", "--estimator", "rloo"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "grpx"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "grpo:std=1"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "all:std_norm=false"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "no_such_file.py:fn"],
      ["train", "--estimator", "grpx", "--mdp", "dense:vocab=3"], ["train", "--mdp", "dense:vocab=1"],
      ["train", "--algo", "grpo:kl=k3", "--task", "copy"], ["train", "--estimator", "rloo", "--task", "copy:vocab=99"]],
     [2] * 13),
    # option values out of range, in verify's and train's specs
    ([["verify", "--mdp", "dense:vocab=3", "--estimator", "grpo:eps=-1"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "trepo:anchors=every:0"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo;ppo_gae:critic=oracle"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "all:agg=mean"],
      ["train", "--estimator", "ppo:lambda=2", "--mdp", "dense:vocab=3"]],
     [2] * 5),
    # behaviour and loss specs: names, options, ranges, cross-option rules, plug-in files
    ([["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--behaviour", "temperature:-1"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--behaviour", "top_p:0.9+stale:2"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--behaviour", "mix:0.5,pi"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--loss", "ppo_clip:eps=-1"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--loss", "mis:2,1"],
      ["verify", "--mdp", "dense:vocab=3", "--estimator", "rloo", "--loss", "no_such_file.py:fn"],
      ["train", "--estimator", "rloo", "--mdp", "dense:vocab=3", "--behaviour", "top_q:0.9"],
      ["train", "--estimator", "rloo", "--mdp", "dense:vocab=3", "--loss", "tis:2,cap=3"]],
     [2] * 8),
    ([["prove", "--help"], ["figures", "--help"], ["report", "--help"], ["probe", "--help"]], [0, 0, 0, 0]),
])
def test_help_and_spec_errors_do_not_import_torch(argvs, codes):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = f"ARGVS = {argvs!r}\n" + _NO_HEAVY
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env={"PYTHONPATH": str(repo), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"{codes!r} []", out.stdout[-500:]


def test_python_m_tpg_help_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tpg", "--help"], capture_output=True, text=True,
                         cwd=repo, env={"PYTHONPATH": str(repo), "PATH": ""})
    assert out.returncode == 0 and "usage: tpg" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "tpg.cli" in imported and not {"torch", "numpy", "pandas"} & imported


def test_an_export_named_like_its_submodule_stays_the_export():
    import sys
    import types

    import tpg.verify.exact_moments as m  # binds the sub-module in tpg.verify, as any import of it does
    from tpg.verify import exact_moments

    assert isinstance(exact_moments, types.FunctionType) and m is exact_moments  # as with eager imports
    assert isinstance(sys.modules["tpg.verify.exact_moments"], types.ModuleType)
