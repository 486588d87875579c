"""`longside bench serve`: it runs end to end over real servers and reports the median pair."""

import json

import pytest

from longside.bench import serve as bench
from longside.errors import LongsideError


def test_sizes_are_checked_before_any_work(tmp_path):
    with pytest.raises(LongsideError, match="must be >= 1"):
        bench.main(["--repeats", "0", "--json", str(tmp_path / "serve.json")])
    assert not (tmp_path / "serve.json").exists()


@pytest.mark.slow
def test_bench_writes_the_median_pair(tmp_path):
    out = tmp_path / "serve.json"
    assert bench.main(["--quick", "--users", "2", "--memory-tokens", "256", "--new-tokens", "4",
                       "--requests", "10", "--repeats", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["repeats"] == 2 and len(r["pairs"]) == 2
    ratios = sorted(p["ratio"] for p in r["pairs"])
    assert r["concurrent_over_sequential_tokens_per_s"] == ratios[0]  # the lower of two
    warm = r["resident"]  # the same turns with every user's memory read into RAM first
    assert len(warm["pairs"]) == 2
    assert warm["concurrent_over_sequential_tokens_per_s"] == sorted(p["ratio"] for p in warm["pairs"])[0]
    assert warm["sequential"]["tokens"] == warm["concurrent"]["tokens"] == 2 * 4
    assert r["sequential"]["tokens"] == r["concurrent"]["tokens"] == 2 * 4
    # users start on disk and are read before their turns; in the resident pairs none is
    for mode in ("sequential", "concurrent"):
        assert r[mode]["engine"]["users_read_ahead"] == 2 and r[mode]["engine"]["read_ahead_s"] > 0
        assert warm[mode]["engine"]["users_read_ahead"] == 0
        assert r[mode]["engine"]["prefill_s"] > 0 and r[mode]["engine"]["step_s"] > 0
    # each pair's rows per step is its concurrent phase's, whichever phase ran last (the
    # second pair runs the concurrent one first); one after another, every step has one row
    for row in r["pairs"] + warm["pairs"]:
        seq, con = row["sequential_engine"], row["concurrent_engine"]
        assert seq["rows_stepped"] == seq["steps"] > 0
        assert row["mean_rows_per_step"] == round(con["rows_stepped"] / con["steps"], 2)
    # greedy replies: each user's is the same alone and with the other at once
    assert r["same_replies"] == {"users": 2, "pairs": [2, 2], "resident_pairs": [2, 2]}
    assert all(row["same_replies"] == 2 for row in r["pairs"] + warm["pairs"])
    assert "replies" not in r["sequential"] and "replies" not in r["concurrent"]
    assert r["restart"]["users_identical_checksum"] == 2
    assert r["isolation"]["cross_user_reads"] == 0 and r["isolation"]["failed"] == 0
