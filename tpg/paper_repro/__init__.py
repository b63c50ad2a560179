"""One script per figure of the studies (``tpg figures`` runs them; they ship with the package).

Each ``NAME.py`` here (but :mod:`.style` and private ``_*.py`` helpers) reads a study's cached results
and writes ``NAME.png`` and ``NAME.pdf`` through its ``main(cache_dir, out_dir)``; ``tpg figures`` lists
them with :func:`tpg.experiments.cli.figure_scripts`. A script also runs on its own:
``python -m tpg.paper_repro.NAME [--cache-dir DIR] [--out-dir DIR]`` (or ``python tpg/paper_repro/NAME.py``
from a checkout). The scripts sit on top of the data flow: they import :mod:`tpg.experiments`, and
nothing in tpg imports them (``tpg figures`` loads them from their files).
"""
