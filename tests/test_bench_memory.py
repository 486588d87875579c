"""Smoke test of `longside bench memory`: it runs end to end and writes the promised fields."""

import json

import pytest

from longside.bench import memory as bench

FIELDS = {"capacity_tokens", "index", "add_tokens_per_s", "search_ms_1024q", "recall_at_k",
          "evict_ms", "bytes_per_token", "save_s", "load_s"}


@pytest.mark.slow
def test_bench_writes_results_json(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSIDE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "memory.json"
    assert bench.main(["--no-backbone", "--sizes", "4096", "--indexes", "flat", "ivf", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "backbone_forward_ms_1024" in report and report["key_source"].startswith("gaussian")
    assert [(r["capacity_tokens"], r["index"]) for r in report["results"]] == [(4096, "flat"), (4096, "ivf")]
    for r in report["results"]:
        assert FIELDS <= set(r)
        assert 0.0 <= r["recall_at_k"] <= 1.0 and r["bytes_per_token"] > 0
    assert report["results"][0]["recall_at_k"] == 1.0  # flat is the reference
