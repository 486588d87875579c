"""NF4 format (bit-exact against bitsandbytes), C kernels against the torch reference,
QuantLinear, quantize_model, save/load, and the quick benchmark's output format."""

from __future__ import annotations

import json

import pytest
import torch
from longside.kernels import (
    NF4Weight,
    QuantLinear,
    cpu,
    dequantize,
    dequantize_nf4,
    load_quantized,
    matmul_nf4,
    matmul_nf4_reference,
    quantize_model,
    quantize_nf4,
    save_quantized,
)
from torch import nn

from longside.errors import CheckpointError, LongsideError

bf = pytest.importorskip("bitsandbytes.functional")
needs_lib = pytest.mark.skipif(not cpu.available(), reason=f"C kernel not built: {cpu.BUILD_HINT}")


def _weight(n, k, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale


# ---------------------------------------------------------------- format

# K multiple of the blocksize (every real model layer), odd sizes, odd element count,
# blocks spanning rows, zero blocks.
FORMAT_SHAPES = [(576, 576, 64), (192, 576, 64), (7, 64, 64), (33, 128, 32), (5, 70, 64), (3, 5, 64),
                 (17, 96, 128), (1, 1, 64), (64, 1536, 64)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n,k,bs", FORMAT_SHAPES)
def test_quantize_matches_bitsandbytes_bit_for_bit(n, k, bs, double_quant):
    w = _weight(n, k, seed=n * k, scale=0.05)
    w[:, :1] = 0.0  # zeros quantize to the code's 0.0 entry
    if n * k >= 128:
        w.view(-1)[:bs] = 0.0  # a whole zero block
    q_ref, s_ref = bf.quantize_4bit(w, quant_type="nf4", blocksize=bs, compress_statistics=double_quant)
    ours = quantize_nf4(w, bs, double_quant)
    assert ours.packed.shape == q_ref.shape and ours.packed.dtype == torch.uint8
    assert torch.equal(ours.packed, q_ref)
    assert torch.equal(ours.absmax, s_ref.absmax)
    if double_quant:
        assert torch.equal(ours.absmax_scale, s_ref.state2.absmax)
        assert torch.equal(ours.absmax_code, s_ref.state2.code)
        assert torch.equal(ours.absmax_offset, s_ref.offset)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n,k,bs", [s for s in FORMAT_SHAPES if s[1] % s[2] == 0])
def test_dequantize_both_ways_bit_for_bit(n, k, bs, double_quant):
    """bnb's dequantize on ours == ours on bnb's == bnb on bnb's. (Only K % blocksize == 0:
    bitsandbytes 0.50's CPU dequantize indexes blocks per row otherwise, which does not
    invert its own flat-block quantize; see the next test.)"""
    w = _weight(n, k, seed=1)
    q_ref, s_ref = bf.quantize_4bit(w, quant_type="nf4", blocksize=bs, compress_statistics=double_quant)
    expected = bf.dequantize_4bit(q_ref, s_ref)
    ours = quantize_nf4(w, bs, double_quant)
    assert torch.equal(bf.dequantize_4bit(*ours.to_bnb()), expected)
    assert torch.equal(dequantize_nf4(NF4Weight.from_bnb(q_ref, s_ref)), expected)
    assert torch.equal(dequantize_nf4(ours), expected)


@pytest.mark.parametrize("n,k,bs", [s for s in FORMAT_SHAPES if s[1] % s[2] != 0])
def test_dequantize_spanning_blocks_matches_bnb_reference_backend(n, k, bs):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = _weight(n, k, seed=2)
    q_ref, s_ref = bf.quantize_4bit(w, quant_type="nf4", blocksize=bs)
    expected = _dequantize_4bit_compute(q_ref.reshape(-1), s_ref.absmax, s_ref.code, bs, (n, k), torch.float32)
    assert torch.equal(dequantize_nf4(NF4Weight.from_bnb(q_ref, s_ref)), expected)
    assert (dequantize_nf4(quantize_nf4(w, bs)) - w).abs().max() <= w.abs().max() * 0.2


def test_quantize_rejects_bad_input():
    with pytest.raises(LongsideError):
        quantize_nf4(torch.randn(4, 4, 4))
    with pytest.raises(LongsideError):
        quantize_nf4(torch.randn(4, 64), blocksize=48)


# ---------------------------------------------------------------- kernels vs reference

@needs_lib
@pytest.mark.parametrize("scalar", [False, True])
def test_dequantize_kernel_is_exact(scalar, monkeypatch):
    monkeypatch.setattr(cpu, "_use_avx2", lambda: not scalar)
    for n, k, bs in FORMAT_SHAPES:
        qw = quantize_nf4(_weight(n, k, seed=3), bs)
        assert torch.equal(dequantize(qw), dequantize_nf4(qw)), (n, k, bs)
    qw = quantize_nf4(_weight(40, 128, seed=4), 64, double_quant=True)
    assert torch.equal(dequantize(qw), dequantize_nf4(qw))


def _check_matmul(x, qw):
    y = matmul_nf4(x, qw)
    ref = matmul_nf4_reference(x, qw)
    assert y.shape == ref.shape and y.dtype == torch.float32
    tol = 2e-5 * (x.abs().amax() * qw.absmax_f32().abs().amax() * qw.shape[1]) + 1e-6
    assert (y - ref).abs().max() <= tol


@needs_lib
@pytest.mark.parametrize("scalar", [False, True])
def test_matmul_random_shapes(scalar, monkeypatch):
    monkeypatch.setattr(cpu, "_use_avx2", lambda: not scalar)
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 576, 576), (8, 192, 576), (600, 33, 64), (3, 17, 96), (5, 9, 70), (17, 31, 128), (2, 5, 7)]
    for _ in range(8):
        m = int(torch.randint(1, 601, (1,), generator=g))
        n = int(torch.randint(1, 80, (1,), generator=g)) * 2 + 1  # odd N
        k = int(torch.randint(1, 6, (1,), generator=g)) * 64
        shapes.append((m, n, k))
    for m, n, k in shapes:
        bs = 32 if k % 64 else 64
        qw = quantize_nf4(_weight(n, k, seed=m + n + k), bs)
        _check_matmul(torch.randn(m, k, generator=g), qw)


@needs_lib
def test_matmul_every_small_m_and_the_switch_to_tiles():
    qw = quantize_nf4(_weight(37, 128, seed=6))
    for m in list(range(1, 20)) + [31, 64, 65]:
        _check_matmul(torch.randn(m, 128), qw)


@needs_lib
def test_matmul_non_contiguous_and_batched_input():
    qw = quantize_nf4(_weight(45, 192, seed=7))
    base = torch.randn(6, 384)
    _check_matmul(base[:, ::2], qw)  # strided last dim
    _check_matmul(torch.randn(192, 5).t(), qw)  # transposed
    _check_matmul(torch.randn(2, 3, 4, 192)[:, 1:], qw)  # batched, sliced
    _check_matmul(base[1:4, 100:292], qw)  # row stride != K


@needs_lib
def test_matmul_double_quant_and_shape_error():
    qw = quantize_nf4(_weight(20, 128, seed=8), double_quant=True)
    _check_matmul(torch.randn(3, 128), qw)
    with pytest.raises(LongsideError):
        matmul_nf4(torch.randn(2, 64), qw)


def test_reference_fallback_warns_when_library_missing(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)
    qw = quantize_nf4(_weight(8, 64, seed=9))
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="pip install"):
        y = matmul_nf4(x, qw)
    assert torch.equal(y, matmul_nf4_reference(x, qw))


# ---------------------------------------------------------------- QuantLinear

@pytest.mark.parametrize("double_quant", [False, True])
def test_quant_linear_forward_and_input_grad(double_quant):
    lin = nn.Linear(128, 24, bias=True)
    q = QuantLinear.from_linear(lin, double_quant=double_quant)
    w = dequantize_nf4(q.nf4_weight())
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(ref_x, w, lin.bias.detach())
    assert y.shape == (3, 5, 24)
    assert torch.allclose(y, ref, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-5)
    assert all(not p.requires_grad for p in q.parameters())
    assert (w - lin.weight).abs().max() <= lin.weight.abs().max() * 0.2


def test_quant_linear_input_grad_of_a_sum_is_the_weight_column_sums():
    q = QuantLinear.from_linear(nn.Linear(64, 6))
    w = dequantize_nf4(q.nf4_weight())
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(2, -1), atol=1e-5)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantize_model_tiny_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        dense = model(ids).logits
    report = quantize_model(model, progress=False)
    assert report["layers"] == 2 * 7
    assert report["linear_bytes_after"] < 0.15 * report["linear_bytes_before"]
    assert report["model_bytes_after"] < report["model_bytes_before"]
    assert not any(isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)
                   for name, m in model.named_modules() if ".layers." in name)
    assert isinstance(model.lm_head, nn.Linear)  # skipped
    with torch.no_grad():
        quant = model(ids).logits
    assert quant.shape == dense.shape
    # 4-bit weights change logits a little, not wholesale.
    assert (quant - dense).abs().mean() < 0.5 * dense.abs().mean()
    with pytest.raises(LongsideError):
        quantize_model(model, progress=False)  # nothing left to quantize


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_load_round_trip(tmp_path, double_quant):
    model = _tiny_llama()
    quantize_model(model, double_quant=double_quant, progress=False)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["format"] == "nf4-bnb"
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    filled = load_quantized(tmp_path / "q", model=_tiny_llama())
    with torch.no_grad():
        assert torch.equal(filled(ids).logits, before)


def test_load_quantized_rejects_a_plain_directory(tmp_path):
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path)


# ---------------------------------------------------------------- benchmark

@needs_lib
def test_quick_benchmark_writes_well_formed_json(tmp_path):
    from longside.bench import kernels as bench

    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["read_gbps"] > 0
    assert data["results"]
    for r in data["results"]:
        assert set(r) >= {"op", "m", "n", "k", "ours_ms", "fp32_ms", "bnb_ms", "ours_gbps"}
        assert r["ours_ms"] > 0 and r["fp32_ms"] > 0 and r["ours_gbps"] > 0
        if r["op"].startswith("ggml"):
            assert r["max_rel_err"] <= (0.03 if r["op"].startswith("ggml_int8") else 1e-5), r
        else:
            assert r["max_abs_err"] <= r["tolerance"]
    ops = {(r["op"], r.get("qtype")) for r in data["results"]}
    assert {("ggml_int8", "Q4_1"), ("ggml_int8_lanes", "Q4_1"), ("ggml_fp32", "Q4_1"), ("ggml_tiled", "Q8_0")} <= ops


def test_quant_linear_dequantize_matches_reference():
    from longside.kernels import QuantLinear, dequantize_nf4

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=False)
    q = QuantLinear.from_linear(lin)
    assert torch.equal(q.dequantize(), dequantize_nf4(q.nf4_weight()))


def test_nf4_weight_refuses_buffers_that_do_not_fit_its_shape():
    """Kernels index `packed` and `absmax` without bounds checks: a weight whose buffers are
    too short (or whose blocksize is absurd) is refused when it is made, not segfaulted on."""
    from longside.errors import LongsideError
    from longside.kernels import NF4Weight

    w = quantize_nf4(torch.randn(64, 128))
    ok = dict(packed=w.packed, absmax=w.absmax, shape=w.shape, blocksize=w.blocksize)
    NF4Weight(**ok)
    for bad, match in [(dict(packed=w.packed[:-1]), "packed"), (dict(absmax=w.absmax[:-1]), "absmax"),
                       (dict(blocksize=3), "blocksize"), (dict(blocksize=0), "blocksize"),
                       (dict(shape=(64, 0)), "shape"), (dict(packed=w.packed.to(torch.int8)), "packed")]:
        with pytest.raises(LongsideError, match=match):
            NF4Weight(**{**ok, **bad})
