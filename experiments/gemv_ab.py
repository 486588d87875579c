"""Two builds of the compiled kernels timed against each other on SmolLM2's own int8 products,
in one process, repeats alternating between the libraries (a shared VM's speed drifts within
minutes; runs minutes apart cannot separate a change of a few tens of percent).

    git show OLD:kernels/ggml_cpu.c > /tmp/old/ggml_cpu.c; git show OLD:kernels/decode_cpu.c > /tmp/old/decode_cpu.c
    gcc -O3 -std=c11 -ffp-contract=off -fopenmp -shared -fPIC /tmp/old/*.c -o /tmp/a.so -lm
    python experiments/gemv_ab.py /tmp/a.so kernels/_ggml_cpu*.so [--rows 1 8 64] [--repeats 40] [--b-lanes] [--json PATH]

One repeat is every product of the 30 blocks (q, k, v, o, gate, up, down: the GGUF's 210 Q4_1
tensors) on `--rows` random x rows, through `ggml_gemv_int8` on the best instruction set here,
2 threads. Per library and row count: min and median time of a repeat, and the median of the
paired ratios B/A (repeat i on B over repeat i on A, run back to back). Both read the blocks in
the file's order, unless `--b-lanes`: B then reads them in the lanes layout (kernels/ggml.py;
a build that knows `LANES_PACKED`), so A = an older build and B = this one compares the two as
users get them, and A = B = this build the layout alone.
"""

import argparse
import ctypes
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from longside.backbone import load_backbone
from longside.kernels import ggml_cpu
from longside.kernels.ggml import GGMLWeight, can_pack_lanes, pack_lanes, type_info
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def _load(path: str) -> ctypes.CDLL:
    # a private copy: two files of one name would otherwise be the same loaded library
    folder = tempfile.mkdtemp()
    copy = os.path.join(folder, os.path.basename(path))
    shutil.copy(path, copy)
    return ctypes.CDLL(copy)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--b-lanes", action="store_true", help="B reads the blocks in the lanes layout")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    check_output_file(args.json, "--json")
    for p in (args.a, args.b):
        if not os.path.isfile(p):
            sys.exit(f"no library at {p}: build it first (see the docstring)")
    run = RunRecord.start()
    torch.set_num_threads(2)
    libs = [_load(args.a), _load(args.b)]
    bb = load_backbone("smollm2-135m")
    weights = []
    for layer in bb.parts.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [x.ggml_weight() for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)]
    weights = [GGMLWeight(w.file_blocks(), w.qtype, w.shape) for w in weights]  # the loader packs them
    lanes = [GGMLWeight(pack_lanes(w.blocks, w.qtype), w.qtype, w.shape, packed=True)
             if args.b_lanes and can_pack_lanes(w.qtype, w.shape[0]) else w for w in weights]
    isa = ggml_cpu._isa_level()
    report = {"a": args.a, "b": args.b, "isa": ggml_cpu.isa(), "products": len(weights), "threads": 2,
              "b_layout": "lanes" if args.b_lanes else "file order", "rows": {}}
    for M in args.rows:
        xs = {k: torch.randn(M, k) for k in {w.shape[1] for w in weights}}
        ys = {n: torch.empty(M, n) for n in {w.shape[0] for w in weights}}
        calls = [[], []]
        for i, ws in enumerate((weights, lanes if args.b_lanes else weights)):
            for w in ws:
                n, k = w.shape
                calls[i].append((type_info(w.qtype)[0] | (ggml_cpu.LANES_PACKED if w.packed else 0),
                                 ctypes.c_void_p(w.blocks.data_ptr()), ctypes.c_int64(w.row_bytes),
                                 ctypes.c_void_p(xs[k].data_ptr()), ctypes.c_int64(k), ctypes.c_int64(M),
                                 ctypes.c_void_p(ys[n].data_ptr()), ctypes.c_int64(n), ctypes.c_int64(n),
                                 ctypes.c_int64(k), ctypes.c_int(2), ctypes.c_int(isa)))
        times = [[], []]
        for rep in range(args.repeats + 2):
            for i, lib in enumerate(libs):
                f = lib.ggml_gemv_int8
                t = time.perf_counter()
                for c in calls[i]:
                    f(*c)
                if rep >= 2:  # two warm-up repeats
                    times[i].append(time.perf_counter() - t)
        ratios = [b / a for a, b in zip(*times)]
        row = {f"{name}_ms": {"min": round(min(t) * 1e3, 3), "median": round(statistics.median(t) * 1e3, 3)}
               for name, t in zip("ab", times)}
        row["b_over_a_median"] = round(statistics.median(ratios), 3)
        report["rows"][str(M)] = row
        print(f"rows {M}: A {row['a_ms']['median']} ms, B {row['b_ms']['median']} ms (medians), "
              f"B/A {row['b_over_a_median']}", flush=True)
    report["provenance"] = run.finish()
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
