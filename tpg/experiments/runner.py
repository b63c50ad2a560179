"""Run a study's grid of cells in parallel, caching each cell's result on disk.

A *study* is a module of :mod:`tpg.experiments.studies` (or any object with the same
attributes): ``NAME``, a frozen dataclass ``Cell``, ``cells(quick) -> list[Cell]`` and the pure
function ``run_cell(cell) -> DataFrame``. The runner

* keys every cell by ``sha256(json(asdict(cell), sort_keys) + class name + tpg.__version__)``
  (:func:`cache_key`), so a changed config or a new package version is a new cell;
* computes only the cells whose ``<cache_dir>/<study>/<key>.parquet`` is missing: on joblib's
  loky processes (``processes``), in this process (``sequential``), or as one task per cell on a
  dask or ray cluster (``dask``/``ray``: a local one, or one at an address, see
  :class:`ClusterSession`), with a progress bar of cells done and time left;
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

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .._io import write_bytes_atomic
from .._lazy import LazyModule
from .._progress import progress_bar, show_progress

pd = LazyModule("pandas")  # imported on first use: `tpg --help` registers `tpg study` without pandas

BACKENDS = ("processes", "sequential", "dask", "ray")
_MANIFEST = "latest.json"


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
        _write_atomic(df, path)  # creates the study's directory when missing
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


# ------------------------------------------------------------------------------ clusters
#: the backends that hand cells to a cluster (:class:`ClusterSession`)
CLUSTER_BACKENDS = ("dask", "ray")
#: seconds to wait for a dask scheduler at an address and for its first worker
CONNECT_TIMEOUT = 30.0


class ClusterError(RuntimeError):
    """A cluster backend could not finish a study: a cell's workers kept dying, a worker runs other
    tpg code than the driver, or a finished cell's file is not visible to the driver. The cells
    finished before it are cached; a rerun computes only the rest."""


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """``sha256`` over ``(path relative to the package, bytes)`` of every ``.py`` file of the
    ``tpg`` package this process imports (``tpg.proofs_checks`` and ``tpg.paper_repro`` included).

    Two processes with the same digest run the same tpg code, whatever the install (checkout,
    editable, wheel); a cluster worker must match the driver's (:func:`_cell_on_worker`)."""
    h = hashlib.sha256()
    for root in _code_dirs():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent).as_posix()
            if "__pycache__" in rel:
                continue
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _code_dirs() -> list[Path]:
    """The package directory of ``tpg`` (with its ``tpg.proofs_checks`` and ``tpg.paper_repro``): the
    code a worker needs, shipped to ray clusters as ``py_modules``."""
    import tpg

    return [Path(tpg.__file__).resolve().parent]


def _driver_paths() -> list[str]:
    """The directories on this process's ``sys.path`` outside the Python installation (a checkout,
    ``$PYTHONPATH``, folders added at run time), absolute, in order."""
    import sysconfig

    installed = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    installed |= {Path(p).resolve() for p in sysconfig.get_paths().values()}
    out: list[str] = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if not path.is_dir() or any(path == r or r in path.parents for r in installed):
            continue
        if str(path) not in out:
            out.append(str(path))
    return out


def _cell_on_worker(run_cell: Callable, study_name: str, cell: Any, cache_dir: str, key: str, digest: str) -> str:
    """The unit of work of a cluster backend: :func:`compute_cell` on a worker, once the worker is
    shown to run the driver's tpg (same :func:`source_digest`), since a worker with other code
    would cache other numbers under the same key. Returns the cell's key."""
    here = source_digest()
    if here != digest:
        import socket

        import tpg

        raise ClusterError(
            f"worker {socket.gethostname()} (pid {os.getpid()}) imports tpg from "
            f"{Path(tpg.__file__).resolve().parent} (version {tpg.__version__}), whose source differs from the "
            f"driver's (digest {here[:12]} vs {digest[:12]}): start the workers with the driver's tpg on their "
            f"path (PYTHONPATH=<checkout> dask worker ..., or pip install the same commit)")
    done = compute_cell(run_cell, study_name, cell, cache_dir)
    if done != key:
        raise ClusterError(f"the worker's cache key {done[:12]} differs from the driver's {key[:12]} for cell {cell!r}")
    return done


#: seconds allowed for the probe's Python and dask/ray start-up, beyond ``CONNECT_TIMEOUT``
PROBE_STARTUP = 15.0
#: what the probe's child process runs, per backend: connect to sys.argv[1], print an id, and
#: leave with os._exit, skipping the client's shutdown (only the answer matters)
_PROBES = {
    "dask": ("a dask scheduler", """
import os, sys
from dask.distributed import Client
client = Client(sys.argv[1], timeout=float(sys.argv[2]), set_as_default=False)
print(client.scheduler_info()["id"], flush=True)
os._exit(0)
""", "is it a `dask scheduler` address, tcp://HOST:PORT?"),
    "ray": ("a ray cluster", """
import os, sys
import ray
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="ERROR")
print(ray.get_runtime_context().get_node_id(), flush=True)
os._exit(0)
""", "with auto: is the cluster that `ray start --head` left in /tmp/ray still running?"),
}


def _probe_cluster(backend: str, address: str, where: str) -> None:
    """Check, in a child process killed after ``CONNECT_TIMEOUT`` plus ``PROBE_STARTUP``, that a
    dask scheduler or ray cluster answers at ``address``; ``ValueError`` naming ``where`` otherwise.

    Why a child process: a server at that address that is not a dask scheduler (an HTTP server, a
    port reused by another service) can make ``Client(address, timeout=...)`` hang well past its
    timeout, or fail deep in the protocol and hang again in the client's clean-up; ray retries a
    dead address (a stale ``/tmp/ray/ray_current_cluster`` left by an earlier ``ray start``) for
    minutes. A process can always be killed. Not for ``ray://`` addresses: the Ray Client fails
    fast on its own, and its server does not survive a killed client."""
    import subprocess

    what, script, hint = _PROBES[backend]
    try:
        proc = subprocess.run([sys.executable, "-c", script, address, str(CONNECT_TIMEOUT)],
                              capture_output=True, text=True, timeout=CONNECT_TIMEOUT + PROBE_STARTUP)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{where}: no {what[2:]} answered at {address!r} within {CONNECT_TIMEOUT:g} s "
                         f"({hint})") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        auth = ("; if the cluster uses token authentication (the default of `ray start`), set RAY_AUTH_MODE=token"
                if backend == "ray" and address != "auto" and "RAY_AUTH_MODE" not in os.environ else "")
        raise ValueError(f"{where}: cannot connect to {what} at {address!r} within {CONNECT_TIMEOUT:g} s "
                         f"({reason}){auth}")


class ClusterSession:
    """One connection to a dask or ray cluster, shared by the :func:`run_study` calls made while
    it is open (:func:`cluster_session`), started on first use and closed by :meth:`close`.

    Where the cells go (first match):

    * dask: ``address`` (``tcp://HOST:PORT`` of a running ``dask scheduler``), else
      ``$DASK_SCHEDULER_ADDRESS``, else the ``dask.distributed.Client`` this process already made,
      else a new ``LocalCluster`` of ``n_jobs`` worker processes with one thread each;
    * ray: ``address`` (``auto``: the cluster ``ray start --head`` last started on this machine;
      ``HOST:PORT`` of a head node; ``ray://HOST:10001``, the Ray Client, needs ``ray[client]``),
      else ``$RAY_ADDRESS``, else the ray instance this process is connected to, else a new local
      ray instance with ``n_jobs`` CPUs. Ray sends its authentication token to an address it is
      given only with ``RAY_AUTH_MODE=token`` (``auto`` needs nothing).

    With a cluster at an address, its workers set the parallelism (``n_jobs`` is not used).
    Workers must import the driver's tpg: a local cluster's workers inherit this process's
    ``sys.path``; on a ray cluster at an address the ``tpg`` package (``tpg.proofs_checks`` included) is
    shipped as the job's ``py_modules``; dask workers at an address must have it on their path.
    Every cell first checks that its worker's :func:`source_digest` equals the driver's and fails
    with :class:`ClusterError` if not. The cache directory must be on storage the driver and the
    workers share (a local cluster always does).

    A worker that dies while computing a cell loses only that cell: dask reruns it on another
    worker up to ``distributed.scheduler.allowed-failures`` times (3), ray up to ``max_retries``
    (3); past that the study stops with :class:`ClusterError` and a rerun resumes.
    """

    def __init__(self, backend: str, n_jobs: int = 2, address: str | None = None):
        if backend not in CLUSTER_BACKENDS:
            raise ValueError(f"a cluster backend must be one of {', '.join(CLUSTER_BACKENDS)}, got {backend!r}")
        if n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(f"address must be a non-empty string, got {address!r}")
        self.backend = backend
        self.n_jobs = n_jobs
        self.address = address.strip() if address else None
        #: where the cells go, in words (set by :meth:`connect`)
        self.description: str | None = None
        self.client = None  # dask: the Client
        self._local_cluster = None  # dask: the LocalCluster this session started
        self._owns_client = False
        self._owns_ray = False

    # -------------------------------------------------------------- connecting
    def connect(self) -> "ClusterSession":
        """Connect to (or start) the cluster; a no-op once connected."""
        if self.description is None:
            (self._connect_dask if self.backend == "dask" else self._connect_ray)()
        return self

    def _connect_dask(self) -> None:
        try:
            from dask.distributed import Client, LocalCluster, get_client
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError("backend 'dask' needs dask[distributed]: pip install 'tpg[dask]'") from None
        address = self.address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        if address is not None:
            where = "address" if self.address else "DASK_SCHEDULER_ADDRESS"
            _probe_cluster("dask", address, where)
            try:
                client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
            except Exception as exc:  # any failure of dask's handshake: one line, not its traceback
                raise ValueError(f"{where}: cannot connect to a dask scheduler at {address!r} within "
                                 f"{CONNECT_TIMEOUT:g} s ({type(exc).__name__}: {exc})") from None
            self.client, self._owns_client = client, True
            try:
                client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            except Exception:  # dask's own TimeoutError type varies across versions
                self.close()
                raise ValueError(f"the dask scheduler at {address!r} has no workers (waited "
                                 f"{CONNECT_TIMEOUT:g} s); start some with `dask worker {address}`") from None
            self.description = f"dask scheduler {address} ({len(client.scheduler_info()['workers'])} workers)"
            return
        try:
            self.client = get_client()
            self.description = f"the dask client of this process ({self.client.scheduler.address})"
            return
        except ValueError:
            pass
        # one thread per worker: cells are single-threaded torch work, parallel over processes
        self._local_cluster = LocalCluster(n_workers=self.n_jobs, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        self.client = Client(self._local_cluster, set_as_default=False)
        self._owns_client = True
        self.description = f"local dask cluster of {self.n_jobs} worker processes ({self._local_cluster.scheduler_address})"

    def _connect_ray(self) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError("backend 'ray' needs ray: pip install 'tpg[ray]'") from None
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address is None and ray.is_initialized():
            self.description = "the ray instance this process is connected to"
            return
        if ray.is_initialized():
            raise ValueError(f"address: this process is already connected to a ray cluster; cannot also "
                             f"connect to {address!r} (ray.shutdown() first)")
        kw = dict(include_dashboard=False, logging_level="WARNING")
        if address is None:
            # ray's workers see only the driver's script directory and cwd; give them the driver's
            # own additions to sys.path too (a checkout, a study module's folder), as dask's do
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_driver_paths())}}
            ray.init(address="local", num_cpus=self.n_jobs, runtime_env=env, **kw)
            self.description = f"local ray instance with {self.n_jobs} CPUs"
        else:
            # the workers of a cluster elsewhere import tpg from the driver's files, shipped with the job
            env = {"py_modules": [str(d) for d in _code_dirs()], "excludes": ["__pycache__", "*.pyc"]}
            if not address.startswith("ray://"):  # the Ray Client fails fast itself, and a killed probe
                _probe_cluster("ray", address, "address" if self.address else "RAY_ADDRESS")  # upsets its server
            try:
                ray.init(address=address, runtime_env=env, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "address" if self.address else "RAY_ADDRESS"
                # ray sends its token (~/.ray/auth_token) to a cluster it finds itself (auto), never
                # to an address it is given unless told to
                hint = ("; if the cluster uses token authentication (the default of `ray start`), set "
                        "RAY_AUTH_MODE=token" if address != "auto" and "RAY_AUTH_MODE" not in os.environ else "")
                raise ValueError(f"{where}: cannot connect to a ray cluster at {address!r} "
                                 f"({type(exc).__name__}: {exc}){hint}") from None
            self.description = f"ray cluster {address}"
        self._owns_ray = True

    def close(self) -> None:
        """Disconnect, and stop what this session started (a local cluster, a local ray instance)."""
        if self.backend == "dask":
            if self.client is not None and self._owns_client:
                self.client.close()
            if self._local_cluster is not None:
                self._local_cluster.close()
            self.client, self._local_cluster, self._owns_client = None, None, False
        elif self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        self.description = None

    def __enter__(self) -> "ClusterSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- running
    def run_cells(self, run_cell: Callable, study_name: str, cells: list, keys: list[str], cache_dir: str | Path,
                  on_done: Callable[[], None] | None = None) -> None:
        """Compute ``cells`` (with their cache ``keys``) on the cluster, calling ``on_done()`` as each
        is stored; on the first failure cancel the rest and raise (the cell's own exception, or
        :class:`ClusterError`)."""
        self.connect()
        cache_dir = str(Path(cache_dir).resolve())  # the workers' working directories differ
        digest = source_digest()
        by_key = dict(zip(keys, cells))
        run = self._run_dask if self.backend == "dask" else self._run_ray
        # closing: a failure here cancels the cells still queued on the cluster at once
        with contextlib.closing(run(run_cell, study_name, cells, keys, cache_dir, digest)) as done:
            self._collect(done, study_name, by_key, cache_dir, on_done)

    @staticmethod
    def _collect(done, study_name, by_key, cache_dir, on_done) -> None:
        for key in done:
            if not _cell_path(study_name, key, cache_dir).exists():
                raise ClusterError(f"cell {by_key[key]!r} of study {study_name!r} finished on a worker, but its file "
                                   f"{_cell_path(study_name, key, cache_dir)} is not visible here: the cache "
                                   f"directory must be on storage the driver and the workers share")
            if on_done is not None:
                on_done()

    def _run_dask(self, run_cell, study_name, cells, keys, cache_dir, digest):
        from dask.distributed import as_completed
        from distributed.scheduler import KilledWorker

        futures = {self.client.submit(_cell_on_worker, run_cell, study_name, cell, cache_dir, key, digest,
                                      key=f"tpg-{study_name}-{key}"): cell for cell, key in zip(cells, keys)}
        finished = False
        try:
            n_done = 0
            for fut in as_completed(list(futures), loop=self.client.loop):
                try:
                    key = fut.result()
                except KilledWorker as exc:
                    raise ClusterError(
                        f"cell {futures[fut]!r} of study {study_name!r}: every dask worker that ran it died "
                        f"(attempts: {exc.allowed_failures + 1}, distributed.scheduler.allowed-failures = "
                        f"{exc.allowed_failures}; out of memory? see the worker logs); the {n_done} cells finished "
                        f"before it are cached, a rerun computes the rest") from None
                n_done += 1
                yield key
            finished = True
        finally:
            if not finished:
                self.client.cancel(list(futures))

    def _run_ray(self, run_cell, study_name, cells, keys, cache_dir, digest):
        import ray

        died = tuple(getattr(ray.exceptions, name) for name in ("WorkerCrashedError", "NodeDiedError",
                                                                  "OutOfMemoryError") if hasattr(ray.exceptions, name))
        task = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES)(_cell_on_worker)
        # the run function travels once through the object store, not once per cell
        run_ref = ray.put(run_cell)
        refs = {task.options(name=f"tpg-{study_name}-{key[:12]}").remote(run_ref, study_name, cell, cache_dir, key,
                                                                          digest): cell
                for cell, key in zip(cells, keys)}
        pending = list(refs)
        n_done = 0
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    key = ray.get(done[0])
                except ray.exceptions.RayTaskError:
                    raise  # the cell's own exception (an instance of its class, with the worker's traceback)
                except died as exc:
                    raise ClusterError(
                        f"cell {refs[done[0]]!r} of study {study_name!r}: every ray worker that ran it died "
                        f"(attempts: {RAY_MAX_RETRIES + 1}, {type(exc).__name__}; out of memory? see the worker "
                        f"logs); the {n_done} cells finished before it are cached, a rerun computes the rest") from None
                except ray.exceptions.RayError as exc:
                    raise ClusterError(
                        f"cell {refs[done[0]]!r} of study {study_name!r}: ray could not run it "
                        f"({type(exc).__name__}: {exc}); the {n_done} cells finished before it are cached, a "
                        f"rerun computes the rest") from None
                n_done += 1
                yield key
        finally:
            for ref in pending:
                ray.cancel(ref)


#: how often ray reruns a cell whose worker died (ray's own default)
RAY_MAX_RETRIES = 3
_OPEN_SESSIONS: list[ClusterSession] = []  # the cluster_session blocks now open, innermost last


@contextlib.contextmanager
def cluster_session(backend: str, n_jobs: int = 2, address: str | None = None):
    """``with cluster_session("dask", 2) as s:`` every :func:`run_study` of this backend inside the
    block (with no ``address`` of its own, or the same) uses one cluster, started at the first
    cell and stopped at the end of the block (see :class:`ClusterSession` for where cells go)."""
    session = ClusterSession(backend, n_jobs, address)
    _OPEN_SESSIONS.append(session)
    try:
        yield session
    finally:
        _OPEN_SESSIONS.remove(session)
        session.close()


@contextlib.contextmanager
def _session_for(backend: str, n_jobs: int, address: str | None):
    for session in reversed(_OPEN_SESSIONS):
        if session.backend == backend and address in (None, session.address):
            yield session
            return
    with cluster_session(backend, n_jobs, address) as session:
        yield session


# ------------------------------------------------------------------------------ running
def run_study(study: str | ModuleType, quick: bool = False, backend: str = "processes", n_jobs: int = 2,
              cache_dir: str | Path = ".tpg-cache", progress: bool | None = None,
              address: str | None = None) -> pd.DataFrame:
    """Run every cell of ``study.cells(quick)`` not yet cached and return all its rows.

    Cells run on ``n_jobs`` workers: ``processes`` (joblib's loky processes), ``sequential`` (in
    this process), ``dask`` or ``ray`` (a cluster: ``address``, the ``DASK_SCHEDULER_ADDRESS`` /
    ``RAY_ADDRESS`` variables, an open :func:`cluster_session`, or a local cluster of ``n_jobs``
    workers; see :class:`ClusterSession`). Each finished cell is stored at once, so a killed run
    resumes. The result has one row per row of ``run_cell`` with the cell's fields, ``study`` and
    ``cell_key`` as columns, in the order of the grid. ``progress``: a bar of cells done on stderr
    (True, False, or None: only when stderr is a terminal).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    if address is not None and backend not in CLUSTER_BACKENDS:
        raise ValueError(f"address is for the {' and '.join(CLUSTER_BACKENDS)} backends, not {backend!r}")
    mod = get_study(study)
    name = mod.NAME
    grid = list(mod.cells(quick))
    keys = [cache_key(c) for c in grid]
    if len(set(keys)) != len(keys):
        raise ValueError(f"study {name!r} has duplicate cells in its grid")
    d = study_dir(name, cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"study": name, "quick": bool(quick), "keys": keys, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_bytes_atomic(d / _MANIFEST, json.dumps(manifest, indent=1).encode(), fsync=False)

    cached = _cached_frames(name, keys, cache_dir, "it will be recomputed")  # damaged cells: quarantined
    todo = [(c, k) for c, k in zip(grid, keys) if k not in cached]
    bar = None
    if show_progress(progress):
        bar = progress_bar(True, total=len(grid), initial=len(grid) - len(todo), desc=f"study {name}", unit="cell")
    step = bar.update if bar is not None else (lambda n=1: None)
    try:
        if not todo:
            pass
        elif backend in CLUSTER_BACKENDS:
            with _session_for(backend, n_jobs, address) as session:
                session.run_cells(mod.run_cell, name, [c for c, _ in todo], [k for _, k in todo], cache_dir, step)
        elif backend == "sequential" or len(todo) == 1 or n_jobs == 1:
            for cell, _ in todo:
                compute_cell(mod.run_cell, name, cell, cache_dir)
                step()
        else:
            import joblib

            par = joblib.Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")
            for _ in par(joblib.delayed(compute_cell)(mod.run_cell, name, cell, str(cache_dir)) for cell, _ in todo):
                step()
    finally:
        if bar is not None:
            bar.close()
    return _read_cells(name, keys, cache_dir, frames=cached)


__all__ = ["BACKENDS", "CLUSTER_BACKENDS", "ClusterError", "ClusterSession", "cluster_session", "source_digest",
           "run_study", "load_results", "latest_run_info", "cache_key", "compute_cell",
           "flatten_fields", "get_study", "read_cell", "cell_bytes", "quarantine_cell", "CorruptCell", "QUARANTINE"]
