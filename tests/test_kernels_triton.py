"""Triton NF4 kernels on CPU under TRITON_INTERPRET=1, small shapes, against the reference.

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
    from longside.kernels import nf4_triton
finally:  # do not leak interpreter mode into other tests of this process (see _interpret)
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from longside.kernels.nf4 import matmul_nf4_reference, quantize_nf4  # noqa: E402

in_process = pytest.mark.skipif(not _FRESH, reason="triton was imported before interpreter mode; "
                                "test_triton_in_a_fresh_process runs these")


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@in_process
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("m,n,k,bs", [(1, 33, 64, 64), (3, 17, 128, 64), (5, 9, 70, 64), (20, 31, 96, 32),
                                      (70, 65, 130, 64), (2, 3, 5, 64)])
def test_triton_matches_reference(m, n, k, bs, fused):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    qw = quantize_nf4(torch.randn(n, k, generator=g), bs)
    x = torch.randn(m, k, generator=g)
    y = nf4_triton.matmul_nf4_triton(x, qw.packed, qw.absmax, n, bs, fused=fused)
    ref = matmul_nf4_reference(x, qw)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)


@in_process
def test_triton_non_contiguous_input_and_default_dispatch():
    qw = quantize_nf4(torch.randn(24, 64), 64)
    x = torch.randn(64, 40).t()  # [40, 64], stride (1, 40): takes the tiled kernel
    assert torch.allclose(nf4_triton.matmul_nf4_triton(x, qw.packed, qw.absmax, 24, 64),
                          matmul_nf4_reference(x, qw), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(_FRESH, reason="ran in this process")
def test_triton_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed, 1 skipped", proc.stdout.splitlines()[-1])  # only this test skips there
