"""The verifier's defaults and choices that the command line shows, in a module free of torch.

``tpg verify --help`` builds its parser from these without importing the verifier (torch takes
seconds to import); each is re-exported by the module that uses it (:mod:`.harness`,
:mod:`.exact_moments`, :mod:`.suite`), where it is documented.
"""

#: Verification modes: ``exact`` (enumerate the sample space) or ``mc`` (a Monte Carlo test).
MODES = ("exact", "mc")
#: Monte Carlo batches by default.
DEFAULT_SAMPLES = 4000
#: Family-wise false-alarm rate of a Monte Carlo run by default.
DEFAULT_ALPHA = 0.01
#: The exact mode's size guard: responses in the stacked sample space.
DEFAULT_MAX_ROWS = 2_000_000
#: The verification suites (``tpg verify --suite``).
SUITES = ("standard",)

__all__ = ["MODES", "DEFAULT_SAMPLES", "DEFAULT_ALPHA", "DEFAULT_MAX_ROWS", "SUITES"]
