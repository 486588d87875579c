"""Decode speed against llama.cpp in pairs, in one process: on a machine whose speed drifts
(a shared VM), rows timed minutes apart by `longside bench generate` can differ by more than
what separates the two programs. Here both are loaded once and timed in turn, A B B A ...,
each pair giving one ratio; the median ratio is the figure to quote, the spread shows the noise.

    python experiments/decode_pairs.py [--memory-tokens 0] [--pairs 9] [--new-tokens 64] [--file-order] [--json PATH]

`--file-order` adds a third program to every round: longside with its Q4 blocks left in the
file's order (no lanes layout, kernels/ggml.py), so one run shows what the layout changes.

Each timing is the bench's: decode = N / (t(1 + N) - t(1)), greedy, a 128-token prompt of the
held-out books, 2 threads; longside is the shipped checkpoint on the GGUF's blocks, with memory
filled as `bench generate --quick` fills it; llama.cpp runs the very same GGUF file
(llama-cpp-python, `pip install 'longside[bench]'`).
"""

import argparse
import json
import statistics
import sys
import time
from unittest import mock

import torch

from longside.bench.generate import QUICK_FILL, _llamacpp_row, _longside_row, _texts
from longside.kernels.gguf_linear import GGUFLinear
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def _decode_speed(gen, prompt: torch.Tensor, n: int) -> float:
    t = time.perf_counter()
    gen(prompt, 1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    gen(prompt, 1 + n)
    return n / max(time.perf_counter() - t - t1, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-tokens", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--file-order", action="store_true", help="also time longside with the blocks in the file's order")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start(["python", "experiments/decode_pairs.py", *sys.argv[1:]])
    torch.set_num_threads(args.threads)
    ours, extra = _longside_row("longside-native", args.memory_tokens, True)
    tok = extra.pop("tokenizer")
    programs = [("longside", ours)]
    if args.file_order:
        with mock.patch.object(GGUFLinear, "pack_lanes", lambda self: False):
            programs.append(("longside-file-order", _longside_row("longside-native", args.memory_tokens, True)[0]))
    theirs, _ = _llamacpp_row(args.prompt_tokens + args.new_tokens + 16)
    programs.append(("llama.cpp", theirs))
    ids, _ = _texts(max(args.memory_tokens, QUICK_FILL) + 2048 + args.prompt_tokens, tok)
    prompt = torch.tensor([ids[-args.prompt_tokens:]])
    for _, gen in programs:  # warm-up
        gen(prompt[:, :8], 2)
        gen(prompt, 4)
    pairs = []
    for i in range(args.pairs):
        order = programs[i % len(programs):] + programs[:i % len(programs)]  # each goes first in turn
        order = order[:: 1 if i % 2 == 0 else -1]
        speeds = {name: _decode_speed(gen, prompt, args.new_tokens) for name, gen in order}
        pairs.append({k: round(v, 2) for k, v in speeds.items()} | {
            "ratio": round(speeds["longside"] / speeds["llama.cpp"], 3)})
        if args.file_order:
            pairs[-1] |= {"file_order_ratio": round(speeds["longside-file-order"] / speeds["llama.cpp"], 3),
                          "lanes_over_file_order": round(speeds["longside"] / speeds["longside-file-order"], 3)}
        print(pairs[-1], flush=True)
    ratios = [p["ratio"] for p in pairs]
    report = {
        "benchmark": "decode pairs against llama.cpp (one process, alternating)",
        "memory_tokens": args.memory_tokens, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "threads": args.threads, "pairs": pairs,
        "ratio_median": round(statistics.median(ratios), 3), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "longside_median_tokens_per_s": round(statistics.median(p["longside"] for p in pairs), 2),
        "llamacpp_median_tokens_per_s": round(statistics.median(p["llama.cpp"] for p in pairs), 2),
        **({"file_order_ratio_median": statistics.median(p["file_order_ratio"] for p in pairs),
            "lanes_over_file_order_median": statistics.median(p["lanes_over_file_order"] for p in pairs),
            "file_order_median_tokens_per_s": round(statistics.median(p["longside-file-order"] for p in pairs), 2)}
           if args.file_order else {}),
        "model_note": extra.get("model_note"), "memory_fill": extra.get("memory_fill"),
        "provenance": run.finish(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "pairs"}, indent=1))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
