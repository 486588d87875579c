"""GGUF block kernels: the torch reference against the gguf package, the C kernels against
the reference (every instruction-set path this CPU has), `GGUFLinear`/`GGUFEmbedding`, and
the real SmolLM2 file's blocks against its converted fp32 weights."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from longside.errors import LongsideError
from longside.kernels import ggml_cpu
from longside.kernels.ggml import (GGML_TYPES, GGMLWeight, dequantize_blocks, dequantize_reference, llama_row_order,
                                   lane_rows, pack_lanes, random_weight, unpack_lanes)
from longside.kernels.gguf_linear import FUSED_MAX_M, INT8_MAX_M, GGUFEmbedding, GGUFLinear, dequantize_ggml, matmul_ggml

TYPES = list(GGML_TYPES)
needs_c = pytest.mark.skipif(not ggml_cpu.available(), reason=f"GGUF C kernel not built: {ggml_cpu.BUILD_HINT}")


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes whose f16 scale fields are finite (as any real file's are)."""
    return random_weight(qtype, n_blocks, GGML_TYPES[qtype][1], seed, scale=0.05).blocks.numpy()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("qtype", TYPES)
def test_reference_is_bit_exact_against_gguf(qtype):
    b = random_blocks(qtype, 64)
    want = gguf_dequantize(b, gguf.GGMLQuantizationType[qtype]).reshape(64, -1)
    got = dequantize_blocks(torch.from_numpy(b), qtype).numpy()
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32))


def test_weight_shape_checks():
    b = torch.zeros(4, 20, dtype=torch.uint8)
    GGMLWeight(b, "Q4_1", (4, 32))
    with pytest.raises(LongsideError, match="multiple of 32"):
        GGMLWeight(b, "Q4_1", (4, 48))
    with pytest.raises(LongsideError, match="do not hold"):
        GGMLWeight(b, "Q4_1", (4, 64))
    with pytest.raises(LongsideError, match="not supported"):
        GGMLWeight(b, "IQ2_XXS", (4, 32))


def test_llama_row_order_inverts_llama_cpp_permutation():
    """llama.cpp's converter stores w.reshape(h, 2, d, K).swapaxes(1, 2); the order undoes it."""
    h, d, k = 3, 4, 5
    w = torch.randn(h * 2 * d, k)
    stored = w.reshape(h, 2, d, k).transpose(1, 2).reshape(h * 2 * d, k)
    assert torch.equal(stored[llama_row_order(h * 2 * d, h)], w)


@needs_c
@pytest.mark.parametrize("isa", ["scalar", "avx2", "vnni", "avx512"])
def test_c_kernels_every_path(isa):
    """Each ISA path in a fresh process (the choice is made once per process): exact
    dequantization, fp32 GEMV to fp32 rounding, int8 GEMV to the error of int8 activations."""
    code = f"""
import torch
from longside.kernels import ggml_cpu
from tests.test_kernels_ggml import random_weight, TYPES
from longside.kernels.ggml import dequantize_reference
want = {isa!r}
if ggml_cpu.isa() != want:
    print("SKIP", ggml_cpu.isa()); raise SystemExit(0)
g = torch.Generator().manual_seed(0)
for qtype in TYPES:
    w = random_weight(qtype, 72, 512, seed=1)
    ref = dequantize_reference(w)
    assert torch.equal(ggml_cpu.dequantize_rows(w).view(torch.int32), ref.view(torch.int32)), qtype
    assert torch.equal(ggml_cpu.dequantize_rows(w, 5, 17), ref[5:17]), qtype
    x = torch.randn(5, 512, generator=g)
    y = x @ ref.t()
    scale = y.abs().max()
    assert (ggml_cpu.gemv_f32(x, w) - y).abs().max() <= 1e-5 * scale, qtype
    assert (ggml_cpu.gemm_tiled(x, w) - y).abs().max() <= 1e-5 * scale, qtype
    if qtype in ggml_cpu.INT8_TYPES:
        err = (ggml_cpu.gemv_int8(x, w) - y).abs().max() / scale
        assert 0 < err < 0.03, (qtype, float(err))
        # rows of x go two at a time (a batch of users): each equals the row alone, bit for bit
        alone = torch.cat([ggml_cpu.gemv_int8(x[i:i + 1], w) for i in range(5)])
        assert torch.equal(ggml_cpu.gemv_int8(x, w), alone), qtype
    if qtype in ggml_cpu.INT8_TYPES:
        # odd blocks per row (9), rows of W not a multiple of 4, 8 or 16, every tiling of 1..17
        # x rows (Q4 kernels take 8 at a time): each x row of a batch has the bits of the row
        # alone, on both decode paths
        w9 = random_weight(qtype, 43, 288, seed=4)
        x9 = torch.randn(17, 288, generator=g)
        y9 = x9 @ dequantize_reference(w9).t()
        for gemv in (ggml_cpu.gemv_int8, ggml_cpu.gemv_f32):
            alone = torch.cat([gemv(x9[i:i + 1], w9) for i in range(17)])
            assert (alone - y9).abs().max() <= 0.03 * y9.abs().max(), (qtype, gemv.__name__)
            for m in range(1, 18):
                assert torch.equal(gemv(x9[:m], w9), alone[:m]), (qtype, gemv.__name__, m)
print("OK")
"""
    env = {**os.environ, "LONGSIDE_GGML_ISA": isa}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"this CPU has no {isa} path (best: {out.stdout.split()[1]})")
    assert "OK" in out.stdout


@needs_c
def test_int8_activations_have_the_scalar_bits_on_every_path():
    """The SIMD quantization of decode inputs equals the scalar loop (roundf: halves away from
    zero) bit for bit, scales and sums included."""
    code = """
import hashlib, torch
from longside.kernels import ggml_cpu
g = torch.Generator().manual_seed(0)
x = torch.randn(7, 288, generator=g) * torch.logspace(-30, 3, 7)[:, None]
x[0, :32] = torch.arange(-16, 16).float() + 0.5  # a block of max 127 has scale 1: exact halves
x[0, 5] = 127.0
x[1, 32:64] = 0.0
x[2, :32] = 1e-40  # 1/scale overflows: codes 0
x[3, 3], x[4, 40] = float("nan"), float("inf")  # codes 0 there
q, d, s = ggml_cpu.quantize_int8(x)
want = torch.where(x[0, :32] < 0, -(x[0, :32].abs() + 0.5).floor(), (x[0, :32] + 0.5).floor())
assert torch.equal(q[0, :32].float(), want), q[0, :32]
assert d[0, 0] == 1.0 and d[1, 1] == 0.0 and not q[1, 32:64].any() and not q[2, :32].any()
assert q[3, 3] == 0 and not q[4, 32:64].any()
print(ggml_cpu.isa(), hashlib.sha256(b"".join(t.numpy().tobytes() for t in (q, d, s))).hexdigest())
"""
    outs = _printed_per_isa(code, ("scalar", "avx2", "avx512"))
    if len(outs) < 2:
        pytest.skip("this CPU has no AVX2")
    assert len(set(outs.values())) == 1, outs


@needs_c
def test_logit_stats_equal_torch_on_every_path():
    """logsumexp, entropy and largest log-probability of each row, from one C pass (AVX-512
    exponentials, or expf), against torch: an odd vocabulary (a masked tail), a -inf logit,
    a peaked row; a NaN logit (in the vectors or the tail) and a row of -inf as torch has them."""
    code = """
import torch
from longside.kernels import ggml_cpu
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 49157, generator=g) * 4
x[1, 7] = float("-inf")
x[2] *= 30
x[3, 11] = 60.0
lse, ent, mx = ggml_cpu.logit_stats(x)
rl = x.logsumexp(-1, keepdim=True)
lp = x - rl
p = lp.exp()
re = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
errs = [float((lse - rl).abs().max() / rl.abs().max()), float((ent - re).abs().max()),
        float((mx - lp.max(-1).values).abs().max())]
assert lse.shape == (5, 1) and ent.shape == mx.shape == (5,)
assert errs[0] < 1e-6 and errs[1] < 1e-4 and errs[2] < 1e-4, errs
y = torch.randn(4, 100, generator=g)  # 6 vectors of 16 and a tail of 4
y[1, 50] = y[2, 98] = float("nan")
y[3] = float("-inf")
l2, e2, m2 = ggml_cpu.logit_stats(y)
assert torch.isfinite(l2[0]).all() and torch.isfinite(e2[0]) and torch.isfinite(m2[0])
for r in (1, 2):  # a NaN logit: NaN statistics, as torch gives
    assert torch.isnan(l2[r]).all() and torch.isnan(e2[r]) and torch.isnan(m2[r]), r
assert l2[3, 0] == float("-inf") and torch.isnan(e2[3]) and torch.isnan(m2[3])
print(ggml_cpu.isa(), "ok")
"""
    outs = _printed_per_isa(code, ("scalar", "avx512"))
    assert all(v == ("ok",) for v in outs.values()), outs


def _printed_per_isa(code: str, isas: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Run `code` in a fresh process per instruction-set cap -> {path it took: what it printed
    after the path's name} (a cap the CPU lacks falls to a lower path: fewer entries)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {}
    for isa in isas:
        r = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "LONGSIDE_GGML_ISA": isa},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got_isa, *vals = r.stdout.split()
        outs[got_isa] = tuple(vals)
    return outs


@needs_c
def test_q4_rows_as_lanes_give_the_scalar_bits_on_every_path():
    """Q4_0 / Q4_1 on int8 activations: each weight row a lane (16 with AVX-512, 8 with AVX2),
    exact integer block sums and one fma per block in block order, so the plain C loop, AVX2
    and AVX-512 give the same bits; a last partial group of rows (43 = 2 x 16 + 11) and x rows
    past one pass of 8 included, and two threads equal one."""
    code = """
import hashlib, torch
from longside.kernels import ggml_cpu
from tests.test_kernels_ggml import random_weight
x = torch.randn(11, 288, generator=torch.Generator().manual_seed(0)) * 3
ys = []
for qtype in ("Q4_0", "Q4_1"):
    w = random_weight(qtype, 43, 288, seed=5)
    y = ggml_cpu.gemv_int8(x, w)
    torch.set_num_threads(1)
    assert torch.equal(ggml_cpu.gemv_int8(x, w), y)
    torch.set_num_threads(2)
    ys.append(y)
print(ggml_cpu.isa(), hashlib.sha256(torch.cat(ys).numpy().tobytes()).hexdigest())
"""
    outs = _printed_per_isa(code, ("scalar", "avx2", "avx512"))
    if len(outs) < 2:
        pytest.skip("this CPU has no AVX2")
    assert len(set(outs.values())) == 1, outs


def test_lanes_layout_is_the_file_bytes_reordered():
    """`pack_lanes` moves bytes only: per 16 rows and block, code dword j of every row, then
    the rows' d (and Q4_1's m) halves; `unpack_lanes` gives the file's bytes back; other types
    and row counts are refused."""
    for qtype, bb, off, dwords in (("Q4_0", 18, 2, 4), ("Q4_1", 20, 4, 4), ("Q8_0", 34, 2, 8)):
        w = random_weight(qtype, 48, 96, seed=1)
        p = pack_lanes(w.blocks, qtype)
        assert p.shape == w.blocks.shape and torch.equal(unpack_lanes(p, qtype), w.blocks)
        assert torch.equal(p.flatten().sort().values, w.blocks.flatten().sort().values)
        group = p[16:32].flatten()  # rows 16..31; block 2, row 16 + 5
        blk = group[2 * 16 * bb:3 * 16 * bb]
        halves = 64 * dwords
        assert torch.equal(blk[64 * 3 + 4 * 5:64 * 3 + 4 * 5 + 4], w.blocks[21, 2 * bb + off + 12:2 * bb + off + 16])
        assert torch.equal(blk[halves + 2 * 5:halves + 2 * 5 + 2], w.blocks[21, 2 * bb:2 * bb + 2])
        if qtype == "Q4_1":
            assert torch.equal(blk[halves + 32 + 2 * 5:halves + 32 + 2 * 5 + 2], w.blocks[21, 2 * bb + 2:2 * bb + 4])
        if qtype == "Q8_0":  # the last code dword of row 21, block 2
            assert torch.equal(blk[64 * 7 + 4 * 5:64 * 7 + 4 * 5 + 4], w.blocks[21, 3 * bb - 4:3 * bb])
        packed = GGMLWeight(p, qtype, (48, 96), packed=True)
        assert torch.equal(dequantize_reference(packed), dequantize_reference(w))
        rows = torch.tensor([21, 0, 47, 21, 16])  # an embedding's lookup, straight from the packed bytes
        assert torch.equal(lane_rows(p, qtype, rows), w.blocks[rows])
    with pytest.raises(LongsideError, match="lanes"):
        GGMLWeight(random_weight("Q4_1", 40, 64).blocks, "Q4_1", (40, 64), packed=True)
    with pytest.raises(LongsideError, match="lanes"):
        pack_lanes(random_weight("Q5_0", 32, 64).blocks, "Q5_0")


@needs_c
def test_lanes_layout_gives_the_file_orders_bits_on_every_path():
    """A packed weight multiplies to the same bits as the file's order: int8 activations on the
    plain C loop, AVX2 (8 lanes: each half of a packed group) and AVX-512, 1..17 x rows (Q4;
    packed Q8_0 has its own, test_q8_rows_as_lanes...); fp32 activations and row ranges of the
    exact dequantization (unpacked a row at a time)."""
    code = """
import torch
from longside.kernels import ggml_cpu
from longside.kernels.ggml import GGMLWeight, dequantize_reference, pack_lanes, random_weight
g = torch.Generator().manual_seed(0)
for qtype in ("Q4_0", "Q4_1", "Q8_0"):
    for n, k in ((48, 288), (32, 96)):
        w = random_weight(qtype, n, k, seed=7)
        p = GGMLWeight(pack_lanes(w.blocks, qtype), qtype, (n, k), packed=True)
        x = torch.randn(17, k, generator=g)
        for m in range(1, 18 if qtype != "Q8_0" else 1):  # packed Q8_0 has its own int8 arithmetic
            assert torch.equal(ggml_cpu.gemv_int8(x[:m], p), ggml_cpu.gemv_int8(x[:m], w)), (qtype, n, m)
        assert torch.equal(ggml_cpu.gemv_f32(x[:5], p), ggml_cpu.gemv_f32(x[:5], w)), qtype
        assert torch.equal(ggml_cpu.dequantize_rows(p, 3, n - 2), dequantize_reference(w)[3:n - 2]), qtype
print(ggml_cpu.isa(), "ok")
"""
    outs = _printed_per_isa(code, ("scalar", "avx2", "avx512"))
    assert all(v == ("ok",) for v in outs.values()), outs


@needs_c
def test_the_packed_bit_is_ignored_on_types_without_the_layout():
    """The C entry points read a Q5_0 weight in the file's order even with the lanes bit set
    (only Q4_0/Q4_1/Q8_0 can be packed; Python refuses the rest before it gets there)."""
    lib, w, x = ggml_cpu._lib(), random_weight("Q5_0", 32, 64, seed=2), torch.randn(3, 64)
    tid = GGML_TYPES["Q5_0"][0]
    for packed_bit in (0, ggml_cpu.LANES_PACKED):
        y, d = torch.empty(3, 32), torch.empty(32, 64)
        lib.ggml_gemv_f32(tid | packed_bit, w.blocks.data_ptr(), w.row_bytes, x.data_ptr(), 64, 3, y.data_ptr(), 32,
                          32, 64, 1, int(ggml_cpu._isa_level() > 0))
        lib.ggml_dequant_rows(tid | packed_bit, w.blocks.data_ptr(), w.row_bytes, d.data_ptr(), 0, 32, 64, 1)
        assert torch.equal(y, ggml_cpu.gemv_f32(x, w)) and torch.equal(d, dequantize_reference(w))


@needs_c
def test_q8_rows_as_lanes_give_the_scalar_bits_on_every_path():
    """A lanes-packed Q8_0 weight (the LM head) on int8 activations: exact integer block sums
    (AVX-512 VNNI: codes + 128 from -128 times the x sum) and one fma per block in block order,
    so the plain C loop and AVX-512 give the same bits, a row of a batch has the bits of the
    row alone (1..17 x rows: past one pass of 8), two threads equal one, and the product is as
    close to the exact one as the file order's."""
    code = """
import hashlib, torch
from longside.kernels import ggml_cpu
from longside.kernels.ggml import GGMLWeight, dequantize_reference, pack_lanes, random_weight
w = random_weight("Q8_0", 48, 288, seed=4)
p = GGMLWeight(pack_lanes(w.blocks, "Q8_0"), "Q8_0", (48, 288), packed=True)
x = torch.randn(17, 288, generator=torch.Generator().manual_seed(0)) * 3
y = ggml_cpu.gemv_int8(x, p)
for m in range(1, 18):
    assert torch.equal(ggml_cpu.gemv_int8(x[:m], p), y[:m]), m
    assert torch.equal(ggml_cpu.gemv_int8(x[m - 1:m], p), y[m - 1:m]), m
big = torch.randn(130, 288, generator=torch.Generator().manual_seed(1))  # past one block of 64 x rows
yb = ggml_cpu.gemv_int8(big, p)
assert all(torch.equal(ggml_cpu.gemv_int8(big[m:m + 1], p), yb[m:m + 1]) for m in (0, 63, 64, 70, 129))
torch.set_num_threads(1)
assert torch.equal(ggml_cpu.gemv_int8(x, p), y)
torch.set_num_threads(2)
exact = x @ dequantize_reference(w).T
err = lambda a: float((a - exact).abs().max() / exact.abs().max())
assert err(y) < 2e-2 and err(y) < 1.5 * err(ggml_cpu.gemv_int8(x, w)) + 1e-6, (err(y), err(ggml_cpu.gemv_int8(x, w)))
print(ggml_cpu.isa(), hashlib.sha256(torch.cat([y, yb]).numpy().tobytes()).hexdigest())
"""
    outs = _printed_per_isa(code, ("scalar", "avx2", "avx512"))
    assert len(set(outs.values())) == 1, outs
    if "avx512" not in outs:  # every path above took the plain C loop
        pytest.skip("this CPU has no AVX-512 VNNI: the packed Q8_0 kernel did not run")


@needs_c
def test_int8_paths_agree_exactly_across_avx2_and_vnni():
    """vpmaddubsw and vpdpbusd (ymm, or zmm two blocks at a time) sum the same integers; the
    fp32 arithmetic after is shared, lane for lane."""
    code = """
import torch
from longside.kernels import ggml_cpu
from tests.test_kernels_ggml import random_weight
x = torch.randn(6, 288, generator=torch.Generator().manual_seed(0))
ys = [ggml_cpu.gemv_int8(x, random_weight(q, 42, 288, seed=2)) for q in ggml_cpu.INT8_TYPES]
y = torch.cat(ys)
print(ggml_cpu.isa(), y.view(torch.int32).sum().item(), y.sum().item())
"""
    outs = _printed_per_isa(code, ("avx2", "vnni", "avx512"))
    if len(outs) < 2:
        pytest.skip("this CPU has no AVX-VNNI and no AVX-512 VNNI")
    assert len(set(outs.values())) == 1, outs


@needs_c
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_linear_paths(qtype):
    w = random_weight(qtype, 48, 256, seed=3)
    bias = torch.randn(48)
    ref = dequantize_reference(w)
    exact = GGUFLinear.from_weight(w, bias, activations="fp32")
    assert torch.equal(exact.dequantize(), ref)
    fast = GGUFLinear.from_weight(w, bias)
    lanes = GGUFLinear.from_weight(w, bias)
    packs = qtype in ("Q4_0", "Q4_1") or (qtype == "Q8_0" and ggml_cpu.isa() == "avx512")
    assert lanes.pack_lanes() == packs and torch.equal(lanes.dequantize(), ref)
    # a state dict holds the file's bytes in either layout, and loads into either
    state = lanes.state_dict()
    assert torch.equal(state["blocks"], w.blocks) and torch.equal(fast.state_dict()["blocks"], w.blocks)
    again = GGUFLinear.from_weight(random_weight(qtype, 48, 256, seed=9), bias)
    again.pack_lanes()
    again.load_state_dict(state)
    assert torch.equal(again.blocks, lanes.blocks) and torch.equal(again.dequantize(), ref)
    strided = GGMLWeight(torch.cat([lanes.blocks, lanes.blocks], 1)[:, :lanes.blocks.shape[1]], qtype, w.shape,
                         lanes.packed)  # not contiguous: the layout travels with the copy
    assert torch.equal(matmul_ggml(torch.ones(1, 256), strided, "fp32"), matmul_ggml(torch.ones(1, 256), w, "fp32"))
    for m in (1, 3, 40, 300):  # fused (2m rows <= the bound) and tiled paths
        x = torch.randn(2, m, 256)
        want = x @ ref.t() + bias
        scale = want.abs().max()
        assert (exact(x) - want).abs().max() <= 1e-5 * scale
        for bound in (None, INT8_MAX_M):  # default FUSED_MAX_M; the lean decode step's INT8_MAX_M
            int8 = 2 * m <= (bound or FUSED_MAX_M) and qtype in ggml_cpu.INT8_TYPES
            err = (fast(x, int8_max_m=bound) - want).abs().max()
            assert err <= (3e-2 if int8 else 1e-5) * scale  # int8 activations round x
            assert int8 or err <= 1e-5 * scale
            if int8 and qtype == "Q8_0" and lanes.packed:  # its own arithmetic (rows as lanes), as close
                assert (lanes(x, int8_max_m=bound) - want).abs().max() <= 3e-2 * scale
            else:
                assert torch.equal(lanes(x, int8_max_m=bound), fast(x, int8_max_m=bound))
    # gradient w.r.t. the input only, through the exact weight
    x = torch.randn(4, 256, requires_grad=True)
    exact(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ ref.t() + bias).pow(2).sum().backward()
    assert (x.grad - x2.grad).abs().max() <= 1e-5 * x2.grad.abs().max()
    assert exact.blocks.requires_grad is False


def test_gguf_linear_refuses_bad_shapes():
    with pytest.raises(LongsideError, match="divisible by 256"):
        GGUFLinear(100, 8, "Q4_K")
    with pytest.raises(LongsideError, match="activations"):
        GGUFLinear(32, 8, "Q4_1", activations="int4")
    layer = GGUFLinear(32, 8, "Q4_1")
    with pytest.raises(LongsideError, match="expects 32"):
        layer(torch.randn(2, 64))


@needs_c
def test_gguf_embedding_rows_and_scale():
    w = random_weight("Q8_0", 50, 64, seed=4)
    ref = dequantize_reference(w)
    emb = GGUFEmbedding(50, 64, "Q8_0", scale=2.0)
    emb.blocks = w.blocks
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), ref[ids] * 2.0)
    for one in (torch.tensor([[49]]), torch.tensor([0]), torch.tensor(17)):  # a decode step's one token
        assert torch.equal(emb(one), ref[one] * 2.0)
    for bad in (torch.tensor([[50]]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            emb(bad)


@needs_c
def test_gguf_embedding_reads_a_packed_tied_head():
    """A tied head packed into lanes lends the embedding its bytes (one table in memory): rows
    (a prompt's, and a decode step's one token) decode as from the file's order, a bad id is
    refused, the state dict holds the file's bytes, and a head of another shape is refused."""
    w = random_weight("Q8_0", 48, 64, seed=6)
    ref = dequantize_reference(w)
    head = GGUFLinear.from_weight(w)
    head.blocks, head.packed = pack_lanes(w.blocks, "Q8_0"), True  # packed whatever this CPU runs
    emb = GGUFEmbedding(48, 64, "Q8_0")
    emb.share_head(head)
    assert emb.blocks is head.blocks and emb.packed
    ids = torch.tensor([[3, 0, 47], [17, 17, 16]])
    assert torch.equal(emb(ids), ref[ids])
    for one in (torch.tensor([[47]]), torch.tensor(21)):
        assert torch.equal(emb(one), ref[one])
    for bad in (torch.tensor([[48, 1]]), torch.tensor([-1]), torch.tensor([[48]]), torch.tensor([[-1, 1]])):
        with pytest.raises(IndexError):
            emb(bad)
    assert torch.equal(emb.state_dict()["blocks"], w.blocks)
    # a state dict (the file's bytes) loads back into the shared table, which stays shared and packed
    tied = torch.nn.ModuleDict({"embed": emb, "head": head})
    state = {k: v.clone() for k, v in tied.state_dict().items()}
    emb.blocks.zero_()
    tied.load_state_dict(state)
    assert emb.blocks is head.blocks and torch.equal(head.blocks, pack_lanes(w.blocks, "Q8_0"))
    assert torch.equal(emb(ids), ref[ids])
    # assigned (the caller's own tensor, one for both keys): packed copies, the caller's bytes untouched
    one = w.blocks.clone()
    tied.load_state_dict({"embed.blocks": one, "head.blocks": one}, assign=True)
    assert torch.equal(one, w.blocks) and torch.equal(emb(ids), ref[ids])
    assert torch.equal(head.blocks, pack_lanes(w.blocks, "Q8_0"))
    with pytest.raises(LongsideError, match="not this embedding"):
        GGUFEmbedding(32, 64, "Q8_0").share_head(head)


def test_reference_fallback_warns_when_kernel_missing(monkeypatch):
    monkeypatch.setattr(ggml_cpu, "available", lambda: False)
    w = random_weight("Q4_0", 8, 64)
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="not built"):
        y = matmul_ggml(x, w)
    assert torch.allclose(y, x @ dequantize_reference(w).t(), atol=1e-5)
    assert torch.equal(dequantize_ggml(w), dequantize_reference(w))
    w16 = random_weight("Q4_0", 16, 64)  # the lanes layout, read through the reference too
    packed = GGMLWeight(pack_lanes(w16.blocks, "Q4_0"), "Q4_0", (16, 64), packed=True)
    with pytest.warns(RuntimeWarning, match="not built"):
        assert torch.equal(matmul_ggml(x, packed), matmul_ggml(x, w16))


@pytest.mark.parametrize("isa", [0, 1])
def test_argmax_rows_gives_torch_argmax(isa, monkeypatch):
    """The C argmax of logit rows is torch's: the first of equal maxima (within and across
    the vector lanes), the first NaN where a row has one, every -inf, widths below and past
    a vector and a ragged tail, a strided row."""
    from longside.kernels import ggml_cpu

    if not ggml_cpu.available() or isa > ggml_cpu._isa_level():
        pytest.skip("no such path here")
    monkeypatch.setattr(ggml_cpu, "_isa_level", lambda: isa)
    g = torch.Generator().manual_seed(0)
    for V in (1, 5, 8, 13, 64, 49152, 49157):
        x = torch.randn(6, V, generator=g)
        x[1] = 3.0  # all equal: index 0
        x[2, V // 2:] = 9.0  # equal maxima in several lanes: the first
        x[3] = float("-inf")
        x[4, V // 3] = float("nan")
        x[4, (2 * V) // 3] = float("nan")
        x[5, -1] = 50.0  # in the tail
        got, want = ggml_cpu.argmax_rows(x), x.argmax(-1)
        assert torch.equal(got, want), (V, got, want)
    wide = torch.randn(3, 100, generator=g)
    assert torch.equal(ggml_cpu.argmax_rows(wide[:, 10:90]), wide[:, 10:90].argmax(-1))
    with pytest.raises(ValueError):
        ggml_cpu.argmax_rows(torch.randn(2, 4, dtype=torch.float64))
