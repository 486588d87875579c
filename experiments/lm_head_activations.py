"""The LM head on int8 or fp32 activations: what each costs in perplexity and in time.

    python experiments/lm_head_activations.py [--segments 8] [--window 1024] [--repeats 30] [--json PATH]

SmolLM2-135M on its GGUF blocks, 8 segments of 1024 tokens of The Tempest (the text and
segments of `longside bench kernels --model`): the exact read (segments: exact tiles + BLAS),
then the decode kernels forced over whole segments (every product on int8 activations, as
decoding runs them) with the LM head on fp32 activations, then with it on int8 too. And in
the same run, the head's one-row product (49152 x 576 Q8_0, the file's order) on fp32
activations (`gemv_f32`) and on int8 ones (`gemv_int8`): median and best of `--repeats`.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from longside.bench import kernels_model
from longside.kernels import ggml_cpu
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start(["python", "experiments/lm_head_activations.py", *sys.argv[1:]])
    torch.set_num_threads(args.threads)
    model, tok = kernels_model._load_smollm2("native")
    text, source = kernels_model.held_out_text(None)
    n = args.segments * args.window
    ids = torch.tensor(tok(text[: n * 8])["input_ids"][:n])
    head = model.get_output_embeddings()
    ppl = {"exact": kernels_model.perplexity(model, ids, args.window)}
    with kernels_model._decode_kernels_everywhere(model):  # the head too, as a decode step runs it
        for kind in ("fp32", "int8"):
            head.activations = kind
            ppl[f"decode_kernels_head_{kind}"] = kernels_model.perplexity(model, ids, args.window)
    head.activations = "int8"  # the loader's default
    w = head.ggml_weight()
    x = torch.randn(1, w.shape[1], generator=torch.Generator().manual_seed(0))
    times = {}
    for f in (ggml_cpu.gemv_f32, ggml_cpu.gemv_int8, ggml_cpu.gemv_f32, ggml_cpu.gemv_int8):
        for _ in range(3):
            f(x, w)
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            f(x, w)
            ts.append(time.perf_counter() - t)
        times.setdefault(f.__name__, []).extend(ts)
    report = {
        "benchmark": "LM head activations: perplexity of the decode kernels and the head's one-row product",
        "text": source, "tokens": int(ids.numel()), "window": args.window,
        "perplexity": {k: round(v, 4) for k, v in ppl.items()},
        "perplexity_vs_exact": {k: f"{(v / ppl['exact'] - 1) * 100:+.2f}%" for k, v in ppl.items() if k != "exact"},
        "head": {"qtype": w.qtype, "shape": list(w.shape), "packed": bool(w.packed)},
        "head_product_ms": {k: {"median": round(statistics.median(v) * 1e3, 3), "best": round(min(v) * 1e3, 3)}
                            for k, v in times.items()},
        "provenance": run.finish(),
    }
    report["head_int8_over_fp32_time"] = round(report["head_product_ms"]["gemv_int8"]["median"]
                                               / report["head_product_ms"]["gemv_f32"]["median"], 3)
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
