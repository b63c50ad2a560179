"""Reading and writing run logs: Parquet (``.parquet``/``.pq``, through pyarrow) or CSV (``.csv``).

Without pyarrow a Parquet path is written as CSV next to it (``FILE.parquet.csv``), with a
warning on stderr; :func:`read_log` reads either.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _has_parquet() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_log(df, path: str) -> str:
    """Write ``df`` by ``path``'s extension; returns the path written."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"TrainConfig.out: a log file must end in .parquet, .pq or .csv, got {path!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        df.to_csv(p, index=False)
        return str(p)
    if not _has_parquet():
        alt = p.with_name(p.name + ".csv")
        print(f"tpg train: pyarrow is not installed; writing {alt} (CSV) instead of {p}", file=sys.stderr)
        df.to_csv(alt, index=False)
        return str(alt)
    df.to_parquet(p, index=False)
    return str(p)


def read_log(path: str):
    """A run log written by :func:`write_log` (Parquet or CSV)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        alt = p.with_name(p.name + ".csv")
        if alt.is_file():
            p = alt
        else:
            raise ValueError(f"no run log at {path!r}")
    try:
        if p.suffix.lower() == ".csv":
            return pd.read_csv(p)
        return pd.read_parquet(p)
    except Exception as exc:
        raise ValueError(f"cannot read run log {str(p)!r}: {exc}") from None


__all__ = ["write_log", "read_log"]
