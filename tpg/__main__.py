"""``python -m tpg ...``: the ``tpg`` command line (:func:`tpg.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
