"""Atomic file writes whose errors name the file the user asked for, and the checksummed envelope
that ``tpg train`` writes its checkpoints in (:func:`unwrap_checkpoint`, for every reader of them).

A write goes to a dotted temporary file in the destination's directory, is flushed to disk, and
is renamed over the destination (``os.replace``, atomic on POSIX), so a reader or a crash never
sees half a file: the destination holds the old contents or the new ones. Any ``OSError`` on the
way (a directory where the file should be, no permission, ``/proc``, a full disk) is re-raised
with the destination as its ``filename`` (never the temporary name), which the command line
prints as ``tpg: error: cannot write FILE: reason``.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A fresh dotted temporary name beside ``path`` (pid and a clock tick, so concurrent writers of
    one file never share a temporary)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def nearest_existing_dir(start: Path, path) -> Path:
    """The nearest existing ancestor of ``start`` (``start`` itself included), which files for ``path``
    would be created under; ``NotADirectoryError`` naming ``path`` when it is a file."""
    anc = start
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{anc} is not a directory", str(path))
    return anc


def ensure_parent(path: Path) -> None:
    """Create ``path``'s missing parent directories; ``NotADirectoryError`` naming the ancestor when
    one of them is a file (``mkdir`` would say only "File exists")."""
    nearest_existing_dir(path.parent, path)
    path.parent.mkdir(parents=True, exist_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (module docstring); missing parent directories are
    created. ``OSError`` (of the right subclass: ``PermissionError``, ``IsADirectoryError``, ...)
    names ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        ensure_parent(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        try:
            tmp.unlink()
        except OSError:  # renamed away (the usual case) or never created
            pass


#: the format tag of the envelope around a ``tpg train`` checkpoint's state
#: (:func:`tpg.train.trainer.checkpoint_bytes`): ``{"format", "sha256", "state": uint8 tensor}``
CHECKPOINT_ENVELOPE = "tpg-train-checkpoint-sha256/1"


def unwrap_checkpoint(obj, where: str):
    """The state inside a ``torch.load``-ed checkpoint envelope
    ``{"format": CHECKPOINT_ENVELOPE, "sha256": hex digest of S, "state": S as a uint8 tensor}``, ``S``
    the ``torch.save`` bytes of the state, verified against its sha256; anything else (a checkpoint of
    the layout from before the checksum, another object) is returned unchanged.

    ``ValueError`` starting with ``where`` (e.g. the file's name) when the envelope is damaged."""
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_ENVELOPE):
        return obj
    import hashlib
    import io

    import torch

    payload, digest = obj.get("state"), obj.get("sha256")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or not isinstance(digest, str):
        raise ValueError(f"{where} is damaged: its envelope lacks the state or the checksum")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{where} is damaged: its sha256 does not match its contents")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # written by another tool under the same tag: any error of torch's reader
        raise ValueError(f"{where} cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None


__all__ = ["write_bytes_atomic", "temp_path", "ensure_parent", "nearest_existing_dir", "CHECKPOINT_ENVELOPE",
           "unwrap_checkpoint"]
