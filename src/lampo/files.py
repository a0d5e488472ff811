"""Durable file writes: the one place Lampo writes files that a crash must never leave half-written.

POSIX `rename(2)` within one filesystem is atomic: a file (or folder) written under a temporary
name, fsynced, then renamed over its final name is, after a crash at any moment, either the old
one or the new one whole.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
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


def install_folder(staged: Path, dest: Path, last: Iterable[str], stale: Iterable[str] = ()) -> None:
    """Move every entry of `staged` (a complete, fsynced folder beside `dest`, on its filesystem)
    into `dest`, replacing the entries of the same name; the `last` names go in last.

    `dest` is shared with other files (a run's output_dir), so it cannot be renamed as a whole.
    The entries that make a folder loadable (`last`: config.json for transformers) are removed
    from `dest` first and installed last, so a crash at any moment leaves the old set whole
    (before the first removal), no `last` file at all (in between: nothing a loader takes for a
    whole model), or the new set whole: never a config.json beside weights that are not its own.
    `stale`: other names in `dest` to remove with the old set (files the new set does not replace).
    """
    staged, dest = Path(staged), Path(dest)
    last = [name for name in last if (staged / name).exists()]
    for name in [*last, *stale]:
        _remove(dest / name)
    fsync_dir(dest)
    for entry in sorted(staged.iterdir()):
        if entry.name not in last:
            _replace(entry, dest / entry.name)
    fsync_dir(dest)
    for name in last:
        _replace(staged / name, dest / name)
    fsync_dir(dest)
    shutil.rmtree(staged, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    if src.is_dir() and dst.exists():
        # rename(2) cannot replace a non-empty folder: move the old one aside, then drop it
        old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
