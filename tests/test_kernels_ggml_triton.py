"""Triton ggml kernels on CPU under TRITON_INTERPRET=1, small shapes, against the reference.

The interpreter must be on when triton itself is imported (triton.language's own helpers
are decorated then). When this module is imported first, it switches it on for the
import and the tests; when something else imported triton before (bitsandbytes does,
so a whole-suite run gets here late), the same tests run again in a fresh Python process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_FRESH = "triton" not in sys.modules
_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from longside.kernels import ggml_triton
finally:  # do not leak interpreter mode into other tests of this process (see _interpret)
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from longside.kernels.ggml import GGML_TYPES, GGMLWeight, dequantize_reference  # noqa: E402

from longside.errors import LongsideError  # noqa: E402

in_process = pytest.mark.skipif(not _FRESH, reason="triton was imported before interpreter mode; "
                                "test_triton_in_a_fresh_process runs these")

TYPES = list(GGML_TYPES)


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def random_weight(name: str, n: int, k: int, seed: int = 0) -> GGMLWeight:
    """Random block bytes, with each block's f16 scale fields set to small finite halves."""
    _, elems, nbytes = GGML_TYPES[name]
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // elems, nbytes), dtype=torch.uint8, generator=g)
    halves = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[name]
    for off in halves:
        h = (torch.randn(n, k // elems, 1, generator=g) * 0.01).half()
        blocks[:, :, off:off + 2] = h.view(torch.uint8)
    return GGMLWeight(blocks.reshape(n, -1), name, (n, k))


def run(x: torch.Tensor, w: GGMLWeight, fused: bool | None) -> torch.Tensor:
    return ggml_triton.matmul_ggml_triton(x, w.blocks, w.qtype, *w.shape, fused=fused)


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w: GGMLWeight, rel: float):
    """|y - x @ W.T| <= rel * (|x| @ |W|.T) elementwise, the reference in float64: a bound
    on summation-order (and, for half inputs, rounding) differences that scales with the terms."""
    deq = dequantize_reference(w).double()
    xd = x.double()
    ref, mag = xd @ deq.T, xd.abs() @ deq.abs().T
    err = (y.double() - ref).abs()
    assert (err <= rel * mag + 1e-30).all(), f"max err {err.max():.3g}, max ratio {(err / mag).max():.3g}"


@in_process
@pytest.mark.parametrize("name", TYPES)
def test_tiled_decodes_bit_exact(name):
    """x = the identity: y = W.T, each entry one exact product w*1 plus exact zeros, so the
    kernel's decoded weights must equal the reference's bit for bit (up to the sign of zero)."""
    w = random_weight(name, 40, 256, seed=1)
    y = run(torch.eye(256), w, fused=False)
    assert torch.equal(y, dequantize_reference(w).T)


@in_process
@pytest.mark.parametrize("name", TYPES)
def test_fused_decodes_bit_exact(name):
    w = random_weight(name, 40, 512, seed=2)
    cols = torch.randperm(512, generator=torch.Generator().manual_seed(3))[:16]
    cols[:4] = torch.tensor([0, 255, 256, 511])  # both ends of both blocks / halves of a K-quant
    y = run(torch.eye(512)[cols], w, fused=True)
    assert torch.equal(y, dequantize_reference(w)[:, cols].T)


@in_process
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m,fused", [(1, True), (5, True), (13, None), (20, False), (70, None)])
def test_matches_reference(name, m, fused):
    # N = 40 is not a multiple of BLOCK_N (16/32/64); M = 5, 13, 20, 70 not multiples of BLOCK_M
    w = random_weight(name, 40, 256 if m != 5 else 512, seed=m)
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m + 7))
    y = run(x, w, fused)
    assert y.shape == (m, 40) and y.dtype == torch.float32
    assert_close_to_reference(y, x, w, rel=1e-5)


@in_process
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_half_input_gives_half_output(name, fused):
    w = random_weight(name, 24, 256, seed=4)
    x = torch.randn(6 if fused else 33, 256, generator=torch.Generator().manual_seed(5)).half()
    y = run(x, w, fused)
    assert y.dtype == torch.float16 and y.shape == (x.shape[0], 24)
    # fp16 output rounding, plus the decoded weights rounded to fp16 for tl.dot in the tiled path
    assert_close_to_reference(y, x, w, rel=2e-3)


@in_process
def test_non_contiguous_input_and_bad_blocks():
    w = random_weight("Q4_K", 24, 256, seed=6)
    x = torch.randn(256, 18).t()  # [18, 256], stride (1, 256): takes the tiled kernel
    assert_close_to_reference(ggml_triton.matmul_ggml_triton(x, w.blocks, "Q4_K", 24, 256), x, w, rel=1e-5)
    with pytest.raises(LongsideError):
        ggml_triton.matmul_ggml_triton(x, w.blocks[:, :-1], "Q4_K", 24, 256)
    with pytest.raises(LongsideError):
        ggml_triton.matmul_ggml_triton(x, w.blocks, "Q5_K", 24, 256)


@pytest.mark.skipif(_FRESH, reason="ran in this process")
def test_triton_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed, 1 skipped", proc.stdout.splitlines()[-1])  # only this test skips there
