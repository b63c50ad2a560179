"""The dask and ray backends of the study runner, run for real: a dask LocalCluster and a local
ray instance cache exactly the cells the ``processes`` backend caches; a worker process killed
mid-study loses no finished cell and the study completes; a worker that always dies stops the
study with a clear error and a rerun resumes; workers with other tpg code are refused; the
README's ``tpg study --backend dask|ray`` commands run as written, at an existing scheduler or
cluster address too.

The default run has the dask tests that share one LocalCluster; the ray tests, the worker that
always dies and the commands that start their own cluster are ``slow`` (seconds of CPU each on
2 cores) and run in CI's second step, ``make test-distributed``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from _ci import skip_unless_ci

import _dist_study
import tpg
from tpg.experiments import runner
from tpg.experiments.runner import ClusterError, cluster_session, run_study

ROOT = Path(tpg.__file__).resolve().parents[1]
README = ROOT / "README.md"
STUDY = "gamma"  # the fastest real study: 4 quick cells, ~0.1 s each


def cached_cells(cache_dir: Path, study: str = STUDY) -> dict[str, pd.DataFrame]:
    """``{cell key: frame}`` of every cell file of a study in a cache directory."""
    return {p.stem: pd.read_parquet(p) for p in sorted((Path(cache_dir) / study).glob("*.parquet"))}


def assert_same_cells(a: dict, b: dict) -> None:
    assert a and sorted(a) == sorted(b)
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for name, value in extra.items():  # None: unset
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_cli(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpg.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env), cwd=ROOT)


def readme_commands(backend: str) -> list[str]:
    """The README's ``tpg study ... --backend BACKEND`` command lines (comments removed)."""
    lines = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    return [line for line in lines if line.startswith("tpg study") and f"--backend {backend}" in line]


def as_argv(command: str, cache_dir: Path, **substitute) -> list[str]:
    for old, new in substitute.items():
        assert old in command
        command = command.replace(old, new)
    return command.split()[1:] + ["--cache-dir", str(cache_dir), "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The quick study's cells from the ``processes`` backend (loky, 2 workers)."""
    cache = tmp_path_factory.mktemp("processes")
    run_study(STUDY, quick=True, backend="processes", n_jobs=2, cache_dir=cache, progress=False)
    return cached_cells(cache)


def kill_a_running_cell(cache: Path, markers: Path, worker_pids, n_before: int, stop: threading.Event,
                        out: dict) -> None:
    """Once ``n_before`` cells are cached, SIGKILL the worker process (one of ``worker_pids()``)
    that started a cell not yet cached less than 0.4 s ago (cells take 0.8 s: it is mid-cell);
    record the cell, the pid and the bytes of every cell file cached at that moment. The grid has
    several rounds of cells after the first ``n_before``, so a killer thread starved past one
    round's window (a loaded machine) still finds a cell to kill in the next."""
    d = cache / _dist_study.NAME
    while not stop.is_set():
        files = sorted(d.glob("*.parquet")) if d.is_dir() else []
        if len(files) >= n_before:
            pids = set(worker_pids())
            done_a = {int(pd.read_parquet(p)["a"].iloc[0]) for p in files}
            now = time.time()  # from here to the kill: microseconds, against 0.4 s of margin
            running = [(a, pid) for a, pid, t in _dist_study.markers(markers)
                       if a not in done_a and now - t < 0.4 and pid in pids]
            if running:
                a, pid = running[0]
                os.kill(pid, signal.SIGKILL)
                out.update(a=a, pid=pid, files={p.name: p.read_bytes() for p in files})
                return
        time.sleep(0.02)


def check_kill_outcome(cache: Path, markers: Path, killed: dict, result: pd.DataFrame, grid: list) -> None:
    """No finished cell lost (same bytes), the killed cell rerun by another process, the grid
    complete and equal to a clean run, and a rerun computes nothing."""
    assert "a" in killed, "no worker was killed"
    d = cache / _dist_study.NAME
    for name, data in killed["files"].items():
        assert (d / name).read_bytes() == data  # intact, never rewritten
    runs = [(a, pid) for a, pid, _ in _dist_study.markers(markers)]
    assert (killed["a"], killed["pid"]) in runs
    assert len({pid for a, pid in runs if a == killed["a"]}) == 2  # killed once, then finished elsewhere
    assert len(result) == 3 * len(grid) and result["a"].tolist() == [c.a for c in grid for _ in range(3)]
    _dist_study.SLEEP = False  # in this process only: the results do not depend on it
    try:
        clean = run_study(_dist_study.study(grid), backend="sequential", cache_dir=cache.parent / "clean",
                          progress=False)
        pd.testing.assert_frame_equal(result, clean, check_exact=True)
        n_runs = len(_dist_study.markers(markers))
        again = run_study(_dist_study.study(grid), backend="sequential", cache_dir=cache, progress=False)
    finally:
        _dist_study.SLEEP = True
    assert len(_dist_study.markers(markers)) == n_runs  # nothing recomputed
    pd.testing.assert_frame_equal(again, clean, check_exact=True)
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def slow_grid(markers: Path, n: int = 8, seconds: float = 0.8) -> list:
    return [_dist_study.Cell(a=i, seconds=seconds, marker_dir=str(markers)) for i in range(n)]


# ------------------------------------------------------------------------------ dask
class TestDask:
    @pytest.fixture(scope="class")
    @classmethod
    def cluster(cls):
        """A LocalCluster of 2 worker processes with one thread each, as `tpg study --backend dask` starts."""
        pytest.importorskip("distributed")
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster, set_as_default=False)
        client.wait_for_workers(2)
        yield cluster, client
        client.close()
        cluster.close()

    def test_cells_equal_processes_backend(self, cluster, reference, tmp_path):
        addr = cluster[0].scheduler_address
        df = run_study(STUDY, quick=True, backend="dask", address=addr, cache_dir=tmp_path, progress=False)
        assert_same_cells(cached_cells(tmp_path), reference)
        assert df["cell_key"].nunique() == len(reference)

    def test_scheduler_from_environment_and_address_errors(self, cluster, tmp_path, monkeypatch):
        scheduler, client = cluster
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler.scheduler_address)
        markers = tmp_path / "m"
        markers.mkdir()
        grid = [_dist_study.Cell(a=i, marker_dir=str(markers)) for i in range(4)]
        run_study(_dist_study.study(grid), backend="dask", cache_dir=tmp_path / "c", progress=False)
        pids = set(client.run(os.getpid).values())
        assert {pid for _, pid, _ in _dist_study.markers(markers)} <= pids  # the cells ran on that cluster
        monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
        monkeypatch.setattr(runner, "CONNECT_TIMEOUT", 1.0)
        port = free_port()  # nobody listens there
        with pytest.raises(ValueError, match="address: cannot connect to a dask scheduler"):
            run_study(_dist_study.study(grid[:2]), backend="dask", address=f"tcp://127.0.0.1:{port}",
                      cache_dir=tmp_path / "x", progress=False)
        with pytest.raises(ValueError, match="address is for the dask and ray backends"):
            run_study(_dist_study.study(grid), backend="processes", address="tcp://127.0.0.1:1", cache_dir=tmp_path)

    @pytest.mark.slow  # waits out the probe's timeout
    def test_an_address_that_never_answers_is_one_line(self, tmp_path, monkeypatch):
        """A server that accepts and never speaks (not a dask scheduler): dask's handshake waits past
        its own timeout (it hung the command for minutes), so the probe's process is killed after
        CONNECT_TIMEOUT + PROBE_STARTUP and the refusal is one line naming the address."""
        import socket

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        held = []
        threading.Thread(target=lambda: held.extend(listener.accept() for _ in range(4)), daemon=True).start()
        monkeypatch.setattr(runner, "CONNECT_TIMEOUT", 1.0)
        monkeypatch.setattr(runner, "PROBE_STARTUP", 8.0)
        try:
            start = time.monotonic()
            with pytest.raises(ValueError, match=r"^address: no dask scheduler answered at 'tcp://127\.0\.0\.1:"):
                run_study(_dist_study.study([_dist_study.Cell(a=0)]), backend="dask",
                          address=f"tcp://127.0.0.1:{listener.getsockname()[1]}", cache_dir=tmp_path,
                          progress=False)
            assert time.monotonic() - start < runner.CONNECT_TIMEOUT + runner.PROBE_STARTUP + 2
        finally:
            listener.close()

    def test_worker_with_other_tpg_code_is_refused(self, cluster, tmp_path, monkeypatch):
        """A worker whose tpg source differs from the driver's computes nothing (here the driver's
        digest is made to differ)."""
        monkeypatch.setattr(runner, "source_digest", lambda: "0" * 64)
        with pytest.raises(ClusterError, match="whose source differs from the driver's"):
            run_study(_dist_study.study([_dist_study.Cell(a=1), _dist_study.Cell(a=2)]), backend="dask",
                      address=cluster[0].scheduler_address, cache_dir=tmp_path, progress=False)
        assert not cached_cells(tmp_path, _dist_study.NAME)

    def test_cache_dir_the_driver_cannot_see_is_an_error(self, cluster, tmp_path, monkeypatch):
        """A worker's cell file the driver cannot find (the cache on a disk the workers do not share;
        here the driver is made to look elsewhere) stops the study with a ClusterError."""
        elsewhere = tmp_path / "driver-view"
        monkeypatch.setattr(runner, "_cell_path", lambda study, key, cache: elsewhere / study / f"{key}.parquet")
        with pytest.raises(ClusterError, match="is not visible here: the cache directory must be on storage"):
            run_study(_dist_study.study([_dist_study.Cell(a=1)]), backend="dask",
                      address=cluster[0].scheduler_address, cache_dir=tmp_path / "shared", progress=False)
        assert len(cached_cells(tmp_path / "shared", _dist_study.NAME)) == 1  # the worker did write it

    def test_readme_command_at_a_scheduler_address(self, cluster, reference, tmp_path, capsys):
        """The README's `tpg study ... --backend dask --address tcp://...` line, pointed at this cluster
        (run by tpg's main in this process: a subprocess would import torch once more)."""
        from tpg.cli import main

        (command,) = [c for c in readme_commands("dask") if "--address" in c]
        readme_addr = re.search(r"tcp://\S+", command).group(0)
        code = main(as_argv(command, tmp_path, **{readme_addr: cluster[0].scheduler_address}))
        out = capsys.readouterr().out
        assert code == 0
        assert f"cells ran on: dask scheduler {cluster[0].scheduler_address} (2 workers)" in out
        assert_same_cells(cached_cells(tmp_path), reference)

    def test_killed_worker_loses_no_cell_and_the_study_completes(self, cluster, tmp_path):
        """SIGKILL a worker process mid-cell: the nanny restarts it, the scheduler reruns the cell on
        the other worker, and every cell cached before the kill stays as it was."""
        scheduler, client = cluster
        markers = tmp_path / "m"
        markers.mkdir()
        grid = slow_grid(markers)
        cache = tmp_path / "c"
        killed: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=kill_a_running_cell, args=(
            cache, markers, lambda: client.run(os.getpid).values(), 2, stop, killed))
        killer.start()
        try:
            result = run_study(_dist_study.study(grid), backend="dask", address=scheduler.scheduler_address,
                               cache_dir=cache, progress=False)
        finally:
            stop.set()
            killer.join()
        check_kill_outcome(cache, markers, killed, result, grid)

    @pytest.mark.slow  # a worker restart: seconds of CPU on 2 cores
    def test_worker_that_always_dies_stops_with_a_clear_error(self, cluster, tmp_path):
        """With no failures allowed, the cell that kills its worker ends the study with a ClusterError;
        the cells finished before stay cached and a rerun completes."""
        scheduler, client = cluster

        def set_allowed(dask_scheduler, n):
            dask_scheduler.allowed_failures = n

        client.wait_for_workers(1, timeout=60)
        client.run_on_scheduler(set_allowed, n=0)
        grid = [_dist_study.Cell(a=i) for i in range(3)]
        bad = grid + [_dist_study.Cell(a=9, seconds=0.5, kill_worker=True)]
        try:
            with pytest.raises(ClusterError, match=r"every dask worker that ran it died \(attempts: 1,.*"
                                                   r"a rerun computes the rest"):
                run_study(_dist_study.study(bad), backend="dask", address=scheduler.scheduler_address,
                          cache_dir=tmp_path, progress=False)
        finally:
            client.run_on_scheduler(set_allowed, n=3)
        done = cached_cells(tmp_path, _dist_study.NAME)
        assert len(done) <= 3 and all(len(df) == 3 for df in done.values())
        client.wait_for_workers(1, timeout=60)  # the survivor (the nanny restarts the other meanwhile)
        df = run_study(_dist_study.study(grid), backend="dask", address=scheduler.scheduler_address,
                       cache_dir=tmp_path, progress=False)
        assert df["a"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_cli_reports_a_cluster_failure_in_one_line(tmp_path, monkeypatch, capsys):
    """`tpg study` turns a ClusterError into one `tpg: error:` line and exit 1 (a failure, not bad
    input: that is exit 2, e.g. --address with a local backend)."""
    from tpg.cli import main

    def fail(*args, **kwargs):
        raise ClusterError("the workers that ran cell X all died")

    monkeypatch.setattr(runner, "run_study", fail)
    code = main(["study", STUDY, "--quick", "--backend", "dask", "--cache-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "tpg: error: the workers that ran cell X all died"
    code = main(["study", STUDY, "--quick", "--address", "tcp://127.0.0.1:1", "--cache-dir", str(tmp_path)])
    assert code == 2 and "--address is for --backend dask or ray" in capsys.readouterr().err


def test_make_test_installs_the_optional_backends():
    """`make test` installs `.[dev]`, and `dev` holds dask[distributed], ray and peft, so the suite
    runs the dask and ray backends and the LoRA mode instead of skipping them; the backends' own
    extras name them too."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(reqs):
        return {re.split(r"[<>=!~;]", r)[0].strip() for r in reqs}

    assert {"dask[distributed]", "ray[client]", "peft", "transformers"} <= names(extras["dev"])
    assert names(extras["dask"]) == {"dask[distributed]"} and names(extras["ray"]) == {"ray[client]"}
    assert "peft" in names(extras["peft"])
    assert '-e ".[dev]"' in (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-distributed" in ci


@pytest.mark.slow
def test_readme_command_local_dask_cluster(reference, tmp_path):
    """`tpg study ... --backend dask` as written: the command starts (and stops) its own LocalCluster."""
    pytest.importorskip("distributed")
    (command,) = [c for c in readme_commands("dask") if "--address" not in c]
    proc = run_cli(as_argv(command, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "cells ran on: local dask cluster of 2 worker processes" in proc.stdout
    assert_same_cells(cached_cells(tmp_path), reference)


# ------------------------------------------------------------------------------ ray
@pytest.mark.slow  # a ray instance costs ~10 s of CPU: run by `make test-distributed` (.ci/run's second step)
class TestRay:
    @pytest.fixture(scope="class")
    @classmethod
    def session(cls):
        """A local ray instance with 2 CPUs, started by the runner's own cluster_session."""
        ray = pytest.importorskip("ray")
        if ray.is_initialized():
            skip_unless_ci("this process is already connected to a ray cluster")
        with cluster_session("ray", n_jobs=2) as s:
            s.connect()
            yield s

    def test_cells_equal_processes_backend(self, session, reference, tmp_path):
        run_study(STUDY, quick=True, backend="ray", cache_dir=tmp_path, progress=False)
        assert session.description == "local ray instance with 2 CPUs"
        assert_same_cells(cached_cells(tmp_path), reference)

    def test_killed_worker_loses_no_cell_and_the_study_completes(self, session, tmp_path):
        """SIGKILL the ray worker process of a running cell: ray reruns the cell (max_retries) on a new
        worker, and every cell cached before the kill stays as it was."""
        markers = tmp_path / "m"
        markers.mkdir()
        grid = slow_grid(markers)
        cache = tmp_path / "c"
        killed: dict = {}
        stop = threading.Event()
        # a ray worker is any process that started a cell (ray's own processes never do)
        killer = threading.Thread(target=kill_a_running_cell, args=(
            cache, markers, lambda: [pid for _, pid, _ in _dist_study.markers(markers)], 2, stop, killed))
        killer.start()
        try:
            result = run_study(_dist_study.study(grid), backend="ray", cache_dir=cache, progress=False)
        finally:
            stop.set()
            killer.join()
        check_kill_outcome(cache, markers, killed, result, grid)


@contextlib.contextmanager
def ray_head(client_port: int | None, num_cpus: int = 2):
    """A ray cluster from `ray start --head --block` in its own process group (its Ray Client server
    on ``client_port``, if given): yields its address; stopped through that process (SIGTERM, then
    SIGKILL to the group it leads)."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = cli_env(RAY_ADDRESS=None)
    client = [f"--ray-client-server-port={client_port}"] if client_port else []
    head = subprocess.Popen([ray_bin, "start", "--head", "--port=0", f"--num-cpus={num_cpus}", *client,
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        address, lines = None, []
        for line in head.stdout:  # it prints the address other nodes join with
            lines.append(line)
            m = re.search(r"--address='([^']+)'", line)
            if m:
                address = m.group(1)
                break
        assert address, "ray start --head printed no address:\n" + "".join(lines[-30:])
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        head.stdout.close()


@pytest.mark.slow
def test_readme_ray_commands_local_and_at_a_cluster_address(reference, tmp_path):
    """The README's `--backend ray` lines as written: a local instance the command starts, and
    `--address auto`, the cluster that `ray start --head` started on this machine; then the same
    cluster by its HOST:PORT in RAY_ADDRESS (with RAY_AUTH_MODE=token, as ray requires for a given
    address), and by the Ray Client's ray://HOST:PORT where grpcio (ray[client]) is installed. At an
    address the workers get tpg as the job's py_modules and pass the digest check."""
    pytest.importorskip("ray")
    (local,) = [c for c in readme_commands("ray") if "--address" not in c]
    proc = run_cli(as_argv(local, tmp_path / "local"), RAY_ADDRESS=None)
    assert proc.returncode == 0, proc.stderr
    assert "cells ran on: local ray instance with 2 CPUs" in proc.stdout
    assert_same_cells(cached_cells(tmp_path / "local"), reference)

    (at_cluster,) = [c for c in readme_commands("ray") if "--address auto" in c]
    try:
        import grpc  # noqa: F401  (the Ray Client needs it: ray[client], which `make test` installs)
        client_port = free_port()
    except ImportError:
        client_port = None
    with ray_head(client_port) as address:
        proc = run_cli(as_argv(at_cluster, tmp_path / "auto"), RAY_ADDRESS=None)
        assert proc.returncode == 0, proc.stderr
        assert "cells ran on: ray cluster auto" in proc.stdout
        assert_same_cells(cached_cells(tmp_path / "auto"), reference)
        proc = run_cli(as_argv(local, tmp_path / "env"), RAY_ADDRESS=address, RAY_AUTH_MODE="token")
        assert proc.returncode == 0, proc.stderr
        assert f"cells ran on: ray cluster {address}" in proc.stdout
        assert_same_cells(cached_cells(tmp_path / "env"), reference)
        if client_port is None:
            return
        client = f"ray://127.0.0.1:{client_port}"
        proc = run_cli(as_argv(local, tmp_path / "client") + ["--address", client], RAY_AUTH_MODE="token")
        assert proc.returncode == 0, proc.stderr
        assert f"cells ran on: ray cluster {client}" in proc.stdout
        assert_same_cells(cached_cells(tmp_path / "client"), reference)


@pytest.mark.slow  # waits out the probe's timeout
def test_a_ray_address_nobody_serves_is_one_line(tmp_path, monkeypatch):
    """A HOST:PORT where no ray cluster runs (ray itself retries such an address for minutes): the
    probe's process is killed after CONNECT_TIMEOUT + PROBE_STARTUP and the refusal is one line."""
    pytest.importorskip("ray")
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT", 2.0)
    monkeypatch.setattr(runner, "PROBE_STARTUP", 20.0)
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^address: (no ray cluster answered|cannot connect to a ray cluster) "
                                         rf"at '{re.escape(address)}'") as info:
        run_study(_dist_study.study([_dist_study.Cell(a=0)]), backend="ray", address=address,
                  cache_dir=tmp_path, progress=False)
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < runner.CONNECT_TIMEOUT + runner.PROBE_STARTUP + 5
    assert not list(tmp_path.rglob("*.parquet"))
