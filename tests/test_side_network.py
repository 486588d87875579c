import dataclasses
import math

import pytest
import torch

from longside.backbone import Backbone
from longside.config import SideNetConfig
from longside.errors import CheckpointError
from longside.kernels import ggml_cpu
from longside.nn.attention import causal_lse
from longside.nn.memory_attention import memory_inputs
from longside.nn.side_network import SideNetwork


def _tiny(layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return Backbone(LlamaForCausalLM(cfg), None, "tiny", "f" * 16)


def _brute_retrieve(keys, values, slots=8, valid=None):
    """Exact top-`slots` tokens over `keys/values [B, S, G, D]` (a stand-in bank)."""
    def retrieve(q):
        B, T, H, D = q.shape
        rep = H // keys.shape[2]
        K = keys.repeat_interleave(rep, 2).permute(0, 2, 1, 3)  # B H S D
        V = values.repeat_interleave(rep, 2).permute(0, 2, 1, 3)
        idx = torch.einsum("bthd,bhsd->bths", q, K).topk(slots, -1).indices
        gk = torch.stack([K[b, h][idx[b, :, h]] for b in range(B) for h in range(H)]).view(B, H, T, slots, D)
        gv = torch.stack([V[b, h][idx[b, :, h]] for b in range(B) for h in range(H)]).view(B, H, T, slots, D)
        mask = torch.ones(B, T, H, slots, dtype=torch.bool) if valid is None else valid.expand(B, T, H, slots)
        return gk.transpose(1, 2), gv.transpose(1, 2), mask
    return retrieve


def _side(bb, **kw):
    cfg = SideNetConfig(reduction=2, layer_stride=1, memory_layer=1, k_chunks=2, chunk_size=4, **kw)
    return SideNetwork(cfg, bb.spec, bb)


def _use_isa(isa: int, monkeypatch):
    """Run the C kernels on instruction-set path `isa` (0 plain, 1 AVX2, 3 AVX-512), or skip
    where they are not built or the CPU lacks it."""
    if not ggml_cpu.available():
        pytest.skip("the C kernels are not built")
    if isa > ggml_cpu._isa_level():
        pytest.skip(f"this CPU has no path {isa}")
    monkeypatch.setattr(ggml_cpu, "_isa_level", lambda: isa)


@pytest.mark.parametrize("init,down", [("prune", "prune"), ("random", "avgpool"), ("random", "adapter"),
                                       ("prune", "adapter")])
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_init_equals_backbone_and_shapes(init, down, mode):
    bb = _tiny()
    side = _side(bb, init=init, downsample=down, memory_attention=mode)
    past = bb.encode(torch.randint(0, 96, (2, 12)), memory_layer=1)
    out = bb.encode(torch.randint(0, 96, (2, 10)), memory_layer=1)
    mem = memory_inputs(bb, out, 1, _brute_retrieve(past.memory_keys, past.memory_values))
    h, caches = side(out.hidden_states, mem)
    assert h.shape == (2, 10, 64) and len(caches) == len(side.blocks) == 4
    assert torch.equal(h, out.hidden_states[-1])  # the side contribution starts at zero
    assert side.reader(torch.zeros(2, 10, 32), mem).abs().sum() > 0  # memory does reach the side stream


def test_gates_are_parameters_that_train_and_save():
    bb = _tiny()
    side = _side(bb, memory_attention="gated")  # the per-head gate is what this test trains
    names = dict(side.named_parameters())
    for name in ("gates", "final_gate", "reader.gate"):
        assert name in names and names[name].requires_grad
        assert name in side.state_dict()
    with torch.no_grad():
        side.up.weight.normal_(0, 0.1)
    past = bb.encode(torch.randint(0, 96, (1, 12)), memory_layer=1)
    out = bb.encode(torch.randint(0, 96, (1, 10)), memory_layer=1)
    mem = memory_inputs(bb, out, 1, _brute_retrieve(past.memory_keys, past.memory_values))
    h, _ = side(out.hidden_states, mem)
    bb.lm_head(bb.final_norm(h)).logsumexp(-1).sum().backward()
    for name in ("gates", "final_gate", "reader.gate", "reader.q_delta.weight", "blocks.0.q.weight"):
        assert names[name].grad is not None and names[name].grad.abs().sum() > 0, name


def test_masked_slots_are_ignored():
    bb = _tiny()
    side = _side(bb)
    past = bb.encode(torch.randint(0, 96, (1, 12)), memory_layer=1)
    out = bb.encode(torch.randint(0, 96, (1, 6)), memory_layer=1)
    x = torch.randn(1, 6, 32)
    none_valid = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    mem = memory_inputs(bb, out, 1, _brute_retrieve(past.memory_keys, past.memory_values, valid=none_valid))
    assert torch.equal(side.reader(x, mem), torch.zeros(1, 6, 32))
    # half the slots valid: garbage in the masked half changes nothing
    half = torch.tensor([True] * 4 + [False] * 4).view(1, 1, 1, 8)
    base = _brute_retrieve(past.memory_keys, past.memory_values, valid=half)

    def noisy(q):
        k, v, m = base(q)
        return k.masked_fill(~m[..., None], 1e4), v.masked_fill(~m[..., None], -1e4), m
    a = side.reader(x, memory_inputs(bb, out, 1, base))
    b = side.reader(x, memory_inputs(bb, out, 1, noisy))
    assert torch.allclose(a, b) and a.abs().sum() > 0


def test_cache_matches_full_segment():
    bb = _tiny()
    side = _side(bb)
    with torch.no_grad():
        side.up.weight.normal_(0, 0.1)
    out = bb.encode(torch.randint(0, 96, (1, 9)), memory_layer=1)
    full, _ = side(out.hidden_states, None)
    first, caches = side([h[:, :5] for h in out.hidden_states], None)
    rest, _ = side([h[:, 5:] for h in out.hidden_states], None, start=5, caches=caches)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_a_reader_at_a_distance_scores_memory_with_the_query_rotated_there():
    """distance d: the memory read equals the position-free read of the query rotated at
    position d (what it is defined as); d = 0 is the position-free read itself."""
    bb = _tiny()
    side = _side(bb, memory_attention="joint", memory_distance=7)
    with torch.no_grad():
        side.reader.q_delta.weight.normal_(0, 0.1)
    past = bb.encode(torch.randint(0, 96, (1, 12)), memory_layer=1)
    out = bb.encode(torch.randint(0, 96, (1, 6)), memory_layer=1)
    seen = []
    base = _brute_retrieve(past.memory_keys, past.memory_values)

    def retrieve(q):
        seen.append(q)
        return base(q)
    mem = memory_inputs(bb, out, 1, retrieve)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        side.reader(x, mem)
        q = out.memory_queries + side.reader.q_delta(x).view(1, 6, *out.memory_queries.shape[2:])
        torch.testing.assert_close(seen[-1], bb.rotate(q, torch.full((1, 6), 7), 1))
        side.reader.distance = 0
        side.reader(x, mem)
        torch.testing.assert_close(seen[-1], q)


def test_bad_configs():
    bb = _tiny()
    with pytest.raises(CheckpointError, match="reduction"):
        SideNetwork(SideNetConfig(reduction=3, memory_layer=1), bb.spec, bb)
    with pytest.raises(CheckpointError, match="memory_layer"):
        SideNetwork(SideNetConfig(reduction=2, memory_layer=9), bb.spec, bb)
    with pytest.raises(CheckpointError, match="memory_attention"):
        SideNetConfig(memory_attention="both")
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = Backbone(GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4)), None, "g", "0")
    with pytest.raises(CheckpointError, match="Llama-family"):
        SideNetwork(SideNetConfig(reduction=2, memory_layer=1), gpt2.spec, gpt2)
    side = SideNetwork(SideNetConfig(reduction=2, memory_layer=1, init="random", downsample="adapter"),
                       gpt2.spec, gpt2)  # other families: random init, trainable adapters
    out = gpt2.encode(torch.randint(0, 96, (1, 5)), memory_layer=1)
    assert side(out.hidden_states, None)[0].shape == (1, 5, 64)


def test_prune_init_copies_backbone_weights():
    bb = _tiny()
    side = _side(bb)
    src = bb.model.model.layers[1]  # side layer 0 reads h[1] and starts as block 1
    keep = side.keep
    assert torch.equal(side.blocks[0].attn_norm.weight, src.input_layernorm.weight[keep])
    # every row of the side gate projection is a row of the backbone's, cut to the kept dims
    rows = src.mlp.gate_proj.weight[:, keep]
    for r in side.blocks[0].gate.weight:
        assert (rows - r).abs().sum(1).min() == 0


def test_causal_lse_is_the_logsumexp_of_the_masked_grouped_scores():
    """Against the scores written out with each kv head repeated for its query heads."""
    g = torch.Generator().manual_seed(0)
    for B, T, P, H, G in [(2, 5, 7, 9, 3), (1, 1, 100, 9, 3), (3, 16, 0, 4, 4), (1, 8, 3, 6, 1)]:
        qr, kr = torch.randn(B, T, H, 16, generator=g), torch.randn(B, P + T, G, 16, generator=g)
        k = kr.repeat_interleave(H // G, 2)  # [B, P+T, H, D]
        s = torch.einsum("bthd,bshd->bhts", qr, k) / 4.0
        s = s.masked_fill(~torch.ones(T, P + T, dtype=torch.bool).tril(P), float("-inf"))
        want = torch.logsumexp(s, -1).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
        torch.testing.assert_close(causal_lse(qr, kr), want, atol=1e-5, rtol=1e-5)


def test_causal_lse_in_query_blocks_keeps_masks_and_gradients():
    """A segment longer than one block of queries, padded keys (a mask per row, and one per
    query), a query that sees no key: the same values and gradients as the scores written out."""
    g = torch.Generator().manual_seed(1)
    B, T, P, H, G, D = 2, 600, 37, 6, 2, 8
    qr = torch.randn(B, T, H, D, generator=g, requires_grad=True)
    kr = torch.randn(B, P + T, G, D, generator=g, requires_grad=True)
    row_mask = torch.ones(B, P + T, dtype=torch.bool)
    row_mask[1, :20] = False
    query_mask = torch.rand(B, T, P + T, generator=g) > 0.3
    query_mask[0, 5] = False  # sees nothing: -inf
    for mask in (None, row_mask, query_mask):
        s = torch.einsum("bthd,bshd->bhts", qr, kr.repeat_interleave(H // G, 2)) / math.sqrt(D)
        see = torch.ones(T, P + T, dtype=torch.bool).tril(P)
        if mask is not None:
            see = see & (mask[:, None, None] if mask.dim() == 2 else mask[:, None])
        want = torch.logsumexp(s.masked_fill(~see, float("-inf")), -1).transpose(1, 2).unsqueeze(-1)
        got = causal_lse(qr, kr, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        w = torch.randn(want.shape, generator=g)
        grads = [torch.autograd.grad((x[finite] * w[finite]).sum(), (qr, kr)) for x in (want, got)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_decoding_in_c_follows_replaced_weights(monkeypatch):
    """The C decode step's table of side-block weights is built once and reused: a replaced
    layer, a replaced parameter and a `.to()` round trip (new storage) each rebuild it, so a
    step in C still equals the torch loop."""
    from torch import nn

    bb = _tiny()
    side = _side(bb)
    with torch.no_grad():
        side.up.weight.normal_(0, 0.1)
    out = bb.encode(torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3)), memory_layer=1)

    def step(native: bool) -> torch.Tensor:
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        _, caches = side([h[:, :5] for h in out.hidden_states], None)
        return side([h[:, 5:] for h in out.hidden_states], None, start=5, caches=caches)[0]

    with torch.no_grad():
        before = step(True)
        torch.testing.assert_close(before, step(False), atol=1e-5, rtol=1e-5)
        q = side.blocks[0].q
        side.blocks[0].q = nn.Linear(q.in_features, q.out_features, bias=False)
        side.blocks[1].k.weight = nn.Parameter(torch.randn_like(side.blocks[1].k.weight))
        changed = step(True)
        assert (changed - before).abs().max() > 1e-3
        torch.testing.assert_close(changed, step(False), atol=1e-5, rtol=1e-5)
        side.double()
        side.float()  # every weight in new storage
        torch.testing.assert_close(step(True), changed, atol=1e-5, rtol=1e-5)
    assert side.__dict__.get("_native_memo") is not None  # the C step ran


def test_decoding_in_c_gives_the_same_bits_on_one_thread_and_a_team(monkeypatch):
    """With fewer rows than threads the C step splits each product's outputs over the team
    (one user decoding); every output is the same dot as on one thread, so the bits agree."""
    bb = _tiny()
    side = _side(bb)
    with torch.no_grad():
        side.up.weight.normal_(0, 0.1)
    monkeypatch.setenv("LONGSIDE_DECODE", "c")
    out = bb.encode(torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4)), memory_layer=1)
    threads = torch.get_num_threads()

    def steps(n_threads: int) -> torch.Tensor:
        torch.set_num_threads(n_threads)
        try:
            _, caches = side([h[:, :30] for h in out.hidden_states], None)
            ys = []
            for t in range(30, 40):
                y, caches = side([h[:, t:t + 1] for h in out.hidden_states], None, start=t, caches=caches)
                ys.append(y)
            return torch.cat(ys, 1)
        finally:
            torch.set_num_threads(threads)

    with torch.no_grad():
        assert torch.equal(steps(1), steps(2))


@pytest.mark.parametrize("spread", [1.0, 10.0, 60.0])
@pytest.mark.parametrize("isa", [0, 1, 3])
def test_side_decoding_in_c_equals_torch_on_each_path(isa, spread, monkeypatch):
    """The side blocks' one-token step in C gives the torch loop's output on each
    instruction-set path the CPU has (0 plain loops, 1 AVX2's attend256/swiglu256/exp256, 3
    AVX-512's SwiGLU, with attend256 still for these 8-wide heads): two rows, the second's first two cached positions hidden by the key mask; with
    queries and keys scaled by `spread`, scores differ by ~0.05, ~5 and ~150 (exponentials
    that underflow to 0)."""

    _use_isa(isa, monkeypatch)
    bb = _tiny()
    side = _side(bb)
    with torch.no_grad():
        side.up.weight.normal_(0, 0.3)
        for blk in side.blocks:  # attention that weighs in the output, its scores spread
            blk.o.weight.normal_(0, 0.3)
            blk.q.weight.mul_(spread)
            blk.k.weight.mul_(spread)
    out = bb.encode(torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(6)), memory_layer=1)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[1, :2] = False
    calls = []
    c_step = ggml_cpu.side_decode_layers
    monkeypatch.setattr(ggml_cpu, "side_decode_layers", lambda *a, **k: (calls.append(1), c_step(*a, **k))[1])

    def step(native: bool) -> torch.Tensor:
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        _, caches = side([h[:, :10] for h in out.hidden_states], None)
        return side([h[:, 10:] for h in out.hidden_states], None, start=10, caches=caches, key_mask=key_mask)[0]

    with torch.no_grad():
        want, got = step(False), step(True)
    added = want - out.hidden_states[-1][:, 10:]  # what the side network adds
    assert calls and added.abs().max() > 0.1
    assert (got - want).abs().max() <= 1e-5 * added.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("distance", [0, 5])
@pytest.mark.parametrize("isa", [0, 1, 3])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_memory_read_of_one_token_per_row_in_c_equals_torch(mode, isa, distance, monkeypatch):
    """A decode step's memory read in one C call gives the torch read's values, on each
    instruction-set path the CPU has (0 scalar, 1 AVX2, 3 AVX-512): two rows of different
    lengths (the short one padded on the left), a head that retrieved nothing, masked slots
    holding garbage; memory keys scored position-free and at a rotary distance."""
    from types import SimpleNamespace


    _use_isa(isa, monkeypatch)
    bb = _tiny()
    side = _side(bb, memory_attention=mode, memory_distance=distance)
    with torch.no_grad():
        side.reader.q_delta.weight.normal_(0, 0.1)
        side.reader.gate.normal_(0, 1.0)
    past = bb.encode(torch.randint(0, 96, (2, 12)), memory_layer=1)
    out = bb.encode(torch.randint(0, 96, (2, 7)), memory_layer=1)
    H = bb.spec.num_heads
    valid = torch.rand(2, 1, H, 8, generator=torch.Generator().manual_seed(3)) > 0.3
    valid[0, :, 1] = False  # row 0's head 1 retrieves nothing
    base = _brute_retrieve(past.memory_keys, past.memory_values, valid=valid)

    def retrieve(q):
        k, v, m = base(q)
        return k.masked_fill(~m[..., None], 1e4).contiguous(), v.masked_fill(~m[..., None], -1e4).contiguous(), m
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1, :2] = False  # row 1 is two tokens shorter
    last = SimpleNamespace(memory_queries=out.memory_queries[:, -1:], memory_attn=out.memory_attn[:, -1:],
                           memory_keys=out.memory_keys[:, -1:], memory_keys_rotated=None)
    pos = torch.tensor([[6], [4]])  # each row rotated at its own position (row 1 is two tokens shorter)
    mem = memory_inputs(bb, last, 1, retrieve, window_keys=out.memory_keys, positions=pos,
                        key_positions=torch.arange(7).expand(2, 7), key_mask=key_mask)
    x = torch.randn(2, 1, 32)
    calls = []
    step = ggml_cpu.memory_read_step
    monkeypatch.setattr(ggml_cpu, "memory_read_step", lambda *a, **kw: (step(*a, **kw), calls.append(1))[0])
    with torch.no_grad():
        monkeypatch.setenv("LONGSIDE_DECODE", "torch")
        want = side.reader(x, mem)
        monkeypatch.setenv("LONGSIDE_DECODE", "c")
        got = side.reader(x, mem)  # the query rotated in the call
        rotated = side.reader(x, dataclasses.replace(mem, rotary=None))  # rotated by torch first
    assert calls == [1, 1] and want.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(rotated, want, atol=2e-6, rtol=1e-5)
    if distance:  # the distance changes what is read (in both paths)
        side.reader.distance = 0
        with torch.no_grad():
            assert (side.reader(x, mem) - want).abs().max() > 1e-3


@pytest.mark.parametrize("isa", [0, 1])
def test_side_decoding_reads_float16_weights_as_float16_with_the_same_bits(isa, monkeypatch):
    """Products whose weights are all float16 values (a checkpoint saved in float16) are read
    from float16 copies in the C step: the same bits as reading the float32 weights, on each
    instruction-set path; an in-place change of a weight is followed (a float16 value: new
    copies; any other value: the float32 weights again), each step equal to the torch loop."""
    from longside.nn import side_network

    _use_isa(isa, monkeypatch)
    bb = _tiny()
    side = _side(bb)
    with torch.no_grad():
        side.up.weight.normal_(0, 0.3)
        for blk in side.blocks:
            blk.o.weight.normal_(0, 0.3)
        for p in side.parameters():
            p.copy_(p.half().float())
    out = bb.encode(torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(6)), memory_layer=1)

    def step(native: bool = True) -> torch.Tensor:
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        _, caches = side([h[:, :10] for h in out.hidden_states], None)
        return side([h[:, 10:] for h in out.hidden_states], None, start=10, caches=caches)[0]

    def half_flag() -> set:
        return set(side.__dict__["_native_memo"][1][:, ggml_cpu.SIDE_WORDS["half"]].tolist())

    with torch.no_grad():
        halves = step()
        assert half_flag() == {1}
        torch.testing.assert_close(halves, step(False), atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(side_network, "_float16_copies", lambda weights: [])
        side.__dict__.pop("_native_memo")
        assert torch.equal(step(), halves)  # the float32 weights: the same bits
        assert half_flag() == {0}
        monkeypatch.undo()
        _use_isa(isa, monkeypatch)
        side.blocks[1].gate.weight.mul_(2)  # in place, still float16 values
        doubled = step()
        assert half_flag() == {1} and (doubled - halves).abs().max() > 1e-4
        torch.testing.assert_close(doubled, step(False), atol=1e-5, rtol=1e-5)
        side.blocks[0].q.weight.add_(1e-4 * torch.randn_like(side.blocks[0].q.weight))  # no longer float16 values
        moved = step()
        assert half_flag() == {0}
        torch.testing.assert_close(moved, step(False), atol=1e-5, rtol=1e-5)


def test_continued_side_decoding_checks_the_weights_once(monkeypatch):
    """Steps that continue the caches the last C step returned reuse its table without
    checking the weights again (the caches hold what it names); a new prompt checks them."""
    _use_isa(1 if ggml_cpu._isa_level() else 0, monkeypatch)
    monkeypatch.setenv("LONGSIDE_DECODE", "c")
    bb = _tiny()
    side = _side(bb)
    out = bb.encode(torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7)), memory_layer=1)
    calls, check = [], side._native_weights
    monkeypatch.setattr(side, "_native_weights", lambda: (calls.append(1), check())[1])
    with torch.no_grad():
        for prompt in (8, 6):
            _, caches = side([h[:, :prompt] for h in out.hidden_states], None)
            for t in range(prompt, 12):
                _, caches = side([h[:, t:t + 1] for h in out.hidden_states], None, start=t, caches=caches)
            assert caches.held is side.__dict__["_native_memo"]
    assert len(calls) == 2
