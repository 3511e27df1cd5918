"""Atomic file writes: a reader, or a run killed mid-write, sees the previous file or the new one.

Every writer goes through :func:`atomic_write`: a temporary file in the destination folder
(same file system, so the rename is atomic), flushed and fsync-ed, then ``os.replace``-d over
the destination. A failure (full disk, an exception) removes the temporary file and leaves the
previous file as it was; a killed process leaves its temporary file (``.<name>.<random>.tmp``)
behind, which :func:`remove_stale_temporaries` clears when the writer starts again.

A write that the file system refuses (no space, no permission, read-only) is a ``StorageError``
naming the path, which the command line shows as one line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TMP_SUFFIX = ".tmp"


class StorageError(OSError):
    """A file or folder that cannot be written for a reason of the file system (no space, no
    permission, read-only, a file in the way); the message names the path and the reason."""


# What the file system said, in words, for the errors a user can act on.
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file of that name is in the way",
}


def storage_error(err: OSError, what: str) -> OSError:
    """``err`` as a StorageError for ``what`` (``"cannot write the run folder <path>"``) when it
    is one of the file-system refusals above; any other OSError unchanged (a bug, not the disk)."""
    if isinstance(err, StorageError) or err.errno not in _REASONS:
        return err
    return StorageError(f"{what}: {_REASONS[err.errno]}")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise storage_error(err, f"cannot write {path}") from err
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"cannot write {path}: no space left on {path.parent} (the previous "
                               f"{path.name}, if any, is kept as it was)") from err
        raise


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files of ``atomic_write`` for ``names`` in ``folder`` that a killed
    writer left behind (each as large as the file it was writing); returns the ones removed.
    Call it only when nothing else is writing those files."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def make_new_folder(path: str | Path, what: str = "the folder") -> list[Path]:
    """Create ``path`` (which must not exist) and its missing parents; returns the folders made,
    outermost first, for :func:`remove_new_folders`. StorageError naming ``path`` if it cannot be."""
    path = Path(path)
    missing, folder = [], path
    while not folder.exists() and folder != folder.parent:
        missing.insert(0, folder)
        folder = folder.parent
    try:
        path.mkdir(parents=True)
    except OSError as err:
        raise storage_error(err, f"cannot write {what} {path}") from err
    return missing


def remove_new_folders(made: list[Path]) -> None:
    """Undo :func:`make_new_folder`: the innermost folder with what was written into it since,
    then each parent it made while that is empty."""
    if not made:
        return
    shutil.rmtree(made[-1], ignore_errors=True)
    for folder in reversed(made[:-1]):
        try:
            folder.rmdir()
        except OSError:  # something else was put there meanwhile: keep it
            break


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(data: Any, path: str | Path) -> None:
    write_text_atomic(json.dumps(data, indent=1), path)


def save_image_atomic(image, path: str | Path) -> None:
    """A PIL image (or anything with ``save(file, format=...)``) as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
