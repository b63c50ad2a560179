"""Reading and writing run logs: Parquet (``.parquet``/``.pq``, through pyarrow) or CSV (``.csv``).

A log is written atomically, like a checkpoint: serialised in memory, written to a temporary
file beside the destination and renamed over it (:func:`tpg._io.write_bytes_atomic`), so a
crash or a signal never leaves half a log. Without pyarrow a Parquet path is written as CSV next
to it (``FILE.parquet.csv``), with a warning on stderr; :func:`read_log` reads either.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from .._io import write_bytes_atomic


def _has_parquet() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_log(df, path: str, quiet: bool = False) -> str:
    """Write ``df`` by ``path``'s extension, atomically (module docstring); returns the path written.
    An ``OSError`` names ``path``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"TrainConfig.out: a log file must end in .parquet, .pq or .csv, got {path!r}")
    if suffix != ".csv" and not _has_parquet():
        alt = p.with_name(p.name + ".csv")
        if not quiet:
            print(f"tpg train: pyarrow is not installed; writing {alt} (CSV) instead of {p}", file=sys.stderr)
        p, suffix = alt, ".csv"
    if suffix == ".csv":
        data = df.to_csv(index=False).encode()
    else:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        data = buf.getvalue()
    write_bytes_atomic(p, data)
    return str(p)


#: log columns renamed since earlier releases, old -> new (old logs here, old checkpoints' rows in the trainer)
RENAMED_COLUMNS = {"algo": "method"}


def read_log(path: str):
    """A run log written by :func:`write_log` (Parquet or CSV); a log of an earlier release gets the
    current column names (``algo`` is ``method``)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        alt = p.with_name(p.name + ".csv")
        if alt.is_file():
            p = alt
        else:
            raise ValueError(f"no run log at {path!r}")
    try:
        df = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
    except Exception as exc:
        raise ValueError(f"cannot read run log {str(p)!r}: {exc}") from None
    return df.rename(columns={old: new for old, new in RENAMED_COLUMNS.items()
                              if old in df.columns and new not in df.columns})


__all__ = ["write_log", "read_log", "RENAMED_COLUMNS"]
