"""How a report was made: `RunRecord.start()` when a command begins, `finish()` into its JSON.

Every evaluation and benchmark report carries one (`"provenance"`), so a number in the docs
can be traced to the command line, the code (commit, and whether the tree had uncommitted
changes), the machine and how busy it was, without trusting anyone's notes.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_SOURCE = Path(__file__).resolve().parent


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree: `git rev-parse HEAD` and whether tracked files
    differ from it; (None, None) outside a repository."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_SOURCE,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head.stdout.strip() or None, bool(status.stdout.strip()) if status.returncode == 0 else None


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class RunRecord:
    """The start of a run; `finish()` returns the record for its report."""

    command: list[str]
    started: float = field(default_factory=time.time)
    load_start: float | None = field(default_factory=_load)
    # the code that runs is the code at the start: edits made while it runs are not in it
    git: tuple[str | None, bool | None] = field(default_factory=git_state)

    @classmethod
    def start(cls, command: list[str] | None = None) -> "RunRecord":
        """`command`: the command line as the user typed it (default: this process's argv)."""
        return cls(list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]])

    def finish(self, **extra) -> dict:
        """command, git_commit and git_dirty (at the start), threads, machine load (1-minute
        average) at start and end, cpu, versions, start time and wall seconds, plus `extra` (e.g. repeats)."""
        commit, dirty = self.git
        return {"command": " ".join(shlex.quote(a) for a in self.command), "git_commit": commit, "git_dirty": dirty,
                "threads": torch.get_num_threads(), "load_1min_start": self.load_start, "load_1min_end": _load(),
                "cpu": _cpu(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "wall_s": round(time.time() - self.started, 1), **extra}
