"""Atomic file writes: a reader, or a run killed mid-write, sees the previous file or the new one.

Every writer goes through :func:`atomic_write`: a temporary file in the destination folder
(same file system, so the rename is atomic), flushed and fsync-ed, then ``os.replace``-d over
the destination. A failure (full disk, kill) removes the temporary file and leaves the previous
file as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(data: Any, path: str | Path) -> None:
    write_text_atomic(json.dumps(data, indent=1), path)


def save_image_atomic(image, path: str | Path) -> None:
    """A PIL image (or anything with ``save(file, format=...)``) as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
