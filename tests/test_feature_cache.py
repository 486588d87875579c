import json

import pytest
import torch

from longside.config import SideNetConfig
from longside.errors import LongsideError
from longside.model import LongSideModel
from longside.training.config import preset
from longside.training.feature_cache import FeatureCache
from longside.training.train import train


def _model(backbone):
    torch.manual_seed(0)
    return LongSideModel(backbone, SideNetConfig(window=64, capacity_tokens=1024))


def _segments(tok):
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. However little known the feelings or views of such a man may be "
            "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
            "surrounding families, that he is considered the rightful property of some one or other "
            "of their daughters. My dear Mr. Bennet, said his lady to him one day, have you heard")
    ids = torch.tensor(tok(text).input_ids[:80])
    return ids[:40].view(2, 20), ids[40:].view(2, 20)


def test_replay_reads_back_what_encoding_gave(tmp_path, smollm2):
    model = _model(smollm2)
    first, second = _segments(smollm2.tokenizer)
    cache = FeatureCache(tmp_path / "fc", smollm2, model.feature_layers(), model.config.memory_layer)
    fresh = cache.encode(second)
    again = cache.encode(second)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 2 and cache.stats()["bytes"] > 0
    for i in model.feature_layers():
        assert torch.equal(fresh.hidden_states[i], again.hidden_states[i])
    # one row cached, one new: rows are looked up one by one
    mixed = cache.encode(torch.stack([second[0], first[0]]))
    assert torch.equal(mixed.memory_keys[0], fresh.memory_keys[0])
    # within bfloat16 rounding of the backbone's own float32 features
    ref = smollm2.encode(second, memory_layer=model.config.memory_layer)
    for i in model.feature_layers():
        torch.testing.assert_close(again.hidden_states[i], ref.hidden_states[i], rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(again.memory_attn, ref.memory_attn, rtol=1e-2, atol=1e-2)


def test_model_with_cache_matches_model_without(tmp_path, smollm2):
    first, second = _segments(smollm2.tokenizer)
    plain, cached = _model(smollm2), _model(smollm2)
    cached.feature_cache = FeatureCache(tmp_path / "fc", smollm2, cached.feature_layers(),
                                        cached.config.memory_layer, dtype="float32")
    for run in (0, 1):  # the second pass replays every segment from disk
        losses = []
        for m in (plain, cached):
            m.reset_memory()
            with torch.no_grad():
                m(first)
                losses.append(m(second, labels=second).loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    assert cached.feature_cache.stats()["hits"] == 4


def test_cache_of_another_setup_is_refused_and_bad_files_are_rebuilt(tmp_path, smollm2):
    model = _model(smollm2)
    layers, m = model.feature_layers(), model.config.memory_layer
    cache = FeatureCache(tmp_path / "fc", smollm2, layers, m)
    _, second = _segments(smollm2.tokenizer)
    cache.encode(second)
    with pytest.raises(LongsideError, match="was made for"):
        FeatureCache(tmp_path / "fc", smollm2, layers, m + 1)
    with pytest.raises(LongsideError, match="was made for"):
        FeatureCache(tmp_path / "fc", smollm2, layers + [1], m)  # needs a layer it does not hold
    FeatureCache(tmp_path / "fc", smollm2, layers[1:], m)  # a subset is fine
    victim = sorted((tmp_path / "fc").glob("*/*.safetensors"))[0]
    victim.write_bytes(b"not a safetensors file")
    again = FeatureCache(tmp_path / "fc", smollm2, layers, m)
    out = again.encode(second)
    assert again.stats()["repaired"] == 1 and out.memory_keys.shape[:2] == (2, 20)
    assert FeatureCache(tmp_path / "fc", smollm2, layers, m).encode(second) is not None
    (tmp_path / "fc" / "cache.json").write_text("{")
    with pytest.raises(LongsideError, match="unreadable"):
        FeatureCache(tmp_path / "fc", smollm2, layers, m)


def test_size_limit_stops_writing(tmp_path, smollm2):
    model = _model(smollm2)
    cache = FeatureCache(tmp_path / "fc", smollm2, model.feature_layers(), model.config.memory_layer, max_gb=1e-9)
    _, second = _segments(smollm2.tokenizer)
    cache.encode(second)
    assert cache.stats()["skipped"] == 2 and not list((tmp_path / "fc").glob("*/*.safetensors"))


def test_training_replays_validation_and_refuses_cache_inside_out(tmp_path, smollm2):
    cfg = preset("tiny", max_steps=3, eval_every=1, save_every=100, out=str(tmp_path / "run"),
                 feature_cache=str(tmp_path / "features"))
    result = train(cfg, backbone=smollm2, progress=False)
    stats = result["feature_cache"]
    assert stats["hits"] > 0 and stats["misses"] > 0  # validation segments come back at every evaluation
    assert json.loads((tmp_path / "features" / "cache.json").read_text())["backbone"] == smollm2.name
    bad = preset("tiny", max_steps=1, out=str(tmp_path / "run"), feature_cache=str(tmp_path / "run" / "f"))
    with pytest.raises(LongsideError, match="inside the checkpoint"):
        train(bad, backbone=smollm2, progress=False)


def test_cache_of_a_quantized_backbone_is_refused_for_the_dense_one(tmp_path, smollm2):
    """Features of an NF4 backbone differ from the dense one's: a cache made with one is
    refused for the other (the backbone's quantization is part of the cache's identity)."""
    import copy

    model = _model(smollm2)
    layers, m = model.feature_layers(), model.config.memory_layer
    FeatureCache(tmp_path / "fc", smollm2, layers, m)
    quantized = copy.copy(smollm2)  # the same weights' identity, marked as quantized
    quantized.quantization = {"kind": "nf4"}
    with pytest.raises(LongsideError, match="was made for"):
        FeatureCache(tmp_path / "fc", quantized, layers, m)
    # a GGUF's own blocks read segments exactly like the fp32 copy: the same cache serves both
    native, dense = copy.copy(smollm2), copy.copy(smollm2)
    native.quantization, dense.quantization = {"kind": "native"}, None
    FeatureCache(tmp_path / "fc2", native, layers, m)
    FeatureCache(tmp_path / "fc2", dense, layers, m)
