"""The pytest plugin (tpg.pytest_plugin) run for real: a user's test file, in a pytest run of its own
(pytester), with the tpg_verifier fixture on a correct RLOO and on a deliberately biased function."""

import importlib.metadata
import re
import textwrap
from pathlib import Path

import pytest
from _ci import skip_unless_ci

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
CASE = "length:vocab=2,horizon=4,eos=1,seed=2"

USER_TESTS = textwrap.dedent(f'''
    import torch

    def my_rloo(rewards, group_ids):
        """Leave-one-out baseline: unbiased."""
        out = torch.zeros_like(rewards)
        for g in group_ids.unique():
            m = group_ids == g
            out[m] = rewards[m] - (rewards[m].sum() - rewards[m]) / (int(m.sum()) - 1)
        return out

    def mean_with_self(rewards, group_ids):
        """The group mean including the response itself: E[g] = (G - 1) / G grad J, not grad J."""
        out = torch.zeros_like(rewards)
        for g in group_ids.unique():
            m = group_ids == g
            out[m] = rewards[m] - rewards[m].mean()
        return out

    def test_rloo_is_unbiased(tpg_verifier):
        tpg_verifier.assert_unbiased(my_rloo, cases="{CASE}")

    def test_mean_with_self_is_unbiased(tpg_verifier):
        tpg_verifier.assert_unbiased(mean_with_self, cases="{CASE}")
''')


@pytest.fixture
def isolated(pytester, monkeypatch):
    """pytester with plugin autoloading off: the plugin comes from ``-p tpg.pytest_plugin`` alone, whether or
    not an installed tpg also registers it through its entry point."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return pytester


def test_fixture_passes_the_unbiased_and_fails_the_biased_with_a_readable_message(isolated):
    isolated.makepyfile(test_user=USER_TESTS)
    result = isolated.runpytest("-p", "tpg.pytest_plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "test_mean_with_self_is_unbiased" in out and "AssertionError" in out
    result.stdout.fnmatch_lines([
        "*tpg: test_user.mean_with_self is not unbiased on 1 of 1 case (G = 3; exact mode*",
        f"*case 1 of 1: {CASE}*",
        "*verdict   scaled (wanted unbiased)*",
        "*cosine    1.0000000000   scale 0.666667   rel_bias 0.333*",
        "*target    grad J*",
        "*case file */tpg-cases/case-1-length.json*",
        "*reproduce tpg verify --case */tpg-cases/case-1-length.json --estimator */test_user.py:mean_with_self "
        "--group-size 3*",
        f"*or tpg verify --mdp {CASE} --estimator */test_user.py:mean_with_self --group-size 3*",
    ])
    path = re.search(r"case file (\S+\.json)", out).group(1)
    assert Path(path).is_file() and "/test_mean_with_self_is_unbias" in path  # under the test's tmp_path


def test_marker_over_command_line_over_defaults(isolated):
    isolated.makepyfile(test_settings=textwrap.dedent('''
        import pytest

        def test_defaults(tpg_verifier):
            assert tpg_verifier.defaults["mode"] == "mc" and tpg_verifier.defaults["samples"] == 123
            assert tpg_verifier.defaults["group_size"] == 3 and tpg_verifier.case_dir.name == "tpg-cases"

        @pytest.mark.tpg(mode="exact", group_size=4)
        def test_marker(tpg_verifier):
            assert tpg_verifier.defaults["mode"] == "exact" and tpg_verifier.defaults["group_size"] == 4
            assert tpg_verifier.defaults["samples"] == 123
    '''))
    result = isolated.runpytest("-p", "tpg.pytest_plugin", "-p", "no:cacheprovider", "--tpg-mode", "mc",
                                "--tpg-samples", "123")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*tpg: tpg_verifier defaults mode=mc, samples=123*"])


def test_marker_with_an_unknown_key_is_a_usage_error(isolated):
    isolated.makepyfile(test_bad=textwrap.dedent('''
        import pytest

        @pytest.mark.tpg(modes="mc")
        def test_it(tpg_verifier):
            pass
    '''))
    result = isolated.runpytest("-p", "tpg.pytest_plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.tpg: unknown keys *modes*; allowed: mode, samples, seed, alpha, "
                                 "group_size*"])


def test_plugin_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, tpg.pytest_plugin; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}).stdout
    assert out.strip() == "[]"  # every pytest run of a repo with tpg installed loads it


def test_entry_point_table_names_the_plugin():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    # named as the module: `-p tpg.pytest_plugin` (or pytest_plugins = [...]) then finds it registered
    assert data["project"]["entry-points"]["pytest11"] == {"tpg.pytest_plugin": "tpg.pytest_plugin"}
    import tpg.pytest_plugin as plugin
    assert callable(plugin.tpg_verifier) and callable(plugin.pytest_addoption)


def test_installed_entry_point_loads_the_plugin_without_p(pytester):
    """Once tpg is (re)installed with this pyproject, plain ``pytest`` finds the fixture."""
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.value == "tpg.pytest_plugin"]
    if not eps:
        skip_unless_ci("the installed tpg predates its pytest11 entry point (reinstall to test it)")
    pytester.makepyfile(test_ep="def test_it(tpg_verifier):\n    assert tpg_verifier.defaults['mode'] == 'exact'\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    pytester.runpytest("-p", "no:cacheprovider", "-p", "tpg.pytest_plugin").assert_outcomes(passed=1)  # no clash
    pytester.runpytest("-p", "no:cacheprovider", "-p", "no:tpg.pytest_plugin").assert_outcomes(errors=1)
