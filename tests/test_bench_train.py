from longside.bench.train import _ratios, _worker


def test_ratios_compare_with_qlora_and_replay():
    rows = [{"method": "longside", "seq_len": 512, "peak_mem_mb": 100.0, "step_s": 2.0},
            {"method": "longside-replay", "seq_len": 512, "peak_mem_mb": 100.0, "step_s": 1.0},
            {"method": "qlora", "seq_len": 512, "peak_mem_mb": 250.0, "step_s": 5.0},
            {"method": "qlora", "seq_len": 1024, "error": ["out of memory"]}]
    (r,) = _ratios(rows)
    assert r == {"seq_len": 512, "qlora_over_longside_mem": 2.5, "qlora_over_longside_step": 2.5,
                 "longside_over_replay_step": 2.0}


def test_replay_step_runs_from_the_feature_cache():
    row = _worker("longside-replay", 32, 1, 1)
    assert row["method"] == "longside-replay" and row["step_s"] > 0 and "replayed" in row["note"]
    assert row["loss"] == row["loss"]  # a number, not NaN
    # the timed step read the batch back (written by the warm-up step); nothing else was encoded
    assert row["feature_cache"]["hits"] == 1 and row["feature_cache"]["misses"] == 2
