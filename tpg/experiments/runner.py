"""Run a study's grid of cells in parallel, caching each cell's result on disk.

A *study* is a module of :mod:`tpg.experiments.studies` (or any object with the same
attributes): ``NAME``, a frozen dataclass ``Cell``, ``cells(quick) -> list[Cell]`` and the pure
function ``run_cell(cell) -> DataFrame``. The runner

* keys every cell by ``sha256(json(asdict(cell), sort_keys) + class name + tpg.__version__)``
  (:func:`cache_key`), so a changed config or a new package version is a new cell;
* computes only the cells whose ``<cache_dir>/<study>/<key>.parquet`` is missing, on joblib
  workers (``processes``: loky; ``dask``/``ray``: the same cells on a cluster through joblib's
  backends; ``sequential``: in this process), with a progress bar of cells done and time left;
* writes each result to a temporary file and renames it, so an interrupted run leaves only
  whole cells and the next run resumes where it stopped;
* checks every cell it reads: a cell file carries the sha256 of its own bytes (in its Parquet
  key-value metadata, ``tpg.sha256``, computed with that digest replaced by 64 zeros), so
  garbage, a truncated file or one damaged byte anywhere is detected (:func:`read_cell`). A
  damaged cell is moved to ``<cache_dir>/<study>/quarantine/`` with a one-line message on
  stderr; :func:`run_study` then recomputes it, and :func:`load_results` leaves it out and says
  so. Cells written before checksums existed are read unverified (Parquet's own checks only);
* returns one DataFrame: every row of ``run_cell`` plus the cell's fields as columns
  (nested dicts flattened to ``outer.inner``, lists stored as JSON text), ``study`` and
  ``cell_key``.

Each run also records its cell keys in ``<cache_dir>/<study>/latest.json``;
:func:`load_results` reads the cells of that latest run (``which="all"``: every cached cell), so
figures and the report describe the last grid that was run, quick or full, not a mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .._lazy import LazyModule

pd = LazyModule("pandas")  # imported on first use: `tpg --help` registers `tpg study` without pandas

BACKENDS = ("processes", "sequential", "dask", "ray")
_MANIFEST = "latest.json"
_DASK_CLIENT = None  # the client run_study started, kept alive for later runs in this process


# ------------------------------------------------------------------------------ keys and files
def cell_dict(cell: Any) -> dict:
    """``asdict(cell)``; raises ``TypeError`` for anything but a dataclass instance."""
    if not dataclasses.is_dataclass(cell) or isinstance(cell, type):
        raise TypeError(f"a cell must be a dataclass instance, got {type(cell).__name__}")
    return dataclasses.asdict(cell)


def cache_key(cell: Any) -> str:
    """``sha256(json(asdict(cell), sorted keys) + cell class name + tpg.__version__)`` as hex."""
    from tpg import __version__

    text = json.dumps(cell_dict(cell), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256((text + type(cell).__name__ + __version__).encode()).hexdigest()


def flatten_fields(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> ``{"outer.inner": value}``; lists/tuples -> JSON text (Parquet-safe
    scalars only)."""
    out: dict = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_fields(v, name + "."))
        elif isinstance(v, (list, tuple)):
            out[name] = json.dumps(v)
        else:
            out[name] = v
    return out


def study_dir(study_name: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / study_name


def _cell_path(study_name: str, key: str, cache_dir: str | Path) -> Path:
    return study_dir(study_name, cache_dir) / f"{key}.parquet"


_CHECKSUM_KEY = b"tpg.sha256"
_PLACEHOLDER = b"0" * 64
QUARANTINE = "quarantine"


class CorruptCell(ValueError):
    """A cached cell file that cannot be trusted (not Parquet, truncated, or its checksum differs)."""


def _digest_with_placeholder(data: bytes, digest: bytes) -> bytes | None:
    """``sha256`` (hex) of ``data`` with its last occurrence of ``digest`` replaced by 64 zeros, or
    ``None`` when ``digest`` does not occur. The key-value metadata sits in the Parquet footer,
    after every data page and statistic, so the last occurrence is the stored one."""
    pos = data.rfind(digest)
    if pos < 0:
        return None
    return hashlib.sha256(data[:pos] + _PLACEHOLDER + data[pos + len(digest):]).hexdigest().encode()


def cell_bytes(df: pd.DataFrame) -> bytes:
    """The Parquet bytes of a cell's frame (what ``df.to_parquet(index=False)`` writes) with the
    sha256 of the whole file in its key-value metadata ``tpg.sha256``: written once with 64 zeros
    there, hashed, and the zeros overwritten by the hex digest (the same length, so no other byte
    moves). :func:`read_cell` reverses the substitution to check it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _CHECKSUM_KEY: _PLACEHOLDER})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    pos = data.rfind(_PLACEHOLDER)
    digest = hashlib.sha256(data).hexdigest().encode()
    data = data[:pos] + digest + data[pos + len(_PLACEHOLDER):]
    if _digest_with_placeholder(data, digest) != digest:  # pragma: no cover - would be a bug here
        raise AssertionError("a cell's checksum does not verify right after writing it")
    return data


def read_cell(path: str | Path) -> pd.DataFrame:
    """A cached cell's frame, after checking the file: ``CorruptCell`` (a ``ValueError``) when it is
    not Parquet, is truncated, or differs anywhere from what was written (its ``tpg.sha256``)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(path).read_bytes()
    try:
        meta = pq.read_metadata(pa.BufferReader(data)).metadata or {}
    except Exception as exc:  # not Parquet, truncated, a damaged footer
        raise CorruptCell(f"not a readable Parquet file: {_one_line(exc)}") from None
    digest = meta.get(_CHECKSUM_KEY)
    if digest is not None and (len(digest) != 64 or _digest_with_placeholder(data, digest) != digest):
        raise CorruptCell("its sha256 does not match its contents: the file was damaged after it was written")
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # a legacy cell without checksum whose pages are damaged
        raise CorruptCell(f"its data cannot be decoded: {_one_line(exc)}") from None


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quarantine_cell(path: Path, reason: str, consequence: str) -> Path | None:
    """Move a damaged cell file into ``quarantine/`` beside it (a unique name, so nothing there is
    ever overwritten) and print one line on stderr saying why and what follows; returns the new
    path, or ``None`` when it could not be moved (a read-only cache: the message says so)."""
    import sys

    dest = path.parent / QUARANTINE / f"{path.stem}.{time.time_ns()}{path.suffix}"
    try:
        dest.parent.mkdir(exist_ok=True)
        os.replace(path, dest)
        where = f"moved to {dest}"
    except OSError as exc:
        dest, where = None, f"could not move it aside ({exc.strerror or exc})"
    print(f"tpg: cache cell {path} is damaged ({reason}); {where}; {consequence}", file=sys.stderr, flush=True)
    return dest


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    # serialised with its checksum, written to a dotted temporary file and renamed: a kill mid-write
    # leaves only the temporary, which no reader ever picks up
    from tpg._io import write_bytes_atomic

    write_bytes_atomic(path, cell_bytes(df))


def _with_cell_columns(df: pd.DataFrame, study_name: str, cell: Any, key: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"run_cell of study {study_name!r} returned {type(df).__name__}, not a DataFrame")
    df = df.reset_index(drop=True).copy()
    # run_cell's own columns win over cell fields of the same name
    for name, value in flatten_fields(cell_dict(cell)).items():
        if name not in df.columns:
            df[name] = [value] * len(df)
    df["study"] = study_name
    df["cell_key"] = key
    return df


def compute_cell(run_cell: Callable, study_name: str, cell: Any, cache_dir: str | Path) -> str:
    """Run one cell and store it (the unit of work a joblib worker does); returns its key."""
    key = cache_key(cell)
    path = _cell_path(study_name, key, cache_dir)
    if not path.exists():
        df = _with_cell_columns(run_cell(cell), study_name, cell, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(df, path)
    return key


# ------------------------------------------------------------------------------ studies
def get_study(study: str | ModuleType) -> ModuleType:
    """A study module from its name (``tpg.experiments.studies.<name>``) or the module itself."""
    if isinstance(study, str):
        from .studies import load_study

        return load_study(study)
    for attr in ("NAME", "cells", "run_cell"):
        if not hasattr(study, attr):
            raise TypeError(f"{study!r} is not a study: it lacks {attr}")
    return study


def _cached_frames(study_name: str, keys: list[str], cache_dir: str | Path, consequence: str) -> dict:
    """``{key: frame}`` of the cached cells among ``keys`` that read and verify (:func:`read_cell`);
    a damaged one is quarantined (:func:`quarantine_cell`, with ``consequence`` in its message) and
    left out, a missing one just left out."""
    frames = {}
    for k in dict.fromkeys(keys):
        path = _cell_path(study_name, k, cache_dir)
        if not path.exists():
            continue
        try:
            frames[k] = read_cell(path)
        except CorruptCell as exc:
            quarantine_cell(path, str(exc), consequence)
    return frames


def _read_cells(study_name: str, keys: list[str], cache_dir: str | Path, frames: dict | None = None,
                consequence: str = "left out of these results") -> pd.DataFrame:
    """The cells ``keys`` (in order) as one frame: those in ``frames`` as given, the others read
    from the cache and checked; damaged ones are quarantined and left out."""
    frames = dict(frames or {})
    missing = [k for k in keys if k not in frames]
    frames.update(_cached_frames(study_name, missing, cache_dir, consequence))
    found = [frames[k] for k in keys if k in frames]
    found = [f for f in found if len(f.columns)]
    if not found:
        return pd.DataFrame()
    return pd.concat(found, ignore_index=True)


def _read_manifest(d: Path) -> dict | None:
    """The latest run's manifest of a study directory, or ``None`` when there is none; a damaged
    one is reported on stderr and treated as absent (it never blocks ``study`` or ``report``)."""
    import sys

    manifest = d / _MANIFEST
    if not manifest.exists():
        return None
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or \
                not all(isinstance(k, str) for k in data["keys"]):
            raise ValueError("it is not a {\"keys\": [...]} object")
        return data
    except (OSError, ValueError, RecursionError) as exc:
        print(f"tpg: cache manifest {manifest} is damaged ({_one_line(exc)}); ignoring it", file=sys.stderr,
              flush=True)
        return None


def load_results(study_name: str, cache_dir: str | Path = ".tpg-cache", which: str = "latest") -> pd.DataFrame:
    """The cached results of a study as one DataFrame (empty if nothing is cached).

    ``which="latest"``: the cells of the latest :func:`run_study` of this study that are cached
    (all cached cells if no run was recorded); ``which="all"``: every cached cell, whatever grid
    it came from.
    """
    if which not in ("latest", "all"):
        raise ValueError(f"which must be 'latest' or 'all', got {which!r}")
    d = study_dir(study_name, cache_dir)
    if not d.is_dir():
        return pd.DataFrame()
    manifest = _read_manifest(d) if which == "latest" else None
    if manifest is not None:
        keys = manifest["keys"]
    else:
        keys = sorted(p.stem for p in d.glob("*.parquet"))
    keys = [k for k in dict.fromkeys(keys) if _cell_path(study_name, k, cache_dir).exists()]
    return _read_cells(study_name, keys, cache_dir,
                       consequence=f"left out of these results (`tpg study {study_name}` recomputes it)")


def latest_run_info(study_name: str, cache_dir: str | Path = ".tpg-cache") -> dict | None:
    """``{"study", "quick", "keys", "started"}`` of the latest run, or ``None`` (also for a damaged
    manifest, which is reported on stderr)."""
    return _read_manifest(study_dir(study_name, cache_dir))


# ------------------------------------------------------------------------------ running
def _parallel(backend: str, n_jobs: int):
    """A ``joblib.Parallel`` for the backend, plus a context manager to run it under."""
    import contextlib

    import joblib

    if backend == "processes":
        return joblib.Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered"), contextlib.nullcontext()
    if backend == "dask":
        try:
            from dask.distributed import Client, get_client
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("backend 'dask' needs dask[distributed]: pip install 'tpg[dask]'") from exc
        global _DASK_CLIENT
        try:
            get_client()
        except ValueError:
            # connects to DASK_SCHEDULER_ADDRESS when set, else starts a local cluster
            _DASK_CLIENT = Client() if os.environ.get("DASK_SCHEDULER_ADDRESS") else Client(n_workers=n_jobs)
        return joblib.Parallel(n_jobs=-1, return_as="generator_unordered"), joblib.parallel_config(backend="dask")
    if backend == "ray":
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("backend 'ray' needs ray: pip install 'tpg[ray]'") from exc
        register_ray()
        if not ray.is_initialized():
            ray.init()  # honours RAY_ADDRESS
        return joblib.Parallel(n_jobs=-1, return_as="generator_unordered"), joblib.parallel_config(backend="ray")
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def run_study(study: str | ModuleType, quick: bool = False, backend: str = "processes", n_jobs: int = 2,
              cache_dir: str | Path = ".tpg-cache", progress: bool = True) -> pd.DataFrame:
    """Run every cell of ``study.cells(quick)`` not yet cached and return all its rows.

    Cells run on ``n_jobs`` joblib workers (``backend``: ``processes`` | ``sequential`` |
    ``dask`` | ``ray``); each finished cell is stored at once, so a killed run resumes. The
    result has one row per row of ``run_cell`` with the cell's fields, ``study`` and
    ``cell_key`` as columns, in the order of the grid.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    mod = get_study(study)
    name = mod.NAME
    grid = list(mod.cells(quick))
    keys = [cache_key(c) for c in grid]
    if len(set(keys)) != len(keys):
        raise ValueError(f"study {name!r} has duplicate cells in its grid")
    d = study_dir(name, cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"study": name, "quick": bool(quick), "keys": keys, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_text_atomic(d / _MANIFEST, json.dumps(manifest, indent=1))

    cached = _cached_frames(name, keys, cache_dir, "it will be recomputed")  # damaged cells: quarantined
    todo = [c for c, k in zip(grid, keys) if k not in cached]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc=f"study {name}", unit="cell",
                   dynamic_ncols=True)
    try:
        if backend == "sequential" or len(todo) <= 1 or (backend == "processes" and n_jobs == 1):
            for cell in todo:
                compute_cell(mod.run_cell, name, cell, cache_dir)
                if bar is not None:
                    bar.update(1)
        elif todo:
            import joblib

            par, ctx = _parallel(backend, n_jobs)
            with ctx:
                for _ in par(joblib.delayed(compute_cell)(mod.run_cell, name, cell, str(cache_dir)) for cell in todo):
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return _read_cells(name, keys, cache_dir, frames=cached)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["BACKENDS", "run_study", "load_results", "latest_run_info", "cache_key", "compute_cell",
           "flatten_fields", "get_study", "read_cell", "cell_bytes", "quarantine_cell", "CorruptCell", "QUARANTINE"]
