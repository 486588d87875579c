"""Configs refuse wrong types and absurd values with a message, never a traceback later."""

from __future__ import annotations

import json

import pytest

from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError
from longside.training.config import TrainConfig


@pytest.mark.parametrize("body, match", [
    ([1, 2], "JSON object"), (None, "JSON object"), ({"token_cache": "no"}, "token_cache"),
    ({"capacity_tokens": 10 ** 13}, "capacity_tokens"), ({"window": 0}, "window"),
    ({"k_chunks": 2.5}, "k_chunks"), ({"backbone_memory_layers": "15-29"}, "backbone_memory_layers"),
    ({"token_depth": float("nan")}, "token_depth"), ({"surprise": 1}, "unknown fields")])
def test_side_config_json_is_checked(tmp_path, body, match):
    f = tmp_path / "side_config.json"
    f.write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=match):
        SideNetConfig.from_json(f)


def test_side_config_round_trips(tmp_path):
    cfg = SideNetConfig(window=256, backbone_memory_layers=[20, 15], token_cache=False)
    cfg.to_json(tmp_path / "c.json")
    assert SideNetConfig.from_json(tmp_path / "c.json") == cfg
    assert SideNetConfig().memory_attention == "joint"  # the default is what ships


@pytest.mark.parametrize("raw, match", [
    ([1], "JSON object"), ({"lr": "fast"}, "lr"), ({"max_steps": 0}, "out of range"),
    ({"side": [1]}, "side"), ({"batch_size": True}, "batch_size"), ({"nope": 1}, "unknown")])
def test_train_config_is_checked(raw, match):
    with pytest.raises((LongsideError, CheckpointError), match=match):
        TrainConfig.from_dict(raw)


def test_train_cli_refuses_a_bad_config_file(tmp_path):
    import subprocess
    import sys

    for body in (b"[1, 2]", b"\xff\xfe{}", b'{"lr": "fast"}', b'{"side": {"token_cache": "no"}}'):
        f = tmp_path / "c.json"
        f.write_bytes(body)
        r = subprocess.run([sys.executable, "-m", "longside", "train", "--config", str(f), "--out",
                            str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "longside: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
