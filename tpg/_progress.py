"""Progress bars: one rule for every long command, free of torch.

``progress`` is ``True`` (show a bar), ``False`` (none) or ``None`` (auto: a bar only when stderr is a
terminal, so logs, pipes and CI output stay free of carriage-return noise). The command line's
``--progress/--no-progress`` (absent: auto) passes its value straight through.

:class:`Note` is the warning category of what a long run tells its user in passing (the command line
prints it as one ``tpg: note: ...`` line on stderr; in Python it is an ordinary warning).
"""

from __future__ import annotations

import sys


def show_progress(progress: bool | None, stream=None) -> bool:
    """Whether to draw a bar: ``progress`` when it is a bool, else whether ``stream`` (default
    ``sys.stderr``) is a terminal."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(progress: bool | None, **kw):
    """A ``tqdm`` bar on stderr, disabled unless :func:`show_progress` says to draw it (tqdm is
    imported here, on first use)."""
    from tqdm import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(disable=not show_progress(progress, kw["file"]), **kw)


class Note(UserWarning):
    """Something a run tells its user in passing, printed by the command line as ``tpg: note: ...``."""


__all__ = ["show_progress", "progress_bar", "Note"]
