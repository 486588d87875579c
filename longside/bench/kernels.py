"""`longside bench kernels [--quick] [--model] --json PATH`: NF4 and GGUF-block (native)
matmuls against dense fp32 `F.linear` (and NF4 against bitsandbytes), on this machine, in
one run.

Every ratio is against a baseline measured in the same run; `read_gbps` is the machine's
streaming read bandwidth measured here too, so `ours_gbps / read_gbps` says how close the
decode kernel comes to the memory bound. Each timing is the median of several calls after
a warm-up. The fp32 baseline multiplies by the dequantized weight, so its output is also
the reference the kernel output is checked against (`max_abs_err` <= `tolerance`).

GGUF rows (`op` "ggml_int8": fused decode kernel on int8 activations, "ggml_int8_lanes": the
same on Q4 blocks in the lanes layout the loader keeps them in, "ggml_fp32": fused
on exact fp32 activations, "ggml_tiled": exact tiles + BLAS) use random blocks with
finite scales (speed does not depend on the values); the fp32 baseline multiplies by
their exact dequantization, and `max_rel_err` is against it.

`--model` also runs SmolLM2-135M natively (its GGUF blocks) and with every decoder linear
in NF4: perplexity on a held-out text against the dense fp32 copy, greedy decode tokens/s,
and weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longside.bench.kernels_model import bench_model
from longside.errors import LongsideError
from longside.kernels import cpu, ggml_cpu
from longside.kernels.ggml import GGML_TYPES, GGMLWeight, can_pack_lanes, pack_lanes, random_weight
from longside.kernels.gguf_linear import FUSED_MAX_M as GGML_FUSED_MAX_M, INT8_MAX_M as GGML_INT8_MAX_M
from longside.kernels.nf4 import quantize_nf4
from longside.kernels.ops import CPU_FUSED_MAX_M, dequantize, matmul_nf4
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336)]
MS = (1, 8, 512)
SMOKE_SHAPES = [(192, 576), (100, 320)]
GGML_BENCH_TYPES = ("Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K")


def _time_ms(fn: Callable[[], object], budget_s: float, max_reps: int = 50) -> dict:
    """Wall times of `fn` in ms: one warm-up call, then as many calls as fit `budget_s` ->
    {"median", "min", "max", "repeats"} (rows report the median and keep the spread)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "min": round(min(times), 4), "max": round(max(times), 4),
            "repeats": reps}


def read_bandwidth_gbps(mbytes: int = 512, reps: int = 5) -> float:
    """Streaming read bandwidth (GB/s): best of `reps` multithreaded sums of a buffer far
    larger than the last-level cache."""
    buf = torch.ones(mbytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def _bnb_fn(w: torch.Tensor, x: torch.Tensor) -> Callable[[], object] | None:
    try:
        import bitsandbytes as bnb  # optional: the comparison row only; slow to import
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    q, state = bf.quantize_4bit(w, quant_type="nf4", blocksize=64)
    return lambda: bnb.matmul_4bit(x, q.t(), quant_state=state)


def bench_shape(m: int, n: int, k: int, budget_s: float, with_bnb: bool) -> dict:
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) * 0.02
    qw = quantize_nf4(w)
    w_dense = dequantize(qw)  # the fp32 baseline multiplies by exactly the quantized weight
    x = torch.randn(m, k, generator=g)
    y = matmul_nf4(x, qw, qw.absmax)
    ref = F.linear(x, w_dense)
    err = (y - ref).abs().max().item()
    tol = 2e-5 * x.abs().max().item() * qw.absmax.max().item() * k + 1e-6
    timings = {"ours": _time_ms(lambda: matmul_nf4(x, qw, qw.absmax), budget_s),
               "fp32": _time_ms(lambda: F.linear(x, w_dense), budget_s)}
    if with_bnb and (fn := _bnb_fn(w, x)) is not None:
        timings["bnb"] = _time_ms(fn, budget_s / 2, max_reps=5)
    ours, fp32 = timings["ours"]["median"], timings["fp32"]["median"]
    bnb = timings["bnb"]["median"] if "bnb" in timings else None
    weight_bytes = qw.packed.numel() + qw.absmax.numel() * 4
    return {"op": "nf4_fused" if m <= CPU_FUSED_MAX_M else "nf4_tiled", "m": m, "n": n, "k": k,
            "ours_ms": round(ours, 4), "fp32_ms": round(fp32, 4), "bnb_ms": None if bnb is None else round(bnb, 4),
            "ours_gbps": round(weight_bytes / ours / 1e6, 4), "speedup_vs_fp32": round(fp32 / ours, 2),
            "speedup_vs_bnb": None if bnb is None else round(bnb / ours, 2),
            "max_abs_err": err, "tolerance": tol,
            "spread_ms": {k: {f: t[f] for f in ("min", "max", "repeats")} for k, t in timings.items()}}


def bench_ggml_shape(m: int, n: int, k: int, qtype: str, budget_s: float) -> list[dict]:
    """One row per path that runs at this M: the fused int8 kernel (M <= its limit), the fused
    fp32 kernel (M <= the fused limit), the tiled GEMM above it; each against F.linear on the
    exact weight."""
    w = random_weight(qtype, n, k, seed=n * 31 + k)
    w_dense = ggml_cpu.dequantize_rows(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = F.linear(x, w_dense)
    fp32 = _time_ms(lambda: F.linear(x, w_dense), budget_s)["median"]
    paths = {}
    if qtype in ggml_cpu.INT8_TYPES and m <= GGML_INT8_MAX_M:
        paths["ggml_int8"] = lambda: ggml_cpu.gemv_int8(x, w)
        if can_pack_lanes(qtype, n):
            lanes = GGMLWeight(pack_lanes(w.blocks, qtype), qtype, w.shape, packed=True)
            paths["ggml_int8_lanes"] = lambda: ggml_cpu.gemv_int8(x, lanes)
    if m <= GGML_FUSED_MAX_M:
        paths["ggml_fp32"] = lambda: ggml_cpu.gemv_f32(x, w)
    else:
        paths["ggml_tiled"] = lambda: ggml_cpu.gemm_tiled(x, w)
    rows = []
    for op, fn in paths.items():
        t = _time_ms(fn, budget_s)
        rows.append({"op": op, "qtype": qtype, "m": m, "n": n, "k": k, "ours_ms": round(t["median"], 4),
                     "fp32_ms": round(fp32, 4), "bnb_ms": None, "speedup_vs_fp32": round(fp32 / t["median"], 2),
                     "speedup_vs_bnb": None, "ours_gbps": round(w.blocks.numel() / t["median"] / 1e6, 4),
                     "max_rel_err": float((fn() - ref).abs().max() / ref.abs().max()),
                     "spread_ms": {f: t[f] for f in ("min", "max", "repeats")}})
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict) -> None:
    print(f"read bandwidth {report['read_gbps']:.1f} GB/s, {report['threads']} threads, kernel path {report['isa']}")
    print(f"{'op':<22}{'m':>5}{'n':>7}{'k':>7}{'ours ms':>10}{'fp32 ms':>10}{'bnb ms':>10}"
          f"{'x fp32':>8}{'x bnb':>8}{'GB/s':>7}{'% read':>8}")
    for r in report["results"]:
        op = r["op"] + (f" {r['qtype']}" if "qtype" in r else "")
        print(f"{op:<22}{r['m']:>5}{r['n']:>7}{r['k']:>7}{r['ours_ms']:>10.3f}{r['fp32_ms']:>10.3f}"
              f"{_fmt(r['bnb_ms'], '10.3f'):>10}{r['speedup_vs_fp32']:>8.2f}{_fmt(r['speedup_vs_bnb'], '8.1f'):>8}"
              f"{r['ours_gbps']:>7.1f}{100 * r['ours_gbps'] / report['read_gbps']:>7.0f}%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="longside bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short timings, bitsandbytes only where it is fast (<1 min)")
    p.add_argument("--smoke", action="store_true", help="two tiny shapes only (used by the test suite)")
    p.add_argument("--model", action="store_true", help="also SmolLM2-135M end to end (perplexity, decode speed, memory)")
    p.add_argument("--text", type=Path, default=None, help="held-out text for --model perplexity")
    p.add_argument("--ggml-types", default=",".join(GGML_BENCH_TYPES),
                   help="GGUF block types to time (comma-separated; empty: none)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")
    run = RunRecord.start(["longside", "bench", "kernels", *(argv if argv is not None else sys.argv[1:])])
    if not cpu.available():
        raise LongsideError(f"the NF4 CPU kernel is not built: {cpu.BUILD_HINT}")
    qtypes = [t for t in args.ggml_types.split(",") if t]
    if qtypes and not ggml_cpu.available():
        raise LongsideError(f"the GGUF CPU kernel is not built: {ggml_cpu.BUILD_HINT}")
    for t in qtypes:
        if t not in GGML_TYPES:
            raise LongsideError(f"--ggml-types: {t!r} is not one of {', '.join(GGML_TYPES)}")

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    budget = 0.05 if args.smoke else 0.3 if args.quick else 1.5
    report = {"read_gbps": round(read_bandwidth_gbps(64 if args.smoke else 512), 2),
              "threads": torch.get_num_threads(), "isa": cpu.isa(), "fused_max_m": CPU_FUSED_MAX_M,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              # Other processes on these cores skew every timing; say how busy it was.
              "loadavg_1min_before": round(os.getloadavg()[0], 2), "results": []}

    jobs = [(m, n, k) for n, k in shapes for m in MS]
    for m, n, k in tqdm(jobs, desc="bench kernels", leave=False):
        # bitsandbytes on CPU takes ~0.1 s per big product; --quick keeps it to small ones.
        with_bnb = not args.quick or n * k * m <= 576 * 1536 * 512 or m == 1
        report["results"].append(bench_shape(m, n, k, budget, with_bnb and not args.smoke))
    report["ggml_isa"] = ggml_cpu.isa() if qtypes else None
    jobs = [(m, n, k, t) for t in qtypes for n, k in shapes for m in MS if k % GGML_TYPES[t][1] == 0]
    for m, n, k, t in tqdm(jobs, desc="bench ggml", leave=False):
        report["results"].extend(bench_ggml_shape(m, n, k, t, budget))
    report["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print_table(report)
    if args.model:
        report["model"] = bench_model(args.text, quick=args.quick)
        print(json.dumps(report["model"], indent=1))
    report["provenance"] = run.finish()
    if args.json:
        write_json(report, args.json, indent=1)
        print(f"wrote {args.json}")
    return 0
