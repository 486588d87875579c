"""Tile sizes of the Triton GGUF-block kernel (kernels/ggml_triton.py) swept on a CUDA GPU:
for each case, every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) is checked against the exact
dequantization and timed with `triton.testing.do_bench` (kernel time, no launch overhead),
beside bf16 `F.linear` on the dequantized weight. The best tiles went into
`matmul_ggml_triton`; `python -m longside.kernels.bench_gpu` then times the chosen ones.

    python experiments/triton_tiles_sweep.py --json results/triton_tiles_sweep_h200.json

Only on a machine with CUDA (it exits with 2 elsewhere); a few minutes on one H200, most of
it compiling ~220 variants.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = [("Q4_1", 14336, 4096, 1), ("Q4_1", 14336, 4096, 8), ("Q4_1", 14336, 4096, 512), ("Q4_1", 1536, 576, 1),
         ("Q8_0", 14336, 4096, 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("triton_tiles_sweep: no CUDA device here", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from longside.kernels.ggml import dequantize_reference, random_weight, type_info
    from longside.kernels.ggml_triton import FUSED_MAX_M, _ggml_matmul_kernel

    rows = []
    for qtype, n, k, m in CASES:
        w = random_weight(qtype, n, k, seed=1)
        blocks, ref_w = w.blocks.cuda(), dequantize_reference(w).cuda()
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref = F.linear(x.float(), ref_w)
        tid, elems, nbytes = type_info(qtype)
        y = torch.empty(m, n, dtype=x.dtype, device="cuda")
        fused = m <= FUSED_MAX_M
        bms = [min(16, triton.next_power_of_2(m))] if fused else [64, 128]
        bns = [4, 8, 16, 32] if fused else [64, 128]
        bks = [64, 128, 256, 512] if fused else [32, 64]
        best = None
        for bm, bn, bk, nw in itertools.product(bms, bns, bks, (2, 4, 8) if fused else (4, 8)):
            if fused and bm * bn * bk > 65536:  # the broadcast product's registers
                continue
            grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))

            def run(bm=bm, bn=bn, bk=bk, nw=nw, grid=grid):
                _ggml_matmul_kernel[grid](x, blocks, y, m, n, k, blocks.shape[1], x.stride(0), y.stride(0),
                                          QTYPE=tid, BLOCK_ELEMS=elems, BLOCK_BYTES=nbytes, BLOCK_M=bm, BLOCK_N=bn,
                                          BLOCK_K=bk, FUSED=fused, IEEE=False, num_warps=nw)
            try:
                run()
                torch.cuda.synchronize()
            except Exception as e:  # a tile Triton cannot compile (registers, shared memory): not a candidate
                print(f"skip {qtype} m={m} {bm}x{bn}x{bk} w{nw}: {type(e).__name__}", flush=True)
                continue
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            r = dict(qtype=qtype, n=n, k=k, m=m, bm=bm, bn=bn, bk=bk, nw=nw, ms=do_bench(run, warmup=5, rep=20),
                     err=err)
            rows.append(r)
            if err < 2e-2 and (best is None or r["ms"] < best["ms"]):
                best = r
        wd = ref_w.to(torch.bfloat16)
        dense = do_bench(lambda: F.linear(x, wd), warmup=5, rep=20)
        print("BEST", best, "dense_ms", round(dense, 4), "gbps", round(blocks.numel() / best["ms"] / 1e6), flush=True)
        args.json.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
