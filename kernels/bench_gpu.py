"""On a CUDA GPU: check the Triton NF4 and GGUF-block kernels against their references, time
them against dense `F.linear` (and NF4 against bitsandbytes' CUDA kernels, `gemv_4bit` for
m=1, `matmul_4bit` otherwise, where bitsandbytes is installed), and print one table (plus
JSON with --json).

    python -m longside.kernels.bench_gpu [--json PATH] [--dtype bf16|fp16|fp32] [--ggml-types Q4_1,Q4_K]

Bandwidth: `read_gbps` is a device-to-device copy measured in the same run (bytes read);
`ours_gbps` is packed weights + fp32 absmax bytes over the kernel time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from longside.kernels.ggml import GGML_TYPES, dequantize_reference, random_weight
from longside.kernels.ggml_triton import matmul_ggml_triton
from longside.kernels.nf4 import dequantize_nf4, quantize_nf4
from longside.kernels.nf4_triton import matmul_nf4_triton

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336)]
MS = (1, 8, 512)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cuda_ms(fn, reps: int = 50) -> float:
    """Median of `reps` CUDA-event timings after warm-up (and Triton autotune/compile)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_read_gbps(mbytes: int = 2048) -> float:
    src = torch.empty(mbytes << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src), reps=20)
    return src.numel() / ms / 1e6


def bench(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.02
    qw = quantize_nf4(w)  # on CPU, then moved: the same bytes bitsandbytes would make
    packed, absmax = qw.packed.cuda(), qw.absmax.cuda()
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    w_ref = dequantize_nf4(qw).cuda()
    y = matmul_nf4_triton(x, packed, absmax, n, 64)
    ref = F.linear(x.float(), w_ref)
    rel_err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    ours = _cuda_ms(lambda: matmul_nf4_triton(x, packed, absmax, n, 64))
    w_dense = w_ref.to(dtype)
    dense = _cuda_ms(lambda: F.linear(x, w_dense))
    bnb_ms = None
    try:
        import bitsandbytes as bnb  # optional: the comparison column only
        import bitsandbytes.functional as bf
    except ImportError:
        pass
    else:
        q_bnb, state = bf.quantize_4bit(w.to("cuda", dtype), quant_type="nf4", blocksize=64)
        if m == 1:
            bnb_fn = lambda: bf.gemv_4bit(x, q_bnb.t(), state=state)  # noqa: E731
        else:
            bnb_fn = lambda: bnb.matmul_4bit(x, q_bnb.t(), quant_state=state)  # noqa: E731
        bnb_ms = _cuda_ms(bnb_fn)
    weight_bytes = packed.numel() + absmax.numel() * 4
    return {"kernel": "nf4", "m": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""), "ours_ms": ours,
            "dense_ms": dense, "bnb_ms": bnb_ms, "ours_gbps": weight_bytes / ours / 1e6, "rel_err": rel_err}


def bench_ggml(m: int, n: int, k: int, qtype: str, dtype: torch.dtype) -> dict:
    """A GGUF-block weight of random blocks: Triton against its exact dequantization."""
    w = random_weight(qtype, n, k, seed=n + k)
    blocks = w.blocks.cuda()
    w_ref = dequantize_reference(w).cuda()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to("cuda", dtype)
    y = matmul_ggml_triton(x, blocks, qtype, n, k)
    ref = F.linear(x.float(), w_ref)
    rel_err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    ours = _cuda_ms(lambda: matmul_ggml_triton(x, blocks, qtype, n, k))
    w_dense = w_ref.to(dtype)
    dense = _cuda_ms(lambda: F.linear(x, w_dense))
    return {"kernel": qtype, "m": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""), "ours_ms": ours,
            "dense_ms": dense, "bnb_ms": None, "ours_gbps": blocks.numel() / ours / 1e6, "rel_err": rel_err}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longside.kernels.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--ggml-types", default="Q4_1,Q8_0,Q4_K,Q6_K", help="GGUF block types to check and time")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here", file=sys.stderr)
        return 2
    read = device_read_gbps()
    rows, failed = [], 0
    print(f"{torch.cuda.get_device_name()}  copy-read bandwidth {read:.0f} GB/s  dtype {args.dtype}")
    print(f"{'kernel':>7}{'m':>5}{'n':>7}{'k':>7}{'ours ms':>10}{'bnb ms':>10}{'dense ms':>10}{'x dense':>8}"
          f"{'GB/s':>8}{'% read':>8}{'rel err':>10}")
    jobs = [(m, n, k, "nf4") for n, k in SHAPES for m in MS]
    jobs += [(m, n, k, t) for t in args.ggml_types.split(",") if t for n, k in SHAPES for m in MS
             if k % GGML_TYPES[t][1] == 0]
    for m, n, k, kind in jobs:
        try:
            r = bench(m, n, k, DTYPES[args.dtype]) if kind == "nf4" else bench_ggml(m, n, k, kind, DTYPES[args.dtype])
        except Exception as e:  # one broken kernel must not hide the others' rows (a first run on a new GPU)
            failed += 1
            rows.append({"kernel": kind, "m": m, "n": n, "k": k, "error": f"{type(e).__name__}: {e}"})
            print(f"{kind:>7}{m:>5}{n:>7}{k:>7}  FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r["ok"] = r["rel_err"] < (1e-4 if args.dtype == "fp32" else 2e-2)
        failed += not r["ok"]
        rows.append(r)
        if args.json:  # written as it goes: a run cut short keeps its rows
            args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "read_gbps": read,
                                             "results": rows, "complete": False}, indent=1))
        bnb = "-" if r["bnb_ms"] is None else f"{r['bnb_ms']:.4f}"
        print(f"{kind:>7}{m:>5}{n:>7}{k:>7}{r['ours_ms']:>10.4f}{bnb:>10}{r['dense_ms']:>10.4f}"
              f"{r['dense_ms'] / r['ours_ms']:>8.2f}{r['ours_gbps']:>8.0f}{100 * r['ours_gbps'] / read:>7.0f}%"
              f"{r['rel_err']:>10.1e}{'' if r['ok'] else '  WRONG'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "read_gbps": read,
                                         "results": rows, "complete": True}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
