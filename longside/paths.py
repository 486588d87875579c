"""Where longside keeps its on-disk cache, atomic writes into it, and where its compiled
libraries are."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.machinery
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from longside.errors import LongsideError


def cache_dir() -> Path:
    """The cache root: `$LONGSIDE_CACHE`, else `~/.cache/longside`. Created on demand."""
    root = Path(os.environ.get("LONGSIDE_CACHE") or Path.home() / ".cache" / "longside")
    root.mkdir(parents=True, exist_ok=True)
    return root


def compiled_library(folder: Path, stem: str) -> ctypes.CDLL | None:
    """`<folder>/<stem><extension suffix>` (a plain shared library the build put beside its
    Python bindings) loaded with ctypes, or None when it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


def write_json(data, path: str | os.PathLike, indent: int = 1) -> Path:
    """Write `data` as JSON to `path`, atomically: an earlier file survives a crash."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def check_output_file(path: str | os.PathLike | None, what: str = "output") -> Path | None:
    """Check, before any long work, that a file can be written at `path` (None: nothing to
    check): not a directory, its folder creatable and writable. Raises LongsideError saying
    what to fix; leaves nothing behind but the folder it may have created."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise LongsideError(f"{what} path {path} is a directory; give a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise LongsideError(f"cannot write the {what} at {path} ({e.strerror or e}); choose a writable path "
                            "(nothing was run)") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_dir(path: str | os.PathLike | None, what: str = "output") -> Path | None:
    """Like `check_output_file` for a directory that a save will create or replace."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LongsideError(f"{what} path {path} is a file; give a directory path")
    check_output_file(path / ".probe", what)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    A crash or exception leaves any previous file at `path` untouched, and no
    half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
    path = Path(path)
    recover(path)
    if path.is_symlink():
        raise LongsideError(f"{path} is a symbolic link; save to the directory it points to (nothing was written)")
    if path.is_file():
        raise LongsideError(f"{path} is a file; save to a directory path instead (nothing was written)")
    if marker is not None and path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise LongsideError(f"{path} is a directory that this save did not write (no {marker} in it); save "
                            "to a new path (nothing was written or deleted)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
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


def recover(path: str | os.PathLike) -> None:
    """Tidy what saves to `path` by processes that no longer run left behind: their
    temporary files and directories are removed, and a directory that a crash left only
    in its moved-aside copy (between the two renames of `atomic_dir`) is put back.
    Called before every save, and by loaders before they read."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    temp = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*\.tmp$")
    aside = re.compile(rf"^\.{re.escape(path.name)}\.old-(\d+)$")
    for entry in sorted(parent.iterdir()):
        m = temp.match(entry.name) or aside.match(entry.name)
        if m is None or _running(int(m.group(1))):
            continue
        if aside.match(entry.name) and not path.exists() and not path.is_symlink():
            os.replace(entry, path)  # the previous copy: the save that crashed never completed
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (FileNotFoundError if absent)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
