"""Atomic saves: leftovers of killed saves are cleaned, a directory left only in its
moved-aside copy is recovered, output paths are checked before work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from longside.errors import LongsideError
from longside.paths import atomic_dir, atomic_file, check_output_dir, check_output_file, recover


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_saves_are_removed_on_the_next_save(tmp_path):
    pid = _dead_pid()
    (tmp_path / f".bank.lsmb.{pid}.abc.tmp").write_bytes(b"x" * 100)  # a killed atomic_file
    (tmp_path / f".sess.{pid}.xyz.tmp").mkdir()  # a killed atomic_dir
    (tmp_path / f".sess.{pid}.xyz.tmp" / "memory.lsmb").write_bytes(b"y")
    live = tmp_path / f".bank.lsmb.{os.getpid()}.mine.tmp"  # this process's own: kept
    live.write_bytes(b"z")
    with atomic_file(tmp_path / "bank.lsmb") as tmp:
        tmp.write_bytes(b"new")
    with atomic_dir(tmp_path / "sess") as tmp:
        (tmp / "session.json").write_text("{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["bank.lsmb", "sess", live.name])


def test_a_directory_left_only_in_its_old_copy_is_put_back(tmp_path):
    pid = _dead_pid()
    aside = tmp_path / f".sess.old-{pid}"  # the crash came between the two renames
    aside.mkdir()
    (aside / "session.json").write_text('{"kept": true}')
    recover(tmp_path / "sess")
    assert (tmp_path / "sess" / "session.json").read_text() == '{"kept": true}' and not aside.exists()


def test_an_old_copy_beside_a_complete_directory_is_removed(tmp_path):
    pid = _dead_pid()
    (tmp_path / "sess").mkdir()
    (tmp_path / "sess" / "session.json").write_text("new")
    (tmp_path / f".sess.old-{pid}").mkdir()
    recover(tmp_path / "sess")
    assert [p.name for p in tmp_path.iterdir()] == ["sess"]


def test_output_paths_are_checked_before_work(tmp_path):
    with pytest.raises(LongsideError, match="is a directory"):
        check_output_file(tmp_path, "--json")
    (tmp_path / "f").write_text("")
    with pytest.raises(LongsideError, match="cannot write"):
        check_output_file(tmp_path / "f" / "out.json", "--json")  # a file where a folder must be
    with pytest.raises(LongsideError, match="is a file"):
        check_output_dir(tmp_path / "f", "--out")
    assert check_output_file(tmp_path / "new" / "out.json") == tmp_path / "new" / "out.json"
    assert list((tmp_path / "new").iterdir()) == []  # the probe leaves nothing behind
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(LongsideError, match="cannot write"):
            check_output_file(ro / "x.json")


def test_cli_refuses_a_bad_json_path_before_the_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "longside", "eval", "ppl", "--json", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr
