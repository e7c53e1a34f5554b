"""Sizing and durably deleting a study's folders for the retention purge."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from dicom_node.storage import fsync_directory

log = logging.getLogger(__name__)


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root`` (0, 0 when it does not exist); links are not followed."""
    files = size = 0
    if root.is_symlink() or not root.is_dir():
        return (1, root.lstat().st_size) if root.is_symlink() or root.is_file() else (0, 0)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except FileNotFoundError:
                continue
    return files, size


def remove_tree(root: Path, written_before: float | None = None) -> tuple[int, int]:
    """Delete ``root`` and everything under it, durably; returns (files, bytes) deleted.

    Bottom-up: the files of a folder are unlinked, the folder removed and its parent fsynced,
    so a crash leaves a smaller tree that a second call finishes (missing entries are fine).
    Symbolic links are removed, never followed.  With ``written_before`` (a POSIX time), files
    modified later are left in place with their folders: they were written after the purge
    began, so they are not part of what it deletes.
    """
    if not root.exists() and not root.is_symlink():
        return 0, 0
    if root.is_symlink() or not root.is_dir():
        stat = root.lstat()
        if written_before is not None and stat.st_mtime > written_before:
            return 0, 0
        root.unlink()
        fsync_directory(root.parent)
        return 1, stat.st_size
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        folder = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (folder / d).is_symlink())]:
            path = folder / name
            try:
                stat = path.lstat()
                if written_before is not None and stat.st_mtime > written_before:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            size += stat.st_size
            files += 1
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.warning("%s: left in place, it holds files written after the purge began", folder)
            continue
        fsync_directory(folder.parent)
    return files, size
