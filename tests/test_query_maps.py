"""Backbone memory's trained query maps (training/query_maps.py, nn/backbone_memory.py).

Real SmolLM2 backbone with a 64-token window, so each test runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError
from longside.model import LongSideModel, state_hash
from longside.nn.backbone_memory import BackboneMemory
from longside.training.query_maps import QueryMapConfig, block_memory_nll, teacher_attention, train_query_maps

W = 64
LAYERS = [15, 20]


def make_model(backbone, layers=LAYERS) -> LongSideModel:
    cfg = SideNetConfig(window=W, capacity_tokens=4096, backbone_memory_layers=list(layers), token_cache=False)
    return LongSideModel(backbone, cfg).eval()


def random_maps(spec, layers=LAYERS, scale=0.3, seed=0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_heads, spec.head_dim, spec.head_dim)
    return {L: scale * torch.randn(shape, generator=g) / spec.head_dim ** 0.5 for L in layers}


def repeated_doc(seed: int, repeats: int = 3) -> np.ndarray:
    """One random segment of W tokens said `repeats` times: memory holds the answer."""
    x = np.random.default_rng(seed).integers(100, 5000, W)
    return np.concatenate([x] * repeats).astype(np.int64)


def test_zero_maps_read_as_the_block_query(smollm2):
    ids = torch.as_tensor(repeated_doc(1, 2))[None]
    spec = smollm2.spec
    logits = []
    for maps in ({}, {L: torch.zeros(spec.num_heads, spec.head_dim, spec.head_dim) for L in LAYERS},
                 random_maps(spec)):
        model = make_model(smollm2)
        model.use_query_maps(maps)
        model(ids[:, :W])
        logits.append(model(ids[:, W:], write_memory=False).logits)
    assert torch.equal(logits[0], logits[1])
    assert (logits[0] - logits[2]).abs().max() > 1e-3  # a map changes the read


def test_the_rotated_query_is_mapped_like_the_pre_rotary_one(smollm2):
    """The C decode step maps the query after its rotation at `distance`: the same query."""
    spec = smollm2.spec
    bm = BackboneMemory.from_config(smollm2, make_model(smollm2).config, 1, random_maps(spec))
    q = torch.randn(2, 3, spec.num_heads, spec.head_dim, generator=torch.Generator().manual_seed(1))
    for L in LAYERS:
        qm = smollm2.rotate(q, torch.full((2, 3), bm.distance), L)
        bm.map_rotated_query(L, qm)
        torch.testing.assert_close(qm, bm.memory_query(L, q), atol=1e-5, rtol=1e-5)


def test_training_fits_the_teacher_and_never_touches_the_backbone(smollm2):
    """Each block's loss (the share of the teacher's change its read leaves unexplained) falls
    over passes on text that memory holds; the backbone's weights get no gradient."""
    model = make_model(smollm2)
    before = {k: v.clone() for k, v in smollm2.model.state_dict().items() if v.is_floating_point()}
    cfg = QueryMapConfig(blocks=LAYERS, segment=W, segments=3, lr=1e-2, epochs=4)
    maps, history = train_query_maps(smollm2, model.config, [repeated_doc(2)], cfg, progress=False)
    for L in LAYERS:
        assert history[-1][L] < history[0][L] - 0.02, (L, [h[L] for h in history])
        assert maps[L].abs().max() > 0
    assert all(p.grad is None for p in smollm2.model.parameters())
    after = smollm2.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    # the backbone alone reads the held-out copy better with the maps than without
    doc = [repeated_doc(3)]
    trained = block_memory_nll(smollm2, model.config, doc, LAYERS, maps, segment=W, progress=False)
    untrained = block_memory_nll(smollm2, model.config, doc, LAYERS, None, segment=W, progress=False)
    assert trained["off"] == untrained["off"]
    assert trained["memory"][0] < untrained["memory"][0]


def test_output_loss_fits_the_teacher_through_the_blocks_above_and_never_touches_the_backbone(smollm2):
    """loss="output": the KL from the teacher's next-token distribution falls over passes,
    every map gets a gradient (the lower one only through the blocks above it), and the
    backbone's weights get none."""
    model = make_model(smollm2)
    before = {k: v.clone() for k, v in smollm2.model.state_dict().items() if v.is_floating_point()}
    cfg = QueryMapConfig(blocks=LAYERS, segment=W, segments=3, carry=16, lr=1e-2, epochs=4, loss="output")
    maps, history = train_query_maps(smollm2, model.config, [repeated_doc(2)], cfg, progress=False)
    assert history[-1]["kl"] < history[0]["kl"] - 0.02, [h["kl"] for h in history]
    assert all(maps[L].abs().max() > 0 for L in LAYERS)
    assert all(p.grad is None for p in smollm2.model.parameters())
    after = smollm2.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    doc = [repeated_doc(3)]
    trained = block_memory_nll(smollm2, model.config, doc, LAYERS, maps, segment=W, carry=16, progress=False)
    untrained = block_memory_nll(smollm2, model.config, doc, LAYERS, None, segment=W, carry=16, progress=False)
    assert trained["memory"][0] < untrained["memory"][0]
    # a last window holding only carried tokens scores nothing: no NaN in the maps or the reported loss
    maps, hist = train_query_maps(smollm2, model.config, [repeated_doc(2, 2)],
                                  QueryMapConfig(blocks=[20], segment=W, segments=2, carry=1, loss="output"),
                                  progress=False)
    assert torch.isfinite(maps[20]).all() and maps[20].abs().max() > 0
    assert all(np.isfinite(v) for h in hist for v in h.values()), hist
    with pytest.raises(LongsideError, match="'block' or 'output'"):
        train_query_maps(smollm2, model.config, [repeated_doc(2)], QueryMapConfig(blocks=[20], segment=W, segments=3,
                                                                                   loss="logits"), progress=False)


def test_training_documents_must_fit(smollm2):
    model = make_model(smollm2)
    with pytest.raises(LongsideError, match="carry must be"):
        train_query_maps(smollm2, model.config, [repeated_doc(1)], QueryMapConfig(blocks=[20], segment=W, segments=3,
                                                                                   carry=W), progress=False)
    with pytest.raises(LongsideError, match="3 segments of 64"):
        train_query_maps(smollm2, model.config, [repeated_doc(1, 2)], QueryMapConfig(blocks=[20], segment=W, segments=3),
                         progress=False)
    with pytest.raises(LongsideError, match="exceeds the backbone's context"):
        teacher_attention(smollm2, torch.zeros(smollm2.spec.max_positions + 1, dtype=torch.int64), [20])


def test_maps_are_saved_loaded_and_refused_when_bad(smollm2, tmp_path):
    model = make_model(smollm2)
    bare = state_hash(model)
    maps = random_maps(smollm2.spec)
    model.use_query_maps(maps)
    assert state_hash(model) != bare
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LongSideModel.from_pretrained(tmp_path / "ckpt", backbone=smollm2)
    assert sorted(loaded.query_maps) == LAYERS
    for L in LAYERS:
        assert torch.equal(loaded.query_maps[L], maps[L])
    mapped = state_hash(loaded)  # provenance tells a mapped checkpoint from its bare side weights
    # memory written with one reading is never read with another
    loaded(torch.as_tensor(repeated_doc(4, 1))[None])
    with pytest.raises(LongsideError, match="reset_memory"):
        loaded.use_query_maps({})
    assert sorted(loaded.query_maps) == LAYERS
    loaded.reset_memory()
    loaded.use_query_maps({})
    assert state_hash(loaded) != mapped
    for bad in ({20: torch.zeros(3, 3)}, {20: "not a tensor"}, {99: torch.zeros(9, 64, 64)}):
        with pytest.raises(LongsideError, match="finite"):
            make_model(smollm2).use_query_maps(bad)
    path = tmp_path / "ckpt" / "query_maps.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="fit-query-maps"):
        LongSideModel.from_pretrained(tmp_path / "ckpt", backbone=smollm2)
    from safetensors.torch import save_file
    save_file({"block.20": torch.zeros(2, 2)}, str(path), metadata={"format": "longside-query-maps-v1"})
    with pytest.raises(CheckpointError, match="query_maps.safetensors"):
        LongSideModel.from_pretrained(tmp_path / "ckpt", backbone=smollm2)


def test_fit_query_maps_command_saves_a_mapped_checkpoint(smollm2, tmp_path, monkeypatch):
    import json

    from longside.cli import fit_query_maps as cli

    monkeypatch.setattr(cli, "load_model", lambda path: (make_model(smollm2, layers=[]), {"note": "test"}))
    monkeypatch.setattr(cli, "book_documents", lambda bb, split, n, length: [repeated_doc(5, length // W)] * n)
    out, report = tmp_path / "mapped", tmp_path / "fit.json"
    assert cli.main(["--out", str(out), "--blocks", "20", "--docs", "1", "--json", str(report)]) == 0
    loaded = LongSideModel.from_pretrained(out, backbone=smollm2)
    assert loaded.config.backbone_memory_layers == [20] and sorted(loaded.query_maps) == [20]
    assert json.loads(report.read_text())["blocks"] == [20]
    with pytest.raises(LongsideError, match="--docs"):
        cli.main(["--out", str(tmp_path / "again"), "--docs", "0"])


def test_a_model_built_on_the_same_side_network_reads_with_its_maps(smollm2):
    """Evaluations build a model per memory capacity on the shared side network."""
    from longside.eval.common import with_capacity

    model = make_model(smollm2)
    model.use_query_maps(random_maps(smollm2.spec))
    other = with_capacity(model, 2048)
    assert sorted(other.query_maps) == LAYERS and all(other.query_maps[L] is model.query_maps[L] for L in LAYERS)
    with pytest.raises(TypeError):
        other.query_maps[20] = torch.zeros(1)  # read-only: use_query_maps checks what it takes
    assert sorted(other.backbone_memory.query_maps) == LAYERS


def test_memory_and_sessions_written_with_maps_are_refused_by_a_model_with_other_maps(smollm2, tmp_path):
    """Keys above a mapped block depend on its map: a saved memory or chat records the maps."""
    from longside.errors import MemoryBankError, SessionError
    from longside.inference.chat import ChatSession

    ids = list(range(100, 100 + 2 * W))
    mapped = make_model(smollm2)
    mapped.use_query_maps(random_maps(smollm2.spec))
    mapped.memory.write_ids(ids)
    mapped.save_memory(tmp_path / "mapped.lsmb")
    saved = mapped.memory.blocks.lengths()
    chat = ChatSession(mapped, max_new_tokens=2)
    chat.memorize("The harbour master keeps the blue ledger.")
    chat.save(tmp_path / "mapped.session")
    plain = make_model(smollm2)
    plain.memory.write_ids(ids)
    plain.save_memory(tmp_path / "plain.lsmb")
    held = plain.memory.blocks.lengths()
    for model, path, want in ((plain, "mapped.lsmb", "with query maps [0-9a-f]{16}, but this model reads with none"),
                              (mapped, "plain.lsmb", "no query maps recorded.*but this model reads with query maps"),
                              (make_model(smollm2), "mapped.lsmb", "reads with none")):
        with pytest.raises(MemoryBankError, match=want):
            model.load_memory(tmp_path / path)
    assert plain.memory.blocks.lengths() == held  # what it held stays
    other = make_model(smollm2)
    other.use_query_maps(random_maps(smollm2.spec, seed=1))
    with pytest.raises(MemoryBankError, match="with query maps"):
        other.load_memory(tmp_path / "mapped.lsmb")
    plain_chat = ChatSession(make_model(smollm2), max_new_tokens=2)
    plain_chat.memorize("The harbour master keeps the blue ledger.")
    plain_chat.save(tmp_path / "plain.session")
    for model, session in ((plain, "mapped.session"), (other, "mapped.session"), (mapped, "plain.session")):
        with pytest.raises(SessionError, match="another side network configuration"):
            ChatSession.load(tmp_path / session, model)
    # a session records the maps its own memory was written with, not the model's later ones
    switched = make_model(smollm2)
    switched.use_query_maps(mapped.query_maps)
    own = ChatSession(switched, max_new_tokens=2, memory=switched.new_memory(1))
    own.memorize("The harbour master keeps the blue ledger.")
    switched.use_query_maps(other.query_maps)  # the model's own memory is empty: allowed
    own.save(tmp_path / "own.session")
    with pytest.raises(SessionError, match="another side network configuration"):
        ChatSession.load(tmp_path / "own.session", switched)
    assert len(ChatSession.load(tmp_path / "own.session", mapped, own_memory=True).memory.banks[0]) > 0
    again = make_model(smollm2)
    again.use_query_maps(mapped.query_maps)  # the same maps: both load
    again.load_memory(tmp_path / "mapped.lsmb")
    assert again.memory.blocks.lengths() == saved
    assert ChatSession.load(tmp_path / "mapped.session", again).messages == chat.messages
