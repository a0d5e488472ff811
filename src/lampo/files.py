"""Durable file writes: the one place Lampo writes files that a crash must never leave half-written.

POSIX `rename(2)` within one filesystem is atomic: a file (or folder) written under a temporary
name, fsynced, then renamed over its final name is, after a crash at any moment, either the old
one or the new one whole.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write `text` to `path` (a new file inside a folder that is renamed into place later)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: a temporary file beside it, fsynced, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_text(tmp, text, fsync=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root` (files another library wrote included)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """Make a folder's new entries (and a rename into it) durable."""
    # Some filesystems do not support a directory fsync: not an error worth stopping training for.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
