"""Replacing files and folders so that a crash never leaves neither the old nor the new one; checking that a
folder can be written."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_path(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished ``tmp`` (file or directory) onto ``dest``; an earlier ``dest`` is removed only
    after the new one is in place (a crash in between leaves one of the two, never neither)."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file or directory tree if it exists (temporary outputs of a failed run)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def probe_writable_dir(directory: str | os.PathLike) -> None:
    """Create ``directory`` (and its parents) and write and remove a probe file there: OSError if it
    cannot be written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".affmae-write-test-{uuid.uuid4().hex[:8]}"
    probe.write_bytes(b"")
    probe.unlink()
