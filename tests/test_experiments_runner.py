"""The experiment runner: cache keys, the Parquet cache, reruns, interrupted runs, backends."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from tpg.experiments import runner
from tpg.experiments.runner import cache_key, flatten_fields, load_results, run_study


@dataclass(frozen=True)
class ToyCell:
    a: int = 0
    name: str = "x"
    opts: dict = field(default_factory=dict)
    specs: tuple = ("p", "q")


@dataclass(frozen=True)
class OtherCell:
    a: int = 0
    name: str = "x"
    opts: dict = field(default_factory=dict)
    specs: tuple = ("p", "q")


def toy_study(n: int = 4, calls: list | None = None, fail_at: int | None = None) -> types.SimpleNamespace:
    """A study object: ``n`` cells, two rows each; records calls; raises at cell ``fail_at``."""
    calls = [] if calls is None else calls

    def run_cell(cell: ToyCell) -> pd.DataFrame:
        if fail_at is not None and cell.a == fail_at:
            raise RuntimeError("interrupted")
        calls.append(cell.a)
        return pd.DataFrame({"y": [cell.a * 2.0, cell.a * 3.0], "k": [0, 1]})

    return types.SimpleNamespace(NAME="toy", cells=lambda quick: [ToyCell(a=i, opts={"s": i}) for i in
                                                                   range(2 if quick else n)],
                                 run_cell=run_cell, calls=calls)


def test_cache_key_is_stable_and_tracks_fields_class_and_version(monkeypatch):
    c = ToyCell(a=1, opts={"u": 1, "v": 2})
    assert cache_key(c) == cache_key(ToyCell(a=1, opts={"v": 2, "u": 1}))  # sorted keys
    assert len(cache_key(c)) == 64
    assert cache_key(c) != cache_key(ToyCell(a=2, opts={"u": 1, "v": 2}))
    assert cache_key(c) != cache_key(OtherCell(a=1, opts={"u": 1, "v": 2}))
    import tpg

    before = cache_key(c)
    monkeypatch.setattr(tpg, "__version__", "999")
    assert cache_key(c) != before
    with pytest.raises(TypeError):
        cache_key({"a": 1})


def test_flatten_fields():
    flat = flatten_fields({"a": 1, "o": {"x": 2, "deep": {"y": 3}}, "t": (1, 2)})
    assert flat == {"a": 1, "o.x": 2, "o.deep.y": 3, "t": "[1, 2]"}


def test_run_study_rows_columns_and_cache_hit(tmp_path):
    study = toy_study()
    df = run_study(study, backend="sequential", cache_dir=tmp_path, progress=False)
    assert sorted(study.calls) == [0, 1, 2, 3]
    assert len(df) == 8
    for col in ("y", "k", "a", "name", "opts.s", "specs", "study", "cell_key"):
        assert col in df.columns
    assert (df["study"] == "toy").all()
    assert df["cell_key"].nunique() == 4
    assert json.loads(df["specs"].iloc[0]) == ["p", "q"]
    # rows come back in grid order, the cell's fields beside run_cell's columns
    assert df["a"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert df["y"].tolist() == [0.0, 0.0, 2.0, 3.0, 4.0, 6.0, 6.0, 9.0]
    files = sorted(p.name for p in (tmp_path / "toy").iterdir())
    assert sum(f.endswith(".parquet") for f in files) == 4
    assert not [f for f in files if f.endswith(".tmp")]
    # a rerun computes nothing and returns the same frame
    study.calls.clear()
    again = run_study(study, backend="sequential", cache_dir=tmp_path, progress=False)
    assert study.calls == []
    pd.testing.assert_frame_equal(df, again)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    calls: list = []
    with pytest.raises(RuntimeError):
        run_study(toy_study(calls=calls, fail_at=2), backend="sequential", cache_dir=tmp_path / "a", progress=False)
    assert calls == [0, 1]
    calls2: list = []
    resumed = run_study(toy_study(calls=calls2), backend="sequential", cache_dir=tmp_path / "a", progress=False)
    assert calls2 == [2, 3]  # only what was missing
    fresh = run_study(toy_study(), backend="sequential", cache_dir=tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(resumed, fresh)


_KILL_STUDY = '''
import time
from dataclasses import dataclass
import pandas as pd
NAME = "slowtoy"
@dataclass(frozen=True)
class Cell:
    a: int
def cells(quick):
    return [Cell(a=i) for i in range(6)]
def run_cell(cell):
    time.sleep(0.4)
    return pd.DataFrame({"y": [float(cell.a) ** 2], "z": [cell.a % 2]})
'''


def test_killed_process_resumes(tmp_path):
    (tmp_path / "slowtoy.py").write_text(textwrap.dedent(_KILL_STUDY))
    cache = tmp_path / "cache"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import slowtoy; "
            "from tpg.experiments.runner import run_study; "
            "run_study(slowtoy, backend='sequential', cache_dir=sys.argv[2], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = cache / "slowtoy"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(d.glob("*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(d.glob("*.parquet")))
    assert 2 <= done < 6
    sys.path.insert(0, str(tmp_path))
    try:
        import slowtoy

        calls = []
        orig = slowtoy.run_cell
        study = types.SimpleNamespace(NAME="slowtoy", cells=slowtoy.cells,
                                      run_cell=lambda c: (calls.append(c.a), orig(c))[1])
        resumed = run_study(study, backend="sequential", cache_dir=cache, progress=False)
        assert len(calls) == 6 - done
        fresh = run_study(slowtoy, backend="sequential", cache_dir=tmp_path / "fresh", progress=False)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slowtoy", None)
    pd.testing.assert_frame_equal(resumed, fresh)
    assert not list(d.glob("*.parquet.tmp")) and all(p.suffix == ".parquet" or p.name == "latest.json"
                                                      for p in d.iterdir() if not p.name.startswith("."))


def test_load_results_latest_and_all(tmp_path):
    study = toy_study()
    run_study(study, quick=False, backend="sequential", cache_dir=tmp_path, progress=False)
    run_study(study, quick=True, backend="sequential", cache_dir=tmp_path, progress=False)
    assert len(load_results("toy", tmp_path)) == 4  # the latest (quick) run: 2 cells
    assert len(load_results("toy", tmp_path, which="all")) == 8
    assert runner.latest_run_info("toy", tmp_path)["quick"] is True
    assert load_results("nothing", tmp_path).empty
    # a stray temp file of a killed writer is never read
    (tmp_path / "toy" / ".deadbeef.123.tmp").write_bytes(b"partial")
    assert len(load_results("toy", tmp_path, which="all")) == 8
    with pytest.raises(ValueError):
        load_results("toy", tmp_path, which="some")


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        run_study(toy_study(), backend="spark", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="n_jobs"):
        run_study(toy_study(), n_jobs=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown study"):
        run_study("no_such_study", cache_dir=tmp_path)
    dup = types.SimpleNamespace(NAME="dup", cells=lambda q: [ToyCell(a=1), ToyCell(a=1)],
                                run_cell=lambda c: pd.DataFrame({"y": [1]}))
    with pytest.raises(ValueError, match="duplicate"):
        run_study(dup, backend="sequential", cache_dir=tmp_path)
    bad = types.SimpleNamespace(NAME="bad", cells=lambda q: [ToyCell(a=1)], run_cell=lambda c: [1, 2])
    with pytest.raises(TypeError, match="DataFrame"):
        run_study(bad, backend="sequential", cache_dir=tmp_path)


def test_processes_backend_matches_sequential(tmp_path, monkeypatch):
    """Real joblib workers (loky) on a real study with a monkeypatched tiny grid."""
    from tpg.experiments.studies import gamma

    tiny = [gamma.Cell(family=f, vocab=2, horizon=2, gammas=(0.9, 1.0), lambdas=(1.0,)) for f in ("terminal", "dense")]
    monkeypatch.setattr(gamma, "cells", lambda quick=False: tiny)
    par = run_study(gamma, backend="processes", n_jobs=2, cache_dir=tmp_path / "p", progress=False)
    seq = run_study(gamma, backend="sequential", cache_dir=tmp_path / "s", progress=False)
    pd.testing.assert_frame_equal(par, seq)
    assert set(gamma.COLUMNS) <= set(par.columns)


def test_cell_fields_do_not_override_run_cell_columns(tmp_path):
    study = types.SimpleNamespace(NAME="clash", cells=lambda q: [ToyCell(a=5)],
                                  run_cell=lambda c: pd.DataFrame({"a": [99]}))
    df = run_study(study, backend="sequential", cache_dir=tmp_path, progress=False)
    assert df["a"].tolist() == [99]
    assert dataclasses.asdict(ToyCell(a=5))["a"] == 5
    assert os.path.isdir(tmp_path / "clash")
    assert Path(tmp_path / "clash" / "latest.json").exists()


# ------------------------------------------------------------------------------ damaged cache files
def _damage(data: bytes, how: str) -> bytes:
    if how == "garbage":
        return b"\x00garbage\xff" * 50
    if how == "truncated":
        return data[: len(data) * 2 // 3]
    if how == "empty":
        return b""
    if how == "one byte in the middle":
        mid = len(data) // 2
        return data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1:]
    # a number changed in the data page: Parquet would read it silently
    six, seven = struct.pack("<d", 6.0), struct.pack("<d", 7.0)
    assert data.find(six) >= 0
    return data.replace(six, seven, 1)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty", "one byte in the middle", "a changed number"])
def test_a_damaged_cell_is_quarantined_skipped_by_load_and_recomputed_by_run(tmp_path, capsys, how):
    study = toy_study()
    fresh = run_study(study, backend="sequential", cache_dir=tmp_path, progress=False)
    d = tmp_path / "toy"
    path = d / f"{cache_key(ToyCell(a=2, opts={'s': 2}))}.parquet"
    good = path.read_bytes()
    path.write_bytes(_damage(good, how))
    capsys.readouterr()
    partial = load_results("toy", tmp_path)  # what report and figures read: the damaged cell left out, said once
    err = capsys.readouterr().err
    assert partial["a"].tolist() == [0, 0, 1, 1, 3, 3]
    assert err.count("\n") == 1 and f"cache cell {path} is damaged" in err and "`tpg study toy` recomputes it" in err
    assert not path.exists() and len(list((d / "quarantine").iterdir())) == 1
    path.write_bytes(_damage(good, how))
    study.calls.clear()
    again = run_study(study, backend="sequential", cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err
    assert study.calls == [2] and "it will be recomputed" in err and err.count("\n") == 1
    pd.testing.assert_frame_equal(again, fresh)
    assert runner.read_cell(path).equals(pd.read_parquet(path))  # the recomputed cell verifies
    assert len(list((d / "quarantine").iterdir())) == 2  # nothing in quarantine is overwritten


def test_a_damaged_manifest_is_reported_and_ignored(tmp_path, capsys):
    study = toy_study()
    run_study(study, quick=True, backend="sequential", cache_dir=tmp_path, progress=False)
    (tmp_path / "toy" / "latest.json").write_text("[" * 100_000)
    capsys.readouterr()
    assert runner.latest_run_info("toy", tmp_path) is None
    assert len(load_results("toy", tmp_path)) == 4
    assert "cache manifest" in capsys.readouterr().err
    run_study(study, quick=True, backend="sequential", cache_dir=tmp_path, progress=False)
    assert runner.latest_run_info("toy", tmp_path)["quick"] is True


def test_cells_without_a_checksum_are_still_read(tmp_path):
    """Cells written before the checksum (plain ``to_parquet``) are read, unverified."""
    study = toy_study()
    fresh = run_study(study, backend="sequential", cache_dir=tmp_path, progress=False)
    for p in (tmp_path / "toy").glob("*.parquet"):
        pd.read_parquet(p).to_parquet(p, index=False)
    study.calls.clear()
    pd.testing.assert_frame_equal(run_study(study, backend="sequential", cache_dir=tmp_path, progress=False), fresh)
    assert study.calls == []


def test_report_is_not_blocked_by_a_damaged_cell(tmp_path, capsys, monkeypatch):
    from tpg.cli import main
    from tpg.experiments.studies import gamma

    tiny = [gamma.Cell(family=f, vocab=2, horizon=2, gammas=(0.9, 1.0), lambdas=(1.0,)) for f in ("terminal", "dense")]
    monkeypatch.setattr(gamma, "cells", lambda quick=False: tiny)
    run_study(gamma, backend="sequential", cache_dir=tmp_path, progress=False)
    cell = tmp_path / "gamma" / f"{cache_key(tiny[1])}.parquet"
    cell.write_bytes(cell.read_bytes()[:100])
    capsys.readouterr()
    assert main(["report", "--no-proofs", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "R.md")]) == 0
    err = capsys.readouterr().err
    assert f"cache cell {cell} is damaged" in err and "Traceback" not in err and (tmp_path / "R.md").exists()
