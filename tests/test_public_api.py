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
