"""Backbone memory's segment reads a slice of queries at a time, or all at once: memorize time.

    python experiments/backbone_memory_read_slice.py [--memory-tokens 8192] [--tokens 4096] [--pairs 2] [--json PATH]

A forward of many tokens (a segment being memorized, a prompt) reads backbone memory through
the hooked forward; `nn/backbone_memory.py` retrieves and attends `READ_SLICE` query tokens at a
time. This times memorizing with the shipped checkpoint and backbone memory 15-29: each run
starts from a fresh memory holding the first `--memory-tokens` of held-out Austen (untimed) and
times memorizing the next `--tokens`, alternating READ_SLICE = 128 (the default) and a whole
segment at once, `--pairs` times. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from longside.bench.generate import _texts
from longside.loading import load_model
from longside.nn import backbone_memory
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-tokens", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start()
    model, info = load_model()
    model.use_backbone_memory(range(15, 30))
    ids, source = _texts(args.memory_tokens + args.tokens, model.backbone.tokenizer)
    default = backbone_memory.READ_SLICE
    settings = {f"slice {default}": default, "whole segment": 1 << 30}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.pairs):
        for name, size in settings.items():
            model.reset_memory()
            backbone_memory.READ_SLICE = size
            model.memory.write_ids(ids[:args.memory_tokens])
            t = time.perf_counter()
            model.memory.write_ids(ids[args.memory_tokens:])
            seconds[name].append(round(time.perf_counter() - t, 2))
    backbone_memory.READ_SLICE = default
    rows = {name: {"seconds": s, "tokens_per_s_median": round(args.tokens / statistics.median(s), 1)}
            for name, s in seconds.items()}
    a, b = (statistics.median(s) for s in seconds.values())
    report = {"experiment": "backbone_memory_read_slice", "memory_tokens": args.memory_tokens,
              "tokens": args.tokens, "text": source, "checkpoint": info["note"], "rows": rows,
              "time_slice_over_whole": round(a / b, 3), "provenance": run.finish(pairs=args.pairs)}
    print(json.dumps(report, indent=1))
    if args.json:
        write_json(report, args.json, indent=1)


if __name__ == "__main__":
    main()
