"""Backbone memory: blocks of the frozen backbone read their own cached keys/values.

Real SmolLM2 backbone, a 64-token window and a few blocks, so each test runs in seconds."""

from __future__ import annotations

import math

import pytest
import torch

from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError, MemoryBankError, SessionError
from longside.inference.window import LocalWindow
from longside.model import LongSideModel
from longside.nn.backbone_memory import BackboneMemory, Segment

W = 64
LAYERS = [12, 20, 27]


def make_model(backbone, layers=LAYERS, **kw) -> LongSideModel:
    cfg = SideNetConfig(window=W, capacity_tokens=4096, backbone_memory_layers=list(layers), **kw)
    return LongSideModel(backbone, cfg).eval()


def ids_of(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(100, 5000, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_empty_memory_leaves_the_backbone_alone(smollm2):
    model = make_model(smollm2)
    ids = ids_of(W)
    # untrained side network: logits are the backbone's, and an empty memory changes nothing
    torch.testing.assert_close(model(ids).logits, smollm2.logits(ids), atol=1e-4, rtol=1e-5)
    assert model.backbone_memory.lengths() == [W - model.backbone_memory.sink_tokens]


def test_memory_changes_the_next_segment_and_reset_forgets(smollm2):
    model = make_model(smollm2)
    a, b = ids_of(W, seed=1), ids_of(W, seed=2)
    model(a)
    with_mem = model(b, write_memory=False).logits
    without = model(b, use_memory=False, write_memory=False).logits
    assert (with_mem - without).abs().max() > 1e-2
    model.reset_memory()
    assert model.backbone_memory.lengths() == [0]
    torch.testing.assert_close(model(b, write_memory=False).logits, without, atol=1e-4, rtol=1e-5)


def test_the_edit_is_one_softmax_over_memory_and_window(smollm2):
    """Block 20 with every stored token retrieved must equal a softmax over [memory keys
    at rotary distance bm.distance; the causal window], computed here directly."""
    L = 20
    model = make_model(smollm2, layers=[L], backbone_memory_k_chunks=64)  # 64 chunks of 4 >= 60 tokens
    bm = model.backbone_memory
    a, b = ids_of(W, seed=3), ids_of(W, seed=4)
    model(a)
    # [M, G, D], minus the sink tokens, rounded as the bank stores them (float16)
    mem_k, mem_v = (x[0, bm.sink_tokens:].half().float() for x in _block_kv(smollm2, bm, a, L))
    kv, edited = {}, {}

    def grab_out(_m, _args, out):
        edited["out"] = out

    with bm.attach(bm.segment(), read=True):  # hooks registered after the edit's see the edited output
        handles = smollm2.parts.hook_kv(smollm2.parts.layers[L], kv, smollm2.spec)
        handles.append(smollm2.parts.out_proj(smollm2.parts.layers[L]).register_forward_hook(grab_out))
        try:
            smollm2.encode(b)
        finally:
            for h in handles:
                h.remove()
    q, k, v = kv["q"][0], kv["k"][0], kv["v"][0]  # the unedited block inputs [T, H|G, D]
    T, H, D = q.shape
    rep = H // k.shape[1]
    pos = torch.arange(T)[None]
    qr, kr = smollm2.rotate(q[None], pos)[0], smollm2.rotate(k[None], pos)[0]
    qm = smollm2.rotate(q[None], torch.full((1, T), bm.distance))[0]
    s_loc = torch.einsum("thd,shd->hts", qr, kr.repeat_interleave(rep, 1))
    s_loc = s_loc.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    s_mem = torch.einsum("thd,mhd->htm", qm, mem_k.repeat_interleave(rep, 1))
    p = torch.softmax(torch.cat([s_mem, s_loc], -1) / math.sqrt(D), -1)
    vals = torch.cat([mem_v, v]).repeat_interleave(rep, 1)  # [M+T, H, D]
    ref = torch.einsum("hts,shd->thd", p, vals).reshape(1, T, H * D)
    want = smollm2.attn_output(L, ref)
    torch.testing.assert_close(edited["out"], want, atol=1e-4, rtol=1e-4)


def _block_kv(backbone, bm: BackboneMemory, ids, L):
    kv = {}
    handles = backbone.parts.hook_kv(backbone.parts.layers[L], kv, backbone.spec)
    try:
        backbone.encode(ids)
    finally:
        for h in handles:
            h.remove()
    return kv["k"], kv["v"]


def test_incremental_decoding_equals_whole_segments(smollm2):
    model = make_model(smollm2)
    ids = ids_of(W + 16, batch=2, seed=5)
    model.init_memory(2)
    full = torch.cat([model(ids[:, :W]).logits, model(ids[:, W:]).logits], 1)
    model.init_memory(2)
    window = LocalWindow(model, 2)
    cuts = [0, 5, *range(14, W - 4, 9), *range(W - 4, ids.shape[1] + 1)]
    inc = torch.cat([window.feed(ids[:, a:b], all_logits=True) for a, b in zip(cuts, cuts[1:])], 1)
    # float32 noise (~1e-4 for the bare backbone) passes through three memory reads here;
    # a wrong local softmax in the cached steps would be off everywhere, by far more
    torch.testing.assert_close(inc, full, atol=2e-3, rtol=1e-4)
    assert (inc - full).abs().mean() < 5e-5
    assert model.backbone_memory.lengths() == [W - 4, W - 4]
    model.init_memory(2)
    no_mem = model(ids[:, W:], use_memory=False, write_memory=False).logits
    assert (full[:, W:] - no_mem).abs().max() > 0.1


@pytest.mark.parametrize("mapped", [False, True], ids=["own-query", "query-maps"])
def test_decode_steps_read_memory_in_c_as_the_hooked_forward_does(smollm2, monkeypatch, mapped):
    """One token per row after the first: the C step, split at the blocks that read memory,
    gives the hooked forward's logits and writes the same banks. Block 15, the memory layer
    the side network reads, reads backbone memory too. Every stored chunk is retrieved (64
    chunks of 4), so a near-tie cannot pick another chunk in either path. With query maps
    (`mapped`, blocks 15 and 27) the C step maps its rotated query between its calls."""
    from longside.kernels import ggml_cpu

    layers = [15, 20, 27]
    model = make_model(smollm2, layers=layers, backbone_memory_k_chunks=64)
    if mapped:
        spec, g = smollm2.spec, torch.Generator().manual_seed(5)
        model.use_query_maps({L: 0.3 * torch.randn(spec.num_heads, spec.head_dim, spec.head_dim, generator=g)
                              / spec.head_dim ** 0.5 for L in (15, 27)})
    ids = ids_of(3 * W + 12, batch=2, seed=11)
    real, splits = ggml_cpu.llama_decode_step, []
    monkeypatch.setattr(ggml_cpu, "llama_decode_step",
                        lambda *a, **k: (splits.append(k.get("blocks")), real(*a, **k))[1])

    def decode(torch_from: int | None = None):
        model.init_memory(2)
        window = LocalWindow(model, 2)
        logits = [window.feed(ids[:, :3], all_logits=True)]
        for t in range(3, ids.shape[1]):
            if t == torch_from:  # from here on the hooked forward, in the middle of a C decoding
                monkeypatch.setenv("LONGSIDE_DECODE", "torch")
            logits.append(window.feed(ids[:, t:t + 1], all_logits=True))
            assert all(window.backbone_segment.length(L) == window.n for L in layers)
        monkeypatch.delenv("LONGSIDE_DECODE", raising=False)
        q = torch.randn(5, smollm2.spec.num_heads, smollm2.spec.head_dim, generator=torch.Generator().manual_seed(0))
        return torch.cat(logits, 1), {L: model.backbone_memory.banks[L][1].search(q, 4) for L in layers}

    c_logits, c_banks = decode()
    # a step after the first segment: blocks 0-14, then each reading block's rest and the next
    assert [(0, 15), (15, 20), (20, 27), (27, 30)] == splits[-4:]
    splits.clear()
    ref_logits, ref_banks = decode(torch_from=3)  # every step through the hooked forward
    assert not splits
    # fp32 rounding (C's rotary and sums against torch's) passes through three memory reads
    # and the token cache: ~1e-3 on most logits, where the bare backbone's C and torch steps
    # differ by ~1e-3, and up to 0.036 on 3 of 20M logits on an AVX2-only machine (session 47);
    # a wrong window log-sum-exp or blend would be off by > 0.1, and the mean below catches drift
    torch.testing.assert_close(c_logits, ref_logits, atol=5e-2, rtol=1e-4)
    assert (c_logits - ref_logits).abs().mean() < 1e-4
    for L in layers:
        for x, y in zip(c_banks[L], ref_banks[L]):
            torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
    switched, _ = decode(torch_from=2 * W + 5)  # C steps with memory, then hooked ones
    torch.testing.assert_close(switched, ref_logits, atol=2e-2, rtol=1e-4)
    model.init_memory(2)
    plain = LocalWindow(model, 2, use_memory=False)
    plain.feed(ids[:, :2 * W])
    without = plain.feed(ids[:, 2 * W:], all_logits=True)
    assert (c_logits[:, 2 * W:] - without).abs().max() > 0.1  # memory was read


def test_a_segment_reads_memory_the_same_in_slices(smollm2, monkeypatch):
    from longside.nn import backbone_memory

    model = make_model(smollm2)
    model(ids_of(W, seed=12))
    b = ids_of(W, seed=13)
    whole = model(b, write_memory=False).logits
    monkeypatch.setattr(backbone_memory, "READ_SLICE", 7)  # 64 queries in 10 slices, the last short
    # the same reads; only the batching of its float32 sums differs (~1e-5)
    torch.testing.assert_close(model(b, write_memory=False).logits, whole, atol=2e-4, rtol=1e-4)


def test_an_open_window_keeps_its_segment_through_other_calls(smollm2):
    """memorize, a whole-segment forward and a second window in between two steps of a
    window must not change what the window computes (each keeps its own segment)."""
    model = make_model(smollm2)
    a, b = ids_of(W, seed=6), ids_of(20, seed=7)

    def steps(interrupt):
        model.init_memory(1)
        model(a)
        window = LocalWindow(model, 1, write_memory=False)
        first = window.feed(b[:, :10], all_logits=True)
        interrupt()
        return torch.cat([first, window.feed(b[:, 10:], all_logits=True)], 1)

    ref = steps(lambda: None)

    def busy():
        model(ids_of(W, seed=8), write_memory=False)
        LocalWindow(model, 1, write_memory=False).feed(ids_of(5, seed=9))

    torch.testing.assert_close(steps(busy), ref, atol=1e-5, rtol=1e-5)


def test_a_fork_keeps_the_prefix_segment_of_the_blocks(smollm2):
    model = make_model(smollm2)
    a, b = ids_of(W, seed=1), ids_of(40, seed=2)
    model(a)  # something in the block banks
    whole = [model(torch.cat([b[:, :20], b[:, 20 + 10 * i:30 + 10 * i]], 1), write_memory=False).logits[:, 20:]
             for i in range(2)]
    window = LocalWindow(model, write_memory=False)
    window.feed(b[:, :20])
    forks = [window.fork(), window.fork()]
    for i, (f, want) in enumerate(zip(forks, whole)):
        torch.testing.assert_close(f.feed(b[:, 20 + 10 * i:30 + 10 * i], all_logits=True), want, atol=1e-4,
                                   rtol=1e-5)
    seg = window.backbone_segment
    assert seg.layers() and all(seg.window(L)[0].shape[1] == 20 for L in seg.layers())


def test_segment_appends_grow_past_capacity_and_forks_are_independent():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, T, 3, 8, 3, generator=g) for T in (5, 50, 1, 30, 1, 100)]  # k, v, kr stacked last
    seg = Segment([0, 1])
    for p in parts[:4]:
        seg.append(7, *p.unbind(-1))
    twin = seg.fork()
    for p in parts[4:]:
        seg.append(7, *p.unbind(-1))
    twin.append(7, *parts[5].unbind(-1))
    whole = torch.cat(parts, 1).unbind(-1)
    assert seg.layers() == [7] and seg.length(7) == 187 and twin.length(7) == 186
    for got, want in zip(seg.window(7), whole):
        assert torch.equal(got, want)
    skip = torch.cat([*parts[:4], parts[5]], 1).unbind(-1)  # the twin never saw parts[4]
    for got, want in zip(twin.window(7), skip):
        assert torch.equal(got, want)
    seg.clear()
    assert seg.layers() == [] and seg.length(7) == 0 and twin.length(7) == 186


def test_memorize_writes_what_forward_writes(smollm2):
    model = make_model(smollm2)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 12
    ids = smollm2.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :2 * W]
    for a in range(0, ids.shape[1], W):
        model(ids[:, a:a + W], return_logits=False)
    q = torch.randn(5, smollm2.spec.num_heads, smollm2.spec.head_dim)
    ref = {L: model.backbone_memory.banks[L][0].search(q, 4) for L in LAYERS}
    model.init_memory(2)
    model.memorize(smollm2.tokenizer.decode(ids[0]), row=1, progress=False)
    assert model.backbone_memory.lengths() == [0, 2 * (W - 4)]
    for L in LAYERS:
        got = model.backbone_memory.banks[L][1].search(q, 4)
        for x, y in zip(got, ref[L]):
            torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)


def test_config_round_trip_and_refusals(smollm2, tmp_path):
    cfg = SideNetConfig(backbone_memory_layers=[27, 15, 15], backbone_memory_k_chunks=16)
    assert cfg.backbone_memory_layers == [15, 27]
    cfg.to_json(tmp_path / "c.json")
    assert SideNetConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(CheckpointError, match="k_chunks"):
        SideNetConfig(backbone_memory_k_chunks=0)
    with pytest.raises(LongsideError, match="blocks 0..29"):
        make_model(smollm2, layers=[30]).memory


def test_saved_memory_keeps_the_block_banks(smollm2, tmp_path):
    model = make_model(smollm2)
    model.memorize("The secret word of the day is marmalade. " * 12, progress=False)
    b = ids_of(20, seed=5)
    want = model(b, write_memory=False).logits
    model.save_memory(tmp_path / "m")
    assert (tmp_path / "m" / "memory.json").is_file()
    model.save_memory(tmp_path / "m")  # saving again replaces it
    model.reset_memory()
    model.load_memory(tmp_path / "m")
    torch.testing.assert_close(model(b, write_memory=False).logits, want, atol=1e-5, rtol=1e-5)
    held = model.backbone_memory.lengths()
    # other blocks, or none, are refused before anything is replaced
    other = make_model(smollm2, layers=[12, 20])
    with pytest.raises(MemoryBankError, match=r"blocks \[12, 20, 27\]"):
        other.load_memory(tmp_path / "m")
    plain = LongSideModel(smollm2, SideNetConfig(window=W, capacity_tokens=4096)).eval()
    with pytest.raises(MemoryBankError, match="none"):
        plain.load_memory(tmp_path / "m")
    plain.memorize("Plain memory.", progress=False)
    plain.save_memory(tmp_path / "plain.lsmb")
    with pytest.raises(MemoryBankError, match="blocks none"):
        model.load_memory(tmp_path / "plain.lsmb")
    with pytest.raises(LongsideError, match="is a directory"):
        plain.save_memory(tmp_path / "m")
    # a wrong path: nothing that is not an earlier memory save is ever replaced
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    with pytest.raises(LongsideError, match="did not write"):
        model.save_memory(tmp_path / "work")
    with pytest.raises(LongsideError, match="is a file"):
        model.save_memory(tmp_path / "work" / "notes.txt")
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    with pytest.raises(MemoryBankError, match="no saved memory"):
        model.load_memory(tmp_path / "nowhere")
    # a missing block bank, one from another save, a damaged manifest: refused, memory kept
    model.save_memory(tmp_path / "m2")
    model.memorize("More text to remember, long enough to pass the sink tokens.", progress=False)
    now = (len(model.memory.banks[0]), model.backbone_memory.lengths())
    assert now[1][0] > held[0]
    (tmp_path / "m2" / "backbone_block20.lsmb").unlink()
    with pytest.raises(MemoryBankError, match="missing"):
        model.load_memory(tmp_path / "m2")
    model.save_memory(tmp_path / "m3")
    (tmp_path / "m3" / "backbone_block20.lsmb").write_bytes((tmp_path / "m" / "backbone_block20.lsmb").read_bytes())
    with pytest.raises(MemoryBankError, match="checksum"):
        model.load_memory(tmp_path / "m3")
    (tmp_path / "m3" / "memory.json").write_text("{not json")
    with pytest.raises(MemoryBankError, match="corrupt"):
        model.load_memory(tmp_path / "m3")
    assert (len(model.memory.banks[0]), model.backbone_memory.lengths()) == now


def test_chat_sessions_keep_the_block_banks(smollm2, tmp_path):
    from longside.inference.chat import ChatSession

    model = make_model(smollm2)
    model.memorize("The secret word of the day is marmalade. " * 12, progress=False)
    chat = ChatSession(model)
    chat.window.feed(ids_of(10))  # an open window: rebuilt on load
    q = torch.randn(3, smollm2.spec.num_heads, smollm2.spec.head_dim)
    before = {L: model.backbone_memory.banks[L][0].search(q, 4) for L in LAYERS}
    chat.save(tmp_path / "s")
    model.reset_memory()
    ChatSession.load(tmp_path / "s", model)
    for L in LAYERS:
        for x, y in zip(model.backbone_memory.banks[L][0].search(q, 4), before[L]):
            assert torch.equal(x, y)
    # a session needs a model with the same backbone memory, and intact block banks
    plain = LongSideModel(smollm2, SideNetConfig(window=W, capacity_tokens=4096)).eval()
    with pytest.raises(SessionError, match="another side network configuration"):
        ChatSession.load(tmp_path / "s", plain)
    with open(tmp_path / "s" / "backbone_block20.lsmb", "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2")
    held = model.backbone_memory.lengths()
    with pytest.raises(SessionError, match="checksum"):
        ChatSession.load(tmp_path / "s", model)
    assert model.backbone_memory.lengths() == held  # refused before the model's memory was touched


def test_training_refuses_backbone_memory(tmp_path):
    from longside.training.config import TrainConfig
    from longside.training.train import train

    cfg = TrainConfig(side=SideNetConfig(backbone_memory_layers=[15]), out=str(tmp_path / "run"))
    with pytest.raises(LongsideError, match="backbone memory"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_switching_backbone_memory_on_a_loaded_model(smollm2):
    from longside.config import parse_blocks

    assert parse_blocks("10,15-17") == [10, 15, 16, 17] and parse_blocks("") == []
    for bad in ("15..29", "29-15"):
        with pytest.raises(CheckpointError, match="15-29"):
            parse_blocks(bad)
    model = LongSideModel(smollm2, SideNetConfig(window=W, capacity_tokens=4096)).eval()
    model(ids_of(W))
    with pytest.raises(LongsideError, match="reset_memory"):
        model.use_backbone_memory([20])
    assert model.memory.lengths() == [W]  # refused: nothing lost
    model.reset_memory()
    with pytest.raises(LongsideError, match="blocks 0..29"):
        model.use_backbone_memory([31])
    assert model.config.backbone_memory_layers == [] and model.backbone_memory is None
    model.use_backbone_memory([20], k_chunks=4)
    model(ids_of(W))
    assert model.backbone_memory.lengths() == [W - 4] and model.config.backbone_memory_k_chunks == 4


def test_block_banks_are_isolated_between_batch_rows(smollm2):
    """Row 1's logits are the same whether row 0's block banks are empty or full."""
    model = make_model(smollm2)
    ask = ids_of(12, batch=2, seed=5)
    rows = []
    for other in (None, ids_of(3 * W, seed=7)):
        model.init_memory(2)
        model.memory.write_ids(ids_of(2 * W, seed=6)[0].tolist(), rows=[1])
        if other is not None:
            model.memory.write_ids(other[0].tolist(), rows=[0])
        lengths = model.memory.lengths()
        blocks = {L: len(model.memory.blocks.banks[L].banks[0]) for L in LAYERS}
        rows.append((lengths, blocks, model(ask, write_memory=False).logits[1]))
    assert rows[0][0][0] == 0 < rows[1][0][0] and all(n > 0 for n in rows[1][1].values())
    assert torch.equal(rows[0][2], rows[1][2])
