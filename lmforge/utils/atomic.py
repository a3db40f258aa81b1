"""Atomic writes: a crash never leaves a half-written file or directory in place of a good one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


# The names the writers below leave behind when a process dies mid-write: tempfile's
# ".NAME.<8 random chars>.tmp" (mkstemp / mkdtemp with our prefix and suffix), and atomic_dir's
# ".NAME.old-PID" backup of the version being replaced.
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
_BACKUP = re.compile(r"\.(?P<name>.+)\.old-\d+")


def clean_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Remove what interrupted atomic writes left in `directory` (only lmforge's own temp names).

    A backup whose target is missing (the process died between the two renames of atomic_dir) is
    the only whole copy, so it is renamed back instead of removed. Returns the names handled.
    Call it only where no other process is writing (at the start of a run in its own directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    handled = []
    for entry in sorted(directory.iterdir()):
        if _TEMP.fullmatch(entry.name):
            _remove(entry)
        elif m := _BACKUP.fullmatch(entry.name):
            target = directory / m["name"]
            if target.exists():
                _remove(entry)
            else:
                os.replace(entry, target)
        else:
            continue
        handled.append(entry.name)
    return handled


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_dir_for(path: str | os.PathLike) -> Path:
    """A fresh temporary directory beside `path` (named so that clean_stale_temps finds it), for
    commit_dir to put in place; writers in other processes can fill it too (sharded checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


def commit_dir(tmp: Path, path: str | os.PathLike) -> None:
    """Put the complete directory `tmp` in place of `path`. The old directory is only removed after
    the new one is in place, so at every instant either the old or the new version is whole on disk."""
    path = Path(path)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    backup = None
    if path.exists():
        backup = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, backup)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `path` as a whole (commit_dir)."""
    tmp = temp_dir_for(path)
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
