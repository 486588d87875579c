"""Every report says how it was made."""

from __future__ import annotations

import json

from longside.bench import memory as bench_memory
from longside.provenance import RunRecord, git_state


def test_run_record_names_command_code_and_machine():
    rec = RunRecord.start(["longside", "eval", "ppl", "--json", "out dir/x.json"]).finish(repeats=3)
    assert rec["command"] == "longside eval ppl --json 'out dir/x.json'"
    commit, dirty = git_state()
    assert rec["git_commit"] == commit and rec["git_dirty"] == dirty
    assert commit is None or len(commit) == 40
    for key in ("threads", "load_1min_start", "load_1min_end", "cpu", "torch", "wall_s", "started"):
        assert key in rec
    assert rec["repeats"] == 3


def test_bench_report_carries_provenance(tmp_path):
    out = tmp_path / "m.json"
    assert bench_memory.main(["--no-backbone", "--sizes", "4096", "--indexes", "flat", "--json", str(out)]) == 0
    prov = json.loads(out.read_text())["provenance"]
    assert prov["command"].startswith("longside bench memory --no-backbone") and "wall_s" in prov
