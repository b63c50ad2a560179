"""The pytest plugin of tpg: a ``tpg_verifier`` fixture, a ``tpg`` marker and ``--tpg-*`` options.

Installed with tpg (entry point ``tpg.pytest_plugin`` in the ``pytest11`` group), so in any repository
where tpg is installed::

    def my_rloo(rewards, group_ids):
        ...

    def test_my_rloo_is_unbiased(tpg_verifier):
        tpg_verifier.assert_unbiased(my_rloo)                         # tpg.testing.DEFAULT_CASES, G = 3
        tpg_verifier.assert_unbiased(my_rloo, cases=["dense:vocab=3,horizon=4,eos=0"], group_size=4)

    @pytest.mark.tpg(mode="mc", samples=2000)                         # per-test defaults
    def test_on_a_bigger_problem(tpg_verifier):
        tpg_verifier.assert_unbiased(my_rloo, cases="dense:vocab=4,horizon=6,eos=0")

``tpg_verifier`` is a :class:`tpg.testing.Verifier` whose failing cases' files go to the test's
``tmp_path`` (``tmp_path/tpg-cases``), so pytest keeps them for the last few runs; its methods
``assert_unbiased``, ``assert_scaled`` and ``assert_biased`` take the arguments of the functions of
:mod:`tpg.testing` and raise ``AssertionError`` with the verdict, cosine, scale, the case file and
the ``tpg verify`` command that reproduces it.

Settings, from strongest to weakest: the method's keyword arguments, the test's ``@pytest.mark.tpg(...)``
(``mode``, ``samples``, ``seed``, ``alpha``, ``group_size``), the command line (``--tpg-mode exact|mc``,
``--tpg-samples N``, ``--tpg-seed S``), then exact mode, 4000 samples, seed 0, alpha 0.01, ``G = 3``.

Without installing (or with plugin autoloading off): ``pytest -p tpg.pytest_plugin`` (or
``pytest_plugins = ["tpg.pytest_plugin"]`` in a conftest), which is also harmless once it is installed:
the entry point carries the module's name. ``-p no:tpg.pytest_plugin`` turns it off. The plugin imports
nothing heavy until a test uses the fixture.
"""

from __future__ import annotations

import pytest

#: The keys of ``@pytest.mark.tpg(...)``.
MARKER_KEYS = ("mode", "samples", "seed", "alpha", "group_size")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("tpg", "tpg: verify policy-gradient estimators (the tpg_verifier fixture)")
    group.addoption("--tpg-mode", choices=("exact", "mc"), default=None,
                    help="default mode of tpg_verifier: exact (proofs by enumeration, the default) or mc (a "
                         "Monte Carlo test: 'consistent' is not a proof)")
    group.addoption("--tpg-samples", type=int, default=None, metavar="N",
                    help="default Monte Carlo batches of tpg_verifier (default 4000)")
    group.addoption("--tpg-seed", type=int, default=None, metavar="S",
                    help="default seed of tpg_verifier's Monte Carlo batches (default 0)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "tpg(mode=, samples=, seed=, alpha=, group_size=): defaults of the "
                                       "tpg_verifier fixture for this test")


def verifier_settings(config, marker=None) -> dict:
    """The :class:`tpg.testing.Verifier` settings of a test: the marker's over the command line's."""
    out = {}
    for key in ("mode", "samples", "seed"):
        value = config.getoption(f"tpg_{key}", None)
        if value is not None:
            out[key] = value
    if marker is not None:
        if marker.args:
            raise ValueError(f"@pytest.mark.tpg takes keyword arguments ({', '.join(MARKER_KEYS)}), "
                                    f"got positional {marker.args!r}")
        unknown = sorted(set(marker.kwargs) - set(MARKER_KEYS))
        if unknown:
            raise ValueError(f"@pytest.mark.tpg: unknown keys {unknown}; allowed: {', '.join(MARKER_KEYS)}")
        out.update(marker.kwargs)
    return out


@pytest.fixture
def tpg_verifier(request, tmp_path):
    """A :class:`tpg.testing.Verifier` writing failing cases' files under ``tmp_path / "tpg-cases"``."""
    from tpg.testing import Verifier

    settings = verifier_settings(request.config, request.node.get_closest_marker("tpg"))
    return Verifier(case_dir=tmp_path / "tpg-cases", **settings)


def pytest_report_header(config) -> str | None:
    settings = verifier_settings(config)
    if not settings:
        return None
    return "tpg: tpg_verifier defaults " + ", ".join(f"{k}={v}" for k, v in settings.items())
