"""Where longside keeps its on-disk cache, and atomic writes into it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """The cache root: `$LONGSIDE_CACHE`, else `~/.cache/longside`. Created on demand."""
    root = Path(os.environ.get("LONGSIDE_CACHE") or Path.home() / ".cache" / "longside")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    A crash or exception leaves any previous file at `path` untouched, and no
    half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    The old directory (if any) is moved aside first and deleted only after the new
    one is in place, so readers never see a half-written directory under `path`. With
    `marker`, an existing non-empty directory is replaced only if it holds a file of
    that name (an earlier save of the same kind), so a wrong path cannot wipe other
    data; a file at `path` is never replaced.
    """
    from longside.errors import LongsideError

    path = Path(path)
    if path.is_file() or path.is_symlink():
        raise LongsideError(f"{path} is a file; save to a directory path instead (nothing was written)")
    if marker is not None and path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise LongsideError(f"{path} is a directory that this save did not write (no {marker} in it); save "
                            "to a new path (nothing was written or deleted)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (FileNotFoundError if absent)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
